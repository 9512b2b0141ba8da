"""Presets by name: ``build_model("light-sr-x4")`` reads ``qmambair/presets/light-sr-x4.yaml``."""

from __future__ import annotations

import copy
from functools import cache
from importlib import resources
from typing import Any

import yaml

from .mambair import MambaIR

# Short names for the architecture of a restoration family (all noise levels / qualities share it).
ALIASES = {"denoise-color": "denoise-color-s25", "jpeg-gray": "jpeg-gray-q30"}


@cache
def _load_presets() -> dict[str, dict[str, Any]]:
    presets = {}
    for entry in resources.files("qmambair.presets").iterdir():
        if entry.name.endswith(".yaml"):
            data = yaml.safe_load(entry.read_text())
            presets[data["name"]] = data
    return presets


def list_presets() -> list[str]:
    """Names accepted by ``build_model`` (aliases included)."""
    return sorted(_load_presets()) + sorted(ALIASES)


def get_preset(name: str) -> dict[str, Any]:
    """The full preset (model keywords, degradation, training defaults) as a fresh dict."""
    presets = _load_presets()
    key = ALIASES.get(name, name)
    if key not in presets:
        raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(list_presets())}")
    return copy.deepcopy(presets[key])


def build_model(name: str | None = None, **overrides: Any) -> MambaIR:
    """Build a MambaIR from a preset name, with keyword overrides (or from keywords alone if name is None).

    The returned model remembers its config in ``model.config`` (what checkpoints store).
    """
    config = get_preset(name)["model"] if name is not None else {}
    config.update(overrides)
    if "depths" in config:
        config["depths"] = list(config["depths"])
    model = MambaIR(**config)
    model.config = dict(config)
    model.preset = ALIASES.get(name, name) if name else None
    return model


ARCH_KEYS = (
    "in_chans",
    "embed_dim",
    "depths",
    "d_state",
    "mlp_ratio",
    "upsampler",
    "upscale",
    "resi_connection",
)


def preset_for_config(config: dict[str, Any]) -> str | None:
    """The first preset (by name) whose architecture keywords equal those of ``config``, if any."""
    defaults = {"resi_connection": "1conv"}
    want = {k: config.get(k, defaults.get(k)) for k in ARCH_KEYS}
    want["depths"] = list(want["depths"] or [])
    for name, preset in sorted(_load_presets().items()):
        have = {k: preset["model"].get(k, defaults.get(k)) for k in ARCH_KEYS}
        if have == want:
            return name
    return None
