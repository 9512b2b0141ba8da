"""int8 inference of quantized linear, conv and projection layers (docs/method.md §6).

Each supported layer runs as: activation codes (one numba pass: x -> int8 codes and their sums), an
int8 x int8 -> int32 matrix product (``torch._int_mm``, oneDNN's integer GEMM) or, for depthwise convs, a
numba kernel that does the integer sums itself, then an epilogue that turns the int32 sums into float
outputs with the exact offset corrections of ``qmambair.quant.int8_kernels`` (no dequantize-then-float
matmul). Zero padding is exact: padded taps hold code 0 and the offset terms count only real taps.

A LayerNorm right before a linear or a dense conv can be computed in that codes pass instead of by torch
(argument ``norm``; ``qmambair.quant.integer.fuse_norms`` sets it up for the VSS blocks' ln_1 and ln_2).

The weights' int8 codes, per-output scales and code sums are prepared once per weight (cached on the
layer, keyed on the weight's storage and version, so an optimiser step or ``load_state_dict`` refreshes
them). Each forward returns ``None`` where it cannot run in int8 (codes wider than int8, strided or dilated
convs, a DLS clip correction on a conv/projection, many clipped elements); the caller then uses the exact
float64 emulation of ``qmambair.quant.integer`` for that call.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import int8_kernels as K
from .affine_params import affine_params
from .base import own_tensors
from .dls import DLS
from .layers import QConv2d, QLinear, QProjection
from .pack import weight_codes

_F64 = torch.float64
INT8_RANGE = (-128, 127)


def act_scalars(quantizer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(s, b, lo, hi), each (G,) float32 with x̂ = clip(s·q − b, lo, hi), q = round(clip((x + b)/s, Qn, Qp)).

    G is 1 (per tensor) or the batch size (DLS per sample); lo/hi are ∓inf except for DLS. The values are
    those the quantizer's forward uses (``affine_params``).
    """
    if not bool(getattr(quantizer, "initialized", False)):
        name = type(quantizer).__name__
        raise ValueError(f"{name} is not initialised; run a batch before integer inference")
    try:
        s, b, clip = affine_params(quantizer, x)
    except NotImplementedError:
        name = type(quantizer).__name__
        raise NotImplementedError(f"integer inference does not support {name} activations") from None
    flat = [t.detach().reshape(-1).float() for t in (s, torch.zeros(()) if b is None else b)]
    if clip is None:
        inf = torch.tensor([float("inf")])
        return flat[0], flat[1], -inf, inf
    return flat[0], flat[1], clip[0].detach().reshape(-1).float(), clip[1].detach().reshape(-1).float()


def per_output(t: torch.Tensor, out_shape: tuple[int, ...], what: str) -> torch.Tensor:
    """A weight scale/offset as one float64 value per output channel: (prod(out_shape),)."""
    t = t.detach().to(_F64)
    full = len(out_shape) + 2  # enough trailing dims for any weight layout
    t = t.reshape(tuple(t.shape) + (1,) * max(0, full - t.dim()))
    if any(size != 1 for size in t.shape[len(out_shape) :]):
        raise NotImplementedError(f"weight {what} varies along the reduced dims; only per-output supported")
    return t.reshape(t.shape[: len(out_shape)]).expand(out_shape).reshape(-1)


@dataclass
class Int8Weight:
    """A weight ready for the integer kernels (rows = output channels)."""

    codes: torch.Tensor  # int8, layer-specific layout (see ``_prepare``)
    alpha: np.ndarray  # (N,) float64 scale per output
    beta: np.ndarray  # (N,) float64 offset per output
    wsum: np.ndarray  # (N,) float64 Σ codes per output
    bias: np.ndarray  # (N,) float64
    fan_in: int
    abs_sum: int  # the largest Σ |codes| of an output channel
    maps: dict  # derived arrays made once: (H, W) or "1x1" -> border maps; "directions" -> projection slices


