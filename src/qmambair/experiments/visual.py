"""Side-by-side pictures: labelled panels (e.g. LR, bicubic, each model, HR crops) in one PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["side_by_side"]


def side_by_side(
    panels: Sequence[tuple[str, np.ndarray]],
    path: str | os.PathLike,
    zoom: int = 1,
    columns: int = 0,
    gap: int = 4,
) -> Path:
    """Lay out ``(label, uint8 HWC image)`` panels of one size in a grid (``columns``; 0: one row), each
    enlarged ``zoom`` times with nearest-neighbour (pixels stay visible) and labelled underneath; write a
    PNG."""
    if not panels:
        raise ValueError("side_by_side needs at least one panel")
    shapes = {img.shape[:2] for _, img in panels}
    if len(shapes) != 1:
        raise ValueError(f"all panels must have one size, got {sorted(shapes)}")
    h, w = next(iter(shapes))
    h, w = h * zoom, w * zoom
    cols = columns or len(panels)
    rows = -(-len(panels) // cols)
    font = ImageFont.load_default()
    label_h = 16
    sheet = Image.new("RGB", (cols * (w + gap) + gap, rows * (h + label_h + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, img) in enumerate(panels):
        img = np.asarray(img)
        if img.dtype != np.uint8:
            raise ValueError(f"panel {label!r}: expected uint8, got {img.dtype}")
        if img.ndim == 2 or img.shape[2] == 1:
            img = np.repeat(img.reshape(img.shape[0], img.shape[1], 1), 3, axis=2)
        tile = Image.fromarray(img[:, :, :3]).resize((w, h), Image.NEAREST)
        x = gap + (i % cols) * (w + gap)
        y = gap + (i // cols) * (h + label_h + gap)
        sheet.paste(tile, (x, y))
        draw.text((x + 2, y + h + 2), label, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
