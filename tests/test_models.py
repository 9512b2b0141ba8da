"""MambaIR against the independent oracle (tests/official_mambair.py); names, counts, checkpoints."""

from __future__ import annotations

import pytest
import torch

from qmambair.loading import load_model
from qmambair.models import build_model
from qmambair.models.checkpoint import CheckpointError, save_model

from .official_mambair import mambair_forward

TOL = 1e-4


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its init (LayerNorms, skip scales, biases too) so that each one matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.mul_(1 + 0.2 * noise).add_(0.02 * torch.randn(p.shape, generator=gen))
    return model.eval()


def oracle_config(model) -> dict:
    cfg = dict(model.config)
    cfg.setdefault("img_range", 1.0)
    return cfg


def check_against_oracle(model, h: int, w: int, seed: int = 1) -> None:
    c = model.config.get("in_chans", 3)
    x = torch.rand(1, c, h, w, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(x)
    ref = mambair_forward(model.state_dict(), oracle_config(model), x)
    assert out.shape == ref.shape
    err = (out.double() - ref).abs().max().item()
    assert err <= TOL, f"max |MambaIR - oracle| = {err:.3g}"


@pytest.mark.parametrize(
    "name, overrides, size",
    [
        ("light-sr-x2", dict(depths=(1, 1)), (5, 7)),
        ("light-sr-x4", dict(depths=(1, 1)), (6, 5)),
        ("classic-sr-x3", dict(embed_dim=36, depths=(1, 1), d_state=4), (5, 3)),
        ("classic-sr-x2", dict(embed_dim=36, depths=(1,), d_state=4), (3, 4)),
        ("classic-sr-x4", dict(embed_dim=36, depths=(1,), d_state=4), (3, 5)),
        ("jpeg-gray-q10", dict(embed_dim=36, depths=(1, 1), d_state=4), (7, 4)),
        ("denoise-color-s25", dict(embed_dim=36, depths=(1,), d_state=4), (4, 6)),
    ],
)
def test_matches_oracle_reduced(name, overrides, size):
    torch.manual_seed(0)
    model = perturb(build_model(name, **overrides))
    check_against_oracle(model, *size)


def test_matches_oracle_full_light_x2_odd_input():
    torch.manual_seed(0)
    model = perturb(build_model("light-sr-x2"))
    check_against_oracle(model, 7, 9)


@pytest.mark.parametrize("size", [(1, 1), (1, 6), (5, 1)])
def test_single_pixel_rows_and_columns(size):
    torch.manual_seed(0)
    model = perturb(build_model("light-sr-x2", depths=(1,)))
    check_against_oracle(model, *size)


def test_parameter_counts():
    def count(model):
        return sum(p.numel() for p in model.parameters())

    assert count(build_model("light-sr-x2")) == 905_016
    assert count(build_model("light-sr-x4")) == 924_492
    classic = count(build_model("classic-sr-x2"))
    assert round(classic / 1e6, 2) == 20.42, classic


def official_light_x4_shapes() -> dict[str, tuple[int, ...]]:
    """The state-dict list of docs/method.md §1.5, written out by hand."""
    shapes: dict[str, tuple[int, ...]] = {
        "conv_first.weight": (60, 3, 3, 3), "conv_first.bias": (60,),
        "patch_embed.norm.weight": (60,), "patch_embed.norm.bias": (60,),
        "norm.weight": (60,), "norm.bias": (60,),
        "conv_after_body.weight": (60, 60, 3, 3), "conv_after_body.bias": (60,),
        "upsample.0.weight": (48, 60, 3, 3), "upsample.0.bias": (48,),
    }
    per_block = {
        "ln_1.weight": (60,), "ln_1.bias": (60,), "ln_2.weight": (60,), "ln_2.bias": (60,),
        "skip_scale": (60,), "skip_scale2": (60,),
        "self_attention.in_proj.weight": (144, 60),
        "self_attention.conv2d.weight": (72, 1, 3, 3), "self_attention.conv2d.bias": (72,),
        "self_attention.x_proj_weight": (4, 24, 72),
        "self_attention.dt_projs_weight": (4, 72, 4),
        "self_attention.dt_projs_bias": (4, 72),
        "self_attention.A_logs": (288, 10), "self_attention.Ds": (288,),
        "self_attention.out_norm.weight": (72,), "self_attention.out_norm.bias": (72,),
        "self_attention.out_proj.weight": (60, 72),
        "conv_blk.cab.0.weight": (30, 60, 1, 1), "conv_blk.cab.0.bias": (30,),
        "conv_blk.cab.1.weight": (30, 1, 3, 3), "conv_blk.cab.1.bias": (30,),
        "conv_blk.cab.3.weight": (60, 30, 1, 1), "conv_blk.cab.3.bias": (60,),
        "conv_blk.cab.4.weight": (60, 1, 3, 3), "conv_blk.cab.4.bias": (60,),
        "conv_blk.cab.5.attention.1.weight": (2, 60, 1, 1), "conv_blk.cab.5.attention.1.bias": (2,),
        "conv_blk.cab.5.attention.3.weight": (60, 2, 1, 1), "conv_blk.cab.5.attention.3.bias": (60,),
    }
    for g in range(4):
        shapes[f"layers.{g}.conv.weight"] = (60, 60, 3, 3)
        shapes[f"layers.{g}.conv.bias"] = (60,)
        for j in range(6):
            for k, s in per_block.items():
                shapes[f"layers.{g}.residual_group.blocks.{j}.{k}"] = s
    return shapes


def test_light_x4_state_dict_names_and_shapes():
    want = official_light_x4_shapes()
    model = build_model("light-sr-x4")
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(have) - set(want)) == [] and sorted(set(want) - set(have)) == []
    assert have == want
    sd = {k: torch.randn(s) for k, s in want.items()}
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.state_dict()["layers.3.residual_group.blocks.5.self_attention.A_logs"],
                       sd["layers.3.residual_group.blocks.5.self_attention.A_logs"])


