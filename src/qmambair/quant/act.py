"""Act_Quant: the per-tensor LSQ+ activation quantizer with a learnable offset (docs/method.md §3.2)."""

from __future__ import annotations

import torch
from torch import nn

from .base import MIN_STEP, Quantizer, grad_scale, lsq_grad_factor, round_ste
from .fused import affine_quant, use_fused


class ActQuant(Quantizer):
    """x̂ = s·round_ste(clip((x+β)/s, Qn, Qp)) − β with learnable step s and offset β (init 0).

    First batch: signed if min(x) < −1e−5, then s = 2·mean|x+β|/sqrt(Qp). The LSQ gradient scale
    g = 1/sqrt(numel·Qp) applies to s wherever it appears (value unchanged). The step is floored at 1e−8 so
    an all-zero first batch or an optimiser step through zero cannot divide by zero (fix over the release).
    """

    def __init__(self, bits: int, signed: bool | None = None):
        super().__init__(bits, signed)
        self.step = nn.Parameter(torch.tensor(1.0))
        self.offset = nn.Parameter(torch.tensor(0.0))

    def initialize(self, x: torch.Tensor) -> None:
        self.decide_sign(x)
        step = 2 * (x + self.offset).abs().mean() / self.qp**0.5
        self.step.copy_(step.clamp_min(MIN_STEP))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qn, qp = self.bounds
        if use_fused(x):
            return affine_quant(x, self.step, self.offset, qn, qp, MIN_STEP, lsq_grad_factor(x.numel(), qp))
        s = grad_scale(self.step, lsq_grad_factor(x.numel(), qp)).clamp_min(MIN_STEP)
        return s * round_ste(torch.clamp((x + self.offset) / s, qn, qp)) - self.offset
