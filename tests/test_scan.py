"""Fast selective-scan backends against the float64 reference loop: outputs, all gradients, dispatch."""

from __future__ import annotations

import contextlib
import functools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import qmambair.scan as scan
from qmambair.scan import available_backends, resolve_backend, selective_scan, selective_scan_ref
from qmambair.scan.chunked import selective_scan_chunked

HAS_CPU = "cpu" in available_backends()
FAST = ["chunked", pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CPU, reason="numba missing"))]
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(
    batch=2, groups=4, per_group=3, n=5, length=130, *, z=True, D=True, bias=True, softplus=True,
    a_scale=None, delta_scale=0.5, seed=0,
) -> dict:  # fmt: skip
    """Random scan inputs (float64 master copies); a_scale=None draws A = -exp(N(0, 1)) per entry."""
    g = torch.Generator().manual_seed(seed)
    dp = groups * per_group
    delta = torch.randn(batch, dp, length, generator=g, dtype=torch.float64) * delta_scale
    if not softplus:
        delta = delta.abs()  # the recurrence is only stable for delta + bias >= 0
    if a_scale is None:
        A = -torch.exp(torch.randn(dp, n, generator=g, dtype=torch.float64))
    else:
        A = torch.full((dp, n), -a_scale, dtype=torch.float64)
    ins = {
        "u": torch.randn(batch, dp, length, generator=g, dtype=torch.float64),
        "delta": delta,
        "A": A,
        "B": torch.randn(batch, groups, n, length, generator=g, dtype=torch.float64),
        "C": torch.randn(batch, groups, n, length, generator=g, dtype=torch.float64),
        "D": torch.randn(dp, generator=g, dtype=torch.float64) if D else None,
        "z": torch.randn(batch, dp, length, generator=g, dtype=torch.float64) if z else None,
        "delta_bias": torch.rand(dp, generator=g, dtype=torch.float64) * 0.5 if bias else None,
    }
    ins["delta_softplus"] = softplus
    return ins


def run(fn, ins: dict, dtype: torch.dtype, grad_out: torch.Tensor, **kw):
    """Output, last state and gradients of every tensor input, in float64."""
    leaves = {k: ins[k].detach().to(dtype).clone().requires_grad_() for k in NAMES if ins[k] is not None}
    args = {k: leaves.get(k) for k in NAMES}
    out, last = fn(**args, delta_softplus=ins["delta_softplus"], return_last_state=True, **kw)
    out.backward(grad_out.to(dtype))
    res = {"out": out.detach().double(), "last": last.detach().double()}
    res.update({"d" + k: t.grad.double() for k, t in leaves.items()})
    return res


def assert_close_to_ref(ins: dict, backend: str, **kw) -> None:
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(ins["u"].shape, generator=g, dtype=torch.float64)
    ref = run(selective_scan_ref, ins, torch.float64, grad_out)
    if kw:
        fn = {"chunked": selective_scan_chunked, "cpu": scan._cpu_module().selective_scan_cpu}[backend]
        got = run(fn, ins, torch.float32, grad_out, **kw)
    else:
        got = run(selective_scan, ins, torch.float32, grad_out, backend=backend)
    assert set(got) == set(ref)
    for key, r in ref.items():
        scale = r.abs().max().item()
        err = (got[key] - r).abs().max().item()
        assert math.isfinite(err) and err <= 1e-4 * scale + 1e-10, (
            f"{backend} {key}: {err:.3g} vs scale {scale:.3g}"
        )


CASES = {
    "all-options": dict(),
    "L=1": dict(batch=1, groups=1, per_group=6, n=3, length=1),
    "bare-groups1": dict(groups=1, per_group=7, length=70, z=False, D=False, bias=False, softplus=False),
    "large-decay": dict(a_scale=math.exp(3), delta_scale=4.0, length=100),
    "mixed-decay": dict(delta_scale=3.0, length=150, seed=3),
    "batch3-z-only": dict(batch=3, length=64, D=False, bias=False),
    "D-no-softplus": dict(batch=2, groups=2, per_group=4, length=65, z=False, softplus=False),
    "split-channel-blocks": dict(batch=1, groups=1, per_group=40, n=16, length=90),
    "several-tiles": dict(batch=1, groups=2, per_group=5, n=4, length=600),  # forward tiles: 256, 256, 88
}


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(backend: str, case: str) -> None:
    assert_close_to_ref(make_inputs(**CASES[case]), backend)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("chunk", [1, 16, 33])
