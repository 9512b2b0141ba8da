"""MATLAB-compatible bicubic ``imresize`` for numpy arrays and torch tensors.

Super-resolution benchmarks define their low-resolution inputs as MATLAB's ``imresize(HR, 1/s, 'bicubic')``
(docs/evaluation.md §1.1). OpenCV's and torch's bicubic are different functions, so this module reproduces
MATLAB's: the cubic kernel with a = -0.5, the kernel widened by 1/scale when shrinking (antialiasing),
MATLAB's output size ``ceil(scale * size)``, its sample positions and weight normalisation, symmetric boundary
handling (edge pixels repeated: ``[c b a | a b c d | d c b]``), and float64 arithmetic throughout.

The weights and source indices for one axis are computed once (:func:`_contributions`, cached) and applied
by one torch routine; numpy inputs are wrapped as CPU tensors, so both paths share every line of the maths.
"""

from __future__ import annotations

import math
import numbers
from functools import lru_cache
from typing import TypeVar, overload

import numpy as np
import torch

__all__ = ["imresize", "modcrop"]

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic'); zero for |x| > 2."""
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1.0)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1.0) & (ax <= 2.0))
    return near + far


@lru_cache(maxsize=128)
def _contributions(
    in_len: int, out_len: int, scale: float, antialiasing: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Weights and 0-based source indices, each ``(out_len, taps)``, for resizing one axis like MATLAB.

    Output pixel i (1-based) sits at input coordinate ``u = i/scale + 0.5*(1 - 1/scale)``; it takes
    ``ceil(width) + 2`` neighbours starting at ``floor(u - width/2)``. When shrinking with antialiasing the
    kernel is stretched to ``width = 4/scale`` and scaled by ``scale``. Rows are normalised to sum to one,
    out-of-range indices are mirrored symmetrically, and taps that are zero for every output are dropped.
    The arrays are cached and shared: treat them as read-only.
    """
    stretch = antialiasing and scale < 1.0
    width = 4.0 / scale if stretch else 4.0
    u = np.arange(1, out_len + 1, dtype=np.float64) / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = math.ceil(width) + 2
    idx = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]  # 1-based, may fall outside
    dist = u[:, None] - idx
    weights = scale * _cubic(scale * dist) if stretch else _cubic(dist)
    weights = weights / weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    idx = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    used = np.any(weights != 0.0, axis=0)
    weights, idx = np.ascontiguousarray(weights[:, used]), np.ascontiguousarray(idx[:, used])
    weights.setflags(write=False)
    idx.setflags(write=False)
    return weights, idx


def _resize_axis(x: torch.Tensor, dim: int, out_len: int, scale: float, antialiasing: bool) -> torch.Tensor:
    """Resize tensor ``x`` along ``dim`` to ``out_len`` samples (the one place the weights are applied)."""
    weights, idx = _contributions(x.shape[dim], out_len, scale, antialiasing)
    w = torch.tensor(weights, dtype=x.dtype, device=x.device)  # copies the read-only cached arrays
    ind = torch.tensor(idx, device=x.device)
    bshape = [1] * x.dim()
    bshape[dim] = out_len
    out = None
    for t in range(w.shape[1]):  # one gather per tap keeps memory at one output-sized buffer
        term = x.index_select(dim, ind[:, t]) * w[:, t].reshape(bshape)
        out = term if out is None else out + term
    assert out is not None
    return out


def _plan(
    in_hw: tuple[int, int],
    scale: float | tuple[float, float] | None,
    output_shape: tuple[int, int] | None,
) -> tuple[tuple[float, float], tuple[int, int]]:
    """MATLAB's rule: a scale gives ``ceil(scale*size)``; an output shape gives scale = out/in per axis."""
    if (scale is None) == (output_shape is None):
        raise ValueError("imresize: give exactly one of `scale` or `output_shape`")
    if scale is not None:
        sh, sw = (scale, scale) if isinstance(scale, numbers.Real) else tuple(scale)
        if not (sh > 0 and sw > 0 and math.isfinite(sh) and math.isfinite(sw)):
            raise ValueError(f"imresize: scale must be positive and finite, got {scale!r}")
        out = (math.ceil(sh * in_hw[0]), math.ceil(sw * in_hw[1]))
        return (float(sh), float(sw)), out
    assert output_shape is not None
    oh, ow = (int(v) for v in output_shape)
    if oh < 1 or ow < 1:
        raise ValueError(f"imresize: output_shape must be positive, got {output_shape!r}")
    return (oh / in_hw[0], ow / in_hw[1]), (oh, ow)


def _resize_hw(
    x: torch.Tensor,
    h_dim: int,
    w_dim: int,
    scale: float | tuple[float, float] | None,
    output_shape: tuple[int, int] | None,
    antialiasing: bool,
) -> torch.Tensor:
    """Resize the two spatial dims of a float64 tensor, stronger shrink first as MATLAB orders them."""
    in_hw = (x.shape[h_dim], x.shape[w_dim])
    if in_hw[0] < 1 or in_hw[1] < 1:
        raise ValueError(f"imresize: empty image of size {in_hw}")
    scales, out_hw = _plan(in_hw, scale, output_shape)
    dims = (h_dim, w_dim)
    order = (1, 0) if scales[1] < scales[0] else (0, 1)
    for k in order:
        x = _resize_axis(x, dims[k], out_hw[k], scales[k], antialiasing)
    return x


@overload
def imresize(
    img: np.ndarray,
    scale: float | tuple[float, float] | None = ...,
    output_shape: tuple[int, int] | None = ...,
    *,
    antialiasing: bool = ...,
    round_uint8: bool = ...,
) -> np.ndarray: ...
@overload
def imresize(
    img: torch.Tensor,
    scale: float | tuple[float, float] | None = ...,
    output_shape: tuple[int, int] | None = ...,
    *,
    antialiasing: bool = ...,
    round_uint8: bool = ...,
) -> torch.Tensor: ...
def imresize(
    img: np.ndarray | torch.Tensor,
    scale: float | tuple[float, float] | None = None,
    output_shape: tuple[int, int] | None = None,
    *,
    antialiasing: bool = True,
    round_uint8: bool = False,
) -> np.ndarray | torch.Tensor:
    """Bicubic resize exactly like MATLAB's ``imresize(img, scale_or_size, 'bicubic')``.

    Args:
        img: numpy ``HW`` or ``HWC`` array, or torch ``HW``, ``CHW`` or ``BCHW`` tensor (spatial dims last).
        scale: factor (``0.25`` shrinks 4x) or ``(scale_h, scale_w)``; output size is ``ceil(scale*size)``.
        output_shape: ``(height, width)`` instead of ``scale``; the per-axis scale is then ``out/in``.
        antialiasing: widen the kernel when shrinking (MATLAB's default, needed for benchmark LR images).
        round_uint8: for ``uint8`` input only, round and clip the result back to ``uint8`` as MATLAB does.

    Returns:
        Same kind as the input (numpy or torch, same device). Values stay on the input's scale and are not
        clipped (bicubic overshoots). Floating inputs keep their dtype (computed in float64 inside).
        Integer inputs give an unrounded float64 result by default, so callers decide how to quantise;
        with ``round_uint8=True`` a ``uint8`` input gives ``uint8`` back.
    """
    if isinstance(img, torch.Tensor):
        if img.dim() not in (2, 3, 4):
            raise ValueError(f"imresize: torch input must be HW, CHW or BCHW, got shape {tuple(img.shape)}")
        if img.is_complex():
            raise TypeError("imresize: complex tensors are not supported")
        out = _resize_hw(img.to(torch.float64), -2, -1, scale, output_shape, antialiasing)
        if img.dtype.is_floating_point:
            return out.to(img.dtype)
        if img.dtype == torch.uint8 and round_uint8:
            return out.round().clamp_(0, 255).to(torch.uint8)
        return out
    arr = np.asarray(img)
    if arr.ndim not in (2, 3):
        raise ValueError(f"imresize: numpy input must be HW or HWC, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"imresize: unsupported dtype {arr.dtype}; use a float or integer image")
    src = np.ascontiguousarray(arr, dtype=np.float64)
    src = torch.from_numpy(src if src.flags.writeable else src.copy())  # torch refuses read-only memory
    res = _resize_hw(src, 0, 1, scale, output_shape, antialiasing).numpy()
    if np.issubdtype(arr.dtype, np.floating):
        return res.astype(arr.dtype, copy=False)
    if arr.dtype == np.uint8 and round_uint8:
        return np.clip(np.round(res), 0, 255).astype(np.uint8)
    return res


def modcrop(img: ArrayT, scale: int) -> ArrayT:
    """Crop the bottom/right edges so height and width are multiples of ``scale`` (BasicSR's ``mod_crop``).

    numpy arrays are ``HW``/``HWC``; torch tensors have their spatial dims last (``HW``/``CHW``/``BCHW``).
    Returns a slice of the input (a view, not a copy), so that ``imresize(modcrop(hr, s), 1/s)`` has
    exactly ``size // s`` pixels per side.
    """
    if int(scale) != scale or scale < 1:
        raise ValueError(f"modcrop: scale must be a positive integer, got {scale!r}")
    s = int(scale)
    if isinstance(img, torch.Tensor):
        if img.dim() < 2:
            raise ValueError(f"modcrop: need at least 2 dims, got shape {tuple(img.shape)}")
        h, w = img.shape[-2], img.shape[-1]
        return img[..., : h - h % s, : w - w % s]
    if img.ndim not in (2, 3):
        raise ValueError(f"modcrop: numpy input must be HW or HWC, got shape {img.shape}")
    h, w = img.shape[0], img.shape[1]
    return img[: h - h % s, : w - w % s]
