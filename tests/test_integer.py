"""Integer inference: exact integer sums, offsets and zero padding, parity with the fake-quant forward."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from qmambair.data.builtin import builtin_images
from qmambair.quant import RFA, ActQuant, QConv2d, QLinear, QuantConfig, describe_quantization
from qmambair.quant.integer import (
    activation_codes,
    disable_integer_inference,
    enable_integer_inference,
    fake_quant_layers,
    integer_conv2d,
    integer_inference,
    integer_parity,
)
from qmambair.quant.pack import export_packed, load_packed, weight_codes

from .test_pack import SMALL, quantized

REL = 1e-5


def astronaut(h: int, w: int, top: int = 100, left: int = 180) -> torch.Tensor:
    img = torch.from_numpy(builtin_images(["astronaut"])["astronaut"]).permute(2, 0, 1)[None]
    return img[..., top : top + h, left : left + w].contiguous()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def conv_layer(bits: int, **kwargs) -> QConv2d:
    """A QConv2d (Act_Quant + RFA) initialised on data, then given sizeable offsets and moved anchors."""
    torch.manual_seed(bits)
    layer = QConv2d(8, 8, 3, act_quant=ActQuant(bits), weight_quant=RFA(bits), **kwargs).train()
    with torch.no_grad():
        layer(torch.randn(2, 8, 9, 9))
        layer.act_quant.offset.fill_(0.7)  # padded zeros are then far from code 0
        layer.weight_quant.beta.fill_(0.01)
        layer.weight_quant.anchors.add_(0.2 * torch.rand(layer.weight_quant.anchors.shape) - 0.1)
    return layer.eval()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(padding=1),
        dict(padding=2, dilation=2, groups=8),
        dict(padding=1, stride=2, groups=2),
        dict(padding=1, padding_mode="reflect"),
        dict(padding=0),
    ],
    ids=["pad", "depthwise-dilated", "grouped-strided", "reflect", "valid"],
)
def test_conv_matches_fake_quant(bits, kwargs):
    layer = conv_layer(bits, **kwargs)
    x = torch.randn(2, 8, 11, 10) - 0.3
    with torch.no_grad():
        ref = layer(x)
        assert rel_err(integer_conv2d(layer, x), ref) <= REL
        # the border needs the padding terms: ignoring them (pretending padded codes are code 0) is wrong
        if kwargs.get("padding") and kwargs.get("padding_mode", "zeros") == "zeros":
            a = activation_codes(layer.act_quant, x)
            codes, scale, offset = weight_codes(layer.weight_quant, layer.weight)
            padded = F.pad(a.codes, [layer.padding[0]] * 4) * a.scale - a.offset
            wrong = F.conv2d(
                padded, scale * codes - offset, layer.bias, layer.stride, 0, layer.dilation, layer.groups
            )
            assert rel_err(wrong, ref) > 1e-2


def test_integer_sums_are_exact():
    """The float64 conv of integer codes equals the int64 computation exactly (argument in the docstring)."""
    layer = conv_layer(8, padding=1)
    x = torch.randn(1, 8, 12, 12) * 3
    qa = activation_codes(layer.act_quant, x).codes
    qw, _, _ = weight_codes(layer.weight_quant, layer.weight)
    fast = F.conv2d(qa.double(), qw.double(), padding=1)
    cols = F.unfold(qa.double(), 3, padding=1).round().long()  # (1, 8*9, 144), integer values
    exact = (qw.reshape(8, -1).long() @ cols).reshape(1, 8, 12, 12)
    assert torch.equal(fast, exact.double())


def test_linear_with_dls_clipping():
    from qmambair.quant import DLS
    from qmambair.quant.integer import integer_linear

    torch.manual_seed(0)
    layer = QLinear(16, 8, bias=True, act_quant=DLS(2), weight_quant=RFA(2)).train()
    with torch.no_grad():
        layer(torch.randn(4, 16))
    layer.eval()
    for seed in range(20):  # skewed inputs: the rounded maximum often lands above max(x) and is clipped
        x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(seed)).exp()
        if bool(activation_codes(layer.act_quant, x).residual.any()):
            break
    assert bool(activation_codes(layer.act_quant, x).residual.any()), "the correction path is exercised"
    with torch.no_grad():
        assert rel_err(integer_linear(layer, x), layer(x)) <= REL


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(bits=4),
        QuantConfig(bits=2),
        QuantConfig(method="lsq", bits=4),
        QuantConfig(method="lsq+", bits=3),
    ],
    ids=lambda c: f"{c.method}-w{c.w_bits}",
)
def test_every_layer_matches_on_real_image(config):
    model = quantized("light-sr-x4", config)
    with torch.no_grad():
        errors = integer_parity(model, astronaut(32, 32))
    assert len(errors) == 220  # every quantized conv, linear and projection of light x4
    worst = max(errors, key=errors.get)
    assert errors[worst] <= REL, f"{worst}: relative error {errors[worst]:.3g}"


def test_end_to_end_in_float64():
    """In float64 the fake-quant path has no float32 rounding to move values across thresholds, so the whole
    network agrees end to end (this is the exactness of the integer path, not luck of a threshold)."""
    model = quantized("light-sr-x4", QuantConfig(bits=4), **SMALL).double()
    x = astronaut(24, 24).double()
    with torch.no_grad():
        ref = model(x)
        with integer_inference(model, strict=True) as done:
            out = model(x)
    assert len(done) == 2 * 2 * 9 + 2
    assert rel_err(out, ref) <= 1e-10
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # the context manager restored the fake-quant forward


def test_packed_model_in_integer_mode(tmp_path):
    model = quantized("light-sr-x4", QuantConfig(bits=3), **SMALL)
    loaded = load_packed(export_packed(model, tmp_path / "m.qmb"))
    x = astronaut(20, 20)
    with torch.no_grad():
        errors = integer_parity(loaded, x)
    assert errors and max(errors.values()) <= REL


def test_unsupported_activation_quantizer_stays_fake_quant_with_a_warning():
    model = quantized("light-sr-x4", QuantConfig(method="pams", bits=4), **SMALL)
    left = fake_quant_layers(model)
    layers = {r.path for r in describe_quantization(model) if r.tensor == "weight"}
    assert set(left) == layers and set(left.values()) == {"PAMS activations"}
    with pytest.warns(UserWarning, match=r"stay in fake-quant \(PAMS activations.*: .*layers\.\*\.conv \("):
        assert enable_integer_inference(model) == []
    with pytest.raises(NotImplementedError, match="PAMS"):
        enable_integer_inference(model, strict=True)


def test_supported_model_switches_without_warning():
    model = quantized("light-sr-x4", QuantConfig(bits=4), **SMALL)
    assert fake_quant_layers(model) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        done = enable_integer_inference(model)
    disable_integer_inference(model)
    assert set(done) == {r.path for r in describe_quantization(model) if r.tensor == "weight"}
