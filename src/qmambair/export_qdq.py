"""QDQ form of quantized layers for ONNX export: integer codes in the graph, QuantizeLinear/DequantizeLinear.

``use_qdq(model)`` switches every supported quantized conv / linear / projection layer of a prepared (frozen)
model to a forward that the TorchScript exporter writes as

    t = clip(x + β_a, s·Qn, s·Qp) → QuantizeLinear(s, zero point 0) → DequantizeLinear → a = s·q_a

with the weight stored as int8 codes q_w (an initialiser) read through DequantizeLinear (w = s_w·q_w; per
output channel on ``axis`` when the scale is). QuantizeLinear rounds half to even like ``torch.round`` and
saturates to the 8-bit range; the clip to the b-bit range comes before it, so ``a`` is exactly s·round(clip((x
+ β_a)/s, Qn, Qp)) = x̂ + β_a. Zero points stay 0 because the offsets β_a (ActQuant, DLS, LSQ+) and β_w (RFA)
are arbitrary floats; they are put back as follows (x̂ = a − β_a, Ŵ = w − β_w):

- linears (``QLinear``): Σ_k x̂_k Ŵ_k = Σ_k a_k w_k − β_w Σ_k a_k − β_a Σ_k Ŵ_k, i.e.
  MatMul of the two dequantized tensors (the pattern onnxruntime fuses into ``MatMulIntegerToFloat``, an
  integer matmul with a float output) minus a row-sum term and a per-output constant times the per-call β_a.
  The row sum reads a second Q/DQ pair on the same input: a second consumer of the first pair blocks the
  fusion. Both operands of the MatMul must come from DequantizeLinear: a float activation times a
  dequantized weight is rewritten by onnxruntime into ``MatMulNBits``, which quantizes the activation to
  8 bits per block (lossy; measured ~50 dB on a small model).
- projections (``QProjection``, a weight per scan direction): onnxruntime runs this batched product as a
  float MatMul whatever its inputs, so the offsets go into the operands (Ŵ = w − β_w; β_a off the smaller
  side) instead of a second Q/DQ pair and row sums.
- convolutions: x̂ = a − β_a and Ŵ = w − β_w are formed in float and convolved with zero padding. This is
  exact without a per-position border map (at zero padding x̂ = 0 is not a code), and onnxruntime has no
  integer convolution with a float output to fuse into anyway. The bias is added after the Conv, not given
  to it: onnxruntime rounds the float bias of a Conv fed by DequantizeLinear to int32 codes of scale s_a·s_w.

DLS computes Δ, β, min and max in the graph on every call (as in PyTorch). Its final clip of x̂ to [min x,
max x] is not affine: convolutions keep it (float ops on x̂); matrix products leave the few clipped values
(at most Δ/2 beyond the extremes of the tensor) unclipped to keep the integer form. That is the one
departure from fake-quant (docs/method.md §6; the parity tests of ``tests/test_onnx_qdq.py`` bound it).

The scan consumes its inputs in float (docs/method.md §4.3); of them, Δ's codes come from a QuantizeLinear
(``grid_index``: the index into the export scan's tables of softplus and decays) and u's fake quantization
rounds through a Q/DQ pair (``fake_quant_qdq``). Not converted (they stay as the fake-quant float ops of the
plain export): the other scan inputs, layers whose activation quantizer is not ``ActQuant``, ``DLS``, ``LSQ``
or ``LSQPlus``, weights without affine integer codes (DoReFa's level table), and more than 8 bits.
"""

from __future__ import annotations

import types
from typing import NamedTuple

import torch
from torch import nn

from .quant.act import ActQuant
from .quant.affine_params import affine_params
from .quant.baselines import LSQ, LSQPlus
from .quant.dls import DLS
from .quant.layers import QConv2d, QLinear, QProjection
from .quant.pack import frozen_codes

ACT_QUANTIZERS = (ActQuant, DLS, LSQ, LSQPlus)


# ------------------------------------------------------------------------------------------- Q/DQ ops
def _axis_view(t: torch.Tensor, axis: int | None, ndim: int) -> torch.Tensor:
    """A scalar, or a 1-D per-axis tensor shaped to broadcast along ``axis`` of an ``ndim`` tensor."""
    if axis is None:
        return t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def _zero_point(g, scale, unsigned: bool, axis: int | None, value: int = 0):
    dtype = torch.uint8 if unsigned else torch.int8
    if axis is None:
        return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))
    size = scale.type().sizes()[0]
    return g.op("Constant", value_t=torch.full((size,), value, dtype=dtype))