def _fits_int8(t: torch.Tensor) -> bool:
    return t.numel() == 0 or (int(t.min()) >= INT8_RANGE[0] and int(t.max()) <= INT8_RANGE[1])


def _activation_fits(bounds: tuple[float, float]) -> bool:
    return INT8_RANGE[0] <= int(bounds[0]) and int(bounds[1]) <= INT8_RANGE[1]


def _tensor_key(tensors: list[torch.Tensor]) -> tuple:
    """Storage and version counter of each tensor (in-place updates such as optimiser steps or
    ``load_state_dict`` bump the version; replacing a tensor changes its storage)."""
    return tuple((t.data_ptr(), t._version) for t in tensors)


def _cache_key(layer: nn.Module, weight: torch.Tensor) -> tuple:
    """What the prepared weight depends on: the weight (or frozen codes), the quantizer's parameters and the
    bias."""
    frozen = getattr(layer.weight_quant, "frozen_codes", None)
    source = frozen if frozen is not None else weight
    tensors = own_tensors(layer.weight_quant, buffers=False)
    if getattr(layer, "bias", None) is not None:
        tensors.append(layer.bias)
    return (source.data_ptr(), source._version, tuple(source.shape), _tensor_key(tensors))


def act_rows(quantizer: nn.Module, x: torch.Tensor) -> np.ndarray:
    """``act_scalars`` as a (G, 4) float32 array of rows (s, b, lo, hi), for the kernels. A quantizer whose
    map does not depend on x (all but DLS) is read once and kept while its parameters are unchanged."""
    if isinstance(quantizer, DLS):
        return np.stack([t.numpy() for t in act_scalars(quantizer, x)], 1)
    key = _tensor_key(own_tensors(quantizer, buffers=False))
    kept = quantizer.__dict__.get("_int8_act_rows")
    if kept is not None and kept[0] == key:
        return kept[1]
    rows = np.stack([t.numpy() for t in act_scalars(quantizer, x)], 1)
    quantizer.__dict__["_int8_act_rows"] = (key, rows)
    return rows


def _prepare(layer: nn.Module, weight: torch.Tensor, n_out: tuple[int, ...]) -> Int8Weight | None:
    """The layer's weight as int8 codes (cached); None if the codes do not fit int8."""
    key = _cache_key(layer, weight)
    cached = layer.__dict__.get("_int8_weight")
    if cached is not None and cached[0] == key:
        return cached[1]
    codes, scale, offset = weight_codes(layer.weight_quant, weight)
    if not _fits_int8(codes):
        prepared = None
    else:
        alpha = per_output(scale, n_out, "scale").numpy().copy()
        beta = per_output(offset, n_out, "offset").numpy().copy()
        n = alpha.shape[0]
        flat = codes.reshape(n, -1)
        bias = getattr(layer, "bias", None)
        bias = np.zeros(n) if bias is None else bias.detach().to(_F64).numpy().copy()
        # projections keep (K, c, d); convs flatten to (N, C·kh·kw), the row order of ``im2col_planes``
        stored = codes if isinstance(layer, QProjection) else codes.reshape(n, -1)
        prepared = Int8Weight(
            codes=stored.to(torch.int8).contiguous(),
            alpha=alpha,
            beta=beta,
            wsum=flat.sum(1).to(_F64).numpy().copy(),
            abs_sum=int(flat.abs().sum(1).max()) if n else 0,
            bias=bias,
            fan_in=flat.shape[1],
            maps={},
        )
    layer.__dict__["_int8_weight"] = (key, prepared)
    return prepared


