"""Fused fake quantization: each quantizer's forward and backward as a few numba passes (``kernels``).

The eager quantizers build their output from a dozen tensor-wide torch operations plus a dozen on scalars,
and autograd records each; a training step of a quantized light MambaIR then ran ~50,000 small operations.
Here each fake-quant is one ``torch.autograd.Function``: one pass for DLS's statistics, one for the codes,
one or two for the backward. The scalar part (DLS's step and offset from the statistics, LSQ's gradient
scale and step floor, RFA's ordered anchors) is computed in float32 (DLS's by a small numba function, the
rest with numpy) in the eager expression's operation order, so the forward output is bit-identical to the
eager quantizer; its backward is written out by hand (in float64) and returns the gradient of every
quantizer parameter.

Which path runs: ``QMAMBAIR_QUANT=eager|fused|auto`` (default auto), or ``with quant_kernels("eager"):`` in
code. ``auto`` takes the fused path for float32 CPU tensors when numba imports, and the eager path otherwise
(CUDA tensors, float64), and always while a graph is captured (ONNX export, tracing, torch.compile). The
eager path is the oracle the fused one is tested against
(``tests/test_fused_quant.py``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from ..tracing import capturing_graph

ENV_VAR = "QMAMBAIR_QUANT"
MODES = ("auto", "eager", "fused")
F32 = np.float32
_override: list[str] = []


_LOADED: list = []  # [the kernels module or None] once imported


def _kernels():
    """The numba kernels, or None when numba is missing or broken (the eager path then runs). Called on
    every quantizer call: a list lookup, cheaper than the ``functools.cache`` wrapper it replaced."""
    if not _LOADED:
        try:
            from . import kernels
        except Exception:  # noqa: BLE001 - a broken numba install must fall back, not break the package
            kernels = None
        _LOADED.append(kernels if kernels is not None and kernels.AVAILABLE else None)
    return _LOADED[0]


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
    if mode == "eager" or capturing_graph():
        return False
    eligible = x.device.type == "cpu" and x.dtype == torch.float32
    if eligible and _kernels() is None:
        if mode == "fused":
            raise RuntimeError(f"{ENV_VAR}=fused but the numba kernels are not available")
        return False
    return eligible


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _f32(value, groups: int) -> np.ndarray:
    """A (groups,) float32 vector from a number or an array of one or ``groups`` values (the kernels only
    read it: it may share memory with ``value``). Called several times per quantizer call, so it avoids
    ``np.broadcast_to``, which costs a few microseconds each time."""
    arr = np.asarray(value, dtype=F32).reshape(-1)
    if arr.shape[0] == groups:
        return np.ascontiguousarray(arr)
    if arr.shape[0] == 1:
        return np.full(groups, arr[0], F32)
    raise ValueError(f"expected 1 or {groups} values, got {arr.shape[0]}")


def _needs_graph(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _NoCtx:
    """Stands in for autograd's ctx when a forward runs without a graph."""

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        pass


# ------------------------------------------------------------------------------------------ affine map
def _affine_forward(x2: torch.Tensor, step, offset, lo, hi, qn: float, qp: float) -> torch.Tensor:
    """The affine fake-quant of each row of ``x2`` (G, n) with per-row float32 scalars."""
    groups = x2.shape[0]
    out = torch.empty_like(x2)
    _kernels().affine_forward(_np(x2), _f32(step, groups), _f32(offset, groups), _f32(lo, groups),
                              _f32(hi, groups), float(qn), float(qp), _np(out))
    return out


def _affine_backward(x2: torch.Tensor, grad: torch.Tensor, step, offset, lo, hi, qn: float, qp: float):
    """(grad_x, per-group sums (G, SUMS) in float64)."""
    k = _kernels()
    groups, n = x2.shape
    per_group, total = k.chunk_layout(groups, n)
    grad_x = torch.empty_like(x2)
    partial = np.zeros((total, k.SUMS), np.float64)
    k.affine_backward(_np(x2), _np(grad.contiguous().reshape(x2.shape)), _f32(step, groups),
                      _f32(offset, groups), _f32(lo, groups), _f32(hi, groups), float(qn), float(qp),
                      _np(grad_x), partial)
    return grad_x, partial.reshape(groups, per_group, k.SUMS).sum(axis=1)


