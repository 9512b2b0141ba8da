"""The fused quantizer kernels (qmambair.quant.fused) against the eager quantizers, their oracle.

Every case runs the same quantizer (same parameters) once on the eager path and once on the fused path and
compares the output (bit for bit: the kernels repeat the eager float32 operations) and the gradients of the
input and of every quantizer parameter (float round-off: the kernels sum in a different order).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qmambair.quant import DLS, LSQ, RFA, ActQuant, LSQWeight
from qmambair.quant.fused import ENV_VAR, _f32, quant_kernels, use_fused

pytest.importorskip("numba")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _run(q: torch.nn.Module, x: torch.Tensor, mode: str, upstream: torch.Tensor):
    q.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with quant_kernels(mode):
        y = q(x)
        (y * upstream).sum().backward()
    params = {name: None if p.grad is None else p.grad.clone() for name, p in q.named_parameters()}
    return y.detach(), x.grad.clone(), params


def assert_fused_matches_eager(q: torch.nn.Module, x: torch.Tensor, rtol: float = 2e-5) -> None:
    q.train()
    with torch.no_grad(), quant_kernels("eager"):
        q(x)  # first-batch initialisation, identical for both runs
    upstream = torch.randn(x.shape, generator=_gen(1))
    y_e, gx_e, p_e = _run(q, x, "eager", upstream)
    y_f, gx_f, p_f = _run(q, x, "fused", upstream)
    assert torch.equal(y_e, y_f), f"forward differs by {(y_e - y_f).abs().max().item()}"
    # round-off of a sum over the tensor (DLS's min/max elements and every parameter gradient are such
    # sums): the eager float32 sum carries ~1e-7 of the summed magnitudes, so an exactly-zero gradient comes
    # out of it as noise of that size
    noise = 1e-7 * upstream.abs().sum().item()
    assert torch.all((gx_e - gx_f).abs() <= 1e-5 * gx_e.abs() + noise)
    noise *= 2 ** (q.bits - 1)  # a step's gradient sums codes up to 2^(b-1) times the upstream
    assert p_e.keys() == p_f.keys()
    for name in p_e:
        if p_e[name] is None:
            assert p_f[name] is None or not p_f[name].any(), name
            continue
        ref, got = p_e[name], p_f[name]
        tol = rtol * ref.abs().max().item() + noise
        assert (ref - got).abs().max().item() <= tol, f"d{name}: {ref} vs {got}"


def tensors() -> dict[str, torch.Tensor]:
    g = _gen(0)
    outlier = torch.randn(4, 30, 17, 9, generator=g) * 2 + 0.3
    outlier[0, 0, 0, 0] = 60.0
    outlier[3, 2, 1, 0] = -45.0
    return {
        "gaussian": torch.randn(2, 8, 16, 16, generator=g),
        "outliers": outlier,
        "all_negative": -torch.rand(3, 700, generator=g) - 1.0,
        "batch1": torch.randn(1, 5, 33, generator=g) * 0.01,
        "large": torch.randn(2, 3, 20000, generator=g),  # several kernel chunks per group
        "constant": torch.full((3, 5, 4), 0.7),
        "one_element": torch.tensor([0.3]),
        "ties": torch.tensor([[0.0, 1.0, 1.0, -2.0, -2.0, 0.5, 1.0, -2.0]]),
    }


ACT_QUANTIZERS = {
    "ActQuant": ActQuant,
    "LSQ": LSQ,
    "LSQWeight": lambda b: LSQWeight(b),
    "DLS": DLS,
    "DLS-per-sample": lambda b: DLS(b, per_sample=True),
    "DLS-sigma1": lambda b: DLS(b, sigma_init=1.0),
}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", sorted(ACT_QUANTIZERS))
@pytest.mark.parametrize("data", sorted(tensors()))
def test_fused_activation_quantizers_match_eager(kind, bits, data):
    x = tensors()[data]
    q = ACT_QUANTIZERS[kind](bits)
    assert_fused_matches_eager(q, x)


def test_fused_dls_with_learned_parameters_and_ties_on_the_clip_bounds():
    # v and w away from their init: the offset uses σ, min and max, and the step all four statistics
    x = tensors()["ties"].repeat(3, 5)
    x[0, 0] = 7.0
    for per_sample in (False, True):
        q = DLS(3, per_sample=per_sample)
        with torch.no_grad():
            q.v.copy_(torch.tensor([-0.8, 0.1, -0.05, 0.02]))
            q.w.copy_(torch.tensor([0.3, 0.5, -0.02, 0.04]))
        assert_fused_matches_eager(q, x)


@pytest.mark.parametrize("bits", [2, 8])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("data", sorted(tensors()))
def test_dls_step_and_offset_without_a_graph_are_the_eager_values(bits, per_sample, data):
    # the inference shortcut (the fused statistics and scalar function) against the torch expression
    x = tensors()[data]
    q = DLS(bits, per_sample=per_sample)
    with torch.no_grad():
        q.v.copy_(torch.tensor([-0.8, 0.1, -0.05, 0.02]))
        q.w.copy_(torch.tensor([0.3, 0.5, -0.02, 0.04]) * (1 if bits == 2 else 0.01))
        with quant_kernels("eager"):
            ref = q.step_and_offset(x)
        with quant_kernels("fused"):
            got = q.step_and_offset(x)
    for name, r, g in zip(("delta", "beta", "lo", "hi"), ref, got, strict=True):
        assert r.shape == g.shape and r.dtype == g.dtype, name
        assert torch.equal(r, g), f"{name}: {r.flatten()[:4]} vs {g.flatten()[:4]}"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])  # 8 bits: 255 thresholds, the kernels' binary-search path
@pytest.mark.parametrize("anchors", ["grid", "moved", "crossed"])
@pytest.mark.parametrize("shape", [(24, 60), (5, 9000)])  # one kernel chunk; three
def test_fused_rfa_matches_eager(bits, anchors, shape):
    w = torch.randn(shape, generator=_gen(2)) * 0.05
    w[0, 0] = 0.9  # far outside the grid
    q = RFA(bits)
    if anchors != "grid":
        with torch.no_grad():
            shift = torch.rand(q.anchors.shape, generator=_gen(3)) * 0.6 - 0.3
            q.anchors.add_(shift)
            if anchors == "crossed":  # the ordering projection is active
                q.anchors[1] = q.anchors[0] - 0.5
        with torch.no_grad(), quant_kernels("eager"):
            q(w)
        q.beta.data.fill_(0.01)
    assert_fused_matches_eager(q, w)


def test_fused_path_is_taken_for_float32_cpu_only(monkeypatch):
    x32, x64 = torch.randn(10), torch.randn(10, dtype=torch.float64)
    assert use_fused(x32) and not use_fused(x64)
    with quant_kernels("eager"):
        assert not use_fused(x32)
    monkeypatch.setenv(ENV_VAR, "eager")
    assert not use_fused(x32)
    with quant_kernels("fused"):
        assert use_fused(x32)
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=ENV_VAR):
        use_fused(x32)
    with pytest.raises(ValueError, match="mode"):
        with quant_kernels("fast"):
            pass


def test_graph_capture_takes_the_eager_path(monkeypatch):
    x = torch.randn(3, 7, generator=_gen(8))
    q = DLS(3)
    assert use_fused(x)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)  # what torch.onnx.export sets
    assert not use_fused(x)
    monkeypatch.undo()
    traced = torch.jit.trace(q, x)  # a trace records torch operations, so the quantizer must be eager
    assert "aten::amin" in str(traced.graph) or "aten::min" in str(traced.graph)
    assert torch.equal(traced(x * 2), q(x * 2))


def test_fused_kernels_are_called_on_the_fused_path(monkeypatch):
    from qmambair.quant import fused

    calls = []
    real = fused._affine_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fused, "_affine_forward", spy)
    x = torch.randn(50)
    q = ActQuant(4).train()
    with quant_kernels("eager"):
        q(x)
    assert not calls
    with quant_kernels("fused"):
        q(x)
    assert calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_take_the_eager_path_and_agree_with_cpu():
    x = torch.randn(4, 100, generator=_gen(4))
    q = DLS(2)
    y_cpu = q(x)
    y_gpu = q.cuda()(x.cuda())
    assert not use_fused(x.cuda())
    assert torch.allclose(y_cpu, y_gpu.cpu(), atol=1e-6)


def test_fused_results_do_not_depend_on_the_thread_count():
    import numba

    x = torch.randn(3, 50000, generator=_gen(5)) * 3
    upstream = torch.randn(x.shape, generator=_gen(6))
    results = []
    before = numba.get_num_threads()
    try:
        for threads in (1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(threads)
            q = DLS(2, per_sample=True)
            results.append(_run(q, x, "fused", upstream))
    finally:
        numba.set_num_threads(before)
    (y1, g1, p1), (y2, g2, p2) = results
    assert torch.equal(y1, y2) and torch.equal(g1, g2)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)


def _counting(q: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    real = q.quantize

    def quantize(w):
        calls.append(1)
        return real(w)

    q.quantize = quantize
    return calls


def test_eval_mode_quantizes_a_weight_once_until_something_changes():
    weight = torch.nn.Parameter(torch.randn(12, 8, generator=_gen(7)) * 0.1)
    q = RFA(3)
    q.train()(weight)  # first training call initialises α
    q.eval()
    calls = _counting(q)
    with torch.no_grad():
        first = q(weight)
        assert q(weight) is first and len(calls) == 1
        weight.add_(0.05)  # an in-place update (what optimiser steps do)
        second = q(weight)
        assert len(calls) == 2 and not torch.equal(first, second)
        q.load_state_dict({k: v.clone() for k, v in q.state_dict().items()})  # copies in place
        q(weight)
        assert len(calls) == 3
    opt = torch.optim.SGD([weight, *q.parameters()], lr=0.1)
    with torch.enable_grad():
        out = q(weight)  # a graph is wanted: computed, not cached
        assert out.grad_fn is not None and len(calls) == 4
        out.sum().backward()
    opt.step()
    with torch.no_grad():
        third = q(weight)
        assert len(calls) == 5 and torch.equal(third, q.quantize(weight))
        q.eval()  # already in eval mode: the cache stays
        q(weight)
        assert len(calls) == 6  # (the direct call above counted once)
        q.train()
        q.eval()
        q(weight)
        assert len(calls) == 7  # train() dropped the cache


@pytest.mark.parametrize("method", ["qmambair", "lsq", "lsq+", "pams", "dorefa", "quantsr", "n2uq", "minmax",
                                    "dynamic"])
def test_every_methods_weight_quantizer_is_computed_once_in_eval_mode(method):
    from qmambair.quant.base import WeightQuantizer
    from qmambair.quant.convert import QuantConfig, make_weight_quantizer

    weight = torch.randn(12, 8, generator=_gen(8)) * 0.1
    q = make_weight_quantizer(QuantConfig(method=method, bits=3), weight, 1)
    assert isinstance(q, WeightQuantizer), type(q).__name__
    q.train()(weight)
    q.eval()
    with torch.no_grad():
        first = q(weight)
        assert q(weight) is first
        weight.add_(0.05)
        assert q(weight) is not first


def test_a_packed_model_decodes_its_codes_once(tmp_path):
    from qmambair.loading import load_model
    from qmambair.quant.pack import frozen_codes, quantized_weights

    model = load_model("light-sr-x4-qmambair-w2a2")
    key, wq, weight = quantized_weights(model)[0]
    codes, scale, offset = frozen_codes(wq)
    first = wq(weight)
    assert wq(weight) is first  # the decoded weight is stored, not recomputed per call
    assert torch.equal(first, scale * codes.float() - offset)


@pytest.mark.parametrize("method, per_sample", [("qmambair", False), ("qmambair", True), ("lsq", False)])
def test_inference_quantizes_u_and_delta_inside_the_scan(monkeypatch, method, per_sample):
    """Without gradients the fused CPU scan fake-quantizes u and Δ as it reads them (QScan passes their
    affine maps); the model's output must be that of quantizing them first, fused and eager alike."""
    import qmambair.scan.cpu as scan_cpu
    from qmambair.models.presets import build_model
    from qmambair.quant import QuantConfig, quantize_model
    from qmambair.quant.layers import QScan

    torch.manual_seed(0)
    model = build_model("light-sr-x4", embed_dim=12, depths=(1, 1), d_state=4)
    model = quantize_model(model, QuantConfig(method=method, bits=2, dls_per_sample=per_sample)).train()
    with torch.no_grad(), quant_kernels("eager"):
        model(torch.rand(2, 3, 12, 12, generator=_gen(0)))  # initialises the quantizers
    model.eval()
    image = torch.rand(2, 3, 10, 14, generator=_gen(1))
    loads = []
    real = scan_cpu.selective_scan_cpu

    def spy(*args, **kwargs):
        loads.append((kwargs.get("u_quant"), kwargs.get("delta_quant")))
        return real(*args, **kwargs)

    monkeypatch.setattr(scan_cpu, "selective_scan_cpu", spy)
    with torch.no_grad():
        on_load = model(image)
    scans = sum(isinstance(m, QScan) for m in model.modules())
    assert scans == 2 and len(loads) == scans and all(u is not None and d is not None for u, d in loads)
    loads.clear()
    with torch.no_grad(), quant_kernels("eager"):
        eager = model(image)
    with torch.enable_grad():
        with_graph = model(image).detach()  # a graph is wanted: u and Δ are quantized before the scan
    assert loads and all(u is None and d is None for u, d in loads)
    assert torch.equal(on_load, with_graph)
    torch.testing.assert_close(on_load, eager, rtol=0, atol=1e-6)


