"""Option types shared by the commands: argparse ``type=`` functions that reject a bad value with a message
saying what was expected (argparse turns it into a usage error, exit code 2)."""

from __future__ import annotations

import argparse
import math

__all__ = ["nonnegative_float", "nonnegative_int", "positive_float", "positive_int"]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def add_tiling_options(p: argparse.ArgumentParser, tile_type=positive_int) -> None:
    """``--tile N`` and ``--tile-mode`` as ``restore`` and ``test`` share them (docs/evaluation.md §3)."""
    p.add_argument("--tile", type=tile_type, default=None, metavar="N",
                   help="tile size in input pixels (default: whole image at once)")
    p.add_argument("--tile-mode", choices=("mambair", "blend"), default="mambair",
                   help="mambair: MambaIR tester tiling, N is its threshold (200 in the paper); "
                   "blend: N x N tiles blended without seams (default: %(default)s)")
