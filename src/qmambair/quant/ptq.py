"""Post-training activation quantizers (docs/method.md §3.6): static MinMax and Percentile, dynamic per-token.

Static quantizers gather statistics while ``calibrating`` is set (the input passes through unchanged),
then ``finish_calibration`` fixes the range. ``calibrate(model, images)`` in calibrate.py drives this.
Weights of the PTQ methods use ``MaxAbsWeight`` (baselines.py).
"""

from __future__ import annotations

import math

import torch

from .base import MIN_STEP, SIGN_THRESHOLD, Quantizer, round_ste


def _fake_quant(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, levels: int) -> torch.Tensor:
    """Uniform asymmetric grid of ``levels`` values from lo to hi (clipped), STE rounding."""
    step = ((hi - lo) / (levels - 1)).clamp_min(MIN_STEP)
    return round_ste(torch.clamp((x - lo) / step, 0, levels - 1)) * step + lo


class StaticQuantizer(Quantizer):
    """Base of the static PTQ quantizers: calibration state in buffers, range fixed afterwards.

    Without a calibration pass, the first call calibrates on its own batch (one-batch calibration).
    """

    calibratable = True

    def __init__(self, bits: int):
        super().__init__(bits, signed=None)
        self.calibrating = False
        self.register_buffer("batches", torch.tensor(0, dtype=torch.long))
        self.register_buffer("observed_min", torch.tensor(math.inf))
        self.register_buffer("observed_max", torch.tensor(-math.inf))

    def start_calibration(self) -> None:
        """Forget previous statistics and pass inputs through while observing them."""
        self.calibrating = True
        self.batches.zero_()
        self.observed_min.fill_(math.inf)
        self.observed_max.fill_(-math.inf)
        self.reset_statistics()
        self.initialized.fill_(False)

    def reset_statistics(self) -> None:
        """Subclass hook: clear extra statistics."""

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        self.batches += 1
        self.observed_min.copy_(torch.minimum(self.observed_min, x.min().to(self.observed_min)))
        self.observed_max.copy_(torch.maximum(self.observed_max, x.max().to(self.observed_max)))

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Fix the range from what was observed (requires at least one observed batch)."""
        self.calibrating = False
        if int(self.batches) == 0:
            raise RuntimeError(f"{type(self).__name__}: calibration saw no input; is this layer used?")
        if self.auto_signed:
            self.signed.fill_(bool(self.observed_min < SIGN_THRESHOLD))
        self.fix_range()
        self.initialized.fill_(True)

    def fix_range(self) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.observe(x.detach())
            return x
        return super().forward(x)

    def initialize(self, x: torch.Tensor) -> None:
        self.start_calibration()
        self.observe(x)
        self.finish_calibration()


class MinMaxQuant(StaticQuantizer):
    """Static per-tensor asymmetric range [min, max] over the calibration set, 2^b uniform levels."""

    def __init__(self, bits: int):
        super().__init__(bits)
        self.register_buffer("low", torch.tensor(0.0))
        self.register_buffer("high", torch.tensor(1.0))

    def fix_range(self) -> None:
        self.low.copy_(self.observed_min)
        self.high.copy_(self.observed_max)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return _fake_quant(x, self.low, self.high, 2**self.bits)


class PercentileQuant(StaticQuantizer):
    """Static clip at the 99.99th percentile p of |x| (Quamba-style), averaged over calibration batches.

    Range [−p, p] on the signed grid, or [0, p] on the unsigned grid when no calibration input was
    negative (min >= −1e−5). Per batch the percentile is an exact order statistic (kthvalue).
    """

    def __init__(self, bits: int, percentile: float = 99.99):
        super().__init__(bits)
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = float(percentile)
        self.register_buffer("clip_sum", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("clip", torch.tensor(1.0))

    def reset_statistics(self) -> None:
        self.clip_sum.zero_()

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        flat = x.detach().abs().reshape(-1).float()
        k = min(max(math.ceil(self.percentile / 100 * flat.numel()), 1), flat.numel())
        self.clip_sum += flat.kthvalue(k).values.double().cpu().to(self.clip_sum.device)

    def fix_range(self) -> None:
        self.clip.copy_((self.clip_sum / self.batches).clamp_min(MIN_STEP))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        step = self.clip / self.qp
        return round_ste(torch.clamp(x / step, self.qn, self.qp)) * step

    def extra_repr(self) -> str:
        return super().extra_repr() + f", percentile={self.percentile}"


class DynamicTokenQuant(Quantizer):
    """Per-token asymmetric min-max at run time (PTQ4VM-style): nothing to calibrate.

    ``token_dim`` is the channel dimension reduced over, so each token (position) gets its own
    [min, max] with 2^b levels; None = one range per tensor.
    """

    needs_init = False

    def __init__(self, bits: int, token_dim: int | None = -1):
        super().__init__(bits, signed=False)
        self.token_dim = token_dim

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_dim is None or x.dim() == 0:
            lo, hi = x.detach().min(), x.detach().max()
        else:
            lo = x.detach().amin(dim=self.token_dim, keepdim=True)
            hi = x.detach().amax(dim=self.token_dim, keepdim=True)
        return _fake_quant(x, lo, hi, 2**self.bits)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", token_dim={self.token_dim}"