def _floor_step(step: torch.Tensor, floor: float) -> np.float32:
    """max(step, floor) in float32: the value of ``grad_scale(step, g).clamp_min(floor)``."""
    return max(F32(step.item()), F32(floor))


def _scale_grad(total: float, step: torch.Tensor, floor: float, gscale: float) -> torch.Tensor:
    """Gradient reaching ``step`` through ``grad_scale(step, gscale).clamp_min(floor)``."""
    passes = F32(step.item()) >= F32(floor)
    return torch.tensor(total * gscale if passes else 0.0, dtype=step.dtype)


class _AffineQuant(torch.autograd.Function):
    """s·round(clip((x + b)/s, qn, qp)) − b, s = max(step, floor) with LSQ's gradient scale, b = offset."""

    @staticmethod
    def forward(ctx, x, step, offset, qn, qp, floor, gscale):
        x2 = x.reshape(1, -1)
        s = _floor_step(step, floor)
        b = F32(offset.item()) if offset is not None else F32(0.0)
        ctx.save_for_backward(x2, step)
        ctx.consts = (s, b, qn, qp, floor, gscale)
        return _affine_forward(x2, s, b, -np.inf, np.inf, qn, qp).reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        x2, step = ctx.saved_tensors
        s, b, qn, qp, floor, gscale = ctx.consts
        grad_x, sums = _affine_backward(x2, grad, s, b, -np.inf, np.inf, qn, qp)
        d_step = _scale_grad(float(sums[0, 0]), step, floor, gscale) if ctx.needs_input_grad[1] else None
        d_offset = torch.tensor(sums[0, 1], dtype=x2.dtype) if ctx.needs_input_grad[2] else None
        return grad_x.reshape(grad.shape), d_step, d_offset, None, None, None, None


def affine_quant(x: torch.Tensor, step: torch.Tensor, offset: torch.Tensor | None, qn: float, qp: float,
                 floor: float, gscale: float) -> torch.Tensor:
    """Fused ``s·round_ste(clip((x + offset)/s, qn, qp)) − offset``, s = grad_scale(step, gscale) floored.

    ``step`` and ``offset`` are 0-d parameters (offset None: 0). Value and gradients are those of the eager
    expression of ActQuant and LSQ.
    """
    x = x.contiguous()
    if _needs_graph(x, step, *([] if offset is None else [offset])):
        return _AffineQuant.apply(x, step, offset, qn, qp, floor, gscale)
    return _AffineQuant.forward(_NoCtx(), x, step, offset, qn, qp, floor, gscale)  # no graph to record


