"""Tiled inference: MambaIR tester arithmetic, exactness on position-independent nets, blending, restore()."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qmambair.eval.tiling import blend_axis, mambair_axis, restore, restore_tiled
from qmambair.models import build_model


class ConvSR(nn.Module):
    """Position-independent: conv 3x3 -> ReLU -> conv 3x3 -> PixelShuffle (receptive radius 2)."""

    def __init__(self, scale: int = 2, cin: int = 3, radius: int = 2):
        super().__init__()
        k = 3 if radius == 2 else 1
        self.body = nn.Sequential(
            nn.Conv2d(cin, 8, k, padding=k // 2), nn.ReLU(),
            nn.Conv2d(8, cin * scale * scale, k, padding=k // 2), nn.PixelShuffle(scale),
        )

    def forward(self, x):
        return self.body(x)


class TileMean(nn.Module):
    """Position-dependent on purpose: every output pixel is the mean of the whole tile (scale 1)."""

    def forward(self, x):
        return x.mean(dim=(-2, -1), keepdim=True).expand_as(x).clone()


class CallIndex(nn.Module):
    """Outputs the index of the call (scale 2): shows which tile wrote which output pixel."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        b, c, h, w = x.shape
        return torch.full((b, c, 2 * h, 2 * w), float(self.calls))


@pytest.mark.parametrize("tile", [2, 7, 37, 200])
def test_mambair_axis_cores_partition(tile):
    for length in list(range(1, 130)) + [199, 200, 201, 399, 400, 401, 450, 451, 1000]:
        pad, tiles = mambair_axis(length, tile)
        n = length // tile + 1
        assert len(tiles) == n
        assert pad < max(length, 2) and (length + pad) % n == 0
        split = (length + pad) // n
        shave = split // 10
        covered = []
        for i, t in enumerate(tiles):
            covered += range(t.core_start, t.core_stop)
            assert 0 <= t.start <= t.core_start < t.core_stop <= t.stop <= length + pad
            assert t.core_start - t.start == (shave if i > 0 else 0)
            assert t.stop - t.core_stop == (shave if i < n - 1 else 0)
        assert covered == list(range(length + pad)), "cores must cover each padded pixel exactly once"


def test_mambair_axis_worked_examples():
    pad, tiles = mambair_axis(450)
    assert pad == 0 and [(t.start, t.stop, t.core_start, t.core_stop) for t in tiles] == [
        (0, 165, 0, 150), (135, 315, 150, 300), (285, 450, 300, 450)]
    pad, tiles = mambair_axis(451)  # 3 tiles, padded to 453, split 151, shave 15
    assert pad == 2 and [(t.start, t.stop) for t in tiles] == [(0, 166), (136, 317), (287, 453)]
    pad, tiles = mambair_axis(120)
    assert pad == 0 and [(t.start, t.stop) for t in tiles] == [(0, 120)]


def test_mambair_mode_exact_tile_extents():
    x = torch.rand(1, 2, 45, 23, dtype=torch.float64)
    out = restore_tiled(TileMean(), x, mode="mambair", tile=20)
    # rows: 3 tiles, split 15, shave 1. cols: 2 tiles, reflect-padded to 24, split 12, shave 1.
    padded = torch.cat([x, x[..., 21:22]], dim=-1)
    rows = [((0, 16), (0, 15)), ((14, 31), (15, 30)), ((29, 45), (30, 45))]
    cols = [((0, 13), (0, 12)), ((11, 24), (12, 23))]
    for (r0, r1), (c0, c1) in rows:
        for (k0, k1), (d0, d1) in cols:
            mean = padded[..., r0:r1, k0:k1].mean(dim=(-2, -1), keepdim=True)
            torch.testing.assert_close(out[..., c0:c1, d0:d1], mean.expand(1, 2, c1 - c0, d1 - d0))


def test_mambair_mode_each_pixel_written_once():
    out = restore_tiled(CallIndex(), torch.rand(1, 1, 47, 61), mode="mambair", tile=20)
    assert out.shape == (1, 1, 94, 122)
    _, rows = mambair_axis(47, 20)
    pad_w, cols = mambair_axis(61, 20)
    expected = torch.zeros(94, (61 + pad_w) * 2)
    k = 0
    for r in rows:
        for c in cols:
            k += 1
            expected[2 * r.core_start : 2 * r.core_stop, 2 * c.core_start : 2 * c.core_stop] = k
    assert torch.equal(out[0, 0], expected[:, :122])


@pytest.mark.parametrize("size, tile", [((66, 92), 30), ((63, 84), 30), ((5, 7), 200)])
def test_mambair_mode_equals_untiled_for_conv_net(size, tile):
    torch.manual_seed(0)
    net = ConvSR(2).eval()
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        ref, out = net(x), restore_tiled(net, x, mode="mambair", tile=tile)
    assert out.shape == ref.shape == (2, 3, 2 * size[0], 2 * size[1])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(67, 95), (41, 3), (1, 1), (199, 2)])
def test_mambair_mode_per_pixel_net_any_size(size):
    torch.manual_seed(0)
    net = ConvSR(3, radius=0).eval()
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(restore_tiled(net, x, mode="mambair", tile=20), net(x), atol=1e-6, rtol=0)


