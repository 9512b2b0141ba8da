"""RFA, the range-floating flexible allocator for weights (docs/method.md §3.4), and its threshold helpers."""

from __future__ import annotations

import torch
from torch import nn

from .base import MIN_STEP, WeightQuantizer, grad_scale, lsq_grad_factor
from .fused import rfa_quant, use_fused

OUTER_SLOPE = 0.1  # slope of the surrogate ŝ outside the first and last anchor


def count_above(u: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """#{i : u > t_i} per element, for increasing ``thresholds`` (a binary search, not a (n, 2^b) mask)."""
    return torch.bucketize(u.detach().contiguous(), thresholds.detach().contiguous(), right=False)


def piecewise_linear(u: torch.Tensor, knots: torch.Tensor, y0: float, outer_slope: float) -> torch.Tensor:
    """The line through (knots[i], y0 + i), slope ``outer_slope`` beyond the first and last knot.

    Between knots i and i+1 the slope is 1/(knots[i+1] − knots[i]); gradients reach u and the knots.
    ``knots`` must be strictly increasing.
    """
    n = knots.numel()
    idx = torch.bucketize(u.detach().contiguous(), knots.detach().contiguous(), right=True) - 1
    seg = idx.clamp(0, n - 2)
    lo, hi = knots[seg], knots[seg + 1]
    inner = y0 + seg.to(u.dtype) + (u - lo) / (hi - lo)
    below = y0 + outer_slope * (u - knots[0])
    above = y0 + (n - 1) + outer_slope * (u - knots[-1])
    return torch.where(idx < 0, below, torch.where(idx >= n - 1, above, inner))


def order_with_gap(points: torch.Tensor, min_gap: float) -> torch.Tensor:
    """Smallest lift with gaps >= ``min_gap``: e_i = max(p_i, e_{i−1} + gap), vectorised and differentiable.

    Uses e_i − i·gap = cummax_{j<=i}(p_j − j·gap). Where p_i is its own running maximum it is returned
    as is, so well-ordered points pass through exactly (value and gradient), with no rounding from the ramp.
    """
    ramp = torch.arange(points.numel(), device=points.device, dtype=points.dtype) * min_gap
    top = torch.cummax(points - ramp, dim=0)
    own = top.indices == torch.arange(points.numel(), device=points.device)
    return torch.where(own, points, top.values + ramp)


class RFA(WeightQuantizer):
    """Weight quantizer with learnable rounding thresholds and uniform integer output levels.

    Per weight tensor: scale α, offset β (init 0), anchors a_0..a_{2^b−1} (init a_i = Qn + i); signed grid.
    First training step: α = 2·mean|W+β|/sqrt(Qp).

        u = clip((W + β)/gscale(α, g), Qn, Qp)
        t_i = (a_{i−1} + a_i)/2                      i = 1..2^b−1
        q = Qn + #{i : u > t_i}                      integer levels: deployable as b-bit codes
        Ŵ = α·(q + (ŝ(u) − stopgrad(ŝ(u)))) − β        (the bracket is exactly 0 in value)

    ŝ is piecewise linear through (a_i, Qn + i), slope 1/(a_{i+1} − a_i) between anchors and 0.1 outside;
    the anchors learn only through ŝ. With anchors on the integer grid this is round-to-nearest with STE.

    Fix over the released code (anchors can cross there, making ŝ's slope negative or infinite): the forward
    uses ``ordered_anchors()``, the raw parameter lifted to a non-decreasing sequence with gaps >= ``min_gap``
    (default 0.1, so ŝ's slope is at most 10). This is a projection applied inside the forward pass rather
    than after each optimiser step, so it needs no trainer hook, holds in eval after any optimiser step,
    and is the identity (value and gradient) while the anchors are well ordered. A raw anchor pushed below
    its neighbour gets no gradient until it is back above, so it cannot run away.
    """

    def __init__(self, bits: int, min_gap: float = 0.1):
        super().__init__(bits)
        if not 0 < min_gap < 1:
            raise ValueError(f"min_gap must be in (0, 1), got {min_gap}")
        self.min_gap = float(min_gap)
        self.alpha = nn.Parameter(torch.tensor(1.0))
        self.beta = nn.Parameter(torch.tensor(0.0))
        self.anchors = nn.Parameter(torch.arange(2**bits, dtype=torch.float32) + self.qn)

    def initialize(self, w: torch.Tensor) -> None:
        self.alpha.copy_((2 * (w + self.beta).abs().mean() / self.qp**0.5).clamp_min(MIN_STEP))

    def ordered_anchors(self) -> torch.Tensor:
        return order_with_gap(self.anchors, self.min_gap)

    def thresholds(self) -> torch.Tensor:
        a = self.ordered_anchors()
        return (a[:-1] + a[1:]) / 2

    def _scale(self, w: torch.Tensor) -> torch.Tensor:
        return grad_scale(self.alpha, lsq_grad_factor(w.numel(), self.qp)).clamp_min(MIN_STEP)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        qn, qp = self.qn, self.qp
        if use_fused(w):
            g = lsq_grad_factor(w.numel(), qp)
            return rfa_quant(w, self.alpha, self.beta, self.anchors, qn, qp, MIN_STEP, g, self.min_gap,
                             OUTER_SLOPE)
        alpha = self._scale(w)
        anchors = self.ordered_anchors()
        u = torch.clamp((w + self.beta) / alpha, qn, qp)
        q = qn + count_above(u, (anchors[:-1] + anchors[1:]) / 2).to(w.dtype)
        s = piecewise_linear(u, anchors, qn, OUTER_SLOPE)
        return alpha * (q + (s - s.detach())) - self.beta

    @torch.no_grad()
    def integer_codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        alpha = self.alpha.clamp_min(MIN_STEP)
        u = torch.clamp((w + self.beta) / alpha, self.qn, self.qp)
        codes = int(self.qn) + count_above(u, self.thresholds())
        return codes, alpha.clone(), self.beta.clone()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", min_gap={self.min_gap}"
