"""ONNX export of float and fake-quant MambaIR: onnxruntime output matches PyTorch on a real image tile."""

from __future__ import annotations

import pytest
import torch

from qmambair.data.builtin import builtin_images
from qmambair.export_onnx import export_onnx, onnx_parity
from qmambair.models import build_model
from qmambair.quant import QuantConfig, quantize_model

pytest.importorskip("onnxruntime")

SMALL = dict(embed_dim=24, depths=[2, 2], d_state=4)  # light-sr-x4 architecture, fewer and narrower blocks


def real_tile(size: int = 32) -> torch.Tensor:
    img = builtin_images(["astronaut"])["astronaut"]  # HWC float32 in [0, 1]
    tile = torch.from_numpy(img[100 : 100 + size, 200 : 200 + size]).permute(2, 0, 1)
    return tile[None].contiguous()


@pytest.mark.parametrize("config", [None, QuantConfig(bits=4), QuantConfig(method="lsq", bits=2)],
                         ids=["float", "qmambair-w4a4", "lsq-w2a2"])
def test_onnx_matches_pytorch_on_real_tile(tmp_path, config):
    torch.manual_seed(0)
    model = build_model("light-sr-x4", **SMALL)
    x = real_tile()
    if config is not None:
        model = quantize_model(model, config).train()
        with torch.no_grad():
            model(x)  # quantizers initialise on the first batch
    model.eval()
    path = export_onnx(model, tmp_path / "model.onnx", tile=tuple(x.shape[-2:]))
    parity = onnx_parity(model, path, x)
    assert parity["psnr"] >= 50.0, parity
    with torch.no_grad():
        assert model(x).shape == (1, 3, 128, 128)


def test_export_refuses_uninitialised_quantizers(tmp_path):
    model = quantize_model(build_model("light-sr-x4", **SMALL), QuantConfig(bits=4)).eval()
    with pytest.raises(ValueError, match="not initialised"):
        export_onnx(model, tmp_path / "model.onnx", tile=16)
