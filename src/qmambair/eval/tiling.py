"""Tiled inference: MambaIR's tester tiling, seam-free blended tiles, and numpy-in/numpy-out ``restore``.

Two tilings (``mode``):

- ``"mambair"`` reproduces MambaIR's test-time tiling exactly (docs/evaluation.md §3.1). Our reading of it,
  for an LR input of h x w and threshold ``tile`` (200 in the tester), per axis (shown for rows)::

      n     = h // tile + 1                 tiles along the axis
      pad   = (n - h % n) % n               reflect padding at the bottom (right for columns)
      split = (h + pad) // n                core size: cores [i*split, (i+1)*split) partition the padded axis
      shave = split // 10                   each tile reaches this far into each existing neighbour
      tile i reads [i*split - shave*(i > 0), (i+1)*split + shave*(i < n-1))

  Tiles run one at a time, each keeps only its own core (scaled by the SR factor), no blending; the result is
  cropped back to (s*h) x (s*w). Statistics-based quantizers (DLS) see one tile per call, as in the paper.
- ``"blend"``: tiles of ``tile`` x ``tile`` LR pixels on a grid with ``overlap`` pixels shared between
  neighbours (the last tile is shifted to end at the border). Each tile's output is weighted by a separable
  raised-cosine ramp over the shared band (weight 1 elsewhere and at image borders) and the weighted sum is
  divided by the sum of weights, so weights sum to one everywhere and there are no seams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MODES = ("mambair", "blend")
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 full-range luma, as PIL's "L" and OpenCV's grey conversion


@dataclass(frozen=True)
class AxisTile:
    """One tile along one axis: it reads [start, stop) and keeps [core_start, core_stop) (LR pixels)."""

    start: int
    stop: int
    core_start: int
    core_stop: int


def mambair_axis(length: int, tile: int = 200) -> tuple[int, list[AxisTile]]:
    """MambaIR tester tiling of one axis: (reflect padding at the end, tiles over the padded axis)."""
    if tile < 2:
        raise ValueError(f"tile must be >= 2, got {tile}")
    n = length // tile + 1
    pad = (n - length % n) % n
    split = (length + pad) // n
    shave = split // 10
    tiles = []
    for i in range(n):
        start = i * split - (shave if i > 0 else 0)
        stop = (i + 1) * split + (shave if i < n - 1 else 0)
        tiles.append(AxisTile(start, stop, i * split, (i + 1) * split))
    return pad, tiles


def blend_axis(length: int, tile: int, overlap: int) -> list[AxisTile]:
    """Blend tiling of one axis: tiles of ``tile`` pixels, stride ``tile - overlap``, the last one flush."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if length <= tile:
        return [AxisTile(0, length, 0, length)]
    starts = list(range(0, length - tile + 1, tile - overlap))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return [AxisTile(s, s + tile, s, s + tile) for s in starts]


def _ramp(size: int, band: int, rise: bool, fall: bool) -> torch.Tensor:
    """Weights of one tile along one axis (output pixels): raised cosine over ``band`` on the shared sides."""
    w = torch.ones(size, dtype=torch.float64)
    if band > 0:
        r = (torch.arange(size, dtype=torch.float64) + 0.5) / band
        if rise:
            w = torch.minimum(w, 0.5 - 0.5 * torch.cos(math.pi * r.clamp(max=1.0)))
        if fall:
            w = torch.minimum(w, 0.5 - 0.5 * torch.cos(math.pi * r.flip(0).clamp(max=1.0)))
    return w


def _axis_weights(tiles: list[AxisTile], scale: int, overlap: int) -> list[torch.Tensor]:
    last = len(tiles) - 1
    return [_ramp((t.stop - t.start) * scale, overlap * scale, k > 0, k < last) for k, t in enumerate(tiles)]


def _run(model: nn.Module, x: torch.Tensor, scale: int | None) -> tuple[torch.Tensor, int]:
    """One forward pass; returns the output and the (checked) integer scale factor."""
    out = model(x)
    h, w = x.shape[-2:]
    s = out.shape[-2] // h
    if out.shape[-2] != s * h or out.shape[-1] != s * w or s < 1:
        raise ValueError(f"model maps {h}x{w} to {tuple(out.shape[-2:])}: not an integer scale")
    if scale is not None and s != scale:
        raise ValueError(f"model scale changed between tiles ({scale} then {s})")
    return out, s


