"""Fake quantization of a scan input applied while the scan reads it (inference only).

A quantized model's scan inputs u and Δ are the two largest tensors of each SS2D layer. Fake-quantizing them
first writes a quantized copy that the scan then reads back; the fused CPU scan can instead quantize each
value as it loads it (``LoadQuant``), which saves that write and read. The map is the affine one of the
activation quantizers (docs/method.md §3.8):

    x̂ = min(max(s·round(min(max((x + b)/s, Qn), Qp)) − b, lo), hi)      (round half to even, float32)

with its scalars per batch element (per-sample DLS) or shared by the batch. ``fake_quant`` is the same map in
torch operations: the other backends apply it before scanning, and the tests use it as the oracle.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

FIELDS = 6  # s, b, lo, hi, Qn, Qp
CODE_LEVELS = 16  # the most codes of a quantized delta for which δ is looked up by code (4 bits)
MAX_LEVELS = 4  # the most levels of delta the CPU scan looks its decays up for (``LoadQuant.levels``)
INFERENCE_ONLY = "u_quant / delta_quant are for inference: run without gradients (torch.no_grad())"


class LoadQuant(NamedTuple):
    """The affine fake quantization of one scan input: each tensor has one value or one per batch element."""

    step: torch.Tensor
    offset: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    qn: float
    qp: float

    def rows(self, batch: int) -> np.ndarray:
        """(batch, 6) float32 rows (s, b, lo, hi, Qn, Qp), as the CPU kernel reads them."""
        out = np.empty((batch, FIELDS), np.float32)
        for k, value in enumerate((self.step, self.offset, self.lo, self.hi)):
            flat = value.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
            if flat.numel() not in (1, batch):
                name = self._fields[k]
                raise ValueError(f"LoadQuant.{name} has {flat.numel()} values for a batch of {batch}")
            out[:, k] = flat.numpy()
        out[:, 4], out[:, 5] = self.qn, self.qp
        return out

    def levels(self) -> torch.Tensor:
        """(groups, Qp − Qn + 1) float32: every value the map can output, min(max(s·k − b, lo), hi) for
        k = Qn..Qp, per group (one row, or one per batch element), with the kernel's float32 operations."""
        s, b, lo, hi = (t.detach().to(device="cpu", dtype=torch.float32).reshape(-1, 1)
                        for t in (self.step, self.offset, self.lo, self.hi))
        k = torch.arange(int(self.qn), int(self.qp) + 1, dtype=torch.float32)
        return torch.minimum(torch.maximum(s * k - b, lo), hi)


def quantize_before_scan(
    u: torch.Tensor, delta: torch.Tensor, u_quant: LoadQuant | None, delta_quant: LoadQuant | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, delta) fake-quantized with ``fake_quant``, for a scan that does not quantize as it reads."""
    if u_quant is None and delta_quant is None:
        return u, delta
    if torch.is_grad_enabled() and (u.requires_grad or delta.requires_grad):
        raise ValueError(INFERENCE_ONLY)
    return (u if u_quant is None else fake_quant(u, u_quant),
            delta if delta_quant is None else fake_quant(delta, delta_quant))


def fake_quant(x: torch.Tensor, q: LoadQuant) -> torch.Tensor:
    """``q`` applied to ``x`` (batch first) with torch operations, in the kernel's operation order."""
    s, b, lo, hi = _per_sample(q, x)
    return torch.minimum(torch.maximum(s * _code(x, s, b, q) - b, lo), hi)


def _per_sample(q: LoadQuant, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q's (s, b, lo, hi) in x's dtype, shaped to broadcast against x (batch first)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    return tuple(t.to(x.dtype).reshape(shape) for t in (q.step, q.offset, q.lo, q.hi))


def _code(x: torch.Tensor, s: torch.Tensor, b: torch.Tensor, q: LoadQuant) -> torch.Tensor:
    """round(clip((x + b)/s, Qn, Qp)): the integer code of each value, as a float."""
    return torch.round(torch.clamp((x + b) / s, q.qn, q.qp))


class DeltaCodes(NamedTuple):
    """A Δ quantized into few codes, after softplus: δ at each position is an entry of a small table.

    ``table``: (batch, channels, codes) softplus(level + delta_bias), one run of entries per (sample,
    channel); ``code``: (batch, channels, L) int32, each position's entry in its run (0-based)."""

    table: torch.Tensor
    code: torch.Tensor

    def delta(self) -> torch.Tensor:
        """δ (batch, channels, L): each position's table entry, by ``torch.gather`` along the codes (one
        GatherElements in an exported graph: onnxruntime reads it much faster per element than a Gather
        from the flattened table, and faster than the softplus it replaces)."""
        return torch.gather(self.table, 2, self.code)


def delta_codes(
    delta: torch.Tensor, q: LoadQuant, delta_bias: torch.Tensor, grid: torch.Tensor | None = None
) -> DeltaCodes:
    """Δ (batch, channels, L) quantized by ``q`` as a table of softplus(level + delta_bias) and codes.

    Δ quantized by ``q`` takes one of Qp − Qn + 1 values per group, so softplus runs on a (channels, codes)
    table (docs/method.md §6). The code is the rounded value ``fake_quant`` computes and each entry comes
    from the same float operations, so ``delta()`` equals softplus taken position by position. ``grid``:
    each value's code − Qn (any integer dtype) if computed elsewhere (the QDQ export's QuantizeLinear)."""
    batch, channels, _ = delta.shape
    s, b, lo, hi = _per_sample(q, delta)
    code = _code(delta, s, b, q) - q.qn if grid is None else grid
    k = torch.arange(int(q.qn), int(q.qp) + 1, dtype=delta.dtype)
    levels = torch.minimum(torch.maximum(s * k - b, lo), hi)  # (1 or batch, 1, codes)
    table = torch.nn.functional.softplus(levels + delta_bias.to(delta.dtype).reshape(1, channels, 1))
    if table.shape[0] != batch:  # one table for the batch (no Expand node in a batch-1 graph)
        table = table.expand(batch, -1, -1)
    return DeltaCodes(table, code.to(torch.int32))
