"""16-bit images, which Pillow handles only partly: recovering full 16-bit colour / grey+alpha samples that
Pillow decodes to 8 bits (``read_16bit``), and writing 16-bit PNG files (``png16_bytes``)."""

from __future__ import annotations

import struct
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["read_16bit", "png16_bytes", "needs_16bit_read", "tile_rawmode"]

# Pillow decodes 16-bit colour samples to their high byte; decoding again with the opposite byte order
# yields the low byte. Maps each rawmode Pillow uses for 16-bit RGB(A) to its byte-swapped twin.
_NATIVE = "L" if sys.byteorder == "little" else "B"
_OTHER = "B" if _NATIVE == "L" else "L"
_LOW_BYTE_RAWMODE = {
    f"{base};16{order}": f"{base};16{swap}"
    for base in ("RGB", "RGBA")
    for order, swap in (("B", "L"), ("L", "B"), ("N", _OTHER))
}


def tile_rawmode(args: object) -> str | None:
    """The rawmode in a Pillow tile's decoder arguments (a string, or the first item of a tuple)."""
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return None


def _with_rawmode(tile: tuple, rawmode: str) -> tuple:
    """A copy of a Pillow tile whose decoder writes ``rawmode`` instead."""
    args = tile[3]
    new_args = rawmode if isinstance(args, str) else (rawmode, *args[1:])
    fields = (tile[0], tile[1], tile[2], new_args)
    return tile._replace(args=new_args) if hasattr(tile, "_replace") else fields


def needs_16bit_read(rawmode: str | None) -> bool:
    """True for the 16-bit colour / grey+alpha rawmodes whose samples Pillow cuts to 8 bits."""
    return rawmode in _LOW_BYTE_RAWMODE or rawmode == "LA;16B"


def read_16bit(p: Path, high: np.ndarray, rawmode: str) -> tuple[np.ndarray, str]:
    """Full 16-bit samples of a PNG/TIFF that Pillow decoded to 8 bits (``high``, the upper bytes).

    Pillow's decoder does the PNG un-filtering and TIFF decompression; only its final unpacking step drops
    the low bytes. For colour, the decoder is run once more with the byte order swapped, which makes it emit
    the lower byte of every sample. For grey+alpha (4 bytes a pixel, decoded into RGBA) it is run once with
    the plain "RGBA" unpacker, which keeps all four bytes. If that fails, the 8-bit result is kept and a
    warning says so. Returns the uint16 HWC array and its layout.
    """
    grey_alpha = rawmode == "LA;16B"
    try:
        with Image.open(p) as im:
            new = "RGBA" if grey_alpha else _LOW_BYTE_RAWMODE[rawmode]
            im.tile = [_with_rawmode(t, new) for t in im.tile]
            raw = np.asarray(im)
        if raw.shape != high.shape or raw.dtype != np.uint8:
            raise ValueError(f"second decoding pass gave {raw.shape} {raw.dtype}")
    except Exception as exc:  # any failure here only costs precision, never correctness
        warnings.warn(f"{p}: 16-bit samples read at 8-bit precision ({exc})", stacklevel=4)
        wide = high.astype(np.uint16) * 257
        return (wide[:, :, [0, 3]], "LA") if grey_alpha else (wide, "RGBA" if high.shape[2] == 4 else "RGB")
    if grey_alpha:
        b = raw.astype(np.uint16)
        return np.stack([(b[..., 0] << 8) | b[..., 1], (b[..., 2] << 8) | b[..., 3]], axis=2), "LA"
    return (high.astype(np.uint16) << 8) | raw, "RGBA" if high.shape[2] == 4 else "RGB"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png16_bytes(a: np.ndarray) -> bytes:
    """Encode a uint16 HWC array (grey, grey+alpha, RGB, RGBA) as 16-bit PNG, which Pillow cannot write."""
    h, w, c = a.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = np.ascontiguousarray(a, dtype=">u2").view(np.uint8).reshape(h, w * c * 2).astype(np.int16)
    bpp = 2 * c
    left = np.zeros_like(raw)
    left[:, bpp:] = raw[:, :-bpp]
    up = np.zeros_like(raw)
    up[1:] = raw[:-1]
    upleft = np.zeros_like(raw)
    upleft[:, bpp:] = up[:, :-bpp]
    pa = np.abs(up - upleft)  # |p - left| with p = left + up - upleft
    pb = np.abs(left - upleft)
    pc = np.abs(left + up - 2 * upleft)
    pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    rows = np.empty((h, 1 + raw.shape[1]), dtype=np.uint8)
    rows[:, 0] = 4  # Paeth
    rows[:, 1:] = ((raw - pred) & 0xFF).astype(np.uint8)
    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + _png_chunk(b"IEND", b"")
    )
