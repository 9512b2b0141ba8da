"""x8 self-ensemble: the mean of a restoration over the eight flips and rotations of the input.

docs/evaluation.md §4. The input is turned by ``k`` quarter turns (``k`` = 0..3), optionally mirrored left to
right, restored, turned back (mirror undone, then ``-k`` quarter turns), and the eight outputs are averaged as
floats, without clamping or rounding in between (what the "+" rows of published SR tables report).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

__all__ = ["dihedral_transforms", "self_ensemble"]


def _forward(img: np.ndarray, turns: int, mirror: bool) -> np.ndarray:
    out = np.rot90(img, turns, axes=(0, 1))
    return out[:, ::-1] if mirror else out


def _inverse(img: np.ndarray, turns: int, mirror: bool) -> np.ndarray:
    out = img[:, ::-1] if mirror else img
    return np.rot90(out, -turns, axes=(0, 1))


def dihedral_transforms() -> Iterator[tuple[int, bool]]:
    """The eight ``(quarter turns, mirror)`` pairs of the ensemble, identity first."""
    for mirror in (False, True):
        for turns in range(4):
            yield turns, mirror


def self_ensemble(restore_fn: Callable[[np.ndarray], np.ndarray], img: np.ndarray) -> np.ndarray:
    """Mean of ``restore_fn`` over the eight flips/rotations of ``img`` (numpy ``HW`` or ``HWC``), as float32.

    ``restore_fn`` maps an image to its restoration (``HW[C]`` -> ``sH x sW[xC']``), e.g. a partial of
    ``qmambair.eval.tiling.restore``; it sees contiguous arrays.
    """
    arr = np.asarray(img)
    if arr.ndim not in (2, 3):
        raise ValueError(f"self_ensemble: expected an HW or HWC image, got shape {arr.shape}")
    total: np.ndarray | None = None
    for turns, mirror in dihedral_transforms():
        out = np.asarray(restore_fn(np.ascontiguousarray(_forward(arr, turns, mirror))))
        back = _inverse(out, turns, mirror).astype(np.float64)
        if total is not None and back.shape != total.shape:
            raise ValueError(f"self_ensemble: outputs of different shapes {back.shape} and {total.shape}")
        total = back if total is None else total + back
    assert total is not None
    return (total / 8.0).astype(np.float32)
