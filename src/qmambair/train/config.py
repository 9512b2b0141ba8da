"""Training configuration: one dataclass, filled in order from its defaults (the paper's recipe,
docs/method.md §5.1), the model preset's ``train`` section (batch, HR patch), an optional YAML file,
command-line flags and finally ``--set key=value`` overrides (``model.embed_dim=30``, ``quant.bits=2``,
``degradation.sigma=50``).

A YAML file holds the same keys, at the top level or under a ``training:`` section. Examples ship in
``qmambair/presets/train/`` and can be named without a path (``--config quick-cpu``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = ["TrainConfig", "parse_set", "apply_sets", "load_config_file", "make_config", "list_train_configs"]

RUNTIME_KEYS = frozenset({"workers", "device", "out", "threads"})  # may change when a run is resumed


@dataclass
class TrainConfig:
    """Everything that defines a training run (full precision when ``quant`` is empty, else QAT)."""

    preset: str = "light-sr-x4"  # model preset: architecture, degradation, default batch/patch
    model: dict[str, Any] = field(default_factory=dict)  # build_model keyword overrides
    degradation: dict[str, Any] = field(default_factory=dict)  # overrides of the preset's degradation
    init: str = ""  # start from these weights (any file load_model reads); QAT: the float model
    interp_init: bool = False  # from scratch: start as bicubic-like upsampling (qmambair.models.init)
    quant: dict[str, Any] = field(default_factory=dict)  # QuantConfig keywords; empty = full precision
    data: str = "builtin"  # image folder, or "builtin" (the fetched photo pool's train split)
    val_data: str = ""  # "": builtin test split / held-out part of `data`; a folder; or "none"
    val_fraction: float = 0.1  # held out of a folder when val_data is ""
    val_images: int = 0  # use at most this many validation images (0: all)
    val_crop: int = 256  # validate on centre crops of this many target pixels (0: whole images)
    val_tile: int = 0  # MambaIR tiling threshold for validation inputs (0: no tiling)
    val_every: int = 1000
    iters: int = 20000
    batch: int = 0  # total over all processes; 0: the preset's
    patch: int = 0  # HR (target) patch size; 0: the preset's
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75, 0.875, 0.9375])  # fractions of iters
    gamma: float = 0.5
    grad_clip: float = 0.0  # max gradient norm (0: no clipping)
    distill: float = 0.0  # weight of L1 to the float teacher's output (0: off)
    teacher: str = ""  # teacher weights; "": the `init` model
    augment: bool = True  # random flips and 90-degree rotations
    patch_min_std: float = 0.0  # skip flat patches: redraw (up to 10 times) below this std in [0, 1] units
    seed: int = 0
    workers: int = 0  # DataLoader worker processes
    log_every: int = 10
    save_every: int = 500
    out: str = ""  # run folder; "": runs/<preset>-<fp|method-wXaY>
    device: str = "auto"  # auto: cuda:<local rank> when available, else cpu
    scan: str = ""  # selective-scan backend (ref, cpu, chunked, gpu); "": automatic / $QMAMBAIR_SCAN
    threads: int = 0  # CPU threads for torch and the numba scan (0: library defaults; see set_threads)
    lr_cache: str = "auto"  # bicubic LR cache folder; auto: $QMAMBAIR_CACHE/lr; "": none

    def __post_init__(self) -> None:
        self.betas = [float(b) for b in self.betas]
        self.milestones = [float(m) for m in self.milestones]
        if len(self.betas) != 2:
            raise ValueError(f"betas must have two values, got {self.betas}")
        if any(not 0 < m < 1 for m in self.milestones):
            raise ValueError(f"milestones are fractions of the run in (0, 1), got {self.milestones}")
        for name in ("iters", "log_every", "save_every", "val_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def is_qat(self) -> bool:
        return bool(self.quant)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict, refusing unknown keys (with the list of valid ones) and coercing scalars."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; valid: {', '.join(fields)}")
        defaults = cls()
        values = {k: _coerce(k, v, getattr(defaults, k)) for k, v in data.items()}
        return cls(**values)

    def resolved(self) -> TrainConfig:
        """A copy with preset-dependent defaults filled in (batch, patch, out)."""
        from ..models.presets import get_preset

        train = get_preset(self.preset).get("train", {})
        cfg = dataclasses.replace(self, model=dict(self.model), degradation=dict(self.degradation),
                                  quant=dict(self.quant))
        cfg.batch = int(self.batch or train.get("batch", 16))
        cfg.patch = int(self.patch or train.get("hr_patch", 64))
        if not cfg.out:
            tag = "fp"
            if cfg.quant:
                bits = cfg.quant.get("bits", 4)
                w, a = cfg.quant.get("w_bits", bits), cfg.quant.get("a_bits", bits)
                tag = f"{cfg.quant.get('method', 'qmambair')}-w{w}a{a}"
            cfg.out = str(Path("runs") / f"{cfg.preset}-{tag}")
        return cfg


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Cast ``value`` to the type of the field's default (YAML may give 2 for 2.0, "1e-4" for 1e-4)."""
    if value is None:
        return default
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if isinstance(default, int | float | str):
            return type(default)(value)
        if isinstance(default, list):
            return list(value) if isinstance(value, list | tuple) else [value]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {key}: cannot use {value!r} (expected {type(default).__name__})") from None
    return value


def parse_set(text: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], value); the value is parsed as YAML (numbers, lists, true/false)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set needs KEY=VALUE, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_sets(data: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a config dict (nested keys create sub-dicts: ``model.depths=[2,2]``)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for text in sets:
        path, value = parse_set(text)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {text}: {part} is not a section")
        node[path[-1]] = value
    return out


def list_train_configs() -> list[str]:
    """Names of the example training configs shipped in ``qmambair/presets/train``."""
    folder = resources.files("qmambair.presets").joinpath("train")
    if not folder.is_dir():
        return []
    return sorted(e.name.removesuffix(".yaml") for e in folder.iterdir() if e.name.endswith(".yaml"))


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training YAML file (or a shipped example by name); returns its option dict."""
    p = Path(path)
    if not p.is_file():
        shipped = resources.files("qmambair.presets").joinpath("train").joinpath(f"{path}.yaml")
        if not shipped.is_file():
            raise FileNotFoundError(f"training config {path} not found (shipped: {list_train_configs()})")
        text = shipped.read_text()
    else:
        text = p.read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"training config {path} must be a mapping of options")
    return dict(data.get("training", data))


def make_config(
    file: str | None = None, sets: list[str] | None = None, **flags: Any
) -> TrainConfig:
    """Defaults < YAML ``file`` < ``flags`` (those not None) < ``sets``; not yet ``resolved()``."""
    data: dict[str, Any] = load_config_file(file) if file else {}
    data.update({k: v for k, v in flags.items() if v is not None})
    return TrainConfig.from_dict(apply_sets(data, sets or []))
