"""Real photographs that ship inside Python wheels, for tests and quick evaluation without any download.

Only images bundled in the scikit-image and PyWavelets wheels are listed (docs/evaluation.md §5.1);
``skimage.data`` entries that would be fetched through pooch are deliberately left out. PyWavelets'
``camera`` is the same picture as scikit-image's and is not repeated.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from functools import cache
from types import ModuleType

import numpy as np

from .io import rgb_to_gray

__all__ = ["builtin_images", "list_builtin"]


def _skimage(name: str, index: int | None = None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        data = _require("skimage.data", "scikit-image")
        out = getattr(data, name)()
        return out[index] if index is not None else out

    return load


def _pywt(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        return getattr(_require("pywt.data", "PyWavelets"), name)()

    return load


# name -> (loader, stored in colour?)
_SOURCES: dict[str, tuple[Callable[[], np.ndarray], bool]] = {
    "astronaut": (_skimage("astronaut"), True),
    "chelsea": (_skimage("chelsea"), True),
    "coffee": (_skimage("coffee"), True),
    "rocket": (_skimage("rocket"), True),
    "motorcycle_left": (_skimage("stereo_motorcycle", 0), True),
    "motorcycle_right": (_skimage("stereo_motorcycle", 1), True),
    "hubble_deep_field": (_skimage("hubble_deep_field"), True),
    "immunohistochemistry": (_skimage("immunohistochemistry"), True),
    "retina": (_skimage("retina"), True),
    "camera": (_skimage("camera"), False),
    "brick": (_skimage("brick"), False),
    "grass": (_skimage("grass"), False),
    "gravel": (_skimage("gravel"), False),
    "moon": (_skimage("moon"), False),
    "coins": (_skimage("coins"), False),
    "aero": (_pywt("aero"), False),
    "ascent": (_pywt("ascent"), False),
}


def _require(module: str, package: str) -> ModuleType:
    """Import ``module`` or explain which package provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"built-in test images need the '{package}' package: pip install {package} "
            "(or install qmambair with its [images] extra)"
        ) from exc


def list_builtin(color: bool | None = None) -> list[str]:
    """Names of the built-in images: all of them, or only colour (``True``) / only grey (``False``) ones."""
    return [n for n, (_, is_color) in _SOURCES.items() if color is None or is_color == color]


@cache
def _load(name: str) -> np.ndarray:
    """uint8 HWC pixels of one built-in image, cached and read-only."""
    arr = np.asarray(_SOURCES[name][0]())
    if arr.dtype != np.uint8:
        raise TypeError(f"built-in image {name!r} has dtype {arr.dtype}, expected uint8")
    arr = arr[:, :, None] if arr.ndim == 2 else arr[:, :, :3]
    arr = np.ascontiguousarray(arr)
    arr.setflags(write=False)
    return arr


def builtin_raw(name: str) -> np.ndarray:
    """The stored 8-bit pixels of one built-in image (HxWx1 grey or HxWx3), a fresh writable copy."""
    if name not in _SOURCES:
        raise KeyError(f"unknown built-in image {name!r}; available: {', '.join(_SOURCES)}")
    return _load(name).copy()


def builtin_images(names: Iterable[str] | None = None, gray: bool = False) -> dict[str, np.ndarray]:
    """Built-in images as float32 ``HWC`` arrays in [0,1], keyed by name (in the order asked).

    ``gray=False`` gives every image ``HxWx3`` (grey pictures replicated to RGB); ``gray=True`` gives
    ``HxWx1`` (colour pictures converted with :func:`~qmambair.data.io.rgb_to_gray`). Each call returns fresh
    arrays the caller may modify.
    """
    wanted = list(_SOURCES) if names is None else ([names] if isinstance(names, str) else list(names))
    unknown = [n for n in wanted if n not in _SOURCES]
    if unknown:
        raise KeyError(f"unknown built-in image(s) {unknown}; available: {', '.join(_SOURCES)}")
    out: dict[str, np.ndarray] = {}
    for name in wanted:
        img = _load(name).astype(np.float32) / 255.0
        if gray and img.shape[2] == 3:
            img = rgb_to_gray(img)
        elif not gray and img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        out[name] = img
    return out
