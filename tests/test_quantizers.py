"""Quantizers on their own: the math of docs/method.md §3 (RFA, DLS, Act_Quant) and the baselines' rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qmambair.quant import (
    DLS,
    LSQ,
    N2UQ,
    PAMS,
    RFA,
    ActQuant,
    DoReFa,
    DoReFaWeight,
    DynamicTokenQuant,
    LSQPlus,
    LSQPlusWeight,
    LSQWeight,
    MaxAbsWeight,
    MinMaxQuant,
    N2UQWeight,
    PAMSWeight,
    PercentileQuant,
    QuantSR,
    TanhRound,
    broadcast_quantizer_state,
)

BITS = (2, 3, 4)


def heavy(shape=(2, 6, 5, 5), seed=0) -> torch.Tensor:
    """Signed, skewed, heavy-tailed data: the kind of activation DLS is meant for."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    return x + 0.3 * x**3 + 0.2


# name -> (factory(bits), group): group(x) reshapes an output into rows, one per quantization group
def _per_tensor(y):
    return y.reshape(1, -1)


def _per_channel(dim):
    return lambda y: y.movedim(dim, 0).reshape(y.shape[dim], -1)


def _per_token(dim):
    return lambda y: y.movedim(dim, -1).reshape(-1, y.shape[dim])


QUANTIZERS = {
    "ActQuant": (lambda b: ActQuant(b), _per_tensor),
    "DLS": (lambda b: DLS(b), _per_tensor),
    "DLS-per-sample": (lambda b: DLS(b, per_sample=True), _per_channel(0)),
    "RFA": (lambda b: RFA(b), _per_tensor),
    "LSQ": (lambda b: LSQ(b), _per_tensor),
    "LSQWeight": (lambda b: LSQWeight(b), _per_tensor),
    "LSQPlus": (lambda b: LSQPlus(b), _per_tensor),
    "LSQPlusWeight": (lambda b: LSQPlusWeight(b, channel_shape=(2, 1, 1, 1)), _per_channel(0)),
    "PAMS": (lambda b: PAMS(b), _per_tensor),
    "PAMSWeight": (lambda b: PAMSWeight(b), _per_tensor),
    "DoReFa": (lambda b: DoReFa(b), _per_tensor),
    "DoReFaWeight": (lambda b: DoReFaWeight(b), _per_tensor),
    "QuantSR": (lambda b: QuantSR(b, channel_shape=(6, 1, 1)), _per_channel(1)),
    "N2UQ": (lambda b: N2UQ(b), _per_tensor),
    "N2UQWeight": (lambda b: N2UQWeight(b), _per_tensor),
    "MinMaxQuant": (lambda b: MinMaxQuant(b), _per_tensor),
    "PercentileQuant": (lambda b: PercentileQuant(b), _per_tensor),
    "DynamicTokenQuant": (lambda b: DynamicTokenQuant(b, token_dim=1), _per_token(1)),
    "MaxAbsWeight-per-channel": (lambda b: MaxAbsWeight(b, out_dims=1), _per_channel(0)),
}


