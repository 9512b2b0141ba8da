"""Baseline quantizers against their papers' definitions, worked by hand on tensors of a few elements.

Each test restates the rule (docs/method.md §3.5 QAT baselines, §3.6 post-training quantizers) in its
docstring; the expected numbers are computed in the test with plain Python arithmetic (``math``), never by
calling the quantizer under test. Inputs are chosen away from rounding ties, so float32 rounding cannot move
a code. Gradients are those of ``sum(c * q(x))`` for a vector ``c`` of distinct weights, so every element's
share is seen.

Notation: b bits; signed grid Qn = -2^(b-1), Qp = 2^(b-1) - 1; unsigned grid Qn = 0, Qp = 2^b - 1; LSQ's
gradient scale g = 1/sqrt(numel * Qp) multiplies the step's gradient wherever a step is learned.
"""

from __future__ import annotations

import math

import pytest
import torch

from qmambair.quant import (
    N2UQ,
    PAMS,
    DoReFa,
    DoReFaWeight,
    DynamicTokenQuant,
    LSQPlus,
    LSQPlusWeight,
    MaxAbsWeight,
    PAMSWeight,
    QuantSR,
)

TOL = dict(rel=1e-5, abs=1e-6)


def near(values: torch.Tensor, expected: list) -> bool:
    """``values`` (any shape) equals the nested list ``expected`` within float32 rounding."""
    flat = values.detach().double().reshape(-1).tolist()
    want = torch.tensor(expected, dtype=torch.float64).reshape(-1).tolist()
    pairs = zip(flat, want, strict=True) if len(flat) == len(want) else []
    return bool(pairs) and all(v == pytest.approx(w, **TOL) for v, w in pairs)


def leaf(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=True)


def set_(param: torch.nn.Parameter, value) -> None:
    with torch.no_grad():
        param.copy_(torch.as_tensor(value, dtype=param.dtype))


def ready(q: torch.nn.Module) -> torch.nn.Module:
    """Mark a quantizer initialised (its parameters are then set by hand) and put it in training mode."""
    q.initialized.fill_(True)
    return q.train()


def g_lsq(numel: int, qp: float) -> float:
    return 1.0 / math.sqrt(numel * qp)


# --- LSQ+ ---------------------------------------------------------------------------------------------------


def test_lsq_plus_activation_init_forward_and_gradients():
    """LSQ+ activations (Bhalgat et al. 2020), docs/method.md baselines: an unsigned b-bit grid moved by a
    learnable offset, x̂ = s·round(clip((x − β)/s, 0, 2^b − 1)) + β. On the first batch the grid spans the
    batch: s = (max − min)/(Qp − Qn), β = min. Backward (straight-through rounding): ∂x̂/∂x = 1 inside the
    range, 0 where clipped; ∂x̂/∂β = 0 inside, 1 where clipped; ∂x̂/∂s = round(v) − v inside (v = (x − β)/s),
    Qn or Qp where clipped, times LSQ's g."""
    q = LSQPlus(2).train()  # Qn = 0, Qp = 3
    first = [-0.5, 0.1, 0.4, 1.0]
    out = q(torch.tensor(first))
    s0, b0 = (1.0 - -0.5) / 3, -0.5
    assert q.step.item() == pytest.approx(s0, **TOL) and q.offset.item() == pytest.approx(b0, **TOL)
    codes = [round((x - b0) / s0) for x in first]  # (0, 1.2, 1.8, 3) -> 0, 1, 2, 3
    assert codes == [0, 1, 2, 3]
    assert near(out, [s0 * k + b0 for k in codes])

    s, beta = 0.4, -0.2
    set_(q.step, s)
    set_(q.offset, beta)
    xs, c = [-0.5, 0.05, 0.3, 1.5], [1.0, 2.0, 3.0, 4.0]
    x = leaf(xs)
    y = q(x)
    v = [(xi - beta) / s for xi in xs]  # -0.75, 0.625, 1.25, 4.25
    vc = [min(max(vi, 0.0), 3.0) for vi in v]
    assert near(y, [s * round(vi) + beta for vi in vc])  # -0.2, 0.2, 0.2, 1.0
    (y * torch.tensor(c)).sum().backward()
    inside = [0.0 < vi < 3.0 for vi in v]
    assert near(x.grad, [ci if ins else 0.0 for ci, ins in zip(c, inside, strict=True)])
    clipped_weight = sum(ci for ci, ins in zip(c, inside, strict=True) if not ins)
    assert q.offset.grad.item() == pytest.approx(clipped_weight, **TOL)
    ds = [round(vi) - vi if ins else vc_ for vi, vc_, ins in zip(v, vc, inside, strict=True)]
    expected_ds = g_lsq(4, 3.0) * sum(ci * d for ci, d in zip(c, ds, strict=True))
    assert q.step.grad.item() == pytest.approx(expected_ds, **TOL)