def test_blend_axis():
    assert [(t.start, t.stop) for t in blend_axis(10, 16, 4)] == [(0, 10)]
    assert [(t.start, t.stop) for t in blend_axis(30, 12, 4)] == [(0, 12), (8, 20), (16, 28), (18, 30)]
    with pytest.raises(ValueError):
        blend_axis(30, 8, 8)


@pytest.mark.parametrize(
    "size, tile, overlap", [((37, 53), 16, 4), ((16, 16), 16, 4), ((9, 40), 8, 3), ((20, 21), 6, 0)]
)
def test_blend_weights_sum_to_one_and_per_pixel_exact(size, tile, overlap):
    torch.manual_seed(0)
    net = ConvSR(2, radius=0).eval()
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        out = restore_tiled(net, x, mode="blend", tile=tile, overlap=overlap)
        ones = restore_tiled(lambda t: torch.ones_like(t), x, mode="blend", tile=tile, overlap=overlap)
        torch.testing.assert_close(out, net(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(ones, torch.ones_like(x), atol=1e-6, rtol=0)


def _max_jump(diff: torch.Tensor) -> float:
    """Largest step between neighbouring pixels of an error image: a seam shows up as a big step."""
    rows = (diff[..., 1:, :] - diff[..., :-1, :]).abs().max()
    cols = (diff[..., :, 1:] - diff[..., :, :-1]).abs().max()
    return max(rows.item(), cols.item())


def test_blend_seams_small_on_real_model():
    # A random tiny MambaIR has a long memory (small dt) and global channel attention, so any tiling
    # changes its output; blending must keep that change small and smooth, unlike hard-edged tiles.
    torch.manual_seed(0)
    model = build_model("light-sr-x2", embed_dim=12, depths=(1,), d_state=4).eval()
    x = torch.rand(1, 3, 24, 20)
    with torch.no_grad():
        ref = model(x)
        blend = restore_tiled(model, x, mode="blend", tile=12, overlap=6)
        hard = restore_tiled(model, x, mode="blend", tile=12, overlap=0)
    assert blend.shape == ref.shape
    span = (ref.max() - ref.min()).item()
    err_blend, err_hard = (blend - ref).abs(), (hard - ref).abs()
    assert err_blend.max() < 0.1 * span and err_blend.mean() < 0.01 * span
    assert err_blend.mean() < 0.5 * err_hard.mean()
    assert _max_jump(blend - ref) < 0.3 * _max_jump(hard - ref)


def test_mambair_mode_rejects_overlap_and_bad_mode():
    with pytest.raises(ValueError, match="overlap"):
        restore_tiled(ConvSR(), torch.rand(1, 3, 8, 8), mode="mambair", tile=4, overlap=2)
    with pytest.raises(ValueError, match="mode"):
        restore_tiled(ConvSR(), torch.rand(1, 3, 8, 8), mode="nope", tile=4)


def test_restore_numpy_scale_and_channels():
    torch.manual_seed(0)
    rgb_net = ConvSR(2).eval()
    img = np.random.default_rng(0).random((11, 7, 3), dtype=np.float32)
    out = restore(rgb_net, img)
    assert out.shape == (22, 14, 3) and out.dtype == np.float32
    with torch.no_grad():
        ref = rgb_net(torch.from_numpy(img.transpose(2, 0, 1))[None])[0].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    np.testing.assert_allclose(restore(rgb_net, img, tile=4, mode="blend", overlap=2), ref, atol=0.2)
    # grey into an RGB model: replicated in, luma out; keeps the (H, W) layout
    grey = img[..., 0]
    out_g = restore(rgb_net, grey)
    assert out_g.shape == (22, 14)
    with torch.no_grad():
        rep = rgb_net(torch.from_numpy(np.repeat(grey[None, None], 3, axis=1)))[0].numpy()
    np.testing.assert_allclose(out_g, 0.299 * rep[0] + 0.587 * rep[1] + 0.114 * rep[2], atol=1e-5)
    # RGB into a grey model: luma in, one channel out
    grey_net = ConvSR(1, cin=1).eval()
    out_y = restore(grey_net, img)
    assert out_y.shape == (11, 7, 1)
    luma = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    with torch.no_grad():
        ref_y = grey_net(torch.from_numpy(luma)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(out_y[..., 0], ref_y, atol=1e-6)
    # uint8 input is scaled to [0, 1]
    u8 = (img * 255).round().astype(np.uint8)
    np.testing.assert_allclose(restore(rgb_net, u8), restore(rgb_net, u8.astype(np.float32) / 255), atol=1e-6)
    with pytest.raises(ValueError, match="image"):
        restore(rgb_net, np.zeros((4, 4, 4), np.float32))


def test_restore_tiny_mambair_tiled_matches_shapes():
    torch.manual_seed(0)
    model = build_model("light-sr-x3", embed_dim=12, depths=(1,), d_state=4)
    img = np.random.default_rng(1).random((9, 13, 3), dtype=np.float32)
    whole = restore(model, img)
    tiled = restore(model, img, tile=5)
    assert whole.shape == tiled.shape == (27, 39, 3)
    assert not torch.is_inference_mode_enabled()