def _special_rows() -> dict[str, torch.Tensor]:
    """Rows whose minimum or maximum sits on the edges of the float32 order: signed zeros, subnormals,
    the largest finite values and infinities, far from the other values or among them."""
    g = _gen(5)
    tiny = torch.finfo(torch.float32).tiny
    big = torch.finfo(torch.float32).max
    base = torch.randn(3, 40000, generator=g)  # three chunks per row
    edges = base.clone()
    edges[0, 17], edges[0, 39999] = -big, big
    edges[1, 20000] = -tiny / 8  # a negative subnormal among normal values
    edges[2] = torch.rand(40000, generator=g) * tiny  # only subnormals and zeros
    edges[2, 5] = 0.0
    signed_zero = torch.tensor([[-0.0, 0.0, -0.0], [0.0, 0.0, 0.0]])
    negative = -torch.rand(2, 33, generator=g) - 1e-3  # every bit pattern has the sign bit set
    infinite = torch.tensor([[1.0, float("inf"), -2.0], [float("-inf"), 3.0, 4.0]])
    return {"edges": edges, "signed_zero": signed_zero, "negative": negative, "infinite": infinite,
            "strided": base[:, ::3], "nan": torch.tensor([[1.0, float("nan"), -5.0], [2.0, 3.0, -1.0]])}