def test_lsq_plus_weight_per_channel_init_forward_and_gradients():
    """LSQ+ weights: a symmetric signed grid with one learnable step per output channel,
    ŵ = s_o·round(clip(w/s_o, Qn, Qp)); the paper's initialisation per channel is
    s = max(|μ − 3σ|, |μ + 3σ|)/2^(b−1) (μ, σ of that channel's weights). Backward: ∂ŵ/∂w = 1 inside the
    grid, 0 where clipped; ∂ŵ/∂s_o = round(w/s_o) − w/s_o inside, Qn or Qp where clipped, times g with numel
    the channel's element count."""
    q = LSQPlusWeight(2, channel_shape=(2, 1)).train()  # b = 2: the init divides by 2
    q(torch.tensor([[1.0, 2.0, 3.0], [-2.0, 0.0, 2.0]]))
    # row 1: μ = 2, σ = 1 -> max(1, 5)/2 = 2.5; row 2: μ = 0, σ = 2 -> 6/2 = 3
    assert near(q.step, [[2.5], [3.0]])

    q = ready(LSQPlusWeight(3, channel_shape=(2, 1)))  # Qn = -4, Qp = 3
    steps = [0.5, 0.25]
    set_(q.step, [[steps[0]], [steps[1]]])
    ws = [[0.3, -1.1, 2.6], [0.1, -0.6, -1.5]]
    c = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    w = leaf(ws)
    y = q(w)
    y_expected, w_grad, s_grad = [], [], []
    for row, s, crow in zip(ws, steps, c, strict=True):
        v = [wi / s for wi in row]
        vc = [min(max(vi, -4.0), 3.0) for vi in v]
        y_expected.append([s * round(vi) for vi in vc])
        inside = [-4.0 < vi < 3.0 for vi in v]
        w_grad.append([ci if ins else 0.0 for ci, ins in zip(crow, inside, strict=True)])
        d = [round(vi) - vi if ins else vci for vi, vci, ins in zip(v, vc, inside, strict=True)]
        s_grad.append(g_lsq(3, 3.0) * sum(ci * di for ci, di in zip(crow, d, strict=True)))
    assert y_expected == [[0.5, -1.0, 1.5], [0.0, -0.5, -1.0]]  # the hand-worked codes: 1, -2, 3 / 0, -2, -4
    assert near(y, y_expected)
    (y * torch.tensor(c)).sum().backward()
    assert near(w.grad, w_grad)
    assert near(q.step.grad, s_grad)


# --- PAMS ---------------------------------------------------------------------------------------------------


def test_pams_activation_forward_and_gradients():
    """PAMS activations (Li et al. 2020): clamp to a learnable [−α, α], then a symmetric b-bit grid with
    2^(b−1) − 1 levels on each side: x̂ = round(clip(x, −α, α)·Qp/α)·α/Qp; α starts at the first batch's
    max|x|. Rounding is straight-through and nothing else is approximated, so: ∂x̂/∂x = 1 inside, 0 where
    clipped; ∂x̂/∂α = sign(x) where clipped, (round(v) − v)/Qp inside (v = x·Qp/α)."""
    q = PAMS(3).train()
    q(torch.tensor([0.3, -2.5, 1.0]))
    assert q.alpha.item() == pytest.approx(2.5)

    alpha, qp = 1.2, 3.0
    set_(q.alpha, alpha)
    xs, c = [-2.0, -0.5, 0.1, 0.7, 1.5], [1.0, 2.0, 3.0, 4.0, 5.0]
    x = leaf(xs)
    y = q(x)
    v = [min(max(xi, -alpha), alpha) * qp / alpha for xi in xs]  # -3, -1.25, 0.25, 1.75, 3
    assert [round(vi) for vi in v] == [-3, -1, 0, 2, 3]
    assert near(y, [round(vi) * alpha / qp for vi in v])
    (y * torch.tensor(c)).sum().backward()
    inside = [abs(xi) < alpha for xi in xs]
    assert near(x.grad, [ci if ins else 0.0 for ci, ins in zip(c, inside, strict=True)])
    d_alpha = sum(
        ci * ((round(vi) - vi) / qp if ins else math.copysign(1.0, xi))
        for ci, vi, xi, ins in zip(c, v, xs, inside, strict=True)
    )
    assert d_alpha == pytest.approx(4.25)  # -1 + 5 from the clipped ends, (0.5 - 0.75 + 1)/3 inside
    assert q.alpha.grad.item() == pytest.approx(d_alpha, **TOL)


