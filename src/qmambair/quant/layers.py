"""Quantized layers: drop-in subclasses of the float modules that keep the float parameter names.

``QConv2d`` / ``QLinear`` subclass ``nn.Conv2d`` / ``nn.Linear``: ``weight`` and ``bias`` keep their names
(a float state dict still fits), and two submodules ``act_quant`` (on the input) and ``weight_quant`` add the
quantizer state. ``QProjection`` and ``QScan`` replace SS2D's parameter-free op modules the same way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models.ss2d import Projection, ScanOp
from ..scan import resolve_backend
from ..scan.load_quant import MAX_LEVELS, LoadQuant
from .affine_params import affine_params
from .base import Quantizer, state_versions
from .fused import use_fused

SCAN_INPUTS = ("u", "delta", "A", "B", "C", "D", "delta_bias")
Q = nn.Module | None  # a quantizer, or None for float


def _or_identity(q: nn.Module | None) -> nn.Module:
    return nn.Identity() if q is None else q


def _affine_grid(q: Quantizer, x: torch.Tensor, copies: int) -> LoadQuant | None:
    """Quantizer ``q``'s affine map on ``x`` as a ``LoadQuant`` (docs/method.md §3.8), or None when ``q`` is
    not initialised yet or has no affine form."""
    if not bool(q.initialized):
        return None
    try:
        step, offset, clip = affine_params(q, x, copies)
    except NotImplementedError:
        return None
    lo, hi = clip if clip is not None else (torch.tensor(-math.inf), torch.tensor(math.inf))
    offset = torch.zeros(()) if offset is None else offset
    return LoadQuant(step, offset, lo, hi, q.qn, q.qp)


class QConv2d(nn.Conv2d):
    """Conv2d on act_quant(input) with weight_quant(weight); the bias stays float."""

    def __init__(self, *args, act_quant: Q = None, weight_quant: Q = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.act_quant = _or_identity(act_quant)
        self.weight_quant = _or_identity(weight_quant)

    @classmethod
    def from_float(cls, module: nn.Conv2d, act_quant: Q, weight_quant: Q) -> QConv2d:
        """A QConv2d sharing ``module``'s weight and bias Parameters (same objects: optimisers still work)."""
        q = cls(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                padding=module.padding, dilation=module.dilation, groups=module.groups,
                bias=module.bias is not None, padding_mode=module.padding_mode, device="meta",
                act_quant=act_quant, weight_quant=weight_quant)
        q.weight = module.weight
        q.bias = module.bias
        return q.to(module.weight.device).train(module.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.act_quant(x), self.weight_quant(self.weight), self.bias)


class QLinear(nn.Linear):
    """Linear on act_quant(input) with weight_quant(weight); the bias stays float."""

    def __init__(self, *args, act_quant: Q = None, weight_quant: Q = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.act_quant = _or_identity(act_quant)
        self.weight_quant = _or_identity(weight_quant)

    @classmethod
    def from_float(cls, module: nn.Linear, act_quant: Q, weight_quant: Q) -> QLinear:
        """A QLinear sharing ``module``'s weight and bias Parameters."""
        q = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta",
                act_quant=act_quant, weight_quant=weight_quant)
        q.weight = module.weight
        q.bias = module.bias
        return q.to(module.weight.device).train(module.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act_quant(x), self.weight_quant(self.weight), self.bias)


