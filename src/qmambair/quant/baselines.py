"""QAT baseline quantizers (docs/method.md §3.5): LSQ, LSQ+, PAMS, DoReFa, QuantSR-style, N2UQ-style.

Each baseline has an activation class and, where its weight rule differs, a ``...Weight`` class. All are
per-tensor unless stated; all keep their state in the state dict (see ``Quantizer``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import MIN_STEP, Quantizer, WeightQuantizer, grad_scale, lsq_grad_factor, round_ste, ste_clamp
from .fused import affine_quant, use_fused
from .rfa import count_above, piecewise_linear


class LSQ(Quantizer):
    """LSQ (Esser et al. 2020): x̂ = s·round_ste(clip(x/s, Qn, Qp)), learnable s, gradient scale g.

    Init s = 2·mean|x|/sqrt(Qp) on the first batch; ``signed=None`` decides signedness there.
    """

    def __init__(self, bits: int, signed: bool | None = None):
        super().__init__(bits, signed)
        self.step = nn.Parameter(torch.tensor(1.0))

    def initialize(self, x: torch.Tensor) -> None:
        self.decide_sign(x)
        self.step.copy_((2 * x.abs().mean() / self.qp**0.5).clamp_min(MIN_STEP))

    def _step(self, x: torch.Tensor) -> torch.Tensor:
        return grad_scale(self.step, lsq_grad_factor(x.numel(), self.qp)).clamp_min(MIN_STEP)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused(x):
            qn, qp = self.bounds
            return affine_quant(x, self.step, None, qn, qp, MIN_STEP, lsq_grad_factor(x.numel(), qp))
        s = self._step(x)
        return s * round_ste(torch.clamp(x / s, self.qn, self.qp))


class LSQWeight(WeightQuantizer, LSQ):
    """LSQ for weights: the same rule on a symmetric signed grid, exportable as integer codes (and, as every
    weight quantizer, computed once in eval mode: ``WeightQuantizer``)."""

    def __init__(self, bits: int):
        super().__init__(bits)  # WeightQuantizer -> LSQ(bits, signed=True)

    @torch.no_grad()
    def integer_codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.step.clamp_min(MIN_STEP)
        codes = torch.clamp(w / s, self.qn, self.qp).round().long()
        return codes, s.clone(), torch.zeros_like(s)


class LSQPlus(Quantizer):
    """LSQ+ activations (Bhalgat et al. 2020): x̂ = s·round_ste(clip((x−β)/s, 0, 2^b−1)) + β.

    Unsigned grid with a learnable offset β; init from the first batch's range: s = (max−min)/(Qp−Qn),
    β = min.
    """

    def __init__(self, bits: int):
        super().__init__(bits, signed=False)
        self.step = nn.Parameter(torch.tensor(1.0))
        self.offset = nn.Parameter(torch.tensor(0.0))

    def initialize(self, x: torch.Tensor) -> None:
        lo, hi = x.min(), x.max()
        step = ((hi - lo) / (self.qp - self.qn)).clamp_min(MIN_STEP)
        self.step.copy_(step)
        self.offset.copy_(lo - self.qn * step)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        s = grad_scale(self.step, lsq_grad_factor(x.numel(), self.qp)).clamp_min(MIN_STEP)
        return s * round_ste(torch.clamp((x - self.offset) / s, self.qn, self.qp)) + self.offset


class LSQPlusWeight(WeightQuantizer):
    """LSQ+ weights: symmetric signed grid, one learnable step per output channel.

    ``channel_shape`` is the broadcast shape of the step, e.g. (O, 1, 1, 1) for a conv; None = per tensor.
    Init per channel (LSQ+ paper): s = max(|μ − 3σ|, |μ + 3σ|)/2^(b−1).
    """

    def __init__(self, bits: int, channel_shape: tuple[int, ...] | None = None):
        super().__init__(bits)
        self.step = nn.Parameter(torch.ones(channel_shape or ()))

    def _reduce_dims(self, w: torch.Tensor) -> tuple[int, ...]:
        if self.step.dim() == 0:
            return tuple(range(w.dim()))
        return tuple(d for d in range(w.dim()) if self.step.shape[d] == 1)

    def initialize(self, w: torch.Tensor) -> None:
        dims = self._reduce_dims(w)
        mu = w.mean(dim=dims, keepdim=True)
        sd = w.std(dim=dims, keepdim=True) if w.numel() > self.step.numel() else torch.zeros_like(mu)
        s = torch.maximum((mu - 3 * sd).abs(), (mu + 3 * sd).abs()) / 2 ** (self.bits - 1)
        self.step.copy_(s.reshape(self.step.shape).clamp_min(MIN_STEP))

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        g = lsq_grad_factor(w.numel() // max(self.step.numel(), 1), self.qp)
        s = grad_scale(self.step, g).clamp_min(MIN_STEP)
        return s * round_ste(torch.clamp(w / s, self.qn, self.qp))

    @torch.no_grad()
    def integer_codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.step.clamp_min(MIN_STEP)
        return torch.clamp(w / s, self.qn, self.qp).round().long(), s.clone(), torch.zeros_like(s)


class PAMS(Quantizer):
    """PAMS activations (Li et al. 2020): clamp to [−α, α], symmetric b-bit grid (±(2^(b−1)−1)), STE.

    α is learnable (PACT-like: it gets gradient from clipped values) and starts at the first batch's
    max|x| (the paper's running max over the first iterations, reduced to one batch like every other
    quantizer here).
    """

    def __init__(self, bits: int):
        super().__init__(bits, signed=True)
        self.alpha = nn.Parameter(torch.tensor(1.0))

    def initialize(self, x: torch.Tensor) -> None:
        self.alpha.copy_(x.abs().max().clamp_min(MIN_STEP))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.abs().clamp_min(MIN_STEP)
        scale = alpha / self.qp
        return round_ste(ste_clamp(x, -alpha, alpha) / scale) * scale


class MaxAbsWeight(WeightQuantizer):
    """Symmetric weights from max|w| (not learned): s = max|w|/(2^(b−1)−1), codes in [−Qp, Qp], STE.

    ``out_dims`` = 0: one scale per tensor; k > 0: one per index of the first k dims (per output channel).
    Used by PAMS (per tensor), MinMax and Percentile PTQ (per tensor) and dynamic PTQ (per channel).
    """

    needs_init = False

    def __init__(self, bits: int, out_dims: int = 0):
        super().__init__(bits)
        self.out_dims = int(out_dims)

    def _scale(self, w: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(self.out_dims, w.dim()))
        top = w.detach().abs().amax(dim=dims, keepdim=True) if dims else w.detach().abs()
        return top.clamp_min(MIN_STEP) / self.qp

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        s = self._scale(w)
        return round_ste(torch.clamp(w / s, -self.qp, self.qp)) * s

    @torch.no_grad()
    def integer_codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self._scale(w)
        return torch.clamp(w / s, -self.qp, self.qp).round().long(), s, torch.zeros_like(s)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", out_dims={self.out_dims}"


class PAMSWeight(MaxAbsWeight):
    """PAMS weights: max-abs per tensor, not learned."""

    def __init__(self, bits: int):
        super().__init__(bits, out_dims=0)


class DoReFa(Quantizer):
    """DoReFa activations (Zhou et al. 2016): clamp to [0, 1], round to the uniform b-bit grid, STE."""

    needs_init = False

    def __init__(self, bits: int):
        super().__init__(bits, signed=False)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        n = 2**self.bits - 1
        return round_ste(torch.clamp(x, 0.0, 1.0) * n) / n


class DoReFaWeight(WeightQuantizer):
    """DoReFa weights: t = tanh(w)/(2·max|tanh w|) + 1/2 in [0, 1], round to b bits, map back.

    DoReFa maps back to 2q − 1 in [−1, 1]; MambaIR has no normalisation after most quantized layers, so the
    result is then rescaled by max|w| (detached) to keep a pretrained layer's scale (choice, documented).
    """

    needs_init = False

    def __init__(self, bits: int):
        super().__init__(bits)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        n = 2**self.bits - 1
        t = torch.tanh(w)
        t = t / (2 * t.abs().max().detach().clamp_min(MIN_STEP)) + 0.5
        q = round_ste(t * n) / n
        return (2 * q - 1) * w.detach().abs().max()

    @torch.no_grad()
    def integer_codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = 2**self.bits - 1
        t = torch.tanh(w)
        t = t / (2 * t.abs().max().clamp_min(MIN_STEP)) + 0.5
        top = w.abs().max()
        scale = 2 * top / n
        codes = (t * n).round().long() + int(self.qn)
        return codes, scale, top + scale * self.qn


class TanhRound(torch.autograd.Function):
    """Round forward; backward the derivative of a tanh soft staircase (QuantSR-style).

    In each rounding interval [n, n+1) the surrogate n + 1/2 + tanh(k·(x − n − 1/2))/(2·tanh(k/2)) rises
    from n to n+1; its slope peaks at the rounding threshold and averages 1 like the plain STE.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.k = k
        return x.round()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        k = ctx.k
        r = x - torch.floor(x) - 0.5
        slope = k * (1 - torch.tanh(k * r) ** 2) / (2 * math.tanh(k / 2))
        return grad * slope, None