def test_chunk_sizes_not_dividing_length(backend: str, chunk: int) -> None:
    assert_close_to_ref(make_inputs(batch=2, groups=2, per_group=5, length=100, seed=7), backend, chunk=chunk)


def test_segment_lengths():
    from qmambair.scan.segmented import segment_length

    assert segment_length(1024) == 32 and segment_length(4096) == 64  # √T when T is a square
    assert segment_length(130) == 10 and segment_length(600) == 24  # the divisor nearest below √T
    assert segment_length(12) == 3  # four segments of three
    assert segment_length(97) is None and segment_length(2 * 101) is None  # a prime; only 2 below √202
    assert segment_length(9) is None and segment_length(1) is None  # fewer than four segments


SEGMENTED_CASES = ["all-options", "bare-groups1", "large-decay", "mixed-decay", "several-tiles"]


@pytest.mark.parametrize("case", SEGMENTED_CASES)
def test_segmented_chunks_match_float64_reference(case: str, monkeypatch) -> None:
    """The O(T) segmented chunk (exported graphs) against the float64 loop: output, last state, gradients."""
    from qmambair.scan import chunked

    calls = []
    real = chunked.segmented_chunk
    monkeypatch.setattr(chunked, "segmented_chunk", lambda *a: calls.append(a[6]) or real(*a))
    ins = make_inputs(**CASES[case])
    length = ins["u"].shape[-1]
    assert_close_to_ref(ins, "chunked", chunk=length, segmented=True, checkpoint=False)
    assert calls == [chunked.segment_length(length)]  # one chunk, segmented
    calls.clear()
    assert_close_to_ref(ins, "chunked", chunk=36, segmented=True, checkpoint=False)  # h0 carried in
    assert calls[0] == 6  # chunks of 36 as 6 x 6 (a short last chunk may have its own or be doubled)


@pytest.mark.parametrize("backend", FAST)
def test_non_contiguous_inputs_and_no_grad(backend: str) -> None:
    ins = make_inputs(batch=2, groups=4, per_group=3, length=40)
    dense = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in ins.items()}
    strided = dict(dense)
    for k in ("u", "delta", "z"):
        strided[k] = dense[k].transpose(1, 2).contiguous().transpose(1, 2)
    for k in ("B", "C"):
        strided[k] = dense[k].transpose(2, 3).contiguous().transpose(2, 3)
    strided["A"] = dense["A"].t().contiguous().t()
    assert not strided["u"].is_contiguous() and not strided["B"].is_contiguous()
    with torch.no_grad():
        a = selective_scan(**strided, backend=backend)
        b = selective_scan(**dense, backend=backend)
        r = selective_scan_ref(**dense)
    assert (a - b).abs().max() <= 1e-6 * b.abs().max()  # same values whatever the strides
    assert (a - r).abs().max() <= 1e-5 * r.abs().max()


@pytest.mark.parametrize("backend", FAST)
def test_partial_requires_grad_and_dtype(backend: str) -> None:
    ins = make_inputs(batch=1, groups=2, per_group=2, length=20)
    args = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in ins.items()}
    args["B"] = args["B"].clone().requires_grad_()
    selective_scan(**args, backend=backend).sum().backward()
    assert args["B"].grad is not None and args["u"].grad is None
    half = {k: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    half["B"] = half["B"].detach()
    assert selective_scan(**half, backend=backend).dtype == torch.bfloat16


@pytest.mark.parametrize("checkpoint", [True, False])
def test_chunked_gradcheck_float64(checkpoint: bool) -> None:
    ins = make_inputs(batch=1, groups=2, per_group=2, n=2, length=5, seed=5)
    leaves = [ins[k].clone().requires_grad_() for k in NAMES]

    def f(*xs):
        return selective_scan_chunked(*xs, delta_softplus=True, chunk=2, checkpoint=checkpoint)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)


def test_dispatch_env_override_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    u = torch.zeros(1, 2, 3)
    monkeypatch.setenv("QMAMBAIR_SCAN", "ref")
    assert resolve_backend(None, u) == "ref"
    assert resolve_backend("chunked", u) == "chunked"  # the argument wins over the environment
    monkeypatch.setenv("QMAMBAIR_SCAN", "CHUNKED")
    assert resolve_backend(None, u) == "chunked"
    monkeypatch.setenv("QMAMBAIR_SCAN", "bogus")
    with pytest.raises(ValueError, match="QMAMBAIR_SCAN"):
        resolve_backend(None, u)
    monkeypatch.delenv("QMAMBAIR_SCAN")
    with pytest.raises(ValueError, match="unknown scan backend 'nope'"):
        selective_scan(
            u, u, torch.zeros(2, 1), torch.zeros(1, 1, 1, 3), torch.zeros(1, 1, 1, 3), backend="nope"
        )
    with pytest.raises((RuntimeError, ValueError), match="gpu"):
        resolve_backend("gpu", u)
    assert resolve_backend(None, u) == ("cpu" if HAS_CPU else "chunked")
    assert resolve_backend(None, u.double()) == "chunked"
    assert {"ref", "chunked"} <= set(available_backends())