@pytest.mark.parametrize("name", sorted(_special_rows()))
def test_one_pass_min_and_max_are_torch_amin_and_amax(name):
    # the fused statistics read min and max from integer order keys of the float bits; torch is the oracle
    from qmambair.quant.fused import _stats_np

    x2 = _special_rows()[name]
    _, _, lo, hi = _stats_np(x2)
    ref_lo, ref_hi = x2.amin(dim=1).numpy(), x2.amax(dim=1).numpy()
    if name == "nan":  # a NaN in a row makes both NaN, as amin/amax; the other row is unaffected
        assert np.isnan(lo[0]) and np.isnan(hi[0]) and np.isnan(ref_lo[0]) and np.isnan(ref_hi[0])
        lo, hi, ref_lo, ref_hi = lo[1:], hi[1:], ref_lo[1:], ref_hi[1:]
    assert np.array_equal(lo, ref_lo) and np.array_equal(hi, ref_hi), (lo, ref_lo, hi, ref_hi)


@pytest.mark.parametrize("mode", ["eager", "fused"])
@pytest.mark.parametrize("data", ["gaussian", "outliers", "large", "constant", "one_element"])
def test_statistics_of_a_repeated_tensor_come_from_one_copy(mode, data):
    from qmambair.quant.fused import group_stats

    x = tensors()[data]
    x2 = x.reshape(x.shape[0] if x.dim() > 1 else 1, -1)
    fused = mode == "fused"
    for copies in (1, 4):
        ref = group_stats(x2.repeat(1, copies), fused=fused)  # the oracle reads every copy
        got = group_stats(x2, fused=fused, copies=copies)
        for name, r, g in zip(("mean", "var", "min", "max"), ref, got, strict=True):
            assert (r is None) == (g is None), name
            assert r is None or torch.equal(r, g), f"{name} x{copies}: {r.flatten()[:3]} vs {g.flatten()[:3]}"
    q = DLS(2, per_sample=True)
    with torch.no_grad(), quant_kernels(mode):
        ref = q.step_and_offset(x.repeat(1, *([4] + [1] * (x.dim() - 2))) if x.dim() > 1 else x.repeat(4), 1)
        got = q.step_and_offset(x, 4)
    assert all(torch.equal(r.flatten(), g.flatten()) for r, g in zip(ref, got, strict=True))


