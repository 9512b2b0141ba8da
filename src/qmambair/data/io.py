"""Reading and writing images as float32 ``HWC`` arrays in [0,1].

Every image enters the toolkit through :func:`read_image` and leaves through :func:`write_image`, so bit
depth, channel layout, alpha, palettes and EXIF orientation are handled in one place:

- 8-bit data is divided by 255 and 16-bit data by 65535, so a 16-bit PNG keeps its full precision (Pillow
  itself can only hold 16-bit *grey*; 16-bit colour and grey+alpha samples are recovered here from Pillow's
  own decoder, see :func:`qmambair.data.png16.read_16bit`).
- ``mode`` picks the channels: ``"rgb"`` (3, grey is replicated), ``"gray"`` (1, luma 0.299 R + 0.587 G +
  0.114 B like Pillow's ``"L"``, not rounded) or ``"keep"`` (1 or 3, as stored; palettes become RGB).
- Alpha is not part of the restoration problem: with ``alpha="drop"`` it is discarded (with a warning when it
  is not fully opaque; colours are *not* composited onto a background); ``alpha="keep"`` returns it apart.
- Problems with the input raise :class:`ImageReadError` naming the file and saying what to do.

Writes are atomic (``qmambair.fileio.atomic_path``: temporary file in the target folder, then rename), so
an interrupted run never leaves a half-written image, and paths listed in ``protect`` (such as the inputs)
are never replaced.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..fileio import atomic_path
from .png16 import needs_16bit_read, png16_bytes, read_16bit, tile_rawmode

__all__ = [
    "ImageReadError",
    "ProtectedPathError",
    "ImageInfo",
    "read_image",
    "image_info",
    "write_image",
    "rgb_to_gray",
    "WRITE_FORMATS",
]

StrPath = str | os.PathLike[str]

#: Output suffix -> Pillow format name. Reading accepts anything Pillow opens (these plus GIF, PPM, ...).
WRITE_FORMATS: dict[str, str] = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
}

_GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float64)

# EXIF orientation -> numpy operations on HWC arrays reproducing Pillow's ImageOps.exif_transpose.
_ORIENT_OPS = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}

# Formats whose files keep an alpha channel (Pillow writes BMP alpha but reads it back without).
_ALPHA_FORMATS = ("PNG", "TIFF", "WEBP")

# Decoding failures Pillow reports for corrupt or truncated data.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


class ImageReadError(ValueError):
    """An image file is missing, empty, corrupt or not an image; ``path`` says which one."""

    def __init__(self, path: StrPath, problem: str, advice: str) -> None:
        self.path = Path(path)
        self.problem = problem
        self.advice = advice
        super().__init__(f"cannot read image '{self.path}': {problem}. {advice}")

    def __reduce__(self) -> tuple:  # picklable, so it survives worker processes
        return (type(self), (self.path, self.problem, self.advice))


class ProtectedPathError(FileExistsError):
    """``write_image`` was asked to replace a file it was told to protect (typically an input image)."""


# ----------------------------------------------------------------------------------------------- reading


def rgb_to_gray(img: np.ndarray) -> np.ndarray:
    """Full-range luma ``0.299 R + 0.587 G + 0.114 B`` of an ``HWC`` RGB float image, as ``HW1`` float32.

    The same weights as Pillow's ``convert("L")`` and OpenCV's grey reading, but without rounding to 8 bits,
    so grey test images for JPEG artefact removal keep full precision until the codec quantises them.
    """
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"rgb_to_gray: expected an HWC RGB image, got shape {img.shape}")
    return (img.astype(np.float64) @ _GRAY_WEIGHTS)[:, :, None].astype(np.float32)


def _check_file(p: Path) -> None:
    """Fail early, with advice, on the problems that are not about image content."""
    if not p.exists():
        where = "" if p.is_absolute() else f" (relative to {Path.cwd()})"
        raise ImageReadError(p, f"no such file{where}", "Check the path and the file name.")
    if p.is_dir():
        raise ImageReadError(p, "it is a folder", "Pass an image file, or list the folder's images first.")
    if p.stat().st_size == 0:
        raise ImageReadError(p, "the file is empty (0 bytes)", "It was not written completely; re-create it.")
    if not os.access(p, os.R_OK):
        raise ImageReadError(p, "permission denied", "Make the file readable by this user.")


def _not_an_image(p: Path) -> ImageReadError:
    """Explain an unidentified file, pointing out text files (a common mix-up with file lists)."""
    head = p.read_bytes()[:256]
    try:
        text = head.decode("utf-8")
        looks = f"it looks like a text file (starts with {text.strip()[:40]!r})"
    except UnicodeDecodeError:
        looks = "its content is not a format Pillow recognises"
    return ImageReadError(p, looks, "Pass a PNG, JPEG, BMP, TIFF or WebP image.")


@contextmanager
def _opened(p: Path) -> Iterator[Image.Image]:
    """Open ``p`` with Pillow, turning every way it can fail into an :class:`ImageReadError`."""
    _check_file(p)
    try:
        with Image.open(p) as im:
            yield im
    except UnidentifiedImageError:
        raise _not_an_image(p) from None
    except PermissionError as exc:
        raise ImageReadError(p, "permission denied", "Make the file readable by this user.") from exc
    except _DECODE_ERRORS as exc:
        problem = f"the file is corrupt or truncated ({type(exc).__name__}: {exc})"
        raise ImageReadError(p, problem, "Re-create or re-download it.") from exc


def _orientation(im: Image.Image) -> int:
    """EXIF orientation tag (1-8); 1 when absent or unreadable."""
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # a damaged EXIF block should not stop the pixels from being read
        return 1


def _decode(im: Image.Image, p: Path, rawmode: str | None) -> tuple[np.ndarray, float, str]:
    """Pixels as an HWC array, the value of full intensity, and the layout ("L", "LA", "RGB" or "RGBA").

    ``rawmode`` is the sample layout Pillow announced when opening the file (it tells 16-bit colour apart).
    """
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(im).astype(np.uint16)[:, :, None], 65535.0, "L"
    if mode == "I":  # 32-bit integer grey: assumed to hold 16-bit values
        return np.clip(np.asarray(im), 0, 65535).astype(np.uint16)[:, :, None], 65535.0, "L"
    if mode == "F":  # float grey: assumed to be in [0,1]
        return np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)[:, :, None], 1.0, "L"
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
    elif mode == "1":
        im = im.convert("L")
    elif mode == "La":
        im = im.convert("LA")
    elif mode == "RGBa":
        im = im.convert("RGBA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):  # CMYK, YCbCr, LAB, HSV, RGBX, ...
        im = im.convert("RGB")
    arr = np.asarray(im)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if im.mode in ("RGB", "RGBA") and needs_16bit_read(rawmode):
        wide, layout = read_16bit(p, arr, rawmode)
        return wide, 65535.0, layout
    return arr, 255.0, im.mode


@overload
def read_image(
    path: StrPath, mode: Literal["rgb", "gray", "keep"] = ..., alpha: Literal["drop"] = ...
) -> np.ndarray: ...
@overload
def read_image(
    path: StrPath, mode: Literal["rgb", "gray", "keep"] = ..., *, alpha: Literal["keep"]
) -> tuple[np.ndarray, np.ndarray | None]: ...
@overload
def read_image(
    path: StrPath, mode: Literal["rgb", "gray", "keep"], alpha: Literal["keep"]
) -> tuple[np.ndarray, np.ndarray | None]: ...
def read_image(
    path: StrPath,
    mode: Literal["rgb", "gray", "keep"] = "rgb",
    alpha: Literal["drop", "keep"] = "drop",
) -> np.ndarray | tuple[np.ndarray, np.ndarray | None]:
    """Read an image file as a float32 ``HWC`` array in [0,1], upright (EXIF orientation applied).

    Args:
        path: PNG, JPEG, BMP, TIFF, WebP (or any other format Pillow reads; first frame only).
        mode: ``"rgb"`` -> ``HxWx3`` (grey replicated), ``"gray"`` -> ``HxWx1`` (luma of colour images,
            see :func:`rgb_to_gray`), ``"keep"`` -> 1 or 3 channels as stored (palettes become RGB).
        alpha: ``"drop"`` discards an alpha channel (warning if any pixel is not fully opaque);
            ``"keep"`` returns ``(image, alpha)`` with alpha an ``HxW`` float32 array, or ``None`` if absent.

    Raises:
        ImageReadError: the file is missing, empty, unreadable, corrupt, truncated or not an image.
    """
    if mode not in ("rgb", "gray", "keep"):
        raise ValueError(f"read_image: mode must be 'rgb', 'gray' or 'keep', got {mode!r}")
    if alpha not in ("drop", "keep"):
        raise ValueError(f"read_image: alpha must be 'drop' or 'keep', got {alpha!r}")
    p = Path(path)
    with _opened(p) as im:
        rawmode = tile_rawmode(im.tile[0][3]) if im.tile else None  # before anything loads the pixels
        orientation = _orientation(im)
        pixels, full, layout = _decode(im, p, rawmode)

    op = _ORIENT_OPS.get(orientation)
    if op is not None:
        pixels = op(pixels)
    img = pixels.astype(np.float32) / np.float32(full) if full != 1.0 else pixels.astype(np.float32)
    img = np.ascontiguousarray(img)

    alpha_map: np.ndarray | None = None
    if layout in ("LA", "RGBA"):
        img, alpha_map = img[:, :, :-1], img[:, :, -1]
        img = np.ascontiguousarray(img)
        if alpha == "drop" and bool(np.any(alpha_map < 1.0)):
            warnings.warn(
                f"{p}: alpha channel dropped (colours kept as stored, not composited); "
                "pass alpha='keep' to get it",
                stacklevel=2,
            )

    if mode == "rgb" and img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif mode == "gray" and img.shape[2] == 3:
        img = rgb_to_gray(img)
    if alpha == "keep":
        return img, alpha_map
    return img


@dataclass(frozen=True)
class ImageInfo:
    """What a file holds, without decoding its pixels (see :func:`image_info`)."""

    height: int  #: after EXIF orientation, as read_image returns it
    width: int
    bits: int  #: bits per sample in the file: 1, 8, 16 or 32
    channels: int  #: colour channels read_image(mode="keep") returns: 1 (grey) or 3
    has_alpha: bool
    format: str | None  #: Pillow's format name, e.g. "PNG"


def image_info(path: StrPath) -> ImageInfo:
    """Size, bit depth and channels of an image file, e.g. to write 16-bit output for a 16-bit input.

    Only the header is parsed for most formats (Pillow decodes a PNG to find EXIF stored after its
    pixels). Raises :class:`ImageReadError` like :func:`read_image`.
    """
    p = Path(path)
    with _opened(p) as im:
        rawmode = (tile_rawmode(im.tile[0][3]) if im.tile else None) or ""
        mode, fmt, (w, h) = im.mode, im.format, im.size
        has_transparency = "transparency" in im.info
        orientation = _orientation(im)
    if mode == "1":
        bits = 1
    elif mode in ("I", "F"):
        bits = 32
    elif mode.startswith("I;16") or ";16" in rawmode:
        bits = 16
    else:
        bits = 8
    grey = mode in ("1", "L", "LA", "La", "I", "F") or mode.startswith("I;16") or rawmode == "LA;16B"
    alpha = mode in ("LA", "La", "RGBA", "RGBa", "PA") or (mode == "P" and has_transparency)
    if orientation >= 5:
        h, w = w, h
    return ImageInfo(height=h, width=w, bits=bits, channels=1 if grey else 3, has_alpha=alpha, format=fmt)


# ----------------------------------------------------------------------------------------------- writing


def _as_hwc(img: np.ndarray | torch.Tensor) -> np.ndarray:
    """numpy HWC array from an HW/HWC array or an HW/CHW/1CHW tensor."""
    if isinstance(img, torch.Tensor):
        t = img.detach().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() == 3:
            t = t.permute(1, 2, 0)
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        arr = t.numpy()
    else:
        arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"write_image: expected an HxW or HxWxC image with C in 1-4, got shape {arr.shape}")
    return arr


def _quantise(arr: np.ndarray, bits: int) -> np.ndarray:
    """uint8/uint16 samples: floats are clipped to [0,1] and rounded; integer input must match ``bits``."""
    target = np.uint8 if bits == 8 else np.uint16
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ValueError("write_image: image contains NaN or inf values")
        full = 255.0 if bits == 8 else 65535.0
        return np.round(np.clip(arr.astype(np.float64), 0.0, 1.0) * full).astype(target)
    if arr.dtype == target:
        return arr
    raise TypeError(
        f"write_image: {arr.dtype} image with bits={bits}; pass a float image in [0,1], "
        f"or {np.dtype(target).name} samples for bits={bits}"
    )


def _encode(arr: np.ndarray, fmt: str, bits: int, quality: int) -> bytes:
    """File bytes for a uint8/uint16 HWC array in the given Pillow format."""
    channels = arr.shape[2]
    if channels in (2, 4) and fmt not in _ALPHA_FORMATS:
        raise ValueError(f"write_image: {fmt} cannot keep an alpha channel; drop it or write a .png instead")
    if bits == 16:
        return png16_bytes(arr)
    pil = Image.fromarray(arr[:, :, 0] if channels == 1 else arr)
    options: dict[str, object] = {}
    if fmt == "JPEG":
        options = {"quality": quality, "subsampling": 0}  # 4:4:4: do not blur restored colours
    elif fmt == "WEBP":
        options = {"lossless": True, "exact": True}  # exact: keep colours under transparent pixels
    buf = io.BytesIO()
    pil.save(buf, format=fmt, **options)
    return buf.getvalue()


def _same_file(a: Path, b: Path) -> bool:
    """True when two paths name the same file (resolving links, case-insensitive file systems, hard links)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def write_image(
    path: StrPath,
    img: np.ndarray | torch.Tensor,
    *,
    bits: Literal[8, 16] = 8,
    overwrite: bool = True,
    protect: Iterable[StrPath] = (),
    quality: int = 95,
) -> Path:
    """Write an image atomically; the format comes from the suffix (.png .jpg .jpeg .bmp .tif .tiff .webp).

    Args:
        path: output file; missing parent folders are created.
        img: float ``HW``/``HWC`` array in [0,1] (clipped, then rounded to ``bits``), or ``uint8`` (bits=8)
            / ``uint16`` (bits=16) samples; channels grey, grey+alpha, RGB or RGBA (alpha last; PNG, TIFF
            and WebP keep it). torch ``CHW``/``1CHW`` tensors too.
        bits: 8, or 16 for 16-bit PNG (only PNG stores 16 bits here).
        overwrite: if False, an existing ``path`` raises ``FileExistsError``.
        protect: files that must never be replaced, e.g. the inputs of a restoration run. To overwrite an
            input on purpose (a CLI ``--overwrite-input`` flag), simply leave it out of ``protect``.
        quality: JPEG quality (1-100); JPEGs are written 4:4:4. WebP is written lossless.

    Returns:
        The path written. A temporary file in the same folder is renamed over ``path`` (``os.replace``),
        so readers never see a partial image and nothing is left behind on failure.
    """
    p = Path(path)
    fmt = WRITE_FORMATS.get(p.suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(WRITE_FORMATS))
        raise ValueError(f"write_image: unknown suffix '{p.suffix}' in {p}; use one of {known}")
    if bits not in (8, 16):
        raise ValueError(f"write_image: bits must be 8 or 16, got {bits!r}")
    if bits == 16 and fmt != "PNG":
        raise ValueError(f"write_image: 16-bit output is supported for .png only, not '{p.suffix}'")
    if not 1 <= quality <= 100:
        raise ValueError(f"write_image: quality must be in 1..100, got {quality}")
    for guarded in protect:
        if _same_file(p, Path(guarded)):
            raise ProtectedPathError(
                f"write_image: refusing to overwrite '{p}', which is protected (an input of this run); "
                "choose another output path, or allow overwriting the input explicitly"
            )
    if not overwrite and p.exists():
        raise FileExistsError(f"write_image: '{p}' exists; pass overwrite=True or choose another path")

    data = _encode(_quantise(_as_hwc(img), bits), fmt, bits, quality)
    with atomic_path(p) as tmp:
        tmp.write_bytes(data)
    return p