def test_env_selects_backend_that_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(scan, "selective_scan_ref", lambda *a: calls.append(a) or a[0])
    monkeypatch.setenv("QMAMBAIR_SCAN", "ref")
    u = torch.ones(1, 2, 3)
    assert selective_scan(u, u, torch.zeros(2, 1), torch.zeros(1, 1, 1, 3), torch.zeros(1, 1, 1, 3)) is u
    assert len(calls) == 1


def test_missing_numba_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scan, "_cpu_module", lambda: None)
    u = torch.zeros(1, 2, 3)
    assert resolve_backend(None, u) == "chunked"
    assert "cpu" not in available_backends()
    with pytest.raises(RuntimeError, match="numba"):
        resolve_backend("cpu", u)


def test_package_imports_without_numba() -> None:
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import qmambair.scan as s, qmambair.scan.cpu as c\n"
        "assert not c.AVAILABLE and 'cpu' not in s.available_backends()\n"
        "import torch; u = torch.ones(1, 2, 3)\n"
        "assert s.resolve_backend(None, u) == 'chunked'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_chunked_exports_to_onnx(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    ins = make_inputs(batch=1, groups=2, per_group=3, n=4, length=40, seed=2)
    t = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in ins.items()}

    class Scan(torch.nn.Module):
        def forward(self, u, delta, B, C, z):
            return selective_scan_chunked(
                u, delta, t["A"], B, C, t["D"], z, t["delta_bias"], delta_softplus=True, chunk=16
            )

    args = (t["u"], t["delta"], t["B"], t["C"], t["z"])
    path = tmp_path / "scan.onnx"
    with torch.no_grad():
        torch.onnx.export(Scan().eval(), args, str(path), input_names=list("udBCz"), dynamo=True)
        expected = Scan()(*args)
    got = ort.InferenceSession(str(path)).run(
        None, {k: v.numpy() for k, v in zip("udBCz", args, strict=True)}
    )[0]
    assert abs(torch.from_numpy(got) - expected).max() <= 1e-5 * expected.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_backend_matches_reference() -> None:
    from qmambair.scan.gpu import available

    if not available():
        pytest.skip("neither mamba_ssm nor triton is installed")
    ins = make_inputs(batch=2, groups=4, per_group=8, n=10, length=200)
    cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in ins.items()}
    g = torch.randn(ins["u"].shape, dtype=torch.float64)
    ref = run(selective_scan_ref, ins, torch.float64, g)
    got = run(selective_scan, cuda, torch.float32, g.cuda(), backend="gpu")
    for key, r in ref.items():
        err = (got[key].cpu() - r).abs().max().item()
        assert err <= 1e-4 * r.abs().max().item() + 1e-10, key


@pytest.mark.skipif("cpu" not in available_backends(), reason="needs numba")
def test_fused_cpu_scan_flushes_a_decaying_state_instead_of_going_subnormal():
    # one impulse, then zero input: the state decays by e^-2 per step and would pass through subnormal floats
    # (slow on x86) on its way to zero; the kernel flushes it below 1e-30, and the output still matches
    length = 46  # the last state is 2·e^-90 ≈ 1.6e-39, below float32's smallest normal number (1.2e-38)
    u = torch.zeros(1, 2, length)
    u[:, :, 0] = 1.0
    delta = torch.full((1, 2, length), 2.0, requires_grad=True)
    A = -torch.ones(2, 1)
    B, C = torch.ones(1, 1, 1, length), torch.ones(1, 1, 1, length)
    y, last = selective_scan(u, delta, A, B, C, return_last_state=True, backend="cpu")
    ref = selective_scan_ref(u.double(), delta.double(), A.double(), B.double(), C.double())
    assert torch.allclose(y.double(), ref, atol=1e-6)
    assert torch.equal(last, torch.zeros_like(last))
    tiny = (y != 0) & (y.abs() < 1e-30)
    assert not tiny.any()
    y.sum().backward()
    assert torch.isfinite(delta.grad).all()


