"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is a ``torch.save`` dict that loads with ``weights_only=True``::

    qmambair      {"format": "qmambair-train", "version": 1}   (how load_model recognises it)
    model         state dict (quantizer state included for QAT)
    model_config  build_model keywords;  preset  its preset name
    quant_config  QuantConfig.to_dict() or None
    config        the TrainConfig of the run (resolved)
    step          optimiser steps taken
    optimizer, scheduler, rng (one entry per process: python, numpy, torch, cuda)   (absent in best.pt)
    metrics       last validation and best-so-far numbers
    checksum      SHA-256 of everything above (:func:`checkpoint_checksum`); verified on every read, so a
                  damaged file is refused instead of resumed. Files written before it existed have none and
                  are read unchecked.

Writes go to a temporary file in the same folder, are flushed and fsync'ed, then renamed over the target
(and the folder fsync'ed), so a crash or SIGKILL at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..fileio import atomic_path
from ..models.checkpoint import (
    CheckpointError,
    float_model_from_state,
    official_state_dict,
    read_safetensors,
    read_torch_file,
    tensor_bytes,
)
from ..quant.files import model_from_safetensors, model_from_state
from ..quant.pack import load_packed

__all__ = [
    "FORMAT",
    "atomic_save",
    "checkpoint_checksum",
    "load_checkpoint",
    "model_from_training_checkpoint",
    "rng_state",
    "set_rng_state",
    "training_checkpoint",
]

FORMAT = {"format": "qmambair-train", "version": 1}
CHECKSUM = "checksum"  # the entry holding checkpoint_checksum(obj)


def _digest(h: Any, value: Any) -> None:
    """Feed a canonical encoding of ``value`` (nested dicts, lists, tensors, arrays, scalars) to ``h``."""
    if isinstance(value, torch.Tensor):
        h.update(f"T{str(value.dtype).removeprefix('torch.')}{list(value.shape)}:".encode())
        h.update(tensor_bytes(value))
    elif isinstance(value, np.ndarray):
        h.update(f"A{value.dtype.str}{list(value.shape)}:".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        h.update(f"D{len(value)}:".encode())
        for key in sorted(value, key=repr):
            _digest(h, key)
            _digest(h, value[key])
    elif isinstance(value, list | tuple):
        h.update(f"L{len(value)}:".encode())
        for item in value:
            _digest(h, item)
    else:
        text = repr(value)
        h.update(f"S{type(value).__name__}{len(text)}:{text}".encode())


def checkpoint_checksum(obj: dict[str, Any]) -> str:
    """SHA-256 (hex) of a checkpoint dict's content, the ``checksum`` entry left out."""
    h = hashlib.sha256()
    _digest(h, {k: v for k, v in obj.items() if k != CHECKSUM})
    return h.hexdigest()


def verify_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """A ``CheckpointError`` if the checkpoint records a checksum its content does not match."""
    expected = obj.get(CHECKSUM)
    if expected is not None and checkpoint_checksum(obj) != expected:
        raise CheckpointError(
            f"{path}: the content does not match the checkpoint's checksum: the file is damaged; use an "
            "intact copy (or best.pt, or start again)"
        )


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` via temp file + fsync + rename; never leaves a partial file at ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def rng_state() -> dict[str, Any]:
    """This process's random states (python, numpy, torch CPU and CUDA) in a weights_only-safe form."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                                        "pos": int(np_state["state"]["pos"])}},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np_state["state"]["key"].numpy().astype(np.uint32),
                         "pos": int(np_state["state"]["pos"])}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def training_checkpoint(
    model: nn.Module,
    config: dict[str, Any],
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    rng: list[dict[str, Any]] | None = None,
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict (module docstring); without optimizer/scheduler/rng it is a weights-only file."""
    quant = getattr(model, "quant_config", None)
    obj: dict[str, Any] = {
        "qmambair": dict(FORMAT),
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "model_config": dict(model.config),
        "preset": getattr(model, "preset", None) or "",
        "quant_config": quant.to_dict() if quant is not None else None,
        "config": dict(config),
        "step": int(step),
        "metrics": dict(metrics or {}),
    }
    if optimizer is not None:
        obj["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        obj["scheduler"] = scheduler.state_dict()
    if rng is not None:
        obj["rng"] = list(rng)
    obj[CHECKSUM] = checkpoint_checksum(obj)
    return obj


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training checkpoint (``weights_only=True``); errors say what is wrong with the file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint")
    obj = read_torch_file(p, map_location)
    if not isinstance(obj, dict) or not isinstance(obj.get("qmambair"), dict) \
            or obj["qmambair"].get("format") != FORMAT["format"]:
        raise CheckpointError(f"{p}: not a qmambair training checkpoint")
    if obj["qmambair"].get("version", 0) > FORMAT["version"]:
        version = obj["qmambair"]["version"]
        raise CheckpointError(f"{p}: written by a newer qmambair (format version {version})")
    verify_checkpoint(obj, p)
    return obj


def model_from_training_checkpoint(obj: dict[str, Any]) -> nn.Module:
    """The network of a loaded training checkpoint (quantized if it was a QAT run), in train mode."""
    try:
        config = dict(obj["model_config"])
        state = obj["model"]
    except (KeyError, TypeError):
        raise CheckpointError("training checkpoint lacks model_config/model entries") from None
    return model_from_state(state, config, obj.get("quant_config"), obj.get("preset"))


def load_model_file(
    path: str | os.PathLike,
    preset: str | None = None,
    param_key: str | None = None,
    map_location: str = "cpu",
) -> nn.Module:
    """The model of any model file, in eval mode: what ``qmambair.loading.load_model`` and a run's ``init``
    read once a name has become a file.

    ``.qmb``: packed low-bit; ``.safetensors``: the project's format (float or quantized) or a bare official
    state dict; other suffixes: ``torch.load``, a training checkpoint of this project or an official BasicSR
    file (``params``/``params_ema``, or the key ``param_key``). ``preset`` forces a float architecture.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".qmb":
        return load_packed(p).eval()
    if suffix == ".safetensors":
        return model_from_safetensors(*read_safetensors(p, map_location), preset=preset).eval()
    obj = read_torch_file(p, map_location)
    if isinstance(obj, dict) and "qmambair" in obj:  # a training checkpoint of this project
        verify_checkpoint(obj, p)
        return model_from_training_checkpoint(obj).eval()
    try:
        sd = official_state_dict(obj, param_key)
    except CheckpointError as exc:
        raise CheckpointError(f"{p}: {exc}") from None
    return float_model_from_state(sd, preset=preset).eval()