def perturb_(q: torch.nn.Module, seed: int = 1) -> None:
    """Move learnable quantizer parameters off their (often gradient-free) initial point."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in q.named_parameters():
            if name == "anchors":
                p.add_(0.2 * (torch.rand(p.shape, generator=g) - 0.5))
            elif name in ("step", "alpha"):
                p.mul_(0.6)
            elif name == "w":  # DLS: a smaller step, below the (M - m)/2^b cap that blocks its gradient
                p.mul_(0.3)
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_at_most_2_pow_b_levels(name, bits):
    make, groups = QUANTIZERS[name]
    q = make(bits).train()
    x = heavy()
    q(x)  # initialise
    perturb_(q)
    with torch.no_grad():
        y = q(heavy(seed=3))
    assert torch.isfinite(y).all()
    for row in groups(y):
        assert row.unique().numel() <= 2**bits, f"{name}: {row.unique().numel()} levels in one group"


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_gradients_reach_every_parameter(name):
    make, _ = QUANTIZERS[name]
    q = make(3).train()
    x = heavy()
    q(x)
    perturb_(q)
    x = heavy(seed=5).requires_grad_(True)
    y = q(x)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in q.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}.{pname}"
        assert p.grad.abs().sum() > 0, f"{name}.{pname} got a zero gradient"


@pytest.mark.parametrize("value", [0.0, 0.7, -2.5])
@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_constant_tensor_gives_no_nan(name, value):
    make, _ = QUANTIZERS[name]
    q = make(4).train()
    x = torch.full((2, 6, 3, 3), value, requires_grad=True)
    y = q(x)
    y.sum().backward()
    assert torch.isfinite(y).all(), name
    assert torch.isfinite(x.grad).all(), name
    for pname, p in q.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), f"{name}.{pname}"


def test_dls_constant_tensor_is_reproduced_exactly():
    x = torch.full((3, 4), 1.25)
    assert torch.equal(DLS(2)(x), x)
    assert torch.equal(DLS(2, per_sample=True)(x), x)


# --- RFA ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_rfa_on_grid_is_round_to_nearest_with_ste(bits):
    g = torch.Generator().manual_seed(bits)
    w0 = 0.05 * torch.randn(16, 8, 3, 3, generator=g)
    rfa, lsq = RFA(bits).train(), LSQWeight(bits).train()
    w1 = w0.clone().requires_grad_(True)
    w2 = w0.clone().requires_grad_(True)
    y1, y2 = rfa(w1), lsq(w2)
    assert rfa.alpha.item() == pytest.approx(lsq.step.item())  # same init rule (β = 0)
    assert torch.allclose(y1, y2, atol=1e-7, rtol=0)
    expected = rfa.alpha * torch.clamp(w0 / rfa.alpha, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1).round()
    assert torch.allclose(y1, expected, atol=1e-7, rtol=0)
    coeff = torch.randn(w0.shape, generator=g)
    (y1 * coeff).sum().backward()
    (y2 * coeff).sum().backward()
    assert torch.allclose(w1.grad, w2.grad, atol=1e-6)  # straight-through inside the range, 0 outside
    assert rfa.alpha.grad.item() == pytest.approx(lsq.step.grad.item(), rel=1e-4, abs=1e-7)


def test_rfa_surrogate_slopes():
    rfa = RFA(2).train()  # Qn = -2, anchors a_0..a_3
    anchors = torch.tensor([-1.6, -0.9, 0.5, 0.8])
    with torch.no_grad():
        rfa.anchors.copy_(anchors)
        rfa.alpha.fill_(1.0)
    rfa.initialized.fill_(True)
    mids = (anchors[:-1] + anchors[1:]) / 2
    outside = torch.tensor([-1.8, -1.7, 0.9, 0.95])  # within the clip range [-2, 1], beyond the anchors
    u = torch.cat([mids, outside]).requires_grad_(True)
    rfa(u).sum().backward()
    expected = torch.cat([1 / (anchors[1:] - anchors[:-1]), torch.full((4,), 0.1)])
    assert torch.allclose(u.grad, expected, rtol=1e-5)
    # the forward levels stay uniform integers: q = Qn + #{u > t_i}
    with torch.no_grad():
        q = rfa(torch.tensor([-1.9, -1.0, 0.0, 0.7, 1.0]))
    thresholds = (anchors[:-1] + anchors[1:]) / 2  # -1.25, -0.2, 0.65
    assert q.tolist() == [-2.0, -1.0, 0.0, 1.0, 1.0]
    assert torch.allclose(rfa.thresholds(), thresholds)
    assert rfa.anchors.grad is not None and rfa.anchors.grad.abs().sum() > 0


def test_rfa_anchors_stay_ordered_with_min_gap():
    rfa = RFA(3, min_gap=0.1).train()
    with torch.no_grad():
        # crossed (-2.0 > -2.5, 3.0 > 2.0) and too close (-1.0, -0.99)
        rfa.anchors.copy_(torch.tensor([-4.0, -2.0, -2.5, -1.0, -0.99, 3.0, 2.0, 2.5]))
    a = rfa.ordered_anchors()
    gaps = a[1:] - a[:-1]
    assert (gaps >= 0.1 - 1e-6).all()
    # ordered anchors with enough gap pass unchanged
    assert torch.equal(RFA(3).ordered_anchors(), RFA(3).anchors.detach())
    w = torch.randn(64, requires_grad=True)
    rfa(w).pow(2).sum().backward()
    assert torch.isfinite(rfa.anchors.grad).all() and torch.isfinite(w.grad).all()
    # a hostile optimiser step cannot produce non-finite outputs or slopes above 1/min_gap
    opt = torch.optim.SGD(rfa.parameters(), lr=0.5)
    for _ in range(5):
        w = torch.randn(64, requires_grad=True)
        rfa(w).sum().backward()  # dŴ/dW = ŝ'(u) <= 1/min_gap
        assert w.grad.abs().max() <= 10 + 1e-4
        opt.zero_grad()
        (rfa(w) - 3 * w.detach()).pow(2).sum().backward()
        opt.step()
        assert torch.isfinite(rfa(w)).all()
        a = rfa.ordered_anchors()
        assert (a[1:] - a[:-1] >= 0.1 - 1e-6 * a.abs().max().clamp_min(1)).all()  # float32 spacing


@pytest.mark.parametrize(
    "make", [lambda: RFA(3), lambda: LSQWeight(3), lambda: LSQPlusWeight(3, (4, 1)), lambda: PAMSWeight(3),
             lambda: DoReFaWeight(3), lambda: N2UQWeight(3), lambda: MaxAbsWeight(3, out_dims=1)],
)
def test_weight_integer_codes_reproduce_forward(make):
    q = make().train()
    w = 0.1 * heavy((4, 9))
    q(w)
    perturb_(q)
    with torch.no_grad():
        y = q(w)
    codes, scale, offset = q.integer_codes(w)
    assert codes.dtype == torch.int64
    assert codes.min() >= -(2 ** (q.bits - 1)) and codes.max() <= 2 ** (q.bits - 1) - 1
    assert torch.allclose(scale * codes - offset, y, atol=1e-6)


# --- DLS and Act_Quant -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_dls_step_is_capped_and_output_in_range(bits):
    x = heavy()
    for scale in (1.0, 50.0):  # 50: the learned step would exceed the cap
        q = DLS(bits)
        with torch.no_grad():
            q.w.mul_(scale)
        delta, beta, lo, hi = q.step_and_offset(x)
        cap = (x.max() - x.min()) / 2**bits
        assert delta.item() <= cap.item() * (1 + 1e-6)
        if scale == 50.0:
            assert delta.item() == pytest.approx(cap.item())
        y = q(x)
        assert y.min() >= x.min() and y.max() <= x.max()
    # at init β = -μ and Δ = min((|0| + 3σ)/(2^(b-1)-1), cap)
    q = DLS(bits)
    delta, beta, _, _ = q.step_and_offset(x)
    assert beta.item() == pytest.approx(-x.mean().item(), abs=1e-6)
    expected = min(3 * x.std().item() / (2 ** (bits - 1) - 1), cap.item())
    assert delta.item() == pytest.approx(expected, rel=1e-4)


def test_dls_per_sample_does_not_depend_on_other_samples():
    x = heavy((3, 5, 4, 4))
    other = heavy((3, 5, 4, 4), seed=9) * 10
    q = DLS(3, per_sample=True)
    alone = q(x[:1])
    mixed = q(torch.cat([x[:1], other[1:]]))
    assert torch.equal(alone, mixed[:1])
    per_tensor = DLS(3)
    assert not torch.equal(per_tensor(x[:1]), per_tensor(torch.cat([x[:1], other[1:]]))[:1])


def test_dls_paper_init_at_two_bits_is_stuck_on_the_cap_and_sigma_init_frees_it():
    # the paper's init starts a 2-bit step at 3σ > (M - m)/4 for a Gaussian: the step is the cap, and min()
    # sends w no gradient; sigma_init=1 starts at ≈ σ, below the cap, with less error and a gradient into w
    x = torch.randn(20000, generator=torch.Generator().manual_seed(3))
    cap = (x.max() - x.min()) / 4
    errors = {}
    for sigma_init in (3.0, 1.0):
        q = DLS(2, sigma_init=sigma_init)
        delta = q.step_and_offset(x)[0]
        y = q(x)
        (y - x).pow(2).mean().backward()
        errors[sigma_init] = (y - x).pow(2).mean().item()
        if sigma_init == 3.0:
            assert delta.item() == pytest.approx(cap.item(), rel=1e-6)
            assert q.w.grad.abs().sum().item() == 0
        else:
            assert delta.item() == pytest.approx(x.std().item(), rel=1e-3)
            assert q.w.grad[1].abs().item() > 0
    assert errors[1.0] < 0.5 * errors[3.0]
    with pytest.raises(ValueError, match="sigma_init"):
        DLS(2, sigma_init=0)


def test_actquant_first_batch_init_and_sign():
    x = heavy()
    q = ActQuant(4).train()
    assert not bool(q.initialized)
    q(x)
    assert bool(q.initialized) and bool(q.signed)
    assert q.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(7), rel=1e-5)
    u = ActQuant(4).train()
    u(x.abs())
    assert not bool(u.signed)
    assert u.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(15), rel=1e-5)
    # formula: s * round(clip((x + β)/s, Qn, Qp)) - β
    with torch.no_grad():
        q.offset.fill_(0.3)
    s, b = q.step.item(), 0.3
    assert torch.allclose(q(x), s * torch.clamp((x + b) / s, -8, 7).round() - b, atol=1e-6)


def test_signedness_is_state_and_survives_reload():
    q = ActQuant(3).train()
    q(heavy().abs())  # unsigned first batch
    fresh = ActQuant(3)
    fresh.load_state_dict(q.state_dict())
    assert set(q.state_dict()) >= {"signed", "initialized", "step", "offset"}
    fresh.eval()
    x = heavy(seed=4)  # signed data later: the stored decision must hold
    assert not bool(fresh.signed)
    assert torch.equal(fresh(x), q.eval()(x))


def test_eval_mode_init_warns():
    with pytest.warns(UserWarning, match="evaluation batch"):
        ActQuant(4).eval()(heavy())


def test_tanh_round_gradient_averages_one():
    x = torch.linspace(-3, 3, 6001, requires_grad=True)
    y = TanhRound.apply(x, 4.0)
    assert torch.equal(y, x.detach().round())
    y.sum().backward()
    assert x.grad.mean().item() == pytest.approx(1.0, abs=0.01)
    assert x.grad[3000 + 500].item() > x.grad[3000].item()  # peaks at the rounding threshold x = 0.5


# --- post-training ---------------------------------------------------------------------------------------


def test_static_ptq_calibration_over_batches():
    batches = [heavy(seed=s) for s in range(3)]
    mm, pc = MinMaxQuant(8), PercentileQuant(8, percentile=100.0)
    for q in (mm, pc):
        q.start_calibration()
        for b in batches:
            assert torch.equal(q(b), b)  # pass-through while calibrating
        q.finish_calibration()
    allx = torch.cat([b.reshape(-1) for b in batches])
    assert mm.low.item() == pytest.approx(allx.min().item())
    assert mm.high.item() == pytest.approx(allx.max().item())
    mean_max = sum(b.abs().max().item() for b in batches) / 3
    assert pc.clip.item() == pytest.approx(mean_max, rel=1e-5)
    assert (mm(batches[0]) - batches[0]).abs().max() <= (mm.high - mm.low) / 255 / 2 + 1e-5


def test_broadcast_without_distributed_is_a_noop():
    q = ActQuant(4)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    broadcast_quantizer_state(q)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def _broadcast_worker(rank: int, world: int, init_file: str, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(rank)
    model = torch.nn.Sequential(ActQuant(4), RFA(3))
    x = torch.randn(64) * (rank + 1) + (0.0 if rank == 0 else 5.0)  # rank 1: different batch, unsigned
    model.train()(x)
    broadcast_quantizer_state(model)
    # numpy arrays travel by value; torch tensors would be shared through file descriptors that vanish when
    # this process exits before the parent has read the queue
    queue.put((rank, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_broadcast_makes_first_batch_init_identical_across_ranks(tmp_path):
    mp = torch.multiprocessing.get_context("spawn")
    queue = mp.Queue()
    init = str(tmp_path / "init")
    procs = [mp.Process(target=_broadcast_worker, args=(r, 2, init, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0].keys() == results[1].keys()
    for k in results[0]:
        assert np.array_equal(results[0][k], results[1][k]), k


def test_an_export_without_gradients_leaves_the_straight_through_terms_out(tmp_path):
    """round_ste's (x − stopgrad x) and grad_scale's (y − stopgrad y) are exact zeros without gradients: an
    ONNX export (no_grad) must not carry them as passes over the tensor; with gradients they are kept."""
    onnx = pytest.importorskip("onnx")
    q = ActQuant(4).train()
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    q(x)
    q.eval()
    path = tmp_path / "act.onnx"
    with torch.no_grad():
        torch.onnx.export(q, (x,), str(path), dynamo=False)
        want = q(x)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("Add") == 1 and ops.count("Sub") == 1  # x + β and − β only
    assert ops.count("Round") == 1
    x.requires_grad_(True)
    out = q(x)  # the straight-through forms, same values, gradients through
    assert torch.equal(out.detach(), want)
    out.sum().backward()
    assert x.grad is not None and q.step.grad is not None
