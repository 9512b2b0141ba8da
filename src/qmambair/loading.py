"""``load_model``: any model a user can name, one call.

Official MambaIR/BasicSR ``.pth`` files, the project's ``.safetensors`` (float or quantized), packed ``.qmb``
files, training checkpoints, shipped model names (``light-sr-x4-fp``) and preset names (a randomly initialised
network). This module sits above the parts that know each format (``qmambair.models.checkpoint``,
``qmambair.quant.files``/``pack``, ``qmambair.train.checkpoint``), so none of them needs to import another's.
"""

from __future__ import annotations

import os

from torch import nn

from .models.checkpoint import locate_model_file
from .models.presets import build_model
from .train.checkpoint import load_model_file

__all__ = ["load_model"]


def load_model(
    path: str | os.PathLike,
    preset: str | None = None,
    param_key: str | None = None,
    map_location: str = "cpu",
) -> nn.Module:
    """Load a model file (or a shipped model or preset by name) and return the network in eval mode.

    - ``.safetensors``: the project's format (config in metadata), or a bare official state dict;
    - ``.pth``/``.pt``/``.ckpt``: official BasicSR files (``params``/``params_ema``, ``module.`` prefix) or a
      qmambair training checkpoint;
    - ``.qmb``: a packed low-bit file (see ``qmambair.quant.pack``).
    ``preset`` forces an architecture (the file must then fit it exactly, else a ``CheckpointError``).
    A shipped model's name (``qmambair.models.shipped``, e.g. ``light-sr-x4-fp``) loads that file; a preset
    name (no such file) builds a randomly initialised model.
    """
    p = locate_model_file(path, presets=preset is None)
    if p is None:
        return build_model(str(path)).eval()
    return load_model_file(p, preset=preset, param_key=param_key, map_location=map_location)
