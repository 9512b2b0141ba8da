"""Fused fake quantization: each quantizer's forward and backward as a few numba passes (``kernels``).

The eager quantizers build their output from a dozen tensor-wide torch operations and let autograd record
each; a training step of a quantized MambaIR then runs tens of thousands of small operations. Here each
fake-quant is one pass for its statistics (DLS: ``torch.var_mean`` and ``torch.aminmax``), one for the codes
and one or two for the backward, as a ``torch.autograd.Function``. The scalar part (DLS's step and offset from
the statistics, LSQ's gradient scale, RFA's ordered anchors) stays in torch on tiny tensors, so autograd
still carries gradients into every quantizer parameter.

Which path runs: ``QMAMBAIR_QUANT=eager|fused|auto`` (default auto), or ``with quant_kernels("eager"):`` in
code. ``auto`` takes the fused path for float32 CPU tensors when numba imports, and the eager path otherwise
(CUDA tensors, float64 — the eager path is the oracle the fused one is tested against).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

import numpy as np
import torch

ENV_VAR = "QMAMBAIR_QUANT"
MODES = ("auto", "eager", "fused")
_override: list[str] = []


@functools.cache
def _kernels():
    """The numba kernels, or None when numba is missing or broken (the eager path then runs)."""
    try:
        from . import kernels
    except Exception:  # noqa: BLE001 - a broken numba install must fall back, not break the package
        return None
    return kernels if kernels.AVAILABLE else None


def _mode() -> str:
    mode = _override[-1] if _override else os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"${ENV_VAR} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


@contextlib.contextmanager
def quant_kernels(mode: str | None) -> Iterator[None]:
    """Run the quantizers inside the block with the ``eager`` or ``fused`` path (None: leave as it is)."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"quant_kernels mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode is not None:
        _override.append(mode)
    try:
        yield
    finally:
        if mode is not None:
            _override.pop()


def use_fused(x: torch.Tensor) -> bool:
    """Whether a quantizer called on ``x`` takes the fused path (see the module docstring)."""
    mode = _mode()
    if mode == "eager":
        return False
    ok = x.device.type == "cpu" and x.dtype == torch.float32 and _kernels() is not None
    if mode == "fused" and not ok and x.device.type == "cpu" and x.dtype == torch.float32:
        raise RuntimeError(f"{ENV_VAR}=fused but the numba kernels are not available")
    return ok


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _vec(t: torch.Tensor | float, groups: int) -> np.ndarray:
    """A per-group float32 vector from a scalar or a (groups,)-shaped tensor."""
    if isinstance(t, torch.Tensor):
        return np.ascontiguousarray(_np(t.reshape(-1)).astype(np.float32, copy=False)).repeat(
            groups if t.numel() == 1 else 1
        )
    return np.full(groups, t, dtype=np.float32)


