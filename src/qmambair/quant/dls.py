"""DLS: the statistical dynamic-balancing learnable scalar activation quantizer (docs/method.md §3.3)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from .base import Quantizer, grad_scale, lsq_grad_factor, round_ste, ste_clamp
from .fused import DLSConsts, dls_params, dls_quant, group_stats, use_fused

MIN_DELTA = 1e-6  # the lower bound of the step (docs/method.md §3.3)
VAR_FLOOR = 1e-12  # sqrt is not differentiable at 0: a constant tensor would give NaN gradients


def step_and_offset(
    mean: torch.Tensor,
    var: torch.Tensor | None,
    lo: torch.Tensor,
    hi: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    *,
    bits: int,
    qp: float,
    numel: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DLS's (Δ, β) from the statistics of a group (mean, unbiased variance or None, min, max).

    β is constant over each group, so the statistics of x̃ = x + β follow from those of x exactly (mean+β, σ,
    min+β, max+β) with the same gradients: no second pass over the tensor.
    """
    # the square root in float64, rounded once to float32: torch's float32 sqrt is not correctly rounded
    # on every CPU (its AVX2 kernels are 1 ulp off for many inputs), float64's rounded to float32 is
    if var is None:
        sigma = torch.zeros_like(mean)
    else:
        sigma = var.clamp_min(VAR_FLOOR).double().sqrt().to(var.dtype)
    beta = v[0] * mean + v[1] * sigma + v[2] * lo + v[3] * hi
    t_mu, t_lo, t_hi = mean + beta, lo + beta, hi + beta
    delta_raw = (w[0] * t_mu.abs() + w[1] * sigma + w[2] * t_lo + w[3] * t_hi).abs()
    delta = grad_scale(delta_raw, lsq_grad_factor(numel, qp)).clamp_min(MIN_DELTA)
    cap = ((hi - lo) / 2**bits).detach().clamp_min(1e-12)
    return torch.minimum(delta, cap), beta


class DLS(Quantizer):
    """Activation quantizer whose offset and step follow the statistics of the current tensor.

    With μ, σ (unbiased), m = min, M = max of x (recomputed every call, training and inference alike):

        β  = v1·μ + v2·σ + v3·m + v4·M                       v init (−1, 0, 0, 0)
        x̃  = x + β
        Δr = |w1·|mean x̃| + w2·std x̃ + w3·min x̃ + w4·max x̃|   w init (1, 3, 0, 0)/(2^(b−1)−1)
        Δ  = min(max(gscale(Δr, g), 1e−6), stopgrad((M − m)/2^b))
        x̂  = clip(Δ·round_ste(clip(x̃/Δ, Qn, Qp)) − β, m, M)

    The grid is always signed: β starts at −μ, so x̃ is centred. Gradients reach v via β, w via Δ and x
    through the statistics as well as the rounding.

    Fixes over the released code, documented here:
    - constant tensor (M = m): the cap (M − m)/2^b would be 0 and x̃/Δ divide by zero. The cap is floored at
      1e−12 (x̂ then equals the clip bound m = M = x exactly) and σ is computed as sqrt(max(var, 1e−12)) so
      neither the value nor the gradient of std at zero variance is NaN; a one-element group has σ = 0.
      The square root is taken in float64 and rounded to float32 (the correctly rounded float32 value on
      every CPU; torch's float32 sqrt is not correctly rounded on all of them).
    ``per_sample=True`` computes every statistic per sample (over all dims but the first), so one image's
    quantization does not depend on the other images of the batch; the default is per tensor (paper).

    ``sigma_init`` is the 3 of the paper's w init (1, 3, 0, 0)/(2^(b−1)−1). At b = 2 that starts the step at
    3σ, above the (M − m)/4 cap for most tensors, so the step *is* the cap and w gets no gradient (see
    ``benchmarks/quant_error.py``); ``sigma_init=1`` starts near the MSE-optimal 4-level step of a Gaussian
    (≈ 1.0σ). An experiment switch, not the paper's recipe.
    """

    needs_init = False

    def __init__(self, bits: int, per_sample: bool = False, sigma_init: float = 3.0):
        super().__init__(bits, signed=True)
        if not sigma_init > 0:
            raise ValueError(f"DLS sigma_init must be > 0, got {sigma_init}")
        self.per_sample = bool(per_sample)
        self.v = nn.Parameter(torch.tensor([-1.0, 0.0, 0.0, 0.0]))
        self.w = nn.Parameter(torch.tensor([1.0, float(sigma_init), 0.0, 0.0]) / (2 ** (bits - 1) - 1))

    def _groups(self, x: torch.Tensor) -> int:
        """Number of statistics groups: the batch size per sample, else 1."""
        return x.shape[0] if self.per_sample and x.dim() > 1 else 1

    def _scalars(self, numel: int) -> functools.partial:
        """The map (mean, var, min, max, v, w) -> (Δ, β) for groups of ``numel`` elements."""
        return functools.partial(step_and_offset, bits=self.bits, qp=self.qp, numel=numel)

    def step_and_offset(self, x: torch.Tensor, copies: int = 1) -> tuple[torch.Tensor, ...]:
        """(Δ, β, m, M) for ``x``, each broadcastable to x (per tensor, or per sample). Without a graph to
        record, on the fused path: the fused forward's scalars (same values, a fraction of the operations).

        ``copies``: those of a tensor holding every sample of ``x`` that many times (e.g. the scan's u, four
        orders of one tensor), computed from ``x`` alone."""
        groups = self._groups(x)
        x2 = x.reshape(groups, -1)
        shape = (groups,) + (1,) * (x.dim() - 1) if x.dim() else ()
        graph = torch.is_grad_enabled() and (x.requires_grad or self.v.requires_grad or self.w.requires_grad)
        if use_fused(x2) and not graph:
            params = dls_params(x2, self.v, self.w, self._consts(x2.shape[1] * copies), copies)
            return tuple(t.reshape(shape) for t in params)
        mean, var, lo, hi = group_stats(x2, fused=use_fused(x2), copies=copies)
        delta, beta = self._scalars(x2.shape[1] * copies)(mean, var, lo, hi, self.v, self.w)
        return tuple(t.reshape(shape) for t in (delta, beta, lo, hi))

    def _consts(self, numel: int) -> DLSConsts:
        """The fused kernels' constants for groups of ``numel`` elements."""
        qn, qp = self.bounds
        return DLSConsts(self.bits, qn, qp, lsq_grad_factor(numel, qp), VAR_FLOOR, MIN_DELTA)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(self._groups(x), -1)
        if use_fused(x2):
            return dls_quant(x2, self.v, self.w, self._consts(x2.shape[1])).reshape(x.shape)
        return self.quantize_eager(x)

    def quantize_eager(self, x: torch.Tensor) -> torch.Tensor:
        """The reference implementation (torch operations recorded by autograd), the fused path's oracle."""
        x2 = x.reshape(self._groups(x), -1)
        mean, var, lo, hi = group_stats(x2)
        delta, beta = self._scalars(x2.shape[1])(mean, var, lo, hi, self.v, self.w)
        out = delta * round_ste(torch.clamp((x2 + beta) / delta, self.qn, self.qp)) - beta
        return ste_clamp(out, lo, hi).reshape(x.shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", per_sample={self.per_sample}"
