"""Float model files: official MambaIR/BasicSR checkpoints and the project's safetensors format.

An official file's architecture is read off its tensor shapes; the project's own files carry their config
(and, for a quantized model, its quantization config) in the safetensors metadata, and a SHA-256 checksum of
their tensors (``tensors_sha256``, see :func:`tensor_checksum`) that every read verifies; files without one
(official or foreign files) are read unchecked. This module knows the float
networks only: quantized models (``qmambair.quant.files``, ``qmambair.quant.pack``), training checkpoints
(``qmambair.train.checkpoint``) and the any-file ``load_model`` (``qmambair.loading``) live above it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..fileio import atomic_path
from .presets import build_model, preset_for_config

FORMAT_NAME = "qmambair-model"
FORMAT_VERSION = 1
CHECKSUM_KEY = "tensors_sha256"  # metadata entry holding tensor_checksum() of the file's tensors


class CheckpointError(UserError, ValueError):
    """A model file that cannot be used: says what is wrong and what would fit."""


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (C order, the machine's byte order), without a copy where possible."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over every tensor in key order: its name, dtype, shape and raw bytes.

    Any changed bit of a value, a renamed or reshaped tensor, or a missing one changes it.
    """
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def verify_checksum(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: str | os.PathLike) -> None:
    """A ``CheckpointError`` if ``meta`` records a checksum that ``tensors`` do not match (none: no check)."""
    expected = meta.get(CHECKSUM_KEY)
    if expected is not None and tensor_checksum(tensors) != expected:
        raise CheckpointError(
            f"{path}: the tensors do not match the file's checksum: the file is damaged (a changed byte on "
            "disk or in transfer); copy or download it again"
        )