def test_pams_weight_max_abs_not_learned():
    """PAMS weights: s = max|w|/(2^(b−1) − 1) per tensor, ŵ = s·round(w/s); s is a statistic, not learned
    (no gradient through it), so ∂ŵ/∂w = 1 everywhere."""
    q = PAMSWeight(3).train()
    ws = [0.4, -1.0, 0.2, 0.75]
    w = leaf(ws)
    y = q(w)
    s = 1.0 / 3
    assert [round(wi / s) for wi in ws] == [1, -3, 1, 2]
    assert near(y, [s * round(wi / s) for wi in ws])
    y.sum().backward()
    assert near(w.grad, [1.0] * 4)
    assert not list(q.parameters())


# --- DoReFa -------------------------------------------------------------------------------------------------


def test_dorefa_activation_forward_and_gradients():
    """DoReFa activations (Zhou et al. 2016): x̂ = round((2^b − 1)·clip(x, 0, 1))/(2^b − 1), straight-through:
    ∂x̂/∂x = 1 for 0 < x < 1, 0 outside."""
    q = DoReFa(2).train()
    xs = [-0.3, 0.1, 0.45, 0.9, 1.4]
    x = leaf(xs)
    y = q(x)
    n = 3
    assert near(y, [round(min(max(xi, 0.0), 1.0) * n) / n for xi in xs])  # 0, 0, 1/3, 1, 1
    y.sum().backward()
    assert near(x.grad, [0.0, 1.0, 1.0, 1.0, 0.0])


def test_dorefa_weight_forward_and_gradients():
    """DoReFa weights: t = tanh(w)/(2·max|tanh w|) + 1/2 in [0, 1], ŵ = 2·round((2^b − 1)·t)/(2^b − 1) − 1,
    straight-through rounding, so ∂ŵ/∂w = (1 − tanh²w)/max|tanh w|. This project then multiplies by max|w|
    (held constant) to keep a trained layer's scale (docs/method.md). The gradient is checked on the elements
    that are not the maximum (where the paper and a held-constant maximum agree); the loss ignores the
    maximal element's output."""
    q = DoReFaWeight(2).train()
    ws = [0.2, -0.5, 1.0, 0.05]
    c = [1.0, 2.0, 0.0, 3.0]
    w = leaf(ws)
    y = q(w)
    n, top = 3, max(abs(v) for v in ws)
    big = max(abs(math.tanh(v)) for v in ws)
    t = [math.tanh(v) / (2 * big) + 0.5 for v in ws]  # 0.6296, 0.1966, 1, 0.5328
    assert [round(n * ti) for ti in t] == [2, 1, 3, 2]
    assert near(y, [(2 * round(n * ti) / n - 1) * top for ti in t])
    (y * torch.tensor(c)).sum().backward()
    expected = [ci * top * (1 - math.tanh(v) ** 2) / big for ci, v in zip(c, ws, strict=True)]
    for i in (0, 1, 3):
        assert w.grad[i].item() == pytest.approx(expected[i], **TOL), i


# --- QuantSR-style ------------------------------------------------------------------------------------------


def tanh_slope(v: float, k: float = 4.0) -> float:
    """d/dv of the soft staircase ⌊v⌋ + 1/2 + tanh(k·(v − ⌊v⌋ − 1/2))/(2·tanh(k/2))."""
    r = v - math.floor(v) - 0.5
    return k * (1 - math.tanh(k * r) ** 2) / (2 * math.tanh(k / 2))