def _tile_mambair(model: nn.Module, x: torch.Tensor, tile: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    pad_h, rows = mambair_axis(h, tile)
    pad_w, cols = mambair_axis(w, tile)
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
    out: torch.Tensor | None = None
    s: int | None = None
    for r in rows:
        for c in cols:
            y, s = _run(model, x[..., r.start : r.stop, c.start : c.stop], s)
            if out is None:
                out = y.new_zeros(*y.shape[:2], x.shape[-2] * s, x.shape[-1] * s)
            r0, c0 = (r.core_start - r.start) * s, (c.core_start - c.start) * s
            rn, cn = (r.core_stop - r.core_start) * s, (c.core_stop - c.core_start) * s
            out[..., r.core_start * s : r.core_stop * s, c.core_start * s : c.core_stop * s] = (
                y[..., r0 : r0 + rn, c0 : c0 + cn]
            )
    assert out is not None and s is not None
    return out[..., : h * s, : w * s]


def _tile_blend(model: nn.Module, x: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    rows, cols = blend_axis(h, tile, overlap), blend_axis(w, tile, overlap)
    acc: torch.Tensor | None = None
    s: int | None = None
    row_w: list[torch.Tensor] = []
    col_w: list[torch.Tensor] = []
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            y, s = _run(model, x[..., r.start : r.stop, c.start : c.stop], s)
            if acc is None:
                acc = torch.zeros(*y.shape[:2], h * s, w * s, dtype=torch.float64, device=y.device)
                row_w = _axis_weights(rows, s, overlap)
                col_w = _axis_weights(cols, s, overlap)
            weight = (row_w[i][:, None] * col_w[j][None, :]).to(y.device)
            acc[..., r.start * s : r.stop * s, c.start * s : c.stop * s] += y.double() * weight
    assert acc is not None and s is not None
    # The weights are separable and the tiles form a grid, so their sum is the outer product of 1-D sums.
    row_sum = torch.zeros(h * s, dtype=torch.float64)
    col_sum = torch.zeros(w * s, dtype=torch.float64)
    for t, wt in zip(rows, row_w, strict=True):
        row_sum[t.start * s : t.stop * s] += wt
    for t, wt in zip(cols, col_w, strict=True):
        col_sum[t.start * s : t.stop * s] += wt
    total = (row_sum[:, None] * col_sum[None, :]).to(acc.device)
    return (acc / total).to(x.dtype)


def restore_tiled(
    model: nn.Module,
    img_tensor: torch.Tensor,
    mode: str = "mambair",
    tile: int = 200,
    overlap: int | None = None,
) -> torch.Tensor:
    """Run ``model`` on (B, C, H, W) ``img_tensor`` tile by tile; returns (B, C', s*H, s*W).

    ``mode="mambair"``: MambaIR's tester tiling with threshold ``tile`` (``overlap`` must be None: it is fixed
    at a tenth of the tile core). ``mode="blend"``: ``tile`` x ``tile`` tiles sharing ``overlap`` pixels
    (default ``tile // 8``), blended with raised-cosine weights. Gradients are not disabled here.
    """
    if img_tensor.dim() != 4:
        raise ValueError(f"expected (B, C, H, W), got {tuple(img_tensor.shape)}")
    if mode == "mambair":
        if overlap is not None:
            raise ValueError("mode 'mambair' fixes the overlap (a tenth of the core); leave overlap=None")
        return _tile_mambair(model, img_tensor, tile)
    if mode == "blend":
        return _tile_blend(model, img_tensor, tile, tile // 8 if overlap is None else overlap)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def model_channels(model: nn.Module) -> int:
    """Input channels a model expects (``in_chans``/``config``, else the first conv's input channels)."""
    for value in (getattr(model, "in_chans", None), (getattr(model, "config", None) or {}).get("in_chans")):
        if isinstance(value, int):
            return value
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


def to_luma(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H, W, 1) BT.601 full-range luma (0.299 R + 0.587 G + 0.114 B)."""
    return (img[..., :3] @ np.asarray(LUMA, dtype=img.dtype))[..., None]


def restore(
    model: nn.Module,
    img: np.ndarray,
    tile: int | None = None,
    mode: str = "mambair",
    overlap: int | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Restore one image: numpy (H, W) or (H, W, C) in [0, 1] -> float32 (s*H, s*W[, C']) numpy, not clamped.

    Integer arrays (uint8/uint16) are scaled to [0, 1] first. Channels are matched to the model: a grey image
    into an RGB model is replicated to three channels and the result is turned back into grey (BT.601 luma);
    an RGB image into a grey model is converted to luma and the result is grey (H, W, 1) -- colour is dropped.
    Alpha is not handled here (pass RGB or grey). ``tile=None`` runs the whole image at once; otherwise see
    ``restore_tiled``. Puts the model in eval mode and runs under ``torch.inference_mode()``.
    """
    arr = np.asarray(img)
    if np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float32) / np.iinfo(arr.dtype).max
    arr = arr.astype(np.float32, copy=False)
    squeeze = arr.ndim == 2
    if squeeze:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"expected an (H, W), (H, W, 1) or (H, W, 3) image, got shape {arr.shape}")
    want = model_channels(model)
    grey_in = arr.shape[2] == 1
    if grey_in and want == 3:
        arr = np.repeat(arr, 3, axis=2)
    elif not grey_in and want == 1:
        arr = to_luma(arr)
    elif arr.shape[2] != want:
        raise ValueError(f"model takes {want} channels, image has {arr.shape[2]}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
    model.eval()
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None].to(device)
        y = model(x) if tile is None else restore_tiled(model, x, mode=mode, tile=tile, overlap=overlap)
        out = y[0].float().cpu().numpy().transpose(1, 2, 0)
    if grey_in and out.shape[2] == 3:
        out = to_luma(out)
    if squeeze and out.shape[2] == 1:
        out = out[..., 0]
    return np.ascontiguousarray(out, dtype=np.float32)