def _needs_graph(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ------------------------------------------------------------------------------------------ affine map
def _affine_forward(x2: torch.Tensor, step, offset, lo, hi, qn: float, qp: float) -> torch.Tensor:
    groups = x2.shape[0]
    out = torch.empty_like(x2)
    _kernels().affine_forward(_np(x2), _vec(step, groups), _vec(offset, groups), _vec(lo, groups),
                              _vec(hi, groups), float(qn), float(qp), _np(out))
    return out


def _affine_backward(x2: torch.Tensor, grad: torch.Tensor, step, offset, lo, hi, qn: float, qp: float):
    """(grad_x, per-group sums (G, SUMS) as float64 numpy)."""
    k = _kernels()
    groups, n = x2.shape
    per_group, total = k.chunk_layout(groups, n)
    grad_x = torch.empty_like(x2)
    partial = np.zeros((total, k.SUMS), np.float64)
    k.affine_backward(_np(x2), _np(grad.contiguous().reshape(x2.shape)), _vec(step, groups),
                      _vec(offset, groups), _vec(lo, groups), _vec(hi, groups), float(qn), float(qp),
                      _np(grad_x), partial)
    return grad_x, partial.reshape(groups, per_group, k.SUMS).sum(axis=1)


class _AffineQuant(torch.autograd.Function):
    """y = step·round(clip((x + offset)/step, qn, qp)) − offset with 0-d step and offset (ActQuant, LSQ)."""

    @staticmethod
    def forward(ctx, x, step, offset, qn, qp):
        x2 = x.reshape(1, -1)
        ctx.save_for_backward(x2, step, offset)
        ctx.bounds = (qn, qp)
        return _affine_forward(x2, step, offset, -np.inf, np.inf, qn, qp).reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        x2, step, offset = ctx.saved_tensors
        grad_x, sums = _affine_backward(x2, grad, step, offset, -np.inf, np.inf, *ctx.bounds)
        d_step = torch.tensor(sums[0, 0], dtype=step.dtype) if ctx.needs_input_grad[1] else None
        d_offset = torch.tensor(sums[0, 1], dtype=offset.dtype) if ctx.needs_input_grad[2] else None
        return grad_x.reshape(grad.shape), d_step, d_offset, None, None


def affine_quant(x: torch.Tensor, step: torch.Tensor, offset: torch.Tensor | None, qn: float,
                 qp: float) -> torch.Tensor:
    """Fused ``step·round_ste(clip((x + offset)/step, qn, qp)) − offset`` (0-d ``step``/``offset``)."""
    if offset is None:
        offset = torch.zeros((), dtype=x.dtype)
    x = x.contiguous()
    if _needs_graph(x, step, offset):
        return _AffineQuant.apply(x, step, offset, qn, qp)
    return _affine_forward(x.reshape(1, -1), step, offset, -np.inf, np.inf, qn, qp).reshape(x.shape)


# ------------------------------------------------------------------------------------------------ DLS
Scalars = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def group_stats(
    x2: torch.Tensor, fused: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(mean, unbiased variance or None for one-element groups, min, max) of each row, shape (G, 1).

    Mean and variance are computed in float64 and rounded to the input's dtype, by torch (``fused=False``,
    differentiable: min and max via amin/amax, which share their gradient among ties) or in one numba pass
    (``fused=True``, no autograd). Both round the same float64 values, so they agree to the bit except when
    a value lies within float64 round-off of a float32 rounding boundary.
    """
    groups, n = x2.shape
    if not fused:
        if n > 1:
            var, mean = torch.var_mean(x2.double(), dim=1, correction=1, keepdim=True)
            var, mean = var.to(x2.dtype), mean.to(x2.dtype)
        else:
            var, mean = None, x2.mean(dim=1, keepdim=True)
        return mean, var, x2.amin(dim=1, keepdim=True), x2.amax(dim=1, keepdim=True)
    k = _kernels()
    per_group, total = k.chunk_layout(groups, n)
    partial = np.empty((total, 4), np.float64)
    xn = _np(x2)
    k.group_sums(xn, partial)
    parts = partial.reshape(groups, per_group, 4)
    s1, s2 = parts[:, :, 0].sum(axis=1), parts[:, :, 1].sum(axis=1)
    shift = xn[:, 0].astype(np.float64)
    mean = torch.from_numpy((shift + s1 / n).astype(np.float32)).reshape(groups, 1)
    var = None
    if n > 1:
        var = torch.from_numpy(np.maximum((s2 - s1 * s1 / n) / (n - 1), 0.0).astype(np.float32))
        var = var.reshape(groups, 1)
    lo = torch.from_numpy(parts[:, :, 2].min(axis=1).astype(np.float32)).reshape(groups, 1)
    hi = torch.from_numpy(parts[:, :, 3].max(axis=1).astype(np.float32)).reshape(groups, 1)
    return mean, var, lo, hi


class _DLSQuant(torch.autograd.Function):
    """DLS on a (G, n) view: statistics per row, ``scalars(mean, var, lo, hi, *params) -> (Δ, β)``."""

    @staticmethod
    def forward(ctx, x2, scalars, qn, qp, *params):
        mean, var, lo, hi = group_stats(x2, fused=True)
        delta, beta = scalars(mean, var, lo, hi, *params)
        ctx.save_for_backward(x2, mean, lo, hi, *([] if var is None else [var]), *params)
        ctx.has_var, ctx.n_params = var is not None, len(params)
        ctx.scalars, ctx.bounds = scalars, (qn, qp)
        return _affine_forward(x2, delta, beta, lo, hi, qn, qp)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        x2, mean, lo, hi = saved[:4]
        var = saved[4] if ctx.has_var else None
        params = saved[len(saved) - ctx.n_params :]
        groups, n = x2.shape
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (mean, lo, hi)]
            var_leaf = var.detach().requires_grad_(True) if var is not None else None
            p_leaves = [p.detach().requires_grad_(p.requires_grad) for p in params]
            delta, beta = ctx.scalars(leaves[0], var_leaf, leaves[1], leaves[2], *p_leaves)
        grad_x, sums = _affine_backward(x2, grad, delta.detach(), beta.detach(), lo, hi, *ctx.bounds)
        sums_t = torch.from_numpy(sums).to(x2.dtype)
        inputs = leaves + ([var_leaf] if var_leaf is not None else [])
        inputs += [p for p in p_leaves if p.requires_grad]
        grads = torch.autograd.grad((delta, beta), inputs,
                                    (sums_t[:, 0:1].reshape(delta.shape), sums_t[:, 1:2].reshape(beta.shape)),
                                    allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs, strict=True)]
        g_mean, g_lo, g_hi = grads[0], grads[1], grads[2]
        g_var = grads[3] if var_leaf is not None else torch.zeros_like(g_mean)
        count_lo, count_hi = sums_t[:, 4:5].clamp_min(1), sums_t[:, 5:6].clamp_min(1)
        g_lo = (g_lo + sums_t[:, 2:3]) / count_lo
        g_hi = (g_hi + sums_t[:, 3:4]) / count_hi
        _kernels().stats_backward(
            _np(x2), _np(grad_x), _vec(mean, groups), _np(g_mean.double().reshape(-1)),
            _np(g_var.double().reshape(-1)), _vec(lo, groups), _vec(g_lo, groups), _vec(hi, groups),
            _vec(g_hi, groups), n,
        )
        p_grads = iter(grads[4 if var_leaf is not None else 3 :])
        param_grads = [next(p_grads) if p.requires_grad else None for p in p_leaves]
        return (grad_x, None, None, None, *param_grads)


def dls_quant(
    x2: torch.Tensor, scalars: Scalars, qn: float, qp: float, *params: torch.Tensor
) -> torch.Tensor:
    """Fused DLS over the rows of ``x2`` (G, n); ``scalars`` maps the statistics and ``params`` to (Δ, β)."""
    x2 = x2.contiguous()
    if _needs_graph(x2, *params):
        return _DLSQuant.apply(x2, scalars, qn, qp, *params)
    mean, var, lo, hi = group_stats(x2, fused=True)
    delta, beta = scalars(mean, var, lo, hi, *params)
    return _affine_forward(x2, delta, beta, lo, hi, qn, qp)


# ------------------------------------------------------------------------------------------------ RFA
class _RFAQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, alpha, beta, anchors, qn, qp, outer_slope):
        flat = w.reshape(-1)
        a = _np(anchors).astype(np.float32)
        thresholds = ((a[:-1] + a[1:]) / np.float32(2)).astype(np.float32)
        out = torch.empty_like(flat)
        _kernels().rfa_forward(_np(flat), np.float32(alpha.item()), np.float32(beta.item()), thresholds,
                               float(qn), float(qp), _np(out))
        ctx.save_for_backward(flat, alpha, beta, anchors)
        ctx.consts = (thresholds, qn, qp, outer_slope)
        return out.reshape(w.shape)

    @staticmethod
    def backward(ctx, grad):
        flat, alpha, beta, anchors = ctx.saved_tensors
        thresholds, qn, qp, outer_slope = ctx.consts
        k = _kernels()
        n = flat.shape[0]
        chunks = max(1, -(-n // k.CHUNK))
        partial = np.zeros((chunks, 2 + anchors.numel()), np.float64)
        grad_w = torch.empty_like(flat)
        k.rfa_backward(_np(flat), _np(grad.contiguous().reshape(-1)), np.float32(alpha.item()),
                       np.float32(beta.item()), thresholds, _np(anchors).astype(np.float32), float(qn),
                       float(qp), float(outer_slope), _np(grad_w), partial)
        sums = torch.from_numpy(partial.sum(axis=0)).to(flat.dtype)
        return grad_w.reshape(grad.shape), sums[0], sums[1], sums[2:], None, None, None


def rfa_quant(w: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, anchors: torch.Tensor, qn: float,
              qp: float, outer_slope: float) -> torch.Tensor:
    """Fused RFA: α·(Qn + #{i : u > t_i}) − β with ŝ's gradient (``anchors`` already ordered, 0-d α, β)."""
    w = w.contiguous()
    if _needs_graph(w, alpha, beta, anchors):
        return _RFAQuant.apply(w, alpha, beta, anchors, qn, qp, outer_slope)
    with torch.no_grad():
        return _RFAQuant.forward(_NoCtx(), w, alpha, beta, anchors, qn, qp, outer_slope)


class _NoCtx:
    """Stands in for autograd's ctx when the forward runs without a graph."""

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        pass
