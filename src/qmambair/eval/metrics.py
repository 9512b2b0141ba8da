"""PSNR and SSIM with BasicSR's conventions (docs/evaluation.md §2), so numbers compare with published tables.

Both metrics first bring the images to 8 bits: float input is clamped to [0,1], multiplied by 255 and
rounded (``np.round``, as BasicSR's ``tensor2img``); ``uint8`` input is used as it is. Then ``crop_border``
pixels are cut from every side and, with ``y_channel=True``, RGB is converted to BT.601 luma
``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` (R, G, B in [0,1], result on the 0-255 scale, not rounded).
All arithmetic is float64. Images are numpy ``HWC`` RGB or ``HW``/``HW1`` grey; torch tensors are accepted
as ``CHW`` or ``1CHW`` and converted.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["psnr", "ssim", "rgb_to_y"]

ImageLike = np.ndarray | torch.Tensor

_Y_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64)


def _to_hwc_numpy(img: ImageLike, name: str) -> np.ndarray:
    """numpy HWC view of the input (HW grey gets a channel axis); torch CHW/1CHW tensors are transposed."""
    if isinstance(img, torch.Tensor):
        t = img.detach()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() not in (2, 3):
            raise ValueError(f"{name}: torch input must be HW, CHW or 1CHW, got shape {tuple(img.shape)}")
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        arr = t.cpu().numpy()
        arr = arr.transpose(1, 2, 0) if arr.ndim == 3 else arr
    else:
        arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected HW or HWC image, got shape {arr.shape}")
    return arr


def _to_uint8(img: ImageLike, name: str) -> np.ndarray:
    """8-bit HWC image: uint8 kept, float clamped to [0,1], x255 and rounded (BasicSR ``tensor2img``)."""
    arr = _to_hwc_numpy(img, name)
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name}: image contains NaN or inf values")
        return np.round(np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    raise TypeError(f"{name}: expected a float image in [0,1] or a uint8 image, got dtype {arr.dtype}")


def rgb_to_y(img: np.ndarray | torch.Tensor) -> np.ndarray:
    """BT.601 luma of an RGB image, float64 ``HW`` on the 0-255 scale (16-235 for in-range input).

    ``uint8`` input is divided by 255 first; float input is taken as RGB in [0,1] (not clamped here).
    ``Y = 16 + 65.481 R + 128.553 G + 24.966 B``: the luma BasicSR (and MATLAB's ``rgb2ycbcr``) use for
    "PSNR/SSIM on Y", unrounded.
    """
    arr = _to_hwc_numpy(img, "rgb_to_y")
    if arr.shape[2] != 3:
        raise ValueError(f"rgb_to_y: expected 3 RGB channels, got shape {arr.shape}")
    x = arr.astype(np.float64)
    if arr.dtype == np.uint8:
        x /= 255.0
    return x @ _Y_WEIGHTS + 16.0


def _prepare(
    img: ImageLike, ref: ImageLike, crop_border: int, y_channel: bool, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Both images as float64 HWC on the 0-255 scale after 8-bit rounding, border crop and Y conversion."""
    a = _to_uint8(img, name)
    b = _to_uint8(ref, name)
    if a.shape != b.shape:
        raise ValueError(f"{name}: image shape {a.shape} differs from reference shape {b.shape}")
    if int(crop_border) != crop_border or crop_border < 0:
        raise ValueError(f"{name}: crop_border must be a non-negative integer, got {crop_border!r}")
    c = int(crop_border)
    if c:
        if a.shape[0] <= 2 * c or a.shape[1] <= 2 * c:
            raise ValueError(f"{name}: crop_border={c} leaves nothing of a {a.shape[0]}x{a.shape[1]} image")
        a = a[c:-c, c:-c]
        b = b[c:-c, c:-c]
    if y_channel and a.shape[2] == 3:
        return rgb_to_y(a)[:, :, None], rgb_to_y(b)[:, :, None]
    if y_channel and a.shape[2] != 1:
        raise ValueError(f"{name}: y_channel=True needs an RGB or grey image, got {a.shape[2]} channels")
    return a.astype(np.float64), b.astype(np.float64)


def psnr(img: ImageLike, ref: ImageLike, crop_border: int = 0, y_channel: bool = False) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(255^2 / MSE)``, over all pixels and channels.

    Identical images (after 8-bit rounding and cropping) give ``float('inf')``; callers averaging over a set
    should treat that case explicitly. ``y_channel`` on a grey image is a no-op, as in BasicSR.
    """
    a, b = _prepare(img, ref, crop_border, y_channel, "psnr")
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(255.0**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian taps (OpenCV ``getGaussianKernel(11, 1.5)``); window = outer(g, g)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable correlation with window ``outer(g, g)``, keeping only fully covered positions ("valid")."""
    k = g.size
    h, w = x.shape
    rows = sum(g[i] * x[i : h - k + 1 + i, :] for i in range(k))
    return sum(g[j] * rows[:, j : w - k + 1 + j] for j in range(k))


def _ssim_channel(a: np.ndarray, b: np.ndarray) -> float:
    """Mean of the SSIM map of two float64 2-D images on the 0-255 scale (BasicSR's ``_ssim``)."""
    c1 = (0.01 * 255.0) ** 2
    c2 = (0.03 * 255.0) ** 2
    g = _gaussian_window()
    mu_a = _filter_valid(a, g)
    mu_b = _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a**2
    var_b = _filter_valid(b * b, g) - mu_b**2
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    num = (2.0 * mu_a * mu_b + c1) * (2.0 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


def ssim(img: ImageLike, ref: ImageLike, crop_border: int = 0, y_channel: bool = False) -> float:
    """Structural similarity: 11x11 Gaussian window (sigma 1.5), valid region only, averaged over channels.

    ``C1 = (0.01*255)^2``, ``C2 = (0.03*255)^2``. Identical images give exactly 1.0. The (cropped) image must
    be at least 11x11.
    """
    a, b = _prepare(img, ref, crop_border, y_channel, "ssim")
    if a.shape[0] < 11 or a.shape[1] < 11:
        raise ValueError(f"ssim: needs at least 11x11 pixels after cropping, got {a.shape[0]}x{a.shape[1]}")
    return float(np.mean([_ssim_channel(a[:, :, c], b[:, :, c]) for c in range(a.shape[2])]))