def test_quantsr_forward_and_gradients():
    """QuantSR-style activations (Qin et al. 2023): a learnable per-channel shift τ before an LSQ quantizer,
    removed after it: x̂ = s·R(clip((x + τ)/s, Qn, Qp)) − τ. R rounds in the forward pass; its backward is
    tanh-shaped inside each rounding interval [n, n + 1]: the slope of n + 1/2 + tanh(k(v − n − 1/2))/
    (2 tanh(k/2)), k = 4, steepest at the rounding threshold n + 1/2. So ∂x̂/∂x = R'(v) inside, 0 where
    clipped; ∂x̂/∂τ = R'(v) − 1 inside, −1 where clipped; ∂x̂/∂s = round(v) − R'(v)·v inside, Qn or Qp
    where clipped, times LSQ's g."""
    q = ready(QuantSR(3, channel_shape=(2, 1), signed=True))  # Qn = -4, Qp = 3
    s, taus = 0.5, [0.1, -0.2]
    set_(q.step, s)
    set_(q.shift, [[taus[0]], [taus[1]]])
    xs = [[0.3, -2.5, 1.6], [0.4, 0.9, 3.0]]
    c = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    x = leaf(xs)
    y = q(x)
    y_expected, x_grad, tau_grad, s_grad = [], [], [], 0.0
    for row, tau, crow in zip(xs, taus, c, strict=True):
        v = [(xi + tau) / s for xi in row]  # 0.8, -4.8, 3.4 / 0.4, 1.4, 5.6
        vc = [min(max(vi, -4.0), 3.0) for vi in v]
        inside = [-4.0 < vi < 3.0 for vi in v]
        y_expected.append([s * round(vi) - tau for vi in vc])
        tau_grad.append(0.0)
        for ci, vi, vci, ins in zip(crow, v, vc, inside, strict=True):
            x_grad.append(ci * tanh_slope(vi) if ins else 0.0)
            tau_grad[-1] += ci * (tanh_slope(vi) - 1 if ins else -1.0)
            s_grad += ci * (round(vi) - tanh_slope(vi) * vi if ins else vci)
    assert y_expected == [pytest.approx([0.4, -2.1, 1.4]), pytest.approx([0.2, 0.7, 1.7])]
    assert near(y, y_expected)
    (y * torch.tensor(c)).sum().backward()
    assert near(x.grad, x_grad)
    assert near(q.shift.grad, tau_grad)
    assert q.step.grad.item() == pytest.approx(g_lsq(6, 3.0) * s_grad, **TOL)
    assert tanh_slope(0.5) > 1 > tanh_slope(0.05)  # peaked at the threshold, flat near the integers


# --- N2UQ-style ---------------------------------------------------------------------------------------------


def inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