class QuantizeLinear(torch.autograd.Function):
    """ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zero_point) as int8 or uint8.

    ``zero_point`` is an integer given as a float, always passed: the tracer fails ("Argument passed to at()
    was not in the map") on an int 0 argument and on an omitted one."""

    @staticmethod
    def forward(ctx, x, scale, axis: int | None, unsigned: bool, zero_point: float):  # noqa: ANN001, ANN205
        q = torch.round(x / _axis_view(scale, axis, x.dim())) + zero_point
        lo, hi = (0, 255) if unsigned else (-128, 127)
        return q.clamp(lo, hi).to(torch.uint8 if unsigned else torch.int8)

    @staticmethod
    def symbolic(g, x, scale, axis, unsigned, zero_point):  # noqa: ANN001, ANN205
        kwargs = {} if axis is None else {"axis_i": axis}
        zero = _zero_point(g, scale, unsigned, axis, int(zero_point))
        return g.op("QuantizeLinear", x, scale, zero, **kwargs)


class DequantizeLinear(torch.autograd.Function):
    """ONNX DequantizeLinear with zero point 0: scale · q in float32."""

    @staticmethod
    def forward(ctx, q, scale, axis: int | None):  # noqa: ANN001, ANN205
        return q.to(torch.float32) * _axis_view(scale, axis, q.dim())

    @staticmethod
    def symbolic(g, q, scale, axis):  # noqa: ANN001, ANN205
        kwargs = {} if axis is None else {"axis_i": axis}
        unsigned = q.type().scalarType() == "Byte"
        return g.op("DequantizeLinear", q, scale, _zero_point(g, scale, unsigned, axis), **kwargs)


def _scale_and_axis(scale: torch.Tensor, groups: int) -> tuple[torch.Tensor, int | None]:
    """A per-tensor scale as a 0-d tensor (axis None), else one value per group as 1-D (axis 0)."""
    if scale.numel() == 1:
        return scale.reshape(()), None
    return scale.reshape(groups), 0


# ------------------------------------------------------------------------------------------ activations
class QDQActivation(NamedTuple):
    """An activation through Q/DQ: ``a`` = s·q = x̂ + β_a; ``t`` the clipped input of QuantizeLinear."""

    a: torch.Tensor
    beta: torch.Tensor | None
    clip: tuple[torch.Tensor, torch.Tensor] | None
    t: torch.Tensor
    scale: torch.Tensor
    axis: int | None
    unsigned: bool

    def requantized(self) -> torch.Tensor:
        """s·q again from a second QuantizeLinear/DequantizeLinear pair on the same input: a second consumer
        of the first pair (the row sums) would stop onnxruntime from fusing it into an integer matmul."""
        q = QuantizeLinear.apply(self.t, self.scale, self.axis, self.unsigned, 0.0)
        return DequantizeLinear.apply(q, self.scale, self.axis)


def quantize_dequantize(quantizer: nn.Module, x: torch.Tensor) -> QDQActivation:
    """x through QuantizeLinear/DequantizeLinear: a = s·round(clip((x + β_a)/s, Qn, Qp)) = x̂ + β_a."""
    scale, beta, clip = affine_params(quantizer, x)
    per_sample = scale.dim() > 0 and scale.shape[0] > 1
    qscale, axis = _scale_and_axis(scale, scale.shape[0] if per_sample else 1)
    t = x if beta is None else x + beta
    qn, qp = quantizer.qn, quantizer.qp
    if isinstance(quantizer, DLS):  # per-call bounds
        t = _clip(t, scale * qn, scale * qp)
    else:
        t = torch.clamp(t, float(scale * qn), float(scale * qp))
    unsigned = not quantizer.is_signed
    a = DequantizeLinear.apply(QuantizeLinear.apply(t, qscale, axis, unsigned, 0.0), qscale, axis)
    return QDQActivation(a, beta, clip, t, qscale, axis, unsigned)


