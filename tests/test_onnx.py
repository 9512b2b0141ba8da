"""ONNX export of float, fake-quant and packed MambaIR: onnxruntime's raw output matches PyTorch's to float
rounding on a real image tile, a sabotaged graph fails the parity check, and
``qmambair export --onnx --check`` passes on a good graph and exits 1 on a bad one."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from qmambair.cli import main
from qmambair.data.builtin import builtin_images
from qmambair.export_onnx import (
    FLOAT_MAX_REL,
    QUANT_MIN_PSNR,
    export_onnx,
    export_scan,
    onnx_parity,
    parity_failure,
    run_onnx,
)
from qmambair.loading import load_model
from qmambair.models import build_model
from qmambair.models.checkpoint import save_model
from qmambair.quant import QuantConfig, quantize_model
from qmambair.quant.pack import export_packed

pytest.importorskip("onnxruntime")

SMALL = dict(embed_dim=24, depths=[2, 2], d_state=4)  # light-sr-x4 architecture, fewer and narrower blocks
# Float graphs match PyTorch to float rounding (measured ~3e-7 of the output range). In a fake-quant graph a
# value within float rounding of a rounding threshold can take the other code, and the change propagates:
# on an Intel Xeon (AVX-512) no value of this model and tile did, on an AMD EPYC (torch's AVX2 kernels) a
# 2-bit code flipped and part of the output moved. So a quantized graph must keep most of its output at float
# rounding (a wrong graph moves nearly all of it) and pass the export check's PSNR bar.
STRICT_REL = 1e-5
MAX_FLIPPED = 0.2  # share of outputs a quantized graph may move beyond float rounding by code flips


def real_tile(size: int = 32) -> torch.Tensor:
    img = builtin_images(["astronaut"])["astronaut"]  # HWC float32 in [0, 1]
    tile = torch.from_numpy(img[100 : 100 + size, 200 : 200 + size]).permute(2, 0, 1)
    return tile[None].contiguous()


def small_model(config: QuantConfig | None, x: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("light-sr-x4", **SMALL)
    if config is not None:
        model = quantize_model(model, config).train()
        with torch.no_grad():
            model(x)  # quantizers initialise on the first batch
    return model.eval()


def reference(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """PyTorch's output with the scan algorithm the graph holds (the oracle of the graph)."""
    with torch.no_grad(), export_scan():
        return model(x).numpy()


def max_rel(ref: np.ndarray, out: np.ndarray) -> float:
    assert out.shape == ref.shape
    return float(np.abs(ref.astype(np.float64) - out).max() / np.abs(ref).max())


def zero_block0_scan(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose first SS2D branch outputs zeros (a graph with a wrong scan branch)."""
    bad = copy.deepcopy(model)
    bad.layers[0].residual_group.blocks[0].self_attention.register_forward_hook(lambda m, a, out: out * 0)
    return bad


CONFIGS = [None, QuantConfig(bits=4), QuantConfig(method="lsq", bits=2)]
IDS = ["float", "qmambair-w4a4", "lsq-w2a2"]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_onnx_matches_pytorch_on_real_tile(tmp_path, config):
    x = real_tile()
    model = small_model(config, x)
    path = export_onnx(model, tmp_path / "model.onnx", tile=tuple(x.shape[-2:]))
    ref, out = reference(model, x), run_onnx(path, x)
    assert ref.shape == (1, 3, 128, 128) and ref.std() > 0.05  # a real picture, not a constant
    parity = onnx_parity(model, path, x)
    if config is None:
        assert max_rel(ref, out) <= STRICT_REL
        assert parity["max_rel"] <= STRICT_REL and parity["psnr"] > 100, parity
    else:
        moved = np.abs(ref.astype(np.float64) - out) > STRICT_REL * np.abs(ref).max()
        assert moved.mean() <= MAX_FLIPPED, f"{moved.mean():.1%} of the output differs"
    assert parity_failure(parity, quantized=config is not None) is None


@pytest.mark.parametrize("config", CONFIGS[:2], ids=IDS[:2])
def test_sabotaged_graph_fails_parity(tmp_path, config):
    """A graph whose first SS2D branch is zeroed differs from the model by only ~0.1 % of the output range
    (65 dB after clipping): the parity thresholds must still reject it."""
    x = real_tile()
    model = small_model(config, x)
    path = export_onnx(zero_block0_scan(model), tmp_path / "bad.onnx", tile=tuple(x.shape[-2:]))
    parity = onnx_parity(model, path, x)
    assert parity["max_rel"] > 10 * STRICT_REL, parity
    assert parity_failure(parity, quantized=config is not None) is not None, parity


def test_export_of_a_loaded_qmb_matches_the_trained_model(tmp_path):
    x = real_tile()
    model = small_model(QuantConfig(bits=4), x)
    loaded = load_model(export_packed(model, tmp_path / "m.qmb"))
    path = export_onnx(loaded, tmp_path / "m.onnx", tile=tuple(x.shape[-2:]))
    assert max_rel(reference(model, x), run_onnx(path, x)) <= STRICT_REL  # oracle: the model before packing


def test_cli_onnx_check_passes_on_a_qmb(tmp_path, capsys):
    x = real_tile(16)
    model = small_model(QuantConfig(bits=4), real_tile())
    qmb = export_packed(model, tmp_path / "m.qmb")
    out = tmp_path / "m.onnx"
    assert main(["export", str(qmb), "--onnx", str(out), "--tile", "16", "--check"]) == 0
    assert "parity check passed" in capsys.readouterr().out
    assert max_rel(reference(model, x), run_onnx(out, x)) <= STRICT_REL  # the file the CLI wrote


def test_cli_check_exits_1_on_a_bad_graph(tmp_path, capsys, monkeypatch):
    import qmambair.export_onnx as eo

    model = small_model(None, real_tile())
    weights = save_model(model, tmp_path / "float.safetensors")
    good = eo.prepare_for_export
    monkeypatch.setattr(eo, "prepare_for_export", lambda m: zero_block0_scan(good(m)))
    assert main(["export", str(weights), "--onnx", str(tmp_path / "m.onnx"), "--tile", "16", "--check"]) == 1
    err = capsys.readouterr().err
    assert "qmambair export: error: ONNX parity check failed" in err and len(err.strip().splitlines()) == 1


def test_cli_help_states_the_thresholds(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    rel = re.search(r"max \|diff\| > ([0-9.e+-]+) x max \|output\| \(float model\)", text)
    db = re.search(r"PSNR < ([0-9.]+) dB \(quantized model", text)
    assert rel and db, text
    assert float(rel.group(1)) == FLOAT_MAX_REL and float(db.group(1)) == QUANT_MIN_PSNR


def test_export_refuses_uninitialised_quantizers(tmp_path):
    model = quantize_model(build_model("light-sr-x4", **SMALL), QuantConfig(bits=4)).eval()
    with pytest.raises(ValueError, match="not initialised"):
        export_onnx(model, tmp_path / "model.onnx", tile=16)