class QuantSR(Quantizer):
    """QuantSR-style activations: a learnable per-channel shift τ before an LSQ quantizer, shifted back.

    x̂ = s·R(clip((x+τ)/s, Qn, Qp)) − τ, where R rounds with a tanh-shaped gradient (``TanhRound``, k = 4).
    ``channel_shape`` is τ's broadcast shape (e.g. (C, 1, 1) for NCHW); None = one shift per tensor.
    τ starts at 0, s and signedness as LSQ on the first batch.
    """

    def __init__(self, bits: int, channel_shape: tuple[int, ...] | None = None, signed: bool | None = None,
                 k: float = 4.0):
        super().__init__(bits, signed)
        self.k = float(k)
        self.step = nn.Parameter(torch.tensor(1.0))
        self.shift = nn.Parameter(torch.zeros(channel_shape or ()))

    def initialize(self, x: torch.Tensor) -> None:
        self.decide_sign(x)
        self.step.copy_((2 * (x + self.shift).abs().mean() / self.qp**0.5).clamp_min(MIN_STEP))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        s = grad_scale(self.step, lsq_grad_factor(x.numel(), self.qp)).clamp_min(MIN_STEP)
        return s * TanhRound.apply(torch.clamp((x + self.shift) / s, self.qn, self.qp), self.k) - self.shift

    def extra_repr(self) -> str:
        return super().extra_repr() + f", shift={tuple(self.shift.shape)}"