@pytest.mark.parametrize("data", ["gaussian", "outliers", "all_negative", "batch1", "large", "constant",
                                  "one_element", "far_offset"])
def test_exported_statistics_match_the_two_pass_ones(data, monkeypatch):
    """In an ONNX export DLS's statistics come from float32 partial sums added in float64, in two passes; they
    stay within about an ulp of torch's two-pass float64 var_mean (the eager path, the oracle), also for a
    mean far above the spread (far_offset) and a constant tensor (variance exactly 0)."""
    import qmambair.quant.fused as fused

    # far_offset: a mean 1e5 times the spread, where the variance must not come from Σx² − (Σx)²/n
    x = torch.randn(2, 4000, generator=_gen(3)) * 1e-3 + 100 if data == "far_offset" else tensors()[data]
    x2 = x.reshape(x.shape[0] if x.dim() > 1 else 1, -1)
    eps = torch.finfo(torch.float32).eps
    for copies in (1, 4):
        want = fused.group_stats(x2.repeat(1, copies))
        with monkeypatch.context() as m:
            m.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
            got = fused.group_stats(x2, copies=copies)
        mean, var = want[:2]
        std = torch.zeros_like(mean) if var is None else var.sqrt()
        tolerances = (eps * (mean.abs() + std),  # mean: an ulp of its size or of the spread, the larger
                      None if var is None else 2 * eps * var,  # var: two ulps (a constant: exactly 0)
                      0.0, 0.0)  # min and max exactly
        for name, r, g, tol in zip(("mean", "var", "min", "max"), want, got, tolerances, strict=True):
            assert (r is None) == (g is None), name
            if r is not None:
                assert bool(((r - g).abs() <= tol).all()), (name, copies, r.flatten()[:3], g.flatten()[:3])


