"""int8 integer inference (qmambair.quant.int8): int8 codes, integer products, exact offset corrections.

Oracles: the layers' own fake-quant forward (float conv / matmul of x̂ and Ŵ, no integer codes) and int64
arithmetic on the codes; never the int8 kernels themselves.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from qmambair.loading import load_model
from qmambair.models import shipped
from qmambair.quant import DLS, LSQ, RFA, ActQuant, QConv2d, QLinear
from qmambair.quant import int8_kernels as K
from qmambair.quant.int8 import int8_conv2d, int8_linear, int8_projection
from qmambair.quant.integer import enable_integer_inference, integer_inference
from qmambair.quant.layers import QProjection

from .test_integer import astronaut, rel_err

REL = 1e-5
pytestmark = pytest.mark.skipif(not K.AVAILABLE, reason="needs numba")


def _train_init(layer: torch.nn.Module, *inputs: torch.Tensor) -> None:
    layer.train()
    with torch.no_grad():
        layer(*inputs)
    layer.eval()


def _offsets(layer: torch.nn.Module, act_offset: float = 0.7) -> None:
    """Sizeable activation/weight offsets: padded zeros are then far from code 0 and β_w matters."""
    with torch.no_grad():
        if isinstance(layer.act_quant, ActQuant):
            layer.act_quant.offset.fill_(act_offset)
        if isinstance(layer.weight_quant, RFA):
            layer.weight_quant.beta.fill_(0.013)
            layer.weight_quant.anchors.add_(0.2 * torch.rand(layer.weight_quant.anchors.shape) - 0.1)


def conv(bits: int, cin: int, cout: int, k: int, **kwargs) -> QConv2d:
    torch.manual_seed(bits * 10 + k)
    layer = QConv2d(cin, cout, k, act_quant=ActQuant(bits), weight_quant=RFA(bits), **kwargs)
    _train_init(layer, torch.randn(2, cin, 9, 9))
    _offsets(layer)
    return layer


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(
    "shape",
    [
        dict(cin=8, cout=6, k=1),
        dict(cin=8, cout=6, k=3, padding=1),
        dict(cin=5, cout=7, k=5, padding=2),
        dict(cin=8, cout=8, k=3, padding=1, groups=8),
        dict(cin=6, cout=6, k=3, padding=2, dilation=2, groups=6),
    ],
    ids=["1x1", "3x3", "5x5", "depthwise", "depthwise-dilated"],
)
def test_conv_matches_fake_quant(bits, shape):
    shape = dict(shape)
    layer = conv(bits, shape.pop("cin"), shape.pop("cout"), shape.pop("k"), **shape)
    x = torch.randn(2, layer.in_channels, 11, 10) - 0.3
    with torch.no_grad():
        out = int8_conv2d(layer, x)
        assert out is not None, "the int8 kernels handle this conv"
        assert rel_err(out, layer(x)) <= REL


@pytest.mark.parametrize("size", [(3, 2), (1, 1), (6, 5)])
def test_depthwise_on_planes_that_are_mostly_border(size):
    """Planes no wider than the padding: every position has padded taps (the border lists hold them all)."""
    layer = conv(4, 6, 6, 3, padding=2, dilation=2, groups=6)
    x = torch.randn(2, 6, *size) - 0.3
    with torch.no_grad():
        out = int8_conv2d(layer, x)
        assert out is not None
        assert rel_err(out, layer(x)) <= REL


def test_conv_border_terms_matter():
    """Near the border only real taps count: a variant that treats padded taps as code 0 with the interior's
    constant weight sums is off there (the maps are needed), while equal inside."""
    layer = conv(4, 6, 5, 3, padding=1)
    x = torch.randn(1, 6, 8, 8)
    with torch.no_grad():
        ref = layer(x)
        out = int8_conv2d(layer, x)
        w = layer.__dict__["_int8_weight"][1]
        w.maps[(8, 8)] = (np.repeat(w.wsum[:, None], 64, 1), np.full(64, float(w.fan_in)))  # sabotage
        wrong = int8_conv2d(layer, x)
    assert rel_err(out, ref) <= REL
    border = torch.ones(8, 8, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    assert rel_err(wrong[..., ~border], ref[..., ~border]) <= REL
    assert rel_err(wrong[..., border], ref[..., border]) > 1e-3


@pytest.mark.parametrize("act", ["actquant", "lsq", "dls", "dls-per-sample"])
def test_linear_matches_fake_quant(act):
    torch.manual_seed(1)
    quant = {
        "actquant": lambda: ActQuant(4),
        "lsq": lambda: LSQ(3),
        "dls": lambda: DLS(2),
        "dls-per-sample": lambda: DLS(4, per_sample=True),
    }[act]()
    layer = QLinear(24, 10, bias=True, act_quant=quant, weight_quant=RFA(3))
    _train_init(layer, torch.randn(3, 7, 24))
    _offsets(layer)
    x = torch.randn(3, 7, 24).exp() if act.startswith("dls") else torch.randn(3, 7, 24)
    with torch.no_grad():
        out = int8_linear(layer, x)
        assert out is not None
        assert rel_err(out, layer(x)) <= REL


def test_linear_dls_clip_correction_is_needed():
    """Skewed inputs make DLS clip its rounded maximum; without the sparse correction the result is off."""
    torch.manual_seed(0)
    layer = QLinear(16, 8, bias=True, act_quant=DLS(2), weight_quant=RFA(2))
    _train_init(layer, torch.randn(4, 16))
    for seed in range(50):  # skewed inputs: the rounded maximum often lands above max(x) and is clipped
        x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(seed)).exp()
        s, b, lo, hi = (t.reshape(-1)[0].item() for t in layer.act_quant.step_and_offset(x))
        q = torch.clamp((x + b) / s, layer.act_quant.qn, layer.act_quant.qp).round()
        clipped = int(((s * q - b > hi) | (s * q - b < lo)).sum())
        if clipped:
            break
    assert clipped > 0, "this input exercises the correction"
    with torch.no_grad():
        ref = layer(x)
        assert rel_err(int8_linear(layer, x), ref) <= REL
        layer.act_quant.step_and_offset = lambda t, copies=1: tuple(  # hide the clip bounds: no correction
            v if i < 2 else torch.full_like(v, math.inf * (1 if i == 3 else -1))
            for i, v in enumerate(DLS.step_and_offset(layer.act_quant, t, copies))
        )
        assert rel_err(int8_linear(layer, x), ref) > 1e-4


@pytest.mark.parametrize("d", [4, 24])  # the small-K numba product and the int8 GEMM
def test_projection_matches_fake_quant(d):
    torch.manual_seed(d)
    layer = QProjection(ActQuant(4), RFA(4))
    weight = torch.randn(4, 9, d) * 0.3
    x = torch.randn(2, 4, d, 37)
    _train_init(layer, x, weight)
    _offsets(layer)
    with torch.no_grad():
        out = int8_projection(layer, x, weight)
        assert out is not None
        assert rel_err(out, layer(x, weight)) <= REL


def test_projection_on_scan_orders_multiplies_half_the_directions():
    """x_proj's input is SS2D's scan orders (direction k + 2 = direction k reversed): with
    ``reversed_halves`` the int8 path multiplies directions 0 and 1 only and writes 2 and 3 reversed."""
    from qmambair.models.ss2d import scan_orders

    torch.manual_seed(5)
    plain = QProjection(ActQuant(4), RFA(4))
    weight = torch.randn(4, 10, 24) * 0.3
    x = scan_orders(torch.randn(2, 24, 5, 7))  # (2, 4, 24, 35)
    _train_init(plain, x, weight)
    _offsets(plain)
    halves = QProjection(plain.act_quant, plain.weight_quant, reversed_halves=True)
    with torch.no_grad():
        ref = plain(x, weight)  # fake-quant: every direction quantized and multiplied
        out = int8_projection(halves, x, weight)
        assert rel_err(out, ref) <= REL
        assert torch.equal(out, int8_projection(plain, x, weight))  # the same integers and epilogue
        other = x.clone()
        other[:, 2:] = torch.randn_like(other[:, 2:])  # not scan orders: directions 2, 3 still come from 0, 1
        assert rel_err(int8_projection(halves, other, weight), plain(other, weight)) > 0.1


def test_kernels_integer_products_are_exact():
    """small_project (product and rescale in one pass) and the int8 GEMM against int64 arithmetic on random
    codes, the rescale written out in numpy float64 in the same operation order."""
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (9, 5)).astype(np.int8)
    codes = rng.integers(-128, 128, (5, 4099)).astype(np.int8)  # more than one block of positions
    exact = w.astype(np.int64) @ codes.astype(np.int64)
    gemm = torch._int_mm(torch.from_numpy(w), torch.from_numpy(codes)).numpy()
    assert np.array_equal(gemm, exact)
    sums = codes.astype(np.int32).sum(0)
    alpha, beta = rng.uniform(0.01, 0.1, 9), rng.uniform(-0.01, 0.01, 9)
    wsum = w.astype(np.float64).sum(1)
    s, b = np.float32(0.37), np.float32(0.21)
    out = np.empty((9, 4099), np.float32)
    K.small_project(w, codes, sums, s, b, alpha, beta, wsum, 5.0, out)
    s64, b64 = np.float64(s), np.float64(b)
    const = 0.0 - (b64 * alpha * wsum - b64 * beta * 5.0)
    want = ((s64 * alpha)[:, None] * exact - (s64 * beta)[:, None] * sums + const[:, None]).astype(np.float32)
    assert np.array_equal(out, want)


def test_quantize_rows_codes_sums_and_clip_count():
    """Codes, row sums and the count of clipped elements against numpy on the same float32 expression."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((300, 37)) * 2).astype(np.float32)  # more rows than one work item
    s, b, qn, qp = np.float32(0.37), np.float32(0.21), -8.0, 7.0
    q = np.rint(np.clip((x + b) / s, np.float32(qn), np.float32(qp)))
    y = s * q - b
    codes, sums = np.empty(x.shape, np.int8), np.empty(300, np.int32)
    for lo, hi in [(-np.inf, np.inf), (-1.5, 2.0)]:
        lo, hi = np.float32(lo), np.float32(hi)
        count = K.quantize_rows(x, s, b, qn, qp, lo, hi, codes, sums)
        assert np.array_equal(codes, q.astype(np.int8))
        assert np.array_equal(sums, q.astype(np.int64).sum(1))
        assert count == int(((y < lo) | (y > hi)).sum())
    assert count > 0, "the finite bounds clip some elements"