class N2UQ(Quantizer):
    """N2UQ-style activations: learnable thresholds, uniform output levels, generalised STE.

    u = clip((x+β)/s, Qn, Qp); q = Qn + #{i : u > T_i}; x̂ = s·q − β. The thresholds are parametrised by
    their first value and positive gaps (softplus + 0.05), so they stay ordered by construction; they start
    at the rounding midpoints Qn + i − 1/2. The backward pass (G-STE) follows the line through
    (T_i, Qn + i − 1/2): slope 1/(T_{i+1} − T_i) between thresholds, 1 outside. Step s, offset β and
    signedness initialise as Act_Quant.
    """

    min_gap = 0.05

    def __init__(self, bits: int, signed: bool | None = None):
        super().__init__(bits, signed)
        n = 2**bits - 1
        self.step = nn.Parameter(torch.tensor(1.0))
        self.offset = nn.Parameter(torch.tensor(0.0))
        self.first = nn.Parameter(torch.tensor(0.5))  # relative to Qn, so the sign decision can move it
        gap0 = math.log(math.expm1(1.0 - self.min_gap))  # softplus^-1(1 - min_gap)
        self.gaps = nn.Parameter(torch.full((n - 1,), gap0))

    def thresholds(self) -> torch.Tensor:
        gaps = nn.functional.softplus(self.gaps) + self.min_gap
        head = (self.qn + self.first).reshape(1)
        return torch.cat([head, head + torch.cumsum(gaps, 0)])

    def initialize(self, x: torch.Tensor) -> None:
        self.decide_sign(x)
        self.step.copy_((2 * (x + self.offset).abs().mean() / self.qp**0.5).clamp_min(MIN_STEP))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qn, qp = self.qn, self.qp
        s = grad_scale(self.step, lsq_grad_factor(x.numel(), qp)).clamp_min(MIN_STEP)
        u = torch.clamp((x + self.offset) / s, qn, qp)
        t = self.thresholds().to(u.dtype)
        q = qn + count_above(u, t).to(u.dtype)
        sur = piecewise_linear(u, t, qn + 0.5, 1.0)
        return s * (q + (sur - sur.detach())) - self.offset


class N2UQWeight(WeightQuantizer):
    """N2UQ-style weights: scale from mean|w| (recomputed, not learned), uniform rounding, STE.

    s = 2·mean|w|/sqrt(Qp) (the mean|w| scaling with LSQ's constant, so the grid spans the weights at
    every bit-width); the scale is detached.
    """

    needs_init = False

    def __init__(self, bits: int):
        super().__init__(bits)

    def _scale(self, w: torch.Tensor) -> torch.Tensor:
        return (2 * w.detach().abs().mean() / self.qp**0.5).clamp_min(MIN_STEP)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        s = self._scale(w)
        return s * round_ste(torch.clamp(w / s, self.qn, self.qp))

    @torch.no_grad()
    def integer_codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self._scale(w)
        return torch.clamp(w / s, self.qn, self.qp).round().long(), s, torch.zeros_like(s)
