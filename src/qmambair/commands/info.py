"""``qmambair info``: config, preset, parameter count, MACs and quantization of a model."""

from __future__ import annotations

import argparse
import json
from typing import Any

from torch import nn

from ..eval.complexity import count_macs
from ..loading import load_model
from ..models.shipped import shipped_path

REFERENCE_OUTPUT = (720, 1280)  # MACs are usually quoted for a 1280x720 output


def model_scale(model: nn.Module) -> int:
    """The model's upscaling factor (1 for restoration networks)."""
    config = getattr(model, "config", None) or {}
    if not config.get("upsampler", getattr(model, "upsampler", "x")):
        return 1
    return int(getattr(model, "upscale", config.get("upscale", 1)) or 1)


def _quant_dict(quant: Any) -> dict[str, Any] | None:
    if quant is None:
        return None
    if hasattr(quant, "to_dict"):
        return dict(quant.to_dict())
    if isinstance(quant, dict):
        return dict(quant)
    return {"repr": repr(quant)}


def model_info(model: nn.Module, size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Everything ``qmambair info`` prints, as a dict (sizes are (H, W) of the input / output)."""
    scale = model_scale(model)
    if size is None:
        size = (max(1, REFERENCE_OUTPUT[0] // scale), max(1, REFERENCE_OUTPUT[1] // scale))
    macs = count_macs(model, *size)
    return {
        "preset": getattr(model, "preset", None),
        "config": dict(getattr(model, "config", None) or {}),
        "scale": scale,
        "input_size": list(size),
        "output_size": [size[0] * scale, size[1] * scale],
        "params": macs.pop("params"),
        "macs": macs,
        "quant_config": _quant_dict(getattr(model, "quant_config", None)),
    }


def _g(n: int) -> str:
    return f"{n / 1e9:.2f} G"


def format_info(source: str, info: dict[str, Any]) -> str:
    """Human-readable text of ``model_info``."""
    m = info["macs"]
    (h, w), (oh, ow) = info["input_size"], info["output_size"]
    config = ", ".join(f"{k}={v}" for k, v in info["config"].items()) or "(none recorded)"
    quant = info["quant_config"]
    lines = [
        f"model:        {source}",
        f"preset:       {info['preset'] or 'none (custom architecture)'}",
        f"config:       {config}",
        f"parameters:   {info['params']:,} ({info['params'] / 1e6:.3f} M)",
        f"input:        {h}x{w} -> output {oh}x{ow} (scale {info['scale']})",
        f"MACs:         {_g(m['total'])} = conv {_g(m['conv'])} + linear {_g(m['linear'])} "
        f"+ einsum {_g(m['einsum'])} + scan {_g(m['scan'])}",
        f"scan:         counted explicitly, D'*L*(5N+1) MACs; plus {_g(m['scan_exp'])} exp and "
        f"{_g(m['scan_softplus'])} softplus evaluations (not in the total)",
        "quantization: " + (", ".join(f"{k}={v}" for k, v in quant.items()) if quant else "none (float)"),
    ]
    return "\n".join(lines)


def run_info(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    info = model_info(model, args.size)
    packed = None
    source = shipped_path(args.model) or args.model  # a shipped model's name, or a file
    if str(source).lower().endswith(".qmb"):
        from .export import format_packed_info, packed_info

        packed = packed_info(source)
        info["packed"] = {k: v for k, v in packed.items() if k not in ("config", "quant_config")}
    if args.json:
        print(json.dumps({"model": args.model, **info}, indent=2, default=str))
    else:
        print(format_info(args.model, info))
        if packed is not None:
            print(format_packed_info(packed))
    return 0
