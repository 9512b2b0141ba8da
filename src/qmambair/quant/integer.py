"""Integer inference for quantized conv / linear / projection layers: integer codes in, exact sums, rescale.

A quantized layer computes y = Σ x̂·Ŵ + bias with x̂ = s_a·q_a − β_a (activation codes q_a) and
Ŵ = s_w·q_w − β_w (weight codes q_w). Expanding the product over one output's receptive field R::

    Σ_R x̂·Ŵ = s_a s_w Σ q_a q_w − s_a β_w Σ q_a − β_a s_w Σ m q_w + β_a β_w Σ m

where m is 1 at real input positions and 0 at zero padding: a padded position is x̂ = 0, which is not code 0
once β_a ≠ 0, so the two offset terms count only real positions (``conv(m, q_w)`` and ``conv(m, 1)``, which
depend on the position near the border, not on the data). Non-zero padding modes (reflect, ...) pad the codes
themselves, since they commute with the affine map, and then m = 1 everywhere.

Exactness: the four sums are sums of products of integers. With b <= 8, |q_a| <= 255 and |q_w| <= 128, so each
product is below 2^15 and a sum over K terms below K·2^15; every partial sum is an integer of magnitude
< 2^53 as long as K < 2^38 (the largest K in MambaIR is 180·9 = 1620), hence exactly representable in
float64, and every float64 addition (in any order or blocking the conv/matmul kernel picks) is exact.

Two implementations. ``kernels="int8"`` (the default of ``enable_integer_inference``) computes the sums with
int8 codes and int32 accumulation (``qmambair.quant.int8``: ``torch._int_mm`` and numba integer kernels) and
falls back, per call, to the second one where int8 does not apply (codes wider than int8, strided convs,
DLS clipping inside a conv or projection). ``kernels="exact"`` runs the sums as float64 conv/matmul on
integer-valued tensors (exact by the argument above), the oracle the int8 path is tested against besides the
fake-quant forward. Both round only in the final rescale; the result equals the fake-quant forward up to
float rounding.

Coverage. Integer sums replace the fake-quant forward only in quantized conv / linear / projection layers
whose activation quantizer is ``ActQuant``, ``DLS`` (per tensor or per sample), ``LSQ`` or ``LSQPlus`` and
whose weight quantizer has ``integer_codes`` (RFA, LSQ, LSQ+ per channel, max-abs, N2UQ, DoReFa) or frozen
packed codes. DLS clips its output to [min x, max x] after dequantizing, which is not affine: the few clipped
elements' difference to the affine value is added back as a (sparse) float correction. Everything else stays
fake-quant (quantize, then compute in float): layers with other activation quantizers (PAMS, DoReFa,
QuantSR-style, N2UQ-style, the PTQ ones), for which ``enable_integer_inference`` warns and names them (or
raises with ``strict=True``), and, by design, the quantizers that feed no matrix product: the scan inputs
(u, Δ, A, B, C, D, delta_bias), whose scan runs in float (docs/method.md §4.3).
"""

from __future__ import annotations

import contextlib
import re
import types
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..models.mambair import VSSBlock
from .act import ActQuant
from .baselines import LSQ, LSQPlus
from .dls import DLS
from .int8 import INT8_FORWARD, act_scalars, apply_channel_norm, per_output
from .layers import QConv2d, QLinear, QProjection
from .pack import weight_codes

KERNELS = ("int8", "exact")

_F64 = torch.float64


class ActCodes:
    """x̂ = scale·codes − offset + residual (residual None unless the quantizer clips after dequantizing)."""

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor,
        residual: torch.Tensor | None = None,
    ):
        self.codes, self.scale, self.offset, self.residual = codes, scale, offset, residual


@torch.no_grad()
def activation_codes(quantizer: nn.Module, x: torch.Tensor) -> ActCodes:
    """Integer codes of an activation, computed with the same float expressions as the quantizer's forward."""
    s, b, lo, hi = act_scalars(quantizer, x)
    shape = (-1,) + (1,) * (x.dim() - 1) if s.numel() > 1 else ()
    s, b, lo, hi = (t.reshape(shape) for t in (s, b, lo, hi))
    codes = torch.clamp((x + b) / s, quantizer.qn, quantizer.qp).round()
    if not isinstance(quantizer, DLS):
        return ActCodes(codes, s, b)
    affine = s.to(_F64) * codes.to(_F64) - b.to(_F64)
    clipped = torch.minimum(torch.maximum(affine, lo.to(_F64)), hi.to(_F64))
    return ActCodes(codes, s, b, clipped - affine)


