"""Models shipped inside the package (``qmambair/weights/``), trained by ``benchmarks/train_shipped.py``.

A shipped model is addressed by its file stem, e.g. ``light-sr-x4-fp`` (float, safetensors) or
``light-sr-x4-qmambair-w4a4`` (packed ``.qmb``); ``load_model(name)`` accepts these names. Each file has a
Markdown model card next to it (data, budget, machine, wall time, test PSNR/SSIM).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["WEIGHTS_DIR", "list_shipped", "shipped_path", "model_card"]

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
_SUFFIXES = (".safetensors", ".qmb")


def list_shipped() -> list[str]:
    """Names of the shipped models (sorted); empty if none are installed."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.stem for p in WEIGHTS_DIR.iterdir() if p.suffix in _SUFFIXES)


def shipped_path(name: str) -> Path | None:
    """The file of shipped model ``name``, or None if there is no such model."""
    for suffix in _SUFFIXES:
        path = WEIGHTS_DIR / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def model_card(name: str) -> str:
    """The Markdown model card of a shipped model ("" if it has none)."""
    path = shipped_path(name)
    card = path.with_suffix(".md") if path is not None else None
    return card.read_text() if card is not None and card.is_file() else ""