def _norm_codes_oracle(x: np.ndarray, gamma, beta, eps, s, b, qn, qp) -> tuple[np.ndarray, np.ndarray]:
    """LayerNorm over the last dim in float64 and its codes; and where the code is ambiguous (the scaled value
    within 1e-4 of a rounding threshold, where float32 rounding in either LayerNorm may decide)."""
    x64 = x.astype(np.float64)
    mean = x64.mean(-1, keepdims=True)
    y = (x64 - mean) / np.sqrt(x64.var(-1, keepdims=True) + eps) * gamma + beta
    t = np.clip((y + b) / s, qn, qp)
    return np.rint(t), np.abs(t - np.floor(t) - 0.5) < 1e-4


def test_layer_norm_in_the_codes_pass():
    """norm_quantize_rows / norm_quantize_planes against a float64 LayerNorm written out in numpy: the same
    codes except at values on a rounding threshold (a handful, at most one code off), sums of the codes
    exact."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((700, 60)) * 3 + 5).astype(np.float32)  # mean far from 0, more than a block
    gamma = rng.uniform(0.5, 1.5, 60).astype(np.float32)
    beta = rng.uniform(-0.3, 0.3, 60).astype(np.float32)
    s, b, qn, qp = np.float32(0.31), np.float32(0.07), -8.0, 7.0
    want, ambiguous = _norm_codes_oracle(x, gamma, beta, 1e-5, s, b, qn, qp)
    codes, sums = np.empty(x.shape, np.int8), np.empty(700, np.int32)
    K.norm_quantize_rows(x, gamma, beta, 1e-5, s, b, qn, qp, codes, sums)
    assert ambiguous.sum() < 30
    assert np.array_equal(codes[~ambiguous], want[~ambiguous])
    assert np.abs(codes - want).max() <= 1
    assert np.array_equal(sums, codes.astype(np.int32).sum(1))
    planes, plane_sums = np.empty(x.T.shape, np.int8), np.empty(700, np.int32)
    K.norm_quantize_planes(np.ascontiguousarray(x.T), gamma, beta, 1e-5, s, b, qn, qp, planes, plane_sums)
    assert np.array_equal(planes.T[~ambiguous], want[~ambiguous])
    assert np.abs(planes.T - want).max() <= 1
    assert np.array_equal(plane_sums, planes.astype(np.int32).sum(0))


def test_fused_layer_norms_in_a_quantized_model():
    """``enable_integer_inference`` folds each VSS block's ln_1 into in_proj and ln_2 into the CAB's first
    conv: the norms pass their input through, the output still matches fake-quant, the state dict is
    unchanged, and ``disable_integer_inference`` restores the norms."""
    from qmambair.quant import QuantConfig
    from qmambair.quant.integer import disable_integer_inference, unfuse_norms

    from .test_pack import SMALL, quantized

    model = quantized("light-sr-x4", QuantConfig(bits=4), **SMALL)
    x = astronaut(24, 24)
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(x)
        enable_integer_inference(model, strict=True)
        ln = model.layers[0].residual_group.blocks[1].ln_1
        probe = torch.randn(3, 24)
        assert torch.equal(ln(probe), probe)  # folded into in_proj
        fused = model(x)
        unfuse_norms(model)
        assert not torch.equal(ln(probe), probe)
        unfused = model(x)
        assert rel_err(fused, ref) <= 1e-3 and rel_err(unfused, ref) <= 1e-3
        enable_integer_inference(model, strict=True)
        enable_integer_inference(model, strict=True, kernels="exact")  # no folded norms in the emulation
        assert not torch.equal(ln(probe), probe)
        assert rel_err(model(x), ref) <= 1e-3
        disable_integer_inference(model)  # also unfolds
        enable_integer_inference(model, strict=True)
        disable_integer_inference(model)
        assert torch.equal(model(x), ref)
    assert list(model.state_dict()) == keys


def test_layer_norm_before_a_dls_layer_is_applied_in_torch():
    """DLS's scalars come from the normalised tensor itself: no folding, the norm runs first (torch) and the
    result is that of fake-quant on LayerNorm(x)."""
    torch.manual_seed(6)
    layer = QLinear(16, 12, act_quant=DLS(4), weight_quant=RFA(4))
    norm = torch.nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    x = torch.randn(5, 7, 16) * 2 + 1
    _train_init(layer, norm(x).detach())
    with torch.no_grad():
        out = int8_linear(layer, x, norm)
        assert rel_err(out, layer(norm(x))) <= REL


def _depthwise_case(bits: int):
    torch.manual_seed(bits)
    layer = QConv2d(5, 5, 3, padding=1, groups=5, act_quant=ActQuant(bits, signed=True),
                    weight_quant=RFA(bits))
    _train_init(layer, torch.randn(1, 5, 9, 9))
    with torch.no_grad():
        layer.weight.mul_(50)  # codes near the ends of the grid: the largest sums the bits allow
    return layer, torch.randn(1, 5, 9, 9) * 50


@pytest.mark.parametrize("bits", [4, 8])
def test_depthwise_accumulator_width(bits):
    """4-bit codes sum in int16 (twice the vector lanes), 8-bit ones would overflow int16 and sum in int32;
    both match fake-quant, and forcing int16 on the 8-bit layer is wrong: the bound is needed."""
    from qmambair.quant.int8 import accumulator_dtype

    layer, x = _depthwise_case(bits)
    with torch.no_grad():
        out = int8_conv2d(layer, x)
        assert rel_err(out, layer(x)) <= REL
    w = layer.__dict__["_int8_weight"][1]
    bound = max(abs(layer.act_quant.qn), abs(layer.act_quant.qp))
    expected = np.int16 if bits == 4 else np.int32
    assert accumulator_dtype(9, int(bound), w.abs_sum) is expected
    if bits == 8:
        s, b = layer.act_quant.step.item(), layer.act_quant.offset.item()
        wrong = np.empty((5, 9, 9), np.float32)
        border = w.maps[("depthwise", 9, 9)]
        K.depthwise_conv(x[0].numpy(), np.float32(s), np.float32(b), layer.act_quant.qn, layer.act_quant.qp,
                         w.codes.numpy().reshape(5, 3, 3), 1, 1, 1, 1, w.alpha, w.beta, w.bias, *border,
                         wrong, np.empty(0, np.int16))
        assert rel_err(torch.from_numpy(wrong)[None], out) > 1e-2


def test_wide_codes_fall_back_to_exact_emulation():
    """8-bit unsigned activations (codes up to 255) do not fit int8: the layer declines and the enabled model
    still matches fake-quant through the float64 emulation."""
    torch.manual_seed(2)
    layer = QConv2d(4, 4, 3, padding=1, act_quant=ActQuant(8, signed=False), weight_quant=RFA(8))
    _train_init(layer, torch.rand(1, 4, 8, 8))
    x = torch.rand(1, 4, 8, 8)
    with torch.no_grad():
        assert int8_conv2d(layer, x) is None
        ref = layer(x)
        model = torch.nn.Sequential(layer)
        with integer_inference(model):
            assert rel_err(model(x), ref) <= REL


def test_weight_cache_follows_the_weight():
    layer = conv(4, 6, 6, 1)
    x = torch.randn(1, 6, 5, 5)
    with torch.no_grad():
        before = int8_conv2d(layer, x)
        layer.weight.mul_(-1.5)  # an in-place update (like an optimiser step) bumps the version
        after = int8_conv2d(layer, x)
        assert rel_err(after, layer(x)) <= REL
        assert rel_err(after, before) > 1e-2
        layer.bias.add_(0.5)  # the bias is cached too
        assert rel_err(int8_conv2d(layer, x), layer(x)) <= REL


def test_activation_scalars_follow_the_quantizer():
    """The kept activation step/offset are refreshed when the quantizer's parameters change in place or are
    replaced (as an optimiser step or ``load_state_dict`` would), not reused stale."""
    layer = conv(4, 6, 6, 1)
    x = torch.randn(1, 6, 5, 5)
    with torch.no_grad():
        before = int8_conv2d(layer, x)
        layer.act_quant.step.mul_(1.7)
        after = int8_conv2d(layer, x)
        assert rel_err(after, layer(x)) <= REL
        assert rel_err(after, before) > 1e-2
        layer.act_quant.offset = torch.nn.Parameter(torch.tensor(-0.4))
        assert rel_err(int8_conv2d(layer, x), layer(x)) <= REL


@pytest.mark.parametrize("name", ["light-sr-x4-qmambair-w4a4", "light-sr-x2-lsq-w2a2"])
def test_shipped_model_int8_matches_fake_quant(name):
    """End to end on a real image: at least 50 dB against fake-quant, and every quantized layer in int8."""
    model = load_model(shipped.shipped_path(name)).eval()
    x = astronaut(40, 40)
    with torch.no_grad():
        ref = model(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no layer left in fake-quant
            done = enable_integer_inference(model)
        calls = {"int8": 0}
        import qmambair.quant.integer as integer

        assert done
        original = dict(integer.INT8_FORWARD)
        for kind, fn in original.items():
            def counting(*args, fn=fn):
                out = fn(*args)
                calls["int8"] += out is not None
                return out
            integer.INT8_FORWARD[kind] = counting
        try:
            integer.disable_integer_inference(model)
            enable_integer_inference(model)
            out = model(x)
        finally:
            integer.INT8_FORWARD.update(original)
            integer.disable_integer_inference(model)
    mse = float(((out.double() - ref.double()) ** 2).mean())
    assert 10 * math.log10(1 / mse) >= 50
    assert calls["int8"] >= len(done)  # each layer ran its int8 kernels (no silent fallback)


def test_restore_uses_int8_for_packed_models(tmp_path, capsys):
    """``qmambair restore`` runs a .qmb in int8 by default and says so with the time per image; --fake-quant
    runs the float path; the two images agree to within 8-bit rounding almost everywhere."""
    from qmambair.cli import main
    from qmambair.data.io import read_image, write_image

    src = write_image(tmp_path / "a.png", astronaut(24, 20)[0].permute(1, 2, 0).numpy())
    model = str(shipped.shipped_path("light-sr-x4-qmambair-w4a4"))
    assert main(["restore", str(src), "-o", str(tmp_path / "int8.png"), "-m", model]) == 0
    err = capsys.readouterr().err
    assert "s per image (int8)" in err and "(int8)" in err.splitlines()[0]
    assert main(["restore", str(src), "-o", str(tmp_path / "fake.png"), "-m", model, "--fake-quant"]) == 0
    assert "s per image (fake-quant)" in capsys.readouterr().err
    by_name = ["restore", str(src), "-o", str(tmp_path / "by-name.png"), "-m", "light-sr-x4-qmambair-w4a4"]
    assert main(by_name) == 0  # a shipped .qmb named by its name is a .qmb too
    assert "s per image (int8)" in capsys.readouterr().err
    a, b = read_image(tmp_path / "int8.png"), read_image(tmp_path / "fake.png")
    assert a.shape == b.shape == (96, 80, 3)
    levels_a, levels_b = (np.rint(x * 255).astype(np.int16) for x in (a, b))  # 8-bit levels, exact integers
    assert np.abs(levels_a - levels_b).max() <= 2