def _combine(s1, s2, s3, s4, a: ActCodes, sw, bw) -> torch.Tensor:
    """s_a s_w S1 − s_a β_w S2 − β_a s_w S3 + β_a β_w S4 (float64; scalars/tensors already broadcastable)."""
    sa, ba = a.scale.to(_F64), a.offset.to(_F64)
    return sa * sw * s1 - sa * bw * s2 - ba * sw * s3 + ba * bw * s4


def _batch_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-tensor scalar or a per-sample (B, 1, ..) statistic, broadcastable over ``ndim`` dims."""
    return t.reshape(t.shape[:1] + (1,) * (ndim - 1)) if t.dim() > 0 else t


@torch.no_grad()
def integer_conv2d(layer: QConv2d, x: torch.Tensor) -> torch.Tensor:
    """QConv2d forward through integer codes (see the module docstring)."""
    a = activation_codes(layer.act_quant, x)
    qw, sw, bw = weight_codes(layer.weight_quant, layer.weight)
    out_ch = layer.out_channels
    sw = per_output(sw, (out_ch,), "scale").view(1, -1, 1, 1)
    bw = per_output(bw, (out_ch,), "offset").view(1, -1, 1, 1)
    qa, qw = a.codes.to(_F64), qw.to(_F64)
    padding = layer.padding
    if layer.padding_mode != "zeros":  # pad the codes themselves; every position is then "real"
        qa = F.pad(qa, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = 0
    g, kh, kw = layer.groups, qw.shape[2], qw.shape[3]

    def conv(inp: torch.Tensor, w: torch.Tensor, groups: int = 1) -> torch.Tensor:
        return F.conv2d(inp, w, None, layer.stride, padding, layer.dilation, groups)

    s1 = conv(qa, qw, g)
    # Σ q_a over a window depends only on the group of the output channel; the mask sums only on position.
    qa_sum = qa.reshape(qa.shape[0], g, -1, *qa.shape[2:]).sum(2)
    s2 = conv(qa_sum, qw.new_ones(g, 1, kh, kw), g).repeat_interleave(out_ch // g, dim=1)
    mask = qa.new_ones(1, 1, *qa.shape[2:])
    s3 = conv(mask, qw.sum(1, keepdim=True))
    s4 = conv(mask, qw.new_ones(1, 1, kh, kw)) * qw.shape[1]
    y = _combine(s1, s2, s3, s4, _shape_act(a, 4), sw, bw)
    if a.residual is not None and bool(a.residual.any()):
        w_hat = layer.weight_quant(layer.weight).to(_F64)
        res = (
            a.residual
            if layer.padding_mode == "zeros"
            else F.pad(a.residual, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        )
        y = y + conv(res, w_hat, g)
    if layer.bias is not None:
        y = y + layer.bias.to(_F64).view(1, -1, 1, 1)
    return y.to(x.dtype)


def _shape_act(a: ActCodes, ndim: int) -> ActCodes:
    return ActCodes(a.codes, _batch_view(a.scale, ndim), _batch_view(a.offset, ndim), a.residual)


@torch.no_grad()
def integer_linear(layer: QLinear, x: torch.Tensor) -> torch.Tensor:
    """QLinear forward through integer codes: no padding, so the mask sums are plain row sums."""
    a = _shape_act(activation_codes(layer.act_quant, x), x.dim())
    qw, sw, bw = weight_codes(layer.weight_quant, layer.weight)
    sw, bw = per_output(sw, (layer.out_features,), "scale"), per_output(bw, (layer.out_features,), "offset")
    qa, qw = a.codes.to(_F64), qw.to(_F64)
    s1 = qa @ qw.T
    s2 = qa.sum(-1, keepdim=True)
    s3 = qw.sum(1)
    y = _combine(s1, s2, s3, float(layer.in_features), a, sw, bw)
    if a.residual is not None and bool(a.residual.any()):
        y = y + a.residual @ layer.weight_quant(layer.weight).to(_F64).T
    if layer.bias is not None:
        y = y + layer.bias.to(_F64)
    return y.to(x.dtype)


@torch.no_grad()
def integer_projection(layer: QProjection, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """QProjection forward: (b, K, d, L) x (K, c, d) -> (b, K, c, L) through integer codes."""
    a = _shape_act(activation_codes(layer.act_quant, x), x.dim())
    qw, sw, bw = weight_codes(layer.weight_quant, weight)
    k, c, d = weight.shape
    sw = per_output(sw, (k, c), "scale").view(1, k, c, 1)
    bw = per_output(bw, (k, c), "offset").view(1, k, c, 1)
    qa, qw = a.codes.to(_F64), qw.to(_F64)
    s1 = torch.einsum("bkdl,kcd->bkcl", qa, qw)
    s2 = qa.sum(2, keepdim=True)
    s3 = qw.sum(2).view(1, k, c, 1)
    y = _combine(s1, s2, s3, float(d), a, sw, bw)
    if a.residual is not None and bool(a.residual.any()):
        y = y + torch.einsum("bkdl,kcd->bkcl", a.residual, layer.weight_quant(weight).to(_F64))
    return y.to(x.dtype)


_INTEGER_FORWARD = {QConv2d: integer_conv2d, QLinear: integer_linear, QProjection: integer_projection}


def _supported(module: nn.Module) -> bool:
    act = module.act_quant
    if not isinstance(act, ActQuant | LSQ | LSQPlus | DLS):
        return False
    return hasattr(module.weight_quant, "integer_codes") or hasattr(module.weight_quant, "frozen_codes")


def _why_unsupported(module: nn.Module) -> str:
    act = module.act_quant
    if not isinstance(act, ActQuant | LSQ | LSQPlus | DLS):
        return f"{type(act).__name__} activations"
    return f"{type(module.weight_quant).__name__} weights"


def _name_patterns(paths: list[str]) -> str:
    """Module paths with block indices folded: ``layers.*.conv (4), ...`` (all paths named, compactly)."""
    counts: dict[str, int] = {}
    for path in paths:
        key = re.sub(r"\.\d+\.", ".*.", re.sub(r"^\d+\.", "*.", path))
        key = re.sub(r"\.\d+\.", ".*.", key)  # overlapping matches (a.0.1.b)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{key} ({n})" if "*" in key else key for key, n in counts.items())


def fake_quant_layers(model: nn.Module) -> dict[str, str]:
    """Quantized conv / linear / projection layers left in fake-quant by integer inference: path -> why."""
    return {
        path: _why_unsupported(module)
        for path, module in model.named_modules()
        if type(module) in _INTEGER_FORWARD and not _supported(module)
    }


PRE_NORM = "_int8_pre_norm"  # a layer's __dict__ entry: the LayerNorm it applies to its input (fuse_norms)


def _int8_or_exact(int8_fn, exact_fn):
    """A forward that runs the int8 kernels and falls back to the exact emulation where they decline; with a
    pre-norm (``fuse_norms``) both apply it to the input first."""

    def forward(self, x, *args):
        norm = self.__dict__.get(PRE_NORM)
        if norm is None:
            out = int8_fn(self, x, *args)
            return exact_fn(self, x, *args) if out is None else out
        out = int8_fn(self, x, *args, norm)
        return exact_fn(self, apply_channel_norm(norm, self, x), *args) if out is None else out

    return forward


def _passthrough(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x


def fuse_norms(model: nn.Module) -> list[str]:
    """In each VSS block, let the int8 layer after a LayerNorm apply it (in place; returns the norms' paths).

    ln_1's output feeds only SS2D's in_proj, ln_2's only the CAB's first conv (after a move to NCHW). Both
    layers make their activation codes in one pass over their input; with the norm folded into that pass
    (``int8.norm_quantize_rows`` / ``norm_quantize_planes``) the normalised tensor is never written. The
    LayerNorm then passes its input through, and the layer holds it in ``__dict__`` (not as a submodule: the
    state dict stays the same). The norm is computed by the kernel, not by torch, so an input within an ulp
    of a rounding threshold may get the neighbouring code (docs/method.md §6). Only layers already in int8
    inference are fused; ``unfuse_norms`` (and ``disable_integer_inference``) undo it."""
    fused = []
    for path, block in model.named_modules():
        if not isinstance(block, VSSBlock):
            continue
        for name, layer in (("ln_1", block.self_attention.in_proj), ("ln_2", block.conv_blk.cab[0])):
            norm = getattr(block, name)
            int8_layer = "forward" in layer.__dict__ and PRE_NORM not in layer.__dict__
            if type(norm) is not nn.LayerNorm or not int8_layer:
                continue
            layer.__dict__[PRE_NORM] = norm
            norm.forward = types.MethodType(_passthrough, norm)
            fused.append(f"{path}.{name}")
    return fused


def unfuse_norms(model: nn.Module) -> None:
    """Undo ``fuse_norms``: the LayerNorms compute again and the layers read normalised inputs."""
    for module in model.modules():
        norm = module.__dict__.pop(PRE_NORM, None)
        if norm is not None:
            norm.__dict__.pop("forward", None)


def enable_integer_inference(model: nn.Module, strict: bool = False, kernels: str = "int8") -> list[str]:
    """Switch every supported quantized layer to integer inference (in place); returns their paths.

    ``kernels="int8"``: int8 codes and int8 x int8 -> int32 products (``qmambair.quant.int8``), falling back
    per call to the exact float64 emulation where the int8 kernels do not apply; ``"exact"``: the float64
    emulation only (the oracle). Unsupported layers (other activation quantizers, see the module docstring)
    keep the fake-quant forward with a ``UserWarning`` naming them, or raise ``NotImplementedError`` with
    ``strict=True``.
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    left = fake_quant_layers(model)
    if left and strict:
        path, why = next(iter(left.items()))
        raise NotImplementedError(f"{path}: {why} have no integer mode ({len(left)} such layers)")
    unfuse_norms(model)  # from an earlier call: only the int8 forwards apply a folded norm
    done = []
    for path, module in model.named_modules():
        fn = _INTEGER_FORWARD.get(type(module))
        if fn is None or path in left:
            continue
        if kernels == "int8":
            fn = _int8_or_exact(INT8_FORWARD[type(module)], fn)
        module.forward = types.MethodType(fn, module)
        done.append(path)
    if kernels == "int8":
        fuse_norms(model)
    if left:
        reasons = sorted(set(left.values()))
        warnings.warn(
            f"integer inference: {len(left)} quantized layers stay in fake-quant ({'; '.join(reasons)} have "
            f"no integer mode): {_name_patterns(list(left))} (fake_quant_layers(model) lists them)",
            stacklevel=2,
        )
    return done


def disable_integer_inference(model: nn.Module) -> None:
    """Back to the fake-quant forward everywhere (and the LayerNorms ``fuse_norms`` folded back)."""
    unfuse_norms(model)
    for module in model.modules():
        if type(module) in _INTEGER_FORWARD and "forward" in module.__dict__:
            del module.forward


@contextlib.contextmanager
def integer_inference(model: nn.Module, strict: bool = False, kernels: str = "int8") -> Iterator[list[str]]:
    """Context manager: integer inference inside the block, fake-quant again after it."""
    done = enable_integer_inference(model, strict, kernels)
    try:
        yield done
    finally:
        disable_integer_inference(model)


@torch.no_grad()
def integer_parity(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Per-layer check on real activations: run the fake-quant model on ``x`` and feed every supported
    layer's input to its integer forward too; returns max |int − fake| / max |fake| per layer path.

    (End to end the two paths drift apart in float32 wherever a later quantizer's input sits within float
    rounding of a threshold; layer by layer they agree to float rounding.)
    """
    errors: dict[str, float] = {}
    handles = []
    for path, module in model.named_modules():
        fn = _INTEGER_FORWARD.get(type(module))
        if fn is None or not _supported(module):
            continue

        def hook(mod, args, out, path=path, fn=fn):
            diff = (fn(mod, *args).double() - out.double()).abs().max()
            errors[path] = float(diff / out.double().abs().max().clamp_min(1e-30))

        handles.append(module.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return errors