def _onto_grid(
    x: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, qn: float, qp: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clip(x + b, s·qn, s·qp), s, b) for one step s and offset b: what QuantizeLinear(s) rounds to the code
    round(clip((x + b)/s, qn, qp)) (a clipped value divides back to within an ulp of qn or qp)."""
    if step.numel() != 1 or offset.numel() != 1 or not 0 < qp - qn < 256:
        raise ValueError("a QDQ grid takes one step and offset and at most 256 codes")
    s = step.reshape(()).to(x.dtype)
    b = offset.reshape(()).to(x.dtype)
    return torch.clamp(x + b, s * qn, s * qp), s, b


def grid_index(
    x: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, qn: float, qp: float
) -> torch.Tensor:
    """round(clip((x + offset)/step, qn, qp)) − qn, the 0-based grid index of each value, as uint8 from one
    QuantizeLinear (zero point −qn)."""
    t, s, _ = _onto_grid(x, step, offset, qn, qp)
    return QuantizeLinear.apply(t, s, None, True, float(-qn))


def fake_quant_qdq(
    x: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qn: float,
    qp: float,
) -> torch.Tensor:
    """The affine fake quantization min(max(s·round(clip((x + b)/s, qn, qp)) − b, lo), hi) with its rounding
    in QuantizeLinear/DequantizeLinear (zero point 0): fewer, lighter passes than Div/Clip/Round/Mul in
    float, the same values. One set of scalars for the tensor; at most 8 bits."""
    if lo.numel() != 1 or hi.numel() != 1:
        raise ValueError("fake_quant_qdq takes one lo and hi")
    t, s, b = _onto_grid(x, step, offset, qn, qp)
    a = DequantizeLinear.apply(QuantizeLinear.apply(t, s, None, qn >= 0, 0.0), s, None)
    return _clip(a - b, lo.to(x.dtype), hi.to(x.dtype))


def _float_activation(quantizer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x̂ in float from the Q/DQ pair: a − β_a, clipped to [min x, max x] for DLS."""
    act = quantize_dequantize(quantizer, x)
    xh = act.a if act.beta is None else act.a - act.beta
    return xh if act.clip is None else _clip(xh, *act.clip)


