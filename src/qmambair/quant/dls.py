"""DLS: the statistical dynamic-balancing learnable scalar activation quantizer (docs/method.md §3.3)."""

from __future__ import annotations

import torch
from torch import nn

from .base import Quantizer, grad_scale, lsq_grad_factor, round_ste, ste_clamp

MIN_DELTA = 1e-6  # the lower bound of the step (docs/method.md §3.3)
VAR_FLOOR = 1e-12  # sqrt is not differentiable at 0: a constant tensor would give NaN gradients


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

    def _dims(self, x: torch.Tensor) -> tuple[int, ...]:
        if self.per_sample and x.dim() > 1:
            return tuple(range(1, x.dim()))
        return tuple(range(x.dim()))

    @staticmethod
    def _stats(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """mean, safe unbiased std, min, max over ``dims`` (kept for broadcasting)."""
        mean = x.mean(dim=dims, keepdim=True)
        count = 1
        for d in dims:
            count *= x.shape[d]
        if count > 1:
            var = x.var(dim=dims, correction=1, keepdim=True)
            std = var.clamp_min(VAR_FLOOR).sqrt()
        else:
            std = torch.zeros_like(mean)
        return mean, std, x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)

    def step_and_offset(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(Δ, β, m, M) for ``x``, each broadcastable to x (per tensor, or per sample)."""
        dims = self._dims(x)
        qp = self.qp
        mu, sigma, lo, hi = self._stats(x, dims)
        v, w = self.v, self.w
        beta = v[0] * mu + v[1] * sigma + v[2] * lo + v[3] * hi
        # β is constant over each statistics group, so the statistics of x̃ follow from those of x exactly
        # (mean+β, σ, min+β, max+β) with the same gradients: no second pass over the tensor.
        t_mu, t_lo, t_hi = mu + beta, lo + beta, hi + beta
        delta_raw = (w[0] * t_mu.abs() + w[1] * sigma + w[2] * t_lo + w[3] * t_hi).abs()
        numel = x.numel() // (x.shape[0] if self.per_sample and x.dim() > 1 else 1)
        delta = grad_scale(delta_raw, lsq_grad_factor(numel, qp)).clamp_min(MIN_DELTA)
        cap = ((hi - lo) / 2**self.bits).detach().clamp_min(1e-12)
        return torch.minimum(delta, cap), beta, lo, hi

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if x.dim() == 0:
            x = x.reshape(1)
        delta, beta, lo, hi = self.step_and_offset(x)
        out = delta * round_ste(torch.clamp((x + beta) / delta, self.qn, self.qp)) - beta
        return ste_clamp(out, lo, hi).reshape(shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", per_sample={self.per_sample}"