@pytest.mark.skipif("cpu" not in available_backends(), reason="needs numba")
def test_fused_cpu_scan_counts_subnormal_numbers_as_zero_and_restores_the_fp_mode():
    from qmambair.scan.cpu import ieee_denormals

    # y = D·u with B = C = 0: IEEE arithmetic gives the subnormal 1e-39, flush-to-zero gives 0 (forward);
    # du = D·dy with dy = 1e-39 likewise (backward)
    tiny = 1e-39
    u = torch.full((2, 32, 9), tiny, requires_grad=True)
    args = dict(delta=torch.full((2, 32, 9), 0.1), A=-torch.ones(32, 4), B=torch.zeros(2, 1, 4, 9),
                C=torch.zeros(2, 1, 4, 9), D=torch.ones(32))
    for flush in (True, False):
        with contextlib.nullcontext() if flush else ieee_denormals():
            u.grad = None
            y = selective_scan(u, **args, backend="cpu")
            y.backward(torch.full_like(y, tiny))
        want = 0.0 if flush else tiny  # the IEEE value: 1·1e-39 rounded to float32
        assert torch.equal(y.detach(), torch.full_like(y, want).float()), flush
        assert torch.equal(u.grad, torch.full_like(u, want).float()), flush

    # the mode is switched back on every thread that ran a work item: later numba code and numpy on this
    # thread still produce subnormal results
    assert np.float32(2e-38) / np.float32(4.0) > 0
    halves = _halve_in_parallel(np.full(64 * 1024, 2e-38, np.float32))
    assert (halves > 0).all()


@functools.cache
def _parallel_halver():
    from numba import njit, prange

    @njit(parallel=True)
    def halve(x, out):
        for i in prange(x.shape[0]):
            out[i] = x[i] * np.float32(0.5)

    return halve