class QProjection(Projection):
    """SS2D's per-direction projection (x_proj / dt_proj) with quantized input and quantized passed weight.

    ``reversed_halves``: the input (b, K, d, L) is SS2D's scan orders, whose direction k + K/2 is direction k
    read backwards (x_proj's input), so integer inference quantizes and multiplies only the first half and
    writes the second half's outputs reversed (``qmambair.quant.int8.int8_projection``; the same values)."""

    def __init__(
        self, act_quant: nn.Module | None = None, weight_quant: nn.Module | None = None,
        reversed_halves: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.act_quant = _or_identity(act_quant)
        self.weight_quant = _or_identity(weight_quant)
        self.reversed_halves = bool(reversed_halves)

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return super().forward(self.act_quant(x), self.weight_quant(weight))


class QScan(ScanOp):
    """The selective scan with a quantizer on each of its seven inputs (u, Δ, A, B, C, D, delta_bias).

    Submodules ``u_quant``, ``delta_quant``, ``A_quant``, ``B_quant``, ``C_quant``, ``D_quant``,
    ``delta_bias_quant``; the scan arithmetic and hidden state stay float (docs/method.md §4.3).

    ``u_orders``: u (batch, orders·d, L) stacks that many scan orders of one tensor (SS2D's four), so any
    statistic over a whole sample of u is that of its first order: inference reads only that quarter.
    Without gradients, the quantized parameter inputs (A, D, delta_bias) are kept and reused while their
    values and their quantizers' tensors are unchanged; ``train()`` drops them. When Δ's quantizer has at
    most 4 levels (2 bits), the fused CPU scan gets their values and looks its decays exp(δ·A) up instead
    of computing them (training and inference; the same result, docs/method.md §2.2).
    """

    CONSTANT_INPUTS = ("A", "D", "delta_bias")  # model parameters, the same on every call

    def __init__(self, quantizers: dict[str, nn.Module | None] | None = None, u_orders: int = 1):
        super().__init__()
        quantizers = quantizers or {}
        unknown = set(quantizers) - set(SCAN_INPUTS)
        if unknown:
            raise ValueError(f"unknown scan inputs {sorted(unknown)}; expected names from {SCAN_INPUTS}")
        for name in SCAN_INPUTS:
            setattr(self, f"{name}_quant", _or_identity(quantizers.get(name)))
        self.u_orders = int(u_orders)
        self._constants: dict[str, tuple[tuple, torch.Tensor, torch.Tensor]] = {}

    def quantizer(self, name: str) -> nn.Module:
        return getattr(self, f"{name}_quant")

    def forward(self, u, delta, A, B, C, D, delta_bias) -> torch.Tensor:
        loads = self._load_quants(u, delta)
        on_load = () if loads is None else ("u", "delta")  # fake-quantized by the scan as it reads them
        inputs = zip(SCAN_INPUTS, (u, delta, A, B, C, D, delta_bias), strict=True)
        q = [t if name in on_load else self._quantize(name, t) for name, t in inputs]
        u_quant, delta_quant = loads or (None, None)
        levels = self._delta_levels(delta, delta_quant)
        return super().forward(*q, u_quant=u_quant, delta_quant=delta_quant, delta_levels=levels)

    def train(self, mode: bool = True) -> QScan:
        self._constants = {}
        return super().train(mode)

    def _quantize(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``name``'s quantizer on ``t``; a parameter input is quantized once while nothing changes."""
        q = self.quantizer(name)
        if name not in self.CONSTANT_INPUTS or torch.is_grad_enabled() or self.training:
            return q(t)
        key = (tuple(t.shape), t.dtype, t.device, state_versions(q))
        kept = self._constants.get(name)
        if kept is not None and kept[0] == key and torch.equal(kept[1], t):
            return kept[2]
        out = q(t)
        self._constants[name] = (key, t.clone(), out)
        return out

    def _load_quants(self, u: torch.Tensor, delta: torch.Tensor) -> tuple[LoadQuant | None, ...] | None:
        """u's and delta's quantization as ``LoadQuant``s for the fused CPU scan (or, in an ONNX export, for
        the export's scan, which applies them before scanning: u's statistics then come from one scan order),
        or None where the usual path must run: gradients wanted, the fused quantizers or the 'cpu' scan not in
        use, a quantizer not yet initialised or without an affine form (docs/method.md §3.8)."""
        if torch.is_grad_enabled():
            return None
        exporting = torch.onnx.is_in_onnx_export()
        if not exporting and (not use_fused(u) or resolve_backend(None, u) != "cpu"):
            return None
        loads = []
        for name, x, copies in (("u", *self._one_order(u)), ("delta", delta, 1)):
            q = self.quantizer(name)
            if not isinstance(q, Quantizer):
                loads.append(None)  # kept float
                continue
            grid = _affine_grid(q, x, copies)
            if grid is None:
                return None
            loads.append(grid)
        return tuple(loads) if any(q is not None for q in loads) else None

    def _delta_levels(self, delta: torch.Tensor, grid: LoadQuant | None) -> torch.Tensor | None:
        """The values of quantized Δ per sample, (groups, k ≤ 4), for the fused CPU scan's decay table; None
        where that does not apply (Δ float or with more levels, another backend, no affine form, export)."""
        q = self.quantizer("delta")
        if not isinstance(q, Quantizer) or q.qp - q.qn + 1 > MAX_LEVELS:
            return None
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or resolve_backend(None, delta) != "cpu":
            return None
        if grid is None:
            with torch.no_grad():
                grid = _affine_grid(q, delta, 1)
        return None if grid is None else grid.levels()

    def _one_order(self, u: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(the first scan order of u, the number of orders): u's per-sample statistics, a quarter read."""
        b, channels, length = u.shape
        if self.u_orders == 1 or channels % self.u_orders:
            return u, 1
        return u.reshape(b, self.u_orders, channels // self.u_orders * length)[:, 0], self.u_orders