def test_n2uq_forward_and_gradients():
    """N2UQ-style activations (Liu et al. 2022): learnable, non-uniform thresholds T_1 < ... < T_(2^b−1) and
    uniform output levels: u = clip((x + β)/s, Qn, Qp), q = Qn + #{i : u > T_i}, x̂ = s·q − β. Generalised
    STE backward: q is replaced by the piecewise-linear line through (T_i, Qn + i − 1/2), slope
    1/(T_(i+1) − T_i) between thresholds and 1 outside them, so the thresholds learn through that line.
    The thresholds are stored as T_1 = Qn + first and positive gaps softplus(γ_j) + 0.05."""
    q = ready(N2UQ(2, signed=True))  # Qn = -2, Qp = 1, thresholds T1 < T2 < T3
    T = [-1.2, -0.4, 0.7]
    qn = -2.0
    gaps = [inverse_softplus(T[1] - T[0] - 0.05), inverse_softplus(T[2] - T[1] - 0.05)]
    set_(q.first, T[0] - qn)
    set_(q.gaps, gaps)
    s, beta = 0.5, 0.1
    set_(q.step, s)
    set_(q.offset, beta)
    us = [-3.8, -0.45, 0.6, 0.8, 2.2]
    xs = [s * u - beta for u in us]
    c = [1.0, 2.0, 3.0, 4.0, 5.0]
    x = leaf(xs)
    y = q(x)
    uc = [min(max(u, qn), 1.0) for u in us]
    codes = [qn + sum(u > t for t in T) for u in uc]
    assert codes == [-2, -1, 0, 1, 1]  # rounding would give 0 (not -1) for -0.45 and 1 (not 0) for 0.6
    assert near(y, [s * k - beta for k in codes])

    def line(u: float) -> tuple[float, list[float]]:
        """Slope of the G-STE line at u, and its derivatives with respect to T1, T2, T3."""
        d = [0.0, 0.0, 0.0]
        if u <= T[0]:
            d[0] = -1.0
            return 1.0, d
        if u >= T[2]:
            d[2] = -1.0
            return 1.0, d
        i = 0 if u < T[1] else 1
        width = T[i + 1] - T[i]
        d[i] = (u - T[i + 1]) / width**2
        d[i + 1] = -(u - T[i]) / width**2
        return 1.0 / width, d

    (y * torch.tensor(c)).sum().backward()
    inside = [qn < u < 1.0 for u in us]
    slopes = [line(u)[0] for u in uc]
    assert near(x.grad, [ci * sl if ins else 0.0 for ci, sl, ins in zip(c, slopes, inside, strict=True)])
    assert q.offset.grad.item() == pytest.approx(
        sum(ci * (sl - 1 if ins else -1.0) for ci, sl, ins in zip(c, slopes, inside, strict=True)), **TOL)
    ds = sum(ci * (k - sl * u if ins else k) for ci, k, sl, u, ins in zip(c, codes, slopes, uc, inside,
                                                                           strict=True))
    assert q.step.grad.item() == pytest.approx(g_lsq(5, 1.0) * ds, **TOL)
    dT = [s * sum(ci * line(u)[1][j] for ci, u in zip(c, uc, strict=True)) for j in range(3)]
    sig = [1 / (1 + math.exp(-gj)) for gj in gaps]  # d softplus / d γ
    assert q.first.grad.item() == pytest.approx(sum(dT), **TOL)
    assert near(q.gaps.grad, [sig[0] * (dT[1] + dT[2]), sig[1] * dT[2]])


# --- dynamic per-token PTQ ----------------------------------------------------------------------------------


def test_dynamic_per_token_forward_and_gradient():
    """Dynamic per-token PTQ (PTQ4VM-style): at run time each token (position) gets its own asymmetric range
    [min, max] over the channel dimension and 2^b uniform levels, x̂ = lo + Δ·round((x − lo)/Δ) with
    Δ = (max − min)/(2^b − 1); the range is a statistic (no gradient), so ∂x̂/∂x = 1."""
    q = DynamicTokenQuant(2, token_dim=-1).train()
    xs = [[-1.0, 0.2, 2.0], [0.3, 0.35, 0.9]]
    x = leaf(xs)
    y = q(x)
    expected = []
    for row in xs:
        lo, step = min(row), (max(row) - min(row)) / 3
        expected.append([lo + step * round((v - lo) / step) for v in row])
    assert expected[0] == pytest.approx([-1.0, 0.0, 2.0]) and expected[1] == pytest.approx([0.3, 0.3, 0.9])
    assert near(y, expected)
    (y * torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])).sum().backward()
    assert near(x.grad, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])

    channels_first = DynamicTokenQuant(2, token_dim=1)  # NCHW: a token is one pixel, ranges over C
    z = torch.tensor(xs).T.reshape(1, 3, 2, 1)
    assert near(channels_first(z).reshape(3, 2).T, expected)


def test_dynamic_ptq_weights_are_max_abs_per_output_channel():
    """PTQ weights of the dynamic method: symmetric, one scale per output channel,
    s_o = max_o|w|/(2^(b−1) − 1), ŵ = s_o·round(w/s_o)."""
    q = MaxAbsWeight(3, out_dims=1)
    ws = [[0.4, -1.0, 0.2], [0.04, 0.12, -0.3]]
    y = q(torch.tensor(ws))
    expected = []
    for row in ws:
        s = max(abs(v) for v in row) / 3
        expected.append([s * round(v / s) for v in row])
    assert expected[1] == pytest.approx([0.0, 0.1, -0.3])  # codes 0.4 -> 0, 1.2 -> 1, -3
    assert near(y, expected)