def _halve_in_parallel(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    _parallel_halver()(x, out)
    return out


# --------------------------------------------------------------------------- fake quantization on load
def quantize_by_hand(x: torch.Tensor, s, b, lo, hi, qn: float, qp: float) -> torch.Tensor:
    """The affine fake quantization written out here (the oracle): per batch element scalars."""
    rows = []
    for i in range(x.shape[0]):
        pick = [t if t.numel() == 1 else t[i] for t in (s, b, lo, hi)]
        si, bi, loi, hii = (float(t) for t in pick)
        q = torch.round(torch.clamp((x[i] + bi) / si, qn, qp))
        rows.append(torch.clamp(q * si - bi, loi, hii))
    return torch.stack(rows)


def load_quants():
    # u: per batch element, with a clip inside the grid's range; delta: one for the batch, no clip
    u_q = scan.LoadQuant(torch.tensor([0.3, 0.45]), torch.tensor([0.1, -0.2]), torch.tensor([-0.7, -2.0]),
                         torch.tensor([0.5, 2.5]), -2.0, 1.0)
    d_q = scan.LoadQuant(torch.tensor(0.25), torch.tensor(0.05), torch.tensor(-math.inf),
                         torch.tensor(math.inf), -8.0, 7.0)
    return u_q, d_q


@pytest.mark.parametrize("backend", FAST + ["ref"])
def test_load_quant_scans_the_fake_quantized_inputs(backend):
    ins = make_inputs(batch=2, groups=2, per_group=20, n=4, length=70)
    args = {k: (ins[k].float() if ins[k] is not None else None) for k in NAMES}
    u_q, d_q = load_quants()
    by_hand = dict(args, u=quantize_by_hand(args["u"], *u_q), delta=quantize_by_hand(args["delta"], *d_q))
    assert not torch.equal(by_hand["u"], args["u"])
    with torch.no_grad():
        got = selective_scan(**args, delta_softplus=True, backend=backend, u_quant=u_q, delta_quant=d_q)
        want = selective_scan(**by_hand, delta_softplus=True, backend=backend)
        plain = selective_scan(**args, delta_softplus=True, backend=backend)
    assert torch.equal(got, want)  # same kernel, same quantized values: bit for bit
    assert (got - plain).abs().max() > 0.1


def test_load_quant_is_for_inference_only():
    ins = make_inputs(batch=1, groups=1, per_group=2, n=2, length=5)
    u = ins["u"].float().requires_grad_()
    u_q, _ = load_quants()
    args = {k: (ins[k].float() if ins[k] is not None else None) for k in NAMES if k != "u"}
    for backend in ["chunked"] + (["cpu"] if HAS_CPU else []):
        with pytest.raises(ValueError, match="inference"):
            selective_scan(u, **args, delta_softplus=True, backend=backend, u_quant=u_q)
    bad = scan.LoadQuant(torch.ones(3), torch.zeros(()), torch.zeros(()), torch.ones(()), -2.0, 1.0)
    with pytest.raises(ValueError, match="3 values for a batch of 2"):
        bad.rows(2)


# ------------------------------------------------------------------------ decay table for a quantized Δ
LEVELS = torch.tensor([[-0.5, 0.25, 0.75, 1.5], [-1.0, -0.125, 0.5, 2.0]])  # exact in float32 and float64


def _on_levels(ins: dict, levels: torch.Tensor, seed: int = 7) -> dict:
    """``ins`` with delta drawn from each sample's levels (a 2-bit quantizer's output)."""
    b, dp, length = ins["delta"].shape
    codes = torch.randint(0, levels.shape[1], (b, dp, length), generator=torch.Generator().manual_seed(seed))
    rows = levels.expand(b, -1).double()
    return dict(ins, delta=torch.gather(rows, 1, codes.reshape(b, -1)).reshape(b, dp, length))


def _cpu_run(ins: dict, **kw) -> dict:
    g = torch.Generator().manual_seed(1)
    return run(scan._cpu_module().selective_scan_cpu, ins, torch.float32,
               torch.randn(ins["u"].shape, generator=g, dtype=torch.float64), **kw)


@pytest.mark.skipif(not HAS_CPU, reason="needs numba")
@pytest.mark.parametrize("softplus", [True, False])
def test_delta_levels_look_the_decays_up_with_the_same_result_bit_for_bit(softplus):
    cpu = scan._cpu_module()
    levels = LEVELS if softplus else LEVELS.abs()  # without softplus delta + bias must stay >= 0
    ins = _on_levels(make_inputs(batch=2, groups=2, per_group=20, n=4, length=600, softplus=softplus), levels)
    computed = _cpu_run(ins)
    assert cpu.decay_lookups() == {"forward": (0, 4 * 3), "backward": (0, 4 * 10)}
    looked_up = _cpu_run(ins, delta_levels=levels)
    assert cpu.decay_lookups() == {"forward": (12, 12), "backward": (40, 40)}  # every tile, both kernels
    assert set(looked_up) == set(computed)
    for key in computed:
        assert torch.equal(looked_up[key], computed[key]), key
    assert_close_to_ref(ins, "cpu", delta_levels=levels)  # and both agree with the float64 loop


@pytest.mark.skipif(not HAS_CPU, reason="needs numba")
def test_a_value_off_the_levels_is_computed_in_its_tile_only():
    cpu = scan._cpu_module()
    ins = _on_levels(make_inputs(batch=2, groups=2, per_group=20, n=4, length=600), LEVELS)
    ins["delta"][1, 3, 300] += 1e-3  # sample 1, group 0: forward tile 1, backward chunk 4
    looked_up = _cpu_run(ins, delta_levels=LEVELS)
    assert cpu.decay_lookups() == {"forward": (11, 12), "backward": (39, 40)}
    computed = _cpu_run(ins)
    for key in computed:
        assert torch.equal(looked_up[key], computed[key]), key
    three = _cpu_run(ins, delta_levels=LEVELS[:, :3])  # the fourth level missing: its tiles are computed
    assert cpu.decay_lookups()["forward"][0] < 11
    for key in computed:
        assert torch.equal(three[key], computed[key]), key


@pytest.mark.skipif(not HAS_CPU, reason="needs numba")
def test_delta_levels_with_quantization_on_load():
    cpu = scan._cpu_module()
    ins = make_inputs(batch=2, groups=2, per_group=20, n=4, length=300)
    args = {k: (ins[k].float() if ins[k] is not None else None) for k in NAMES}
    inf = math.inf  # 2 bits, per sample, a clip on sample 0
    d_q = scan.LoadQuant(torch.tensor([0.3, 0.2]), torch.tensor([0.05, -0.1]), torch.tensor([-0.5, -inf]),
                         torch.tensor([0.4, inf]), -2.0, 1.0)
    with torch.no_grad():
        plain = selective_scan(**args, delta_softplus=True, backend="cpu", delta_quant=d_q)
        fast = selective_scan(**args, delta_softplus=True, backend="cpu", delta_quant=d_q,
                              delta_levels=d_q.levels())
    assert cpu.decay_lookups()["forward"] == (8, 8)
    assert torch.equal(fast, plain)


@pytest.mark.skipif(not HAS_CPU, reason="needs numba")
def test_a_4_bit_delta_quantized_on_load_is_looked_up_by_code_with_the_same_result():
    cpu = scan._cpu_module()
    ins = make_inputs(batch=2, groups=2, per_group=20, n=4, length=600)
    args = {k: (ins[k].float() if ins[k] is not None else None) for k in NAMES}
    inf = math.inf  # 4 bits, per sample, a clip on sample 0 (the oracle quantizes by hand)
    d_q = scan.LoadQuant(torch.tensor([0.3, 0.2]), torch.tensor([0.05, -0.1]), torch.tensor([-0.5, -inf]),
                         torch.tensor([0.4, inf]), -8.0, 7.0)
    by_hand = dict(args, delta=quantize_by_hand(args["delta"], *d_q))
    with torch.no_grad():
        coded = selective_scan(**args, delta_softplus=True, backend="cpu", delta_quant=d_q)
        assert cpu.delta_code_lookups() == (12, 12)  # 2 samples x 2 groups x 3 tiles of 256 positions
        computed = selective_scan(**by_hand, delta_softplus=True, backend="cpu")
        assert cpu.delta_code_lookups() == (0, 12)
        assert torch.equal(coded, computed)
        args["delta"][1, 3, 300] = math.nan  # sample 1, group 0, tile 1: no code, computed
        with_nan = selective_scan(**args, delta_softplus=True, backend="cpu", delta_quant=d_q)
        assert cpu.delta_code_lookups() == (11, 12)
        assert torch.equal(with_nan[0], coded[0]) and torch.equal(with_nan[1, 20:], coded[1, 20:])
        wide = scan.LoadQuant(*d_q[:4], -128.0, 127.0)  # 8 bits: 256 codes, computed
        selective_scan(**args, delta_softplus=True, backend="cpu", delta_quant=wide)
        assert cpu.delta_code_lookups() == (0, 12)


def test_delta_codes_give_softplus_of_the_quantized_delta():
    from qmambair.scan.load_quant import delta_codes

    def delta_by_code(delta, q, bias):
        return delta_codes(delta, q, bias).delta()

    ins = make_inputs(batch=2, groups=2, per_group=20, n=4, length=300)
    delta, bias = ins["delta"].float() * 4, ins["delta_bias"].float()
    inf = math.inf  # 4 bits, per sample, a clip on sample 0
    d_q = scan.LoadQuant(torch.tensor([0.3, 0.2]), torch.tensor([0.05, -0.1]), torch.tensor([-0.5, -inf]),
                         torch.tensor([0.4, inf]), -8.0, 7.0)
    want = torch.nn.functional.softplus(quantize_by_hand(delta, *d_q) + bias[:, None])
    got = delta_by_code(delta, d_q, bias)
    assert torch.equal(got, want)
    assert len(torch.unique(got[0, 0])) > 4  # many codes in use, the clip too
    one = scan.LoadQuant(*(t[:1] for t in d_q[:4]), -8.0, 7.0)  # one set of scalars for the batch
    want = torch.nn.functional.softplus(quantize_by_hand(delta, *one) + bias[:, None])
    assert torch.equal(delta_by_code(delta, one, bias), want)


def test_load_quant_levels_are_the_values_the_map_outputs():
    u_q, d_q = load_quants()
    ramp = torch.linspace(-4, 4, 4001).expand(2, -1)
    for q in (u_q, d_q):
        by_hand = quantize_by_hand(ramp, *q)  # the oracle's outputs over the whole range
        levels = q.levels()
        assert levels.shape == (q.step.numel(), int(q.qp - q.qn) + 1)
        for i in range(2):
            row = levels[min(i, levels.shape[0] - 1)]
            assert set(torch.unique(by_hand[i]).tolist()) == set(row.tolist())


@pytest.mark.skipif(not HAS_CPU, reason="needs numba")
def test_delta_levels_of_a_wrong_shape_are_refused():
    ins = make_inputs(batch=2, groups=1, per_group=2, n=2, length=5)
    args = {k: (ins[k].float() if ins[k] is not None else None) for k in NAMES}
    for bad in (torch.zeros(2, 5), torch.zeros(3, 4), torch.zeros(4)):
        with pytest.raises(ValueError, match="delta_levels must have shape"):
            selective_scan(**args, delta_softplus=True, backend="cpu", delta_levels=bad)