def _clip(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """min(max(x, lo), hi); one Clip node when the bounds are single values (per tensor), else Max and Min."""
    if lo.numel() == 1 and hi.numel() == 1:
        return torch.clamp(x, lo.reshape(()), hi.reshape(()))
    return torch.minimum(torch.maximum(x, lo), hi)


def _per_sample_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape(t.shape[:1] + (1,) * (ndim - 1)) if t.dim() > 0 else t


# ------------------------------------------------------------------------------------------------ weights
def supported(layer: nn.Module) -> str | None:
    """Why ``layer`` (a quantized conv / linear / projection) cannot be written as QDQ, or None if it can."""
    act = layer.act_quant
    if not isinstance(act, ACT_QUANTIZERS):
        return f"{type(act).__name__} activations"
    if act.bits > 8:
        return f"{act.bits}-bit activations"
    codes = frozen_codes(layer.weight_quant)
    if codes is None:
        return "weights not frozen (prepare_for_export first)"
    if getattr(layer.weight_quant, "frozen_levels", None) is not None:
        return f"{type(layer.weight_quant).__name__} weights (a level table, not scale·codes − offset)"
    if layer.weight_quant.bits > 8:
        return f"{layer.weight_quant.bits}-bit weights"
    return None


def _per_output(t: torch.Tensor, n_out: int) -> torch.Tensor:
    """A weight scale/offset as a scalar (per tensor) or a (n_out,) vector (per output)."""
    if t.numel() == 1:
        return t.reshape(())
    flat = t.reshape(-1)
    if flat.numel() != n_out:
        raise NotImplementedError(f"weight scale of shape {tuple(t.shape)} is not per tensor or per output")
    return flat


def _dequantized_weight(codes: torch.Tensor, scale: torch.Tensor, n_out: int, axis: int) -> torch.Tensor:
    """w = scale·codes through DequantizeLinear (per output channel along ``axis`` if the scale is)."""
    s = _per_output(scale, n_out)
    return DequantizeLinear.apply(codes, s, None if s.dim() == 0 else axis)


# ------------------------------------------------------------------------------------------- forwards
def _matmul_correction(act: QDQActivation, w_hat_sum, bw) -> list[torch.Tensor]:  # noqa: ANN001
    """−β_w Σ_k a_k − β_a Σ_k Ŵ_k of a linear (each term broadcastable to the product's output)."""
    terms = []
    if bw is not None:
        terms.append(act.requantized().sum(-1, keepdim=True) * bw)
    if act.beta is not None:
        terms.append(_per_sample_view(act.beta, act.a.dim()) * w_hat_sum)
    return terms


def qdq_linear(self: QLinear, x: torch.Tensor) -> torch.Tensor:
    """x̂ Ŵᵀ + bias as MatMul(a, w) of two dequantized tensors plus the offset terms."""
    w = _dequantized_weight(self.qdq_codes, self.qdq_scale, self.out_features, axis=1)  # (in, out)
    act = quantize_dequantize(self.act_quant, x)
    y = torch.matmul(act.a, w)
    for term in _matmul_correction(act, self.qdq_wsum, self.qdq_bw):
        y = y - term
    return y if self.bias is None else y + self.bias


def qdq_projection(self: QProjection, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(b, K, d, L) x (K, c, d) -> (b, K, c, L) as MatMul(Ŵ, ·) with Ŵ = w − β_w, w (K, c, d) dequantized
    from codes. onnxruntime has no integer kernel for this batched product (it runs a float MatMul either
    way), so the offsets go into its float operands instead of correction terms: no second Q/DQ pair, no row
    sums. β_a comes off the smaller side: from a (d rows) when d < c, else as β_a Σ_k Ŵ_k from the output."""
    k, c, d = self.qdq_shape
    w = _dequantized_weight(self.qdq_codes, self.qdq_scale, k * c, axis=0).reshape(k, c, d)

    def view(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(k, c, 1) if t.dim() > 0 else t

    if self.qdq_bw is not None:
        w = w - view(self.qdq_bw)
    act = quantize_dequantize(self.act_quant, x)
    if act.beta is None:
        return torch.matmul(w, act.a)
    beta = _per_sample_view(act.beta, act.a.dim())
    if d < c:
        return torch.matmul(w, act.a - beta)
    return torch.matmul(w, act.a) - beta * view(self.qdq_wsum)


def qdq_conv2d(self: QConv2d, x: torch.Tensor) -> torch.Tensor:
    w = _dequantized_weight(self.qdq_codes, self.qdq_scale, self.out_channels, axis=0)
    if self.qdq_bw is not None:
        w = w - (self.qdq_bw.reshape(-1, 1, 1, 1) if self.qdq_bw.dim() else self.qdq_bw)
    # The bias is a separate Add: onnxruntime rewrites a float bias of a Conv whose inputs come from
    # DequantizeLinear into int32 codes of scale s_a·s_w (rounding it), which would change the result.
    y = self._conv_forward(_float_activation(self.act_quant, x), w, None)
    return y if self.bias is None else y + self.bias.reshape(1, -1, 1, 1)


def _prepare(layer: nn.Module) -> None:
    """Attach the QDQ state to ``layer``: int8 codes and the weight scale as (persistent) buffers, so the
    exporter writes them as initialisers; the weight offset and Σ_k Ŵ_k as constants of the forward."""
    codes, scale, offset = frozen_codes(layer.weight_quant)
    codes = codes.to(torch.int8)
    if isinstance(layer, QLinear):
        codes = codes.t().contiguous()  # (in, out): MatMul(a, w) with the scale on axis 1
    elif isinstance(layer, QProjection):  # (K, c, d) stored as (K·c, d): a per-output scale is on axis 0
        layer.qdq_shape = tuple(codes.shape)
        codes = codes.reshape(-1, codes.shape[-1])
    layer.register_buffer("qdq_codes", codes)
    layer.register_buffer("qdq_scale", scale.detach().float().clone())
    n_out = codes.shape[0] if isinstance(layer, QProjection) else layer.weight.shape[0]
    offset = _per_output(offset.detach().float(), n_out)
    layer.qdq_bw = offset.clone() if bool(offset.ne(0).any()) else None
    w_hat = layer.weight_quant.frozen_weight.detach().float()
    layer.qdq_wsum = w_hat.sum(-1) if isinstance(layer, QLinear | QProjection) else None


_FORWARDS = {QConv2d: qdq_conv2d, QLinear: qdq_linear, QProjection: qdq_projection}


def use_qdq(model: nn.Module) -> dict[str, str]:
    """Switch supported quantized layers of a frozen model to their QDQ forward (in place).

    Returns the quantized layers left in fake-quant: path -> why.
    """
    left = {}
    for path, module in model.named_modules():
        forward = _FORWARDS.get(type(module))
        if forward is None:
            continue
        why = supported(module)
        if why is not None:
            left[path] = why
            continue
        _prepare(module)
        module.forward = types.MethodType(forward, module)
    return left