def test_exported_statistics_are_accurate_in_onnxruntime(tmp_path):
    """The exported statistics as onnxruntime computes them, on 2²⁰ values per group, against the float64
    oracle: the float32 partial sums keep them within an ulp or two (one float32 sum over the whole group
    in onnxruntime is off by orders of magnitude more)."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import qmambair.quant.fused as fused

    class Stats(torch.nn.Module):
        def forward(self, x):  # noqa: ANN001, ANN202
            mean, var, _, _ = fused.group_stats(x)
            return mean, var

    x = torch.randn(2, 1 << 20, generator=_gen(4)) * 0.3 + 0.2
    path = tmp_path / "stats.onnx"
    torch.onnx.export(Stats(), (x,), str(path), dynamo=False, opset_version=18)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    mean, var = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    var_ref, mean_ref = torch.var_mean(x.double(), dim=1, keepdim=True)
    eps = float(torch.finfo(torch.float32).eps)
    assert np.all(np.abs(mean - mean_ref.numpy()) <= 2 * eps * np.abs(mean_ref.numpy())), (mean, mean_ref)
    assert np.all(np.abs(var - var_ref.numpy()) <= 2 * eps * var_ref.numpy()), (var, var_ref)


def _quantized_scan_model(method: str = "qmambair", per_sample: bool = True) -> torch.nn.Module:
    from qmambair.models.presets import build_model
    from qmambair.quant import QuantConfig, quantize_model

    torch.manual_seed(0)
    model = build_model("light-sr-x4", embed_dim=12, depths=(1, 1), d_state=4)
    model = quantize_model(model, QuantConfig(method=method, bits=2, dls_per_sample=per_sample)).train()
    with torch.no_grad(), quant_kernels("eager"):
        model(torch.rand(2, 3, 12, 12, generator=_gen(0)))  # initialises the quantizers
    return model.eval()


def test_inference_reads_u_statistics_from_one_scan_order(monkeypatch):
    import qmambair.quant.fused as fused
    from qmambair.quant.layers import QScan

    model = _quantized_scan_model()
    image = torch.rand(2, 3, 10, 14, generator=_gen(1))
    read = []
    real = fused._stats_np

    def spy(x2, copies=1):
        read.append((x2.numel(), copies))
        return real(x2, copies)

    monkeypatch.setattr(fused, "_stats_np", spy)
    with torch.no_grad(), quant_kernels("fused"):
        out = model(image)
    scans = [m for m in model.modules() if isinstance(m, QScan)]
    d_inner = next(m.d_inner for m in model.modules() if hasattr(m, "d_inner"))
    u_numel = 2 * 4 * d_inner * 10 * 14  # batch, orders, channels, H·W
    assert (u_numel // 4, 4) in read and (u_numel, 1) in read  # u: one order, read as 4; Δ: all of it
    for scan in scans:
        scan.u_orders = 1
    with torch.no_grad(), quant_kernels("fused"):
        assert torch.equal(model(image), out)


def test_onnx_export_reads_u_statistics_from_one_scan_order(monkeypatch, tmp_path):
    """In an ONNX export the scan's u and Δ are quantized by the export's scan from QScan's LoadQuants, so the
    graph computes u's statistics from one of its four scan orders too (and the graph's output is unchanged:
    the ONNX parity tests)."""
    pytest.importorskip("onnx")
    from qmambair.export_onnx import export_onnx
    from qmambair.quant import dls

    model = _quantized_scan_model()
    read = []
    real = dls.group_stats

    def spy(x2, fused=False, copies=1):
        read.append((x2.numel(), copies))
        return real(x2, fused=fused, copies=copies)

    monkeypatch.setattr(dls, "group_stats", spy)
    export_onnx(model, tmp_path / "m.onnx", tile=(10, 14), fmt="float")
    d_inner = next(m.d_inner for m in model.modules() if hasattr(m, "d_inner"))
    u_numel = 4 * d_inner * 10 * 14  # one image: orders, channels, H·W
    assert read.count((u_numel // 4, 4)) == 2  # u, per block: one order, read as 4
    assert (u_numel, 1) in read  # Δ: all of it


def test_scan_parameter_inputs_are_quantized_once_in_eval_mode():
    from qmambair.quant.layers import QScan

    model = _quantized_scan_model()
    scan = next(m for m in model.modules() if isinstance(m, QScan))
    ss2d = next(m for m in model.modules() if getattr(m, "scan_op", None) is scan)
    calls = {name: _counting(scan.quantizer(name)) for name in ("A", "D", "delta_bias", "B")}
    image = torch.rand(1, 3, 8, 8, generator=_gen(2))
    with torch.no_grad():
        first = model(image)
        assert torch.equal(model(image), first)
        assert {k: len(v) for k, v in calls.items()} == {"A": 1, "D": 1, "delta_bias": 1, "B": 2}
        ss2d.A_logs.add_(0.5)  # a new value: quantized again
        model(image)
        assert len(calls["A"]) == 2 and len(calls["D"]) == 1
        scan.D_quant.v.add_(0.01)  # the quantizer changed
        model(image)
        assert len(calls["D"]) == 2
    model.train().eval()  # train() drops them
    with torch.no_grad():
        model(image)
    with torch.enable_grad():
        model(image)  # a graph is wanted: quantized, not reused
    assert len(calls["A"]) == 4 and len(calls["delta_bias"]) == 3


def test_dls_sigma_is_the_correctly_rounded_square_root_on_both_paths():
    """σ enters DLS's offset and step; both paths must give the correctly rounded float32 square root on every
    CPU (torch's own float32 sqrt is 1 ulp off for many inputs on AVX2 machines). Oracle: Python's float64
    math.sqrt rounded to float32 (double rounding is innocuous for a square root)."""
    import math

    import numpy as np

    from qmambair.quant.dls import step_and_offset
    from qmambair.quant.fused import DLSConsts, _dls_scalars

    var = torch.from_numpy(np.random.default_rng(0).uniform(0.01, 100.0, 4000).astype(np.float32))
    want = torch.tensor([np.float32(math.sqrt(float(v))) for v in var])
    zero, one = torch.zeros_like(var), torch.ones_like(var)
    v = torch.tensor([0.0, 1.0, 0.0, 0.0])  # β = σ exactly
    _, beta = step_and_offset(zero, var, -one, one, v, torch.full((4,), 0.1), bits=4, qp=7.0, numel=100)
    assert torch.equal(beta, want)
    consts = DLSConsts(bits=4, qn=-8.0, qp=7.0, gscale=0.1, var_floor=1e-12, min_delta=1e-6)
    fused = _dls_scalars(zero.numpy(), var.numpy(), -one.numpy(), one.numpy(), v.numpy(),
                         np.full(4, 0.1, np.float32), consts)
    assert torch.equal(torch.from_numpy(fused["beta"]), want)


def test_per_group_scalars_broadcast_one_value_and_refuse_a_wrong_count():
    assert _f32(2.5, 3).tolist() == [2.5, 2.5, 2.5]
    assert _f32(np.array([-np.inf]), 2).tolist() == [-np.inf, -np.inf]
    got = _f32(np.array([1.0, 2.0, 3.0]), 3)
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.tolist() == [1.0, 2.0, 3.0]
    assert _f32(torch.tensor([[1.0], [4.0]]).numpy(), 2).tolist() == [1.0, 4.0]
    with pytest.raises(ValueError, match="expected 1 or 4 values, got 3"):
        _f32(np.ones(3), 4)


@pytest.mark.parametrize("method, per_sample", [("qmambair", False), ("qmambair", True), ("lsq", False)])
def test_two_bit_delta_scans_look_their_decays_up_with_the_same_training_step(monkeypatch, method,
                                                                              per_sample):
    """With a 2-bit Δ QScan hands the scan Δ's four levels; the scan looks exp(δ·A) up for them. The
    training step (output and every gradient) and inference must be those of computing every decay."""
    import qmambair.scan.cpu as scan_cpu
    from qmambair.models.presets import build_model
    from qmambair.quant import QuantConfig, quantize_model
    from qmambair.quant.layers import QScan

    torch.manual_seed(0)
    model = build_model("light-sr-x4", embed_dim=12, depths=(1, 1), d_state=4)
    model = quantize_model(model, QuantConfig(method=method, bits=2, dls_per_sample=per_sample)).train()
    lr, hr = torch.rand(2, 3, 12, 12, generator=_gen(0)), torch.rand(2, 3, 48, 48, generator=_gen(1))
    with torch.no_grad():
        model(lr)  # initialises the quantizers

    def step() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same drop-path draws for both runs
        out = model(lr)
        (out - hr).abs().mean().backward()
        return [out.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    looked_up = step()
    assert scan_cpu.decay_lookups()["forward"] == scan_cpu.decay_lookups()["forward"][:1] * 2  # all tiles
    assert scan_cpu.decay_lookups()["backward"][0] == scan_cpu.decay_lookups()["backward"][1] > 0
    model.eval()
    with torch.no_grad():
        infer_looked_up = model(lr)
    assert scan_cpu.decay_lookups()["forward"][0] > 0
    monkeypatch.setattr(QScan, "_delta_levels", lambda self, delta, grid: None)
    model.train()
    computed = step()
    assert scan_cpu.decay_lookups()["forward"][0] == 0
    assert len(looked_up) == len(computed) > 10
    assert all(torch.equal(a, b) for a, b in zip(looked_up, computed, strict=True))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(lr), infer_looked_up)


def test_a_four_bit_delta_has_too_many_levels_for_the_table():
    from qmambair.models.presets import build_model
    from qmambair.quant import QuantConfig, quantize_model
    from qmambair.quant.layers import QScan

    for bits, expect in ((4, None), (2, (1, 4))):
        model = build_model("light-sr-x4", embed_dim=12, depths=(1,), d_state=4)
        q = quantize_model(model, QuantConfig(method="lsq", bits=bits)).train()
        with torch.no_grad():
            q(torch.rand(1, 3, 8, 8, generator=_gen(0)))
        scan = next(m for m in q.modules() if isinstance(m, QScan))
        levels = scan._delta_levels(torch.rand(1, 4, 5), None)
        assert (levels if levels is None else tuple(levels.shape)) == expect
