"""Quantized models from their files: the project's safetensors (quantization config in the metadata).

Packed ``.qmb`` files are read by ``qmambair.quant.pack``; float files by ``qmambair.models.checkpoint``.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from ..models.checkpoint import float_model_from_state, infer_config, load_state_dict_checked
from ..models.presets import build_model, preset_for_config
from .convert import QuantConfig, quantize_model


def model_from_state(
    sd: dict[str, torch.Tensor],
    config: dict[str, Any],
    quant_config: dict[str, Any] | None = None,
    preset: str | None = None,
) -> nn.Module:
    """The network ``config`` describes, quantized as ``quant_config`` says (if given), ``sd`` loaded.

    ``preset`` is only the name recorded on the model (default: the preset whose config matches).
    """
    model = build_model(None, **config)
    model.preset = preset or preset_for_config(config)
    if quant_config:
        model = quantize_model(model, QuantConfig.from_dict(quant_config))
    load_state_dict_checked(model, sd)
    return model


def model_from_safetensors(
    sd: dict[str, torch.Tensor], meta: dict[str, str], preset: str | None = None
) -> nn.Module:
    """The model of a safetensors file's tensors and metadata (as ``read_safetensors`` returns them).

    The project's files (float or quantized) carry their config; a bare official state dict has its
    architecture read off the shapes. A forced ``preset`` reads the tensors as that float architecture.
    """
    if preset:
        return float_model_from_state(sd, preset=preset)
    config = json.loads(meta["config"]) if "config" in meta else infer_config(sd)
    quant = json.loads(meta["quant_config"]) if meta.get("quant_config") else None
    return model_from_state(sd, config, quant, meta.get("preset") or None)
