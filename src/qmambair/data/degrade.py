"""Degradations that turn a clean image into a network input, as the benchmark protocols define them.

Protocol: docs/evaluation.md §1.

- Super-resolution: :func:`bicubic_lr` = modcrop, MATLAB bicubic down on float64, rounded to 8-bit levels.
- Denoising: :func:`add_gaussian_noise` = N(0, sigma/255) from a generator seeded per image, not clipped.
- JPEG artefacts: :func:`jpeg_compress` = encode/decode with Pillow's libjpeg at a given quality.
"""

from __future__ import annotations

import io
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from .imresize import imresize, modcrop

__all__ = ["bicubic_lr", "add_gaussian_noise", "jpeg_compress"]

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def bicubic_lr(hr: ArrayT, scale: int) -> ArrayT:
    """Benchmark LR image: ``im2uint8(imresize(modcrop(hr, s), 1/s, 'bicubic')) / 255``.

    ``hr`` is a float image in [0,1] (numpy ``HW``/``HWC`` or torch ``CHW``/``BCHW``) or ``uint8``. The result
    has ``floor(size / scale)`` pixels per side and values on the 8-bit grid ``k/255`` (rounded half away
    from zero and clipped, as MATLAB's ``im2uint8``); numpy gives float32, torch keeps a float dtype.
    Crop the HR the same way (``modcrop(hr, scale)``) to get the matching ground truth.
    """
    if int(scale) != scale or scale < 2:
        raise ValueError(f"bicubic_lr: scale must be an integer >= 2, got {scale!r}")
    s = int(scale)
    cropped = modcrop(hr, s)
    if isinstance(cropped, torch.Tensor):
        x = cropped.to(torch.float64) / (255.0 if cropped.dtype == torch.uint8 else 1.0)
        lr = imresize(x, 1.0 / s)
        out = torch.floor(lr.clamp(0.0, 1.0) * 255.0 + 0.5) / 255.0
        return out.to(hr.dtype if hr.dtype.is_floating_point else torch.float32)
    if not np.issubdtype(cropped.dtype, np.floating) and cropped.dtype != np.uint8:
        raise TypeError(f"bicubic_lr: expected a float image in [0,1] or uint8, got {cropped.dtype}")
    x = cropped.astype(np.float64) / (255.0 if cropped.dtype == np.uint8 else 1.0)
    lr = imresize(x, 1.0 / s)
    return (np.floor(np.clip(lr, 0.0, 1.0) * 255.0 + 0.5) / 255.0).astype(np.float32)


def add_gaussian_noise(
    img: np.ndarray, sigma: float, seed: int = 0, *, bgr_order: bool = False
) -> np.ndarray:
    """``img + N(0, sigma/255)``, not clipped, with a fresh generator seeded ``seed`` for every image.

    The noise comes from ``np.random.RandomState(seed).normal`` with the image's shape, the same stream as the
    ``np.random.seed(0); np.random.normal(0, sigma/255, shape)`` that SwinIR/Restormer/MambaIR test code
    uses, so a given image always gets the same noise. Those scripts hold images in OpenCV's BGR order; pass
    ``bgr_order=True`` with an RGB ``HWC`` image to draw the identical per-channel noise. ``uint8`` input is
    scaled to [0,1] first; float32 stays float32.
    """
    if sigma < 0:
        raise ValueError(f"add_gaussian_noise: sigma must be >= 0, got {sigma}")
    x = np.asarray(img)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"add_gaussian_noise: expected a float image in [0,1] or uint8, got {x.dtype}")
    noise = np.random.RandomState(seed).normal(0.0, sigma / 255.0, x.shape)
    if bgr_order:
        if x.ndim != 3 or x.shape[2] != 3:
            raise ValueError(f"add_gaussian_noise: bgr_order needs an HxWx3 image, got shape {x.shape}")
        noise = noise[:, :, ::-1]
    return (x + noise).astype(x.dtype, copy=False)


def jpeg_compress(img: np.ndarray, quality: int) -> np.ndarray:
    """JPEG-encode and decode ``img`` (``HW``, ``HW1`` grey or ``HWC`` RGB; float in [0,1] or uint8).

    The image is rounded to 8 bits, compressed by Pillow's libjpeg at ``quality`` (1-100, standard tables,
    default 4:2:0 chroma subsampling for colour) and returned as float32 in [0,1] with the input's shape.
    """
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"jpeg_compress: quality must be in 1..100, got {quality}")
    x = np.asarray(img)
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"jpeg_compress: expected a float image in [0,1] or uint8, got {x.dtype}")
        x = np.round(np.clip(x.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    if x.ndim == 3 and x.shape[2] == 1:
        plane = x[:, :, 0]
    elif x.ndim == 2 or (x.ndim == 3 and x.shape[2] == 3):
        plane = x
    else:
        raise ValueError(f"jpeg_compress: expected a grey or RGB image, got shape {x.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(plane)).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        out = np.asarray(im).astype(np.float32) / 255.0
    return out.reshape(x.shape)