def official_state_dict(obj: Any, param_key: str | None = None) -> dict[str, torch.Tensor]:
    """Extract the network's state dict from a loaded BasicSR checkpoint (``params``/``params_ema``)."""
    if isinstance(obj, dict) and param_key is not None:
        if param_key not in obj:
            raise CheckpointError(f"checkpoint has no key {param_key!r}; it has {sorted(obj)[:10]}")
        obj = obj[param_key]
    elif isinstance(obj, dict):
        for key in ("params_ema", "params", "state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            "file does not hold a state dict (expected a dict of tensors, or params/params_ema)"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def infer_config(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Read MambaIR constructor keywords off the names and shapes of a state dict."""
    try:
        embed_dim, in_chans = sd["conv_first.weight"].shape[:2]
        blocks: dict[int, int] = {}
        for key in sd:
            m = re.match(r"layers\.(\d+)\.residual_group\.blocks\.(\d+)\.", key)
            if m:
                g, j = int(m.group(1)), int(m.group(2))
                blocks[g] = max(blocks.get(g, 0), j + 1)
        depths = [blocks[g] for g in range(len(blocks))]
        prefix = "layers.0.residual_group.blocks.0.self_attention."
        d_state = sd[prefix + "A_logs"].shape[1]
        d_inner = sd[prefix + "in_proj.weight"].shape[0] // 2
    except (KeyError, IndexError) as exc:
        raise CheckpointError(f"not a MambaIR state dict: missing {exc}") from None
    config: dict[str, Any] = dict(
        in_chans=int(in_chans),
        embed_dim=int(embed_dim),
        depths=depths,
        d_state=int(d_state),
        mlp_ratio=round(d_inner / embed_dim, 4),
        resi_connection="3conv" if "conv_after_body.0.weight" in sd else "1conv",
    )
    if "conv_before_upsample.0.weight" in sd:
        config["upsampler"] = "pixelshuffle"
        num_feat = sd["conv_before_upsample.0.weight"].shape[0]
        convs = sorted(int(m.group(1)) for k in sd if (m := re.match(r"upsample\.(\d+)\.weight$", k)))
        growth = sd[f"upsample.{convs[0]}.weight"].shape[0] // num_feat
        config["upscale"] = 3 if growth == 9 else 2 ** len(convs)
        if num_feat != 64:
            config["num_feat"] = int(num_feat)
    elif "upsample.0.weight" in sd:
        config["upsampler"] = "pixelshuffledirect"
        config["upscale"] = round((sd["upsample.0.weight"].shape[0] // in_chans) ** 0.5)
    else:
        config["upsampler"] = ""
        config["upscale"] = 1
    # mlp_ratio must reproduce int(mlp_ratio * C) exactly; prefer the published ratios.
    for ratio in (1.2, 2.0, 1.0, 1.5):
        if int(ratio * embed_dim) == d_inner:
            config["mlp_ratio"] = ratio
            break
    return config


def _describe_mismatch(missing: list[str], unexpected: list[str], sd: dict[str, torch.Tensor]) -> str:
    lines = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            lines.append(f"{label} keys: {shown}")
    try:
        fit = preset_for_config(infer_config(sd))
        lines.append(f"the file looks like preset {fit!r}" if fit else "no preset matches the file's shapes")
    except CheckpointError:
        lines.append("the file does not look like a MambaIR checkpoint")
    return "; ".join(lines)


def load_state_dict_checked(
    model: nn.Module, sd: dict[str, torch.Tensor], allow_missing: tuple[str, ...] = ()
) -> None:
    """``load_state_dict(strict=True)``, with an error naming missing/unexpected/mis-shaped keys and a fit.

    Keys whose name contains one of ``allow_missing`` (e.g. quantizer state) may be absent from ``sd``.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not any(a in k for a in allow_missing)]
    unexpected = [k for k in sd if k not in own]
    shape = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in sd
        if k in own and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shape:
        msg = _describe_mismatch(missing, unexpected + shape, sd)
        raise CheckpointError(f"checkpoint does not fit the model: {msg}")
    model.load_state_dict(sd, strict=not allow_missing)


def save_model(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write weights + config (+ quantization config) as one safetensors file, atomically."""
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("model has no .config; build it with build_model() or load_model()")
    meta = {
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "config": json.dumps(config),
        "preset": getattr(model, "preset", None) or "",
    }
    quant = getattr(model, "quant_config", None)
    if quant is not None:
        meta["quant_config"] = json.dumps(quant.to_dict() if hasattr(quant, "to_dict") else dict(quant))
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta[CHECKSUM_KEY] = tensor_checksum(tensors)
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_safetensors(
    path: str | os.PathLike, map_location: str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a safetensors file, its checksum verified (when it has one); a
    ``CheckpointError`` if it cannot be read or is damaged."""
    from safetensors import SafetensorError, safe_open

    check_readable(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    verify_checksum(sd, meta, path)
    if str(map_location) != "cpu":
        sd = {k: v.to(map_location) for k, v in sd.items()}
    return sd, meta


def check_readable(path: str | os.PathLike) -> None:
    """A ``CheckpointError`` saying what is wrong when ``path`` cannot be opened for reading."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied (make the file readable by this user)") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, not a model file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def read_torch_file(path: str | os.PathLike, map_location: str = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of a ``.pth``-like file; a ``CheckpointError`` if unreadable."""
    check_readable(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise CheckpointError(
            f"{path}: cannot be read as a PyTorch checkpoint ({type(exc).__name__}: {exc})"
        ) from None


def float_model_from_state(
    sd: dict[str, torch.Tensor], config: dict[str, Any] | None = None, preset: str | None = None
) -> nn.Module:
    """The float network for a state dict, its weights loaded (train mode).

    The architecture is the ``preset`` if given (the file must fit it exactly), else ``config`` (build_model
    keywords, as the project's files carry), else read off the state dict's shapes (official files).
    """
    if preset:
        return _loaded(build_model(preset), sd)
    model = build_model(None, **(config if config is not None else infer_config(sd)))
    model.preset = preset_for_config(model.config)
    return _loaded(model, sd)


def _loaded(model: nn.Module, sd: dict[str, torch.Tensor]) -> nn.Module:
    load_state_dict_checked(model, sd)
    return model


def locate_model_file(path: str | os.PathLike, presets: bool = True) -> Path | None:
    """The file a model argument names: ``path`` itself, or the file of the shipped model of that name.

    None when ``path`` is a preset name and ``presets`` is true (the caller builds that preset); a
    ``CheckpointError`` listing the choices when it names nothing, or when the file is empty.
    """
    from .presets import list_presets
    from .shipped import list_shipped, shipped_path

    p = Path(path)
    if not p.exists() and shipped_path(str(path)) is not None:
        p = shipped_path(str(path))
    if not p.exists():
        if presets and str(path) in list_presets():
            return None
        raise CheckpointError(
            f"{path}: no such file, shipped model ({', '.join(list_shipped()) or 'none installed'}) "
            f"or preset ({', '.join(list_presets())})"
        )
    if p.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    return p