# ------------------------------------------------------------------------------------------------ DLS
def group_stats(
    x2: torch.Tensor, fused: bool = False, copies: int = 1
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(mean, unbiased variance or None for one-element groups, min, max) of each row, shape (G, 1).

    Mean and variance are computed in float64 and rounded to the input's dtype, by torch (``fused=False``,
    differentiable: min and max via amin/amax, which share their gradient among ties) or by one numba pass
    (``fused=True``, no autograd). Both round the same float64 values, so they
    agree to the bit except when a value lies within float64 round-off of a float32 rounding boundary.
    ``copies``: the statistics of rows holding each element that many times (only the unbiased variance
    changes: n·c − 1 degrees of freedom), for a tensor made of repeats of ``x2`` without reading them.
    """
    groups, n = x2.shape
    if torch.onnx.is_in_onnx_export():
        return _exported_stats(x2, copies)
    if not fused:
        if n * copies > 1:
            var, mean = torch.var_mean(x2.double(), dim=1, correction=1 if copies == 1 else 0, keepdim=True)
            if copies > 1:
                var = var * (n * copies / (n * copies - 1))  # unbiased over the n·c elements
            var, mean = var.to(x2.dtype), mean.to(x2.dtype)
        else:
            var, mean = None, x2.mean(dim=1, keepdim=True)
        return mean, var, x2.amin(dim=1, keepdim=True), x2.amax(dim=1, keepdim=True)
    stats = _stats_np(x2, copies)
    mean, var, lo, hi = (None if a is None else torch.from_numpy(a).reshape(groups, 1) for a in stats)
    return mean, var, lo, hi


STATS_BLOCK = 1024  # values per float32 partial sum of the exported statistics


def _exported_stats(
    x2: torch.Tensor, copies: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``group_stats`` in few light passes for an exported graph: float32 partial sums over blocks of up to
    ``STATS_BLOCK`` values, added up in float64, in two passes: the mean m, then Σd and Σd² of d = x − m
    (exact subtractions for values near m) for the variance (Σd² − (Σd)²/n)/(n − 1), so a mean far above the
    spread does not cancel the variance away. Min and max in float32. Within an ulp or two of
    the eager float64 statistics, not always equal to them (docs/method.md §6): float64 passes over the whole
    tensor cost onnxruntime several times more."""
    groups, n = x2.shape
    block = next(b for b in range(min(n, STATS_BLOCK), 0, -1) if n % b == 0)

    def total(t: torch.Tensor) -> torch.Tensor:  # (groups, 1) float64 sum of (groups, n/block, block) values
        return t.sum(2).double().sum(1, keepdim=True)

    xb = x2.reshape(groups, n // block, block)
    mean = (total(xb) / n).to(x2.dtype)
    var = None
    if n * copies > 1:
        d = xb - mean.unsqueeze(-1)
        sd = total(d)
        var = ((total(d * d) - sd * sd / n) * copies / (n * copies - 1)).clamp_min(0).to(x2.dtype)
    return mean, var, x2.amin(dim=1, keepdim=True), x2.amax(dim=1, keepdim=True)


def _stats_np(
    x2: torch.Tensor, copies: int = 1
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """Float32 (G,) mean, variance (None for one element), min, max of each row (repeated ``copies``
    times), from one numba pass (float64 sums, integer order keys for min and max)."""
    n = x2.shape[1]
    mean, var, lo, hi = _kernels().group_stats(_np(x2), copies)
    return mean, var if n * copies > 1 else None, lo, hi


class DLSConsts(NamedTuple):
    """What DLS's scalar map needs besides the statistics and (v, w)."""

    bits: int
    qn: float
    qp: float
    gscale: float  # LSQ gradient scale of the step
    var_floor: float
    min_delta: float


def _dls_scalars(mean, var, lo, hi, v, w, c: DLSConsts) -> dict[str, np.ndarray]:
    """DLS's step and offset per group (float32, in the eager expression's operation order), with the
    intermediate values the backward needs."""
    k = _kernels()
    out = np.empty((mean.shape[0], len(k.DLS_COLUMNS)), F32)
    has_var = var is not None
    k.dls_scalars(mean, var if has_var else mean, lo, hi, _f32(v, 4), _f32(w, 4), has_var, c.bits,
                  c.var_floor, c.min_delta, out)
    return dict(mean=mean, lo=lo, hi=hi, **{name: out[:, i] for i, name in enumerate(k.DLS_COLUMNS)})


def _dls_scalar_grads(s: dict[str, np.ndarray], var, v, w, g_delta, g_beta, c: DLSConsts):
    """Backward of ``_dls_scalars`` in float64: (g_mean, g_var, g_lo, g_hi, g_v, g_w).

    Mirrors autograd on the eager graph: torch.minimum splits the gradient on a tie, clamp_min passes it
    where the input is >= the floor, abs has gradient sign(x) (0 at 0), grad_scale multiplies it by the
    LSQ factor, the cap is detached, sqrt(max(var, floor)) passes where var >= floor.
    """
    d = {k: a.astype(np.float64) for k, a in s.items()}
    v64, w64 = v.astype(np.float64), w.astype(np.float64)
    g_floored = g_delta * np.where(s["floored"] < s["cap"], 1.0, np.where(s["floored"] == s["cap"], 0.5, 0.0))
    g_pre = g_floored * (s["raw"] >= F32(c.min_delta)) * c.gscale * np.sign(d["pre"])
    g_w = np.array([np.sum(g_pre * np.abs(d["t_mu"])), np.sum(g_pre * d["sigma"]),
                    np.sum(g_pre * d["t_lo"]), np.sum(g_pre * d["t_hi"])])
    g_tmu = g_pre * w64[0] * np.sign(d["t_mu"])
    g_tlo, g_thi = g_pre * w64[2], g_pre * w64[3]
    g_b = g_beta + g_tmu + g_tlo + g_thi  # β enters x̃'s statistics and the output directly
    g_v = np.array([np.sum(g_b * d[k]) for k in ("mean", "sigma", "lo", "hi")])
    g_sigma = g_pre * w64[1] + g_b * v64[1]
    if var is None:
        g_var = np.zeros_like(g_sigma)
    else:
        g_var = np.where(var >= F32(c.var_floor), g_sigma / (2.0 * d["sigma"]), 0.0)
    return g_tmu + g_b * v64[0], g_var, g_tlo + g_b * v64[2], g_thi + g_b * v64[3], g_v, g_w


class _DLSQuant(torch.autograd.Function):
    """DLS on the rows of a (G, n) view: per-row statistics, step and offset from (v, w)."""

    @staticmethod
    def forward(ctx, x2, v, w, consts):
        mean, var, lo, hi = _stats_np(x2)
        s = _dls_scalars(mean, var, lo, hi, _np(v), _np(w), consts)
        ctx.save_for_backward(x2, v, w)
        ctx.scalars, ctx.var, ctx.consts = s, var, consts
        return _affine_forward(x2, s["delta"], s["beta"], lo, hi, consts.qn, consts.qp)

    @staticmethod
    def backward(ctx, grad):
        x2, v, w = ctx.saved_tensors
        s, var, c = ctx.scalars, ctx.var, ctx.consts
        n = x2.shape[1]
        grad_x, sums = _affine_backward(x2, grad, s["delta"], s["beta"], s["lo"], s["hi"], c.qn, c.qp)
        g_mean, g_var, g_lo, g_hi, g_v, g_w = _dls_scalar_grads(s, var, _np(v), _np(w), sums[:, 0],
                                                                sums[:, 1], c)
        g_lo = (g_lo + sums[:, 2]) / np.maximum(sums[:, 4], 1.0)  # min/max share among tied elements
        g_hi = (g_hi + sums[:, 3]) / np.maximum(sums[:, 5], 1.0)
        _kernels().stats_backward(_np(x2), _np(grad_x), s["mean"], g_mean, g_var, s["lo"], g_lo.astype(F32),
                                  s["hi"], g_hi.astype(F32), n)
        return (grad_x, torch.from_numpy(g_v).to(v.dtype), torch.from_numpy(g_w).to(w.dtype), None)


def dls_params(
    x2: torch.Tensor, v: torch.Tensor, w: torch.Tensor, consts: DLSConsts, copies: int = 1
) -> tuple[torch.Tensor, ...]:
    """DLS's (Δ, β, min, max) per row of ``x2`` (G, n) repeated ``copies`` times, each of shape (G,),
    without autograd: the values of the forward's scalars (those of ``dls.step_and_offset`` on the eager
    statistics)."""
    mean, var, lo, hi = _stats_np(x2.detach(), copies)
    s = _dls_scalars(mean, var, lo, hi, _np(v), _np(w), consts)
    return tuple(torch.from_numpy(np.asarray(s[k], dtype=F32)) for k in ("delta", "beta", "lo", "hi"))


def dls_quant(x2: torch.Tensor, v: torch.Tensor, w: torch.Tensor, consts: DLSConsts) -> torch.Tensor:
    """Fused DLS over the rows of ``x2`` (G, n) with its parameters ``v``, ``w`` (value and gradients of
    the eager ``DLS.quantize_eager``)."""
    x2 = x2.contiguous()
    if _needs_graph(x2, v, w):
        return _DLSQuant.apply(x2, v, w, consts)
    return _DLSQuant.forward(_NoCtx(), x2, v, w, consts)  # no graph to record


# ------------------------------------------------------------------------------------------------ RFA
def _ordered(points: np.ndarray, gap: float) -> tuple[np.ndarray, np.ndarray]:
    """``rfa.order_with_gap`` in float32: (lifted points, index of the point each one's value comes from).

    e_i − i·gap = cummax_{j<=i}(p_j − j·gap); the running maximum moves to a later index on ties, as
    torch.cummax does.
    """
    ramp = np.arange(points.shape[0], dtype=F32) * F32(gap)
    shifted = points - ramp
    out, src = np.empty_like(points), np.empty(points.shape[0], np.int64)
    best, at = -np.inf, 0
    for i, value in enumerate(shifted):
        if value >= best:
            best, at = value, i
        src[i] = at
        out[i] = points[i] if at == i else F32(best) + ramp[i]
    return out, src


class _RFAQuant(torch.autograd.Function):
    """RFA: α·(Qn + #{i : u > t_i}) − β, backward through the surrogate ŝ and the anchor ordering."""

    @staticmethod
    def forward(ctx, w, alpha, beta, anchors, qn, qp, floor, gscale, gap, outer_slope):
        flat = w.reshape(-1)
        a = _floor_step(alpha, floor)
        b = F32(beta.item())
        knots, src = _ordered(_np(anchors).astype(F32), gap)
        thresholds = (knots[:-1] + knots[1:]) / F32(2)
        out = torch.empty_like(flat)
        _kernels().rfa_forward(_np(flat), a, b, thresholds, float(qn), float(qp), _np(out))
        ctx.save_for_backward(flat, alpha)
        ctx.consts = (a, b, knots, src, thresholds, qn, qp, floor, gscale, outer_slope)
        return out.reshape(w.shape)

    @staticmethod
    def backward(ctx, grad):
        flat, alpha = ctx.saved_tensors
        a, b, knots, src, thresholds, qn, qp, floor, gscale, outer_slope = ctx.consts
        k = _kernels()
        chunks = max(1, -(-flat.shape[0] // k.CHUNK))
        partial = np.zeros((chunks, 2 + knots.shape[0]), np.float64)
        grad_w = torch.empty_like(flat)
        k.rfa_backward(_np(flat), _np(grad.contiguous().reshape(-1)), a, b, thresholds, knots, float(qn),
                       float(qp), float(outer_slope), _np(grad_w), partial)
        sums = partial.sum(axis=0)
        g_anchors = np.bincount(src, weights=sums[2:], minlength=knots.shape[0])
        return (grad_w.reshape(grad.shape), _scale_grad(float(sums[0]), alpha, floor, gscale),
                torch.tensor(sums[1], dtype=flat.dtype), torch.from_numpy(g_anchors).to(flat.dtype),
                None, None, None, None, None, None)


def rfa_quant(w: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, anchors: torch.Tensor, qn: float,
              qp: float, floor: float, gscale: float, gap: float, outer_slope: float) -> torch.Tensor:
    """Fused RFA from its raw parameters (0-d α, β; unordered anchors), as ``RFA.quantize`` eagerly."""
    w = w.contiguous()
    if _needs_graph(w, alpha, beta, anchors):
        return _RFAQuant.apply(w, alpha, beta, anchors, qn, qp, floor, gscale, gap, outer_slope)
    with torch.no_grad():
        return _RFAQuant.forward(_NoCtx(), w, alpha, beta, anchors, qn, qp, floor, gscale, gap, outer_slope)