_POOL = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A reusable work buffer (one per name and thread, grown when needed; contents undefined).

    Layers run one after another, so one buffer per role (codes, sums, products, im2col columns) serves them
    all instead of allocating megabytes per call.
    """
    pool = _POOL.__dict__.setdefault("buffers", {})
    size = math.prod(shape)
    buf = pool.get(name)
    if buf is None or buf.dtype != dtype or buf.size < size:
        buf = pool[name] = np.empty(max(size, 1), dtype=dtype)
    return buf[:size].reshape(shape)


def _scalars(rows: np.ndarray, g: int) -> tuple[np.float32, ...]:
    """The four activation scalars (s, b, lo, hi) of group ``g`` (or of the only group) as numpy float32."""
    s, b, lo, hi = rows[g if rows.shape[0] > 1 else 0]
    return s, b, lo, hi


def _clipped(x: np.ndarray, bounds: tuple[float, float], sc: tuple, count: int | None = None) -> np.ndarray:
    """Flat indices of the elements of x whose value DLS's outer clip changes (none for other quantizers);
    ``count``: their number when already known (``quantize_rows`` counts them)."""
    s, b, lo, hi = sc
    if not (np.isfinite(lo) or np.isfinite(hi)):
        return np.empty(0, dtype=np.int64)
    flat = x.reshape(-1)
    if count is None:
        count = int(K.count_clipped(flat, s, b, bounds[0], bounds[1], lo, hi))
    if count == 0:
        return np.empty(0, dtype=np.int64)
    return K.clipped_indices(flat, s, b, bounds[0], bounds[1], lo, hi, count)


def accumulator_dtype(taps: int, act_bound: int, weight_bound: int) -> type:
    """np.int16 when no depthwise sum can leave int16's range, else np.int32: |Σ q_a·q_w| <= act_bound times
    ``weight_bound`` (the largest Σ |q_w| of an output channel), |Σ q_a| <= taps·act_bound."""
    limit = np.iinfo(np.int16).max
    return np.int16 if max(act_bound * weight_bound, taps * act_bound) <= limit else np.int32


def _norm_arrays(norm: nn.Module | None, quantizer: nn.Module, channels: int) -> tuple | None:
    """(γ, β, eps) as float32 arrays and a float when the LayerNorm ``norm`` can be computed in the codes pass
    of a layer with ``channels`` inputs (docs/method.md §6): an affine LayerNorm over exactly those channels
    and an activation map that does not depend on the data (not DLS). None otherwise."""
    if type(norm) is not nn.LayerNorm or isinstance(quantizer, DLS):
        return None
    if tuple(norm.normalized_shape) != (channels,):
        return None
    if norm.weight is None or norm.bias is None or norm.weight.dtype != torch.float32:
        return None
    return norm.weight.detach().numpy(), norm.bias.detach().numpy(), float(norm.eps)


def apply_channel_norm(norm: nn.LayerNorm, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The LayerNorm ``norm`` (over channels; its computation, whatever its forward is) on the input of
    ``layer``: the last dim of a linear's input, dim 1 of a conv's (NCHW)."""
    def ln(t: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(t, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    return ln(x) if isinstance(layer, QLinear) else ln(x.movedim(1, -1)).movedim(-1, 1)


def _normalized_input(norm: nn.Module | None, layer: nn.Module, x: torch.Tensor, fusable: bool) -> tuple:
    """(x, LayerNorm arrays for the codes pass or None): ``norm`` applied here in torch when not fused."""
    if norm is None:
        return x, None
    channels = layer.in_features if isinstance(layer, QLinear) else layer.in_channels
    arrays = _norm_arrays(norm, layer.act_quant, channels) if fusable else None
    return (apply_channel_norm(norm, layer, x), None) if arrays is None else (x, arrays)


@torch.no_grad()
def int8_linear(layer: QLinear, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor | None:
    """QLinear through int8 codes; DLS's clipped elements are corrected exactly (sparse rank-1 updates).
    ``norm``: a LayerNorm to apply to x first, computed in the codes pass where it can be (``fuse_norms``)."""
    quantizer = layer.act_quant
    qn, qp = bounds = quantizer.bounds
    if not _activation_fits(bounds) or x.dtype != torch.float32 or x.dim() < 1:
        return None
    w = _prepare(layer, layer.weight, (layer.out_features,))
    if w is None:
        return None
    x, fused = _normalized_input(norm, layer, x, True)
    act = act_rows(quantizer, x)
    groups = act.shape[0]
    xg = x.contiguous().reshape(groups, -1, layer.in_features)
    rows, k = xg.shape[1], xg.shape[2]
    out = torch.empty(groups, rows, layer.out_features)
    w_mat = w.codes.t()  # (K, N), column-major: oneDNN's fast layout
    codes = scratch("codes", (rows, k), np.int8)
    sums = scratch("sums", (rows,), np.int32)
    acc = scratch("acc", (rows, layer.out_features), np.int32)
    for g in range(groups):
        x2 = xg[g].numpy()
        sc = _scalars(act, g)
        if fused is not None:  # not DLS: no outer clip, nothing to count
            K.norm_quantize_rows(x2, *fused, sc[0], sc[1], qn, qp, codes, sums)
            count = 0
        else:
            count = K.quantize_rows(x2, sc[0], sc[1], qn, qp, sc[2], sc[3], codes, sums)
        torch._int_mm(torch.from_numpy(codes), w_mat, out=torch.from_numpy(acc))
        o = out[g].numpy()
        K.rescale_rows(acc, sums, sc[0], sc[1], w.alpha, w.beta, w.wsum, float(w.fan_in), w.bias, o)
        idx = _clipped(x2, bounds, sc, int(count))
        if idx.size:
            w_hat = w.alpha[:, None] * w.codes.numpy().astype(np.float64) - w.beta[:, None]  # (N, K)
            K.add_clip_rows(x2, idx, sc[0], sc[1], qn, qp, sc[2], sc[3], w_hat, o)
    return out.reshape(*x.shape[:-1], layer.out_features)


def _border_maps(layer: QConv2d, w: Int8Weight, h: int, wd: int) -> tuple[np.ndarray, np.ndarray]:
    """(Σ of the real taps' weight codes per output channel and position, number of real taps per position)
    of a zero-padded conv; single columns for 1x1 convs without padding."""
    kh, kw = layer.kernel_size
    key = "1x1" if kh == kw == 1 and layer.padding == (0, 0) else (h, wd)
    if key == "1x1" and key not in w.maps:
        w.maps[key] = (w.wsum[:, None].copy(), np.array([float(w.fan_in)]))
    if key not in w.maps:
        n, c = layer.out_channels, layer.in_channels
        taps = w.codes.to(_F64).reshape(n, c, kh, kw).sum(1, keepdim=True)  # (N, 1, kh, kw)
        ones = torch.ones(1, 1, h, wd, dtype=_F64)
        conv = {"padding": layer.padding, "dilation": layer.dilation}
        wsum = F.conv2d(ones, taps, **conv).reshape(n, -1).numpy().copy()
        count = (F.conv2d(ones, torch.ones(1, 1, kh, kw, dtype=_F64), **conv) * c).reshape(-1).numpy().copy()
        w.maps[key] = (wsum, count)
    return w.maps[key]


def _depthwise_border(layer: QConv2d, w: Int8Weight, h: int, wd: int) -> tuple[np.ndarray, ...]:
    """For a zero-padded depthwise conv on H x W planes: the flat positions where some taps are padding,
    (C, P) the weight codes summed over their real taps and (P,) the number of real taps (made once per
    plane size)."""
    key = ("depthwise", h, wd)
    if key not in w.maps:
        (kh, kw), n = layer.kernel_size, layer.out_channels
        conv = {"padding": layer.padding, "dilation": layer.dilation}
        taps = F.conv2d(torch.ones(1, 1, h, wd, dtype=_F64), torch.ones(1, 1, kh, kw, dtype=_F64), **conv)
        border = torch.nonzero(taps.reshape(-1) < kh * kw).reshape(-1)
        codes = w.codes.to(_F64).reshape(n, 1, kh, kw)
        wsum = F.conv2d(torch.ones(1, n, h, wd, dtype=_F64), codes, groups=n, **conv).reshape(n, -1)
        w.maps[key] = (border.numpy().copy(), wsum[:, border].numpy().copy(),
                       taps.reshape(-1)[border].numpy().copy())
    return w.maps[key]


def _plain_conv(layer: QConv2d) -> bool:
    """Stride 1, zero padding, output size = input size (what the kernels implement)."""
    kh, kw = layer.kernel_size
    dh, dw = layer.dilation
    ph, pw = layer.padding if isinstance(layer.padding, tuple) else (None, None)
    return (
        layer.stride == (1, 1)
        and layer.padding_mode == "zeros"
        and ph is not None
        and 2 * ph == dh * (kh - 1)
        and 2 * pw == dw * (kw - 1)
    )


@torch.no_grad()
def int8_conv2d(layer: QConv2d, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor | None:
    """QConv2d through int8 codes: dense convs as (im2col +) int8 GEMM, depthwise ones in a numba kernel.
    ``norm``: a LayerNorm over the channels to apply to x first (computed in a dense conv's codes pass where
    it can be, ``fuse_norms``)."""
    quantizer = layer.act_quant
    qn, qp = bounds = quantizer.bounds
    depthwise = layer.groups == layer.in_channels == layer.out_channels and layer.groups > 1
    if (
        not _activation_fits(bounds)
        or x.dtype != torch.float32
        or x.dim() != 4
        or not _plain_conv(layer)
        or not (layer.groups == 1 or depthwise)
    ):
        return None
    w = _prepare(layer, layer.weight, (layer.out_channels,))
    if w is None:
        return None
    x, fused = _normalized_input(norm, layer, x, not depthwise)
    act = act_rows(quantizer, x)
    x = x.contiguous()
    batch, c, h, wd = x.shape
    n = layer.out_channels
    out = torch.empty(batch, n, h, wd)
    (kh, kw), (ph, pw), (dh, dw) = layer.kernel_size, layer.padding, layer.dilation
    for i in range(batch):
        sc = _scalars(act, i)
        xi, o = x[i].numpy(), out[i].numpy()
        if _clipped(xi, bounds, sc).size:
            return None  # DLS clipped some elements: the exact emulation corrects them
        if depthwise:
            wq = w.codes.numpy().reshape(n, kh, kw)
            acc_type = np.empty(0, accumulator_dtype(kh * kw, int(max(-qn, qp)), w.abs_sum))
            border, border_wsum, border_taps = _depthwise_border(layer, w, h, wd)
            K.depthwise_conv(xi, sc[0], sc[1], qn, qp, wq, ph, pw, dh, dw, w.alpha, w.beta, w.bias, border,
                             border_wsum, border_taps, o, acc_type)
            continue
        codes = scratch("codes", (c, h * wd), np.int8)
        sums = scratch("sums", (h * wd,), np.int32)
        if fused is not None:
            K.norm_quantize_planes(xi.reshape(c, h * wd), *fused, sc[0], sc[1], qn, qp, codes, sums)
        else:
            K.quantize_planes(xi.reshape(c, h * wd), sc[0], sc[1], qn, qp, codes, sums)
        cols = codes
        if (kh, kw) != (1, 1):
            cols = scratch("cols", (c * kh * kw, h * wd), np.int8)
            K.im2col_planes(codes.reshape(c, h, wd), kh, kw, ph, pw, dh, dw, cols, sums)
        acc = scratch("acc", (n, h * wd), np.int32)
        torch._int_mm(w.codes, torch.from_numpy(cols), out=torch.from_numpy(acc))
        wsum_map, count_map = _border_maps(layer, w, h, wd)
        K.rescale_planes(acc, sums, sc[0], sc[1], w.alpha, w.beta, wsum_map, count_map, w.bias,
                         o.reshape(n, h * wd))
    return out


@torch.no_grad()
def int8_projection(layer: QProjection, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """QProjection (b, K, d, L) x (K, c, d) -> (b, K, c, L): one integer product per sample and direction."""
    quantizer = layer.act_quant
    qn, qp = bounds = quantizer.bounds
    if not _activation_fits(bounds) or x.dtype != torch.float32 or x.dim() != 4:
        return None
    k, c, d = weight.shape
    w = _prepare(layer, weight, (k, c))
    if w is None:
        return None
    act = act_rows(quantizer, x)
    x = x.contiguous()
    batch, _, _, length = x.shape
    out = torch.empty(batch, k, c, length)
    no_bias, count_map = np.zeros(c), np.array([float(d)])
    codes = scratch("codes", (d, length), np.int8)
    sums = scratch("sums", (length,), np.int32)
    acc = scratch("acc", (c, length), np.int32)
    codes_t, acc_t = torch.from_numpy(codes), torch.from_numpy(acc)
    xn, on = x.numpy(), out.numpy()
    halves = getattr(layer, "reversed_halves", False) and k % 2 == 0 and d > K.SMALL_K
    if halves:  # direction j + k/2 is direction j reversed: one product for both
        acc = scratch("acc", (2 * c, length), np.int32)
        acc_t = torch.from_numpy(acc)
    for i in range(batch):
        sc = _scalars(act, i)
        if _clipped(xn[i], bounds, sc).size:
            return None
        if halves:
            for j, (w_codes, alpha, beta, wsum) in enumerate(_paired_directions(w, k)):
                K.quantize_planes(xn[i, j], sc[0], sc[1], qn, qp, codes, sums)
                torch._int_mm(w_codes, codes_t, out=acc_t)
                K.rescale_planes_pair(acc, sums, sc[0], sc[1], alpha, beta, wsum, float(d), on[i, j],
                                      on[i, j + k // 2])
            continue
        for j, (w_codes, w_np, alpha, beta, wsum) in enumerate(_directions(w, k)):
            K.quantize_planes(xn[i, j], sc[0], sc[1], qn, qp, codes, sums)
            if d <= K.SMALL_K:
                K.small_project(w_np, codes, sums, sc[0], sc[1], alpha, beta, wsum[:, 0], float(d), on[i, j])
                continue
            torch._int_mm(w_codes, codes_t, out=acc_t)
            K.rescale_planes(acc, sums, sc[0], sc[1], alpha, beta, wsum, count_map, no_bias, on[i, j])
    return out


def _directions(w: Int8Weight, k: int) -> list[tuple]:
    """Per direction of a projection weight (K, c, d): (codes as a tensor and as an array, α, β, Σ codes as a
    column), sliced once per prepared weight."""
    if "directions" not in w.maps:
        c = w.codes.shape[1]
        rows = [slice(j * c, (j + 1) * c) for j in range(k)]
        w.maps["directions"] = [
            (w.codes[j], w.codes[j].numpy(), w.alpha[r].copy(), w.beta[r].copy(), w.wsum[r, None].copy())
            for j, r in enumerate(rows)
        ]
    return w.maps["directions"]


def _paired_directions(w: Int8Weight, k: int) -> list[tuple]:
    """For j < k/2: directions j and j + k/2 of a projection weight (K, c, d) stacked, (2c, d) codes with
    their α, β and Σ codes (``int8_projection`` with ``reversed_halves``), made once per prepared weight."""
    if "pairs" not in w.maps:
        c, half = w.codes.shape[1], k // 2
        pairs = []
        for j in range(half):
            rows = np.r_[j * c : (j + 1) * c, (j + half) * c : (j + half + 1) * c]
            codes = torch.cat([w.codes[j], w.codes[j + half]]).contiguous()
            pairs.append((codes, w.alpha[rows].copy(), w.beta[rows].copy(), w.wsum[rows].copy()))
        w.maps["pairs"] = pairs
    return w.maps["pairs"]


INT8_FORWARD = {QConv2d: int8_conv2d, QLinear: int8_linear, QProjection: int8_projection}