def tiny(name="light-sr-x2", **kw):
    torch.manual_seed(0)
    return perturb(build_model(name, **{"embed_dim": 12, "depths": (1,), "d_state": 4, **kw}))


def test_eval_is_deterministic_and_drop_path_off():
    torch.manual_seed(0)
    model = perturb(build_model("light-sr-x2", embed_dim=12, depths=(2, 2), d_state=4, drop_path_rate=0.9))
    plain = build_model("light-sr-x2", embed_dim=12, depths=(2, 2), d_state=4, drop_path_rate=0.0).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.rand(1, 3, 5, 6)
    with torch.no_grad():
        a, b, c = model(x), model(x), plain(x)
    assert torch.equal(a, b)
    assert torch.equal(a, c)
    model.train()
    torch.manual_seed(3)
    with torch.no_grad():
        outs = [model(x) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:]), "drop path should be active in training"


# ---- checkpoints -------------------------------------------------------------------------------------------


def _out(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("key", ["params", "params_ema"])
def test_basicsr_checkpoint_loads_without_arguments(tmp_path, key):
    model = tiny()
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "net_g.pth"
    torch.save({key: sd}, path)
    loaded = load_model(path)
    x = torch.rand(1, 3, 5, 7)
    assert not loaded.training
    assert torch.equal(_out(loaded, x), _out(model, x))


def test_basicsr_checkpoint_prefers_ema(tmp_path):
    model, other = tiny(), tiny()
    perturb(other, seed=5)
    path = tmp_path / "both.pth"
    torch.save({"params": other.state_dict(), "params_ema": model.state_dict()}, path)
    x = torch.rand(1, 3, 4, 4)
    assert torch.equal(_out(load_model(path), x), _out(model, x))


@pytest.mark.parametrize("name", ["light-sr-x3", "jpeg-gray-q10"])
def test_save_load_round_trip(tmp_path, name):
    model = tiny(name, embed_dim=36 if name.startswith("jpeg") else 12)
    path = save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(path)
    assert loaded.config == model.config
    c = model.config["in_chans"]
    x = torch.rand(1, c, 5, 3)
    assert torch.equal(_out(loaded, x), _out(model, x))


def test_mismatched_file_names_keys_and_preset(tmp_path):
    sd = build_model("light-sr-x4").state_dict()
    sd.pop("layers.0.residual_group.blocks.0.skip_scale")
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save({"params": sd}, path)
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    msg = str(info.value)
    assert "missing" in msg and "layers.0.residual_group.blocks.0.skip_scale" in msg
    assert "unexpected" in msg and "extra.weight" in msg
    assert "light-sr-x4" in msg


def test_wrong_preset_names_fitting_preset(tmp_path):
    path = tmp_path / "x4.pth"
    torch.save({"params": build_model("light-sr-x4").state_dict()}, path)
    with pytest.raises(CheckpointError) as info:
        load_model(path, preset="light-sr-x2")
    msg = str(info.value)
    assert "upsample.0.weight" in msg and "light-sr-x4" in msg


@pytest.mark.parametrize(
    "filename, content, words",
    [
        ("empty.pth", b"", "empty"),
        ("corrupt.pth", b"\x00\x01garbage" * 50, "cannot be read"),
        ("corrupt.safetensors", b"{not json" * 20, "safetensors"),
    ],
)
def test_corrupt_files_raise_clear_error(tmp_path, filename, content, words):
    path = tmp_path / filename
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=words):
        load_model(path)


def test_corrupt_safetensors_with_preset(tmp_path):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"{garbage" * 10)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(path, preset="light-sr-x2")


def test_non_checkpoint_files(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="state dict"):
        load_model(path)
    path = tmp_path / "other.pth"
    torch.save({"params": {"fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(CheckpointError, match="MambaIR"):
        load_model(path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "missing.pth")


def test_projection_is_the_einsum_with_outputs_and_gradients_in_b_k_order():
    from qmambair.models.ss2d import Projection

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 6, 35, generator=gen, dtype=torch.float64)
    weight = torch.randn(4, 5, 6, generator=gen, dtype=torch.float64)
    upstream = torch.randn(2, 4, 5, 35, generator=gen, dtype=torch.float64)
    results = []
    for fn in (lambda a, w: torch.einsum("bkdl,kcd->bkcl", a, w), Projection()):  # the oracle first
        a, w = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        y = fn(a, w)
        (y * upstream).sum().backward()
        results.append((y.detach(), a.grad, w.grad))
    for ref, got in zip(*results, strict=True):
        assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    y, grad_x, _ = results[1]
    # the order the split, the scan and the quantizers read without a copy
    assert y.is_contiguous() and grad_x.is_contiguous()
