"""Training configuration: one dataclass, filled in order from its defaults (the paper's recipe,
docs/method.md §5.1), the model preset's ``train`` section (batch, HR patch), an optional YAML file,
command-line flags and finally ``--set key=value`` overrides (``model.embed_dim=30``, ``quant.bits=2``,
``degradation.sigma=50``).

A YAML file holds the same keys, at the top level or under a ``training:`` section. Examples ship in
``qmambair/presets/train/`` and can be named without a path (``--config quick-cpu``).

:func:`make_config` checks everything before a run starts (:meth:`TrainConfig.validate`): unknown keys at
every level (``model.emb_dim``, ``quant.bitz``, ``degradation.scal``), types, ranges, the preset, the device,
and that the model's scale fits the degradation; a mistake raises :class:`ConfigError` naming the option.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError

__all__ = ["ConfigError", "TrainConfig", "check_device", "parse_set", "apply_sets", "load_config_file",
           "make_config", "list_train_configs"]

RUNTIME_KEYS = frozenset({"workers", "device", "out", "threads"})  # may change when a run is resumed
DEGRADATION_KEYS = ("type", "kind", "scale", "sigma", "quality")  # what Degradation.from_dict reads


class ConfigError(UserError, ValueError):
    """A training option that cannot be used: names the option and says what would fit."""


def check_device(text: str, option: str = "device") -> str:
    """``text`` if it names a torch device this machine has ("auto" too); else a ``ConfigError``."""
    import torch

    if text in ("", "auto"):
        return text
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{option} {text!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{option} {text!r}: CUDA is not available on this machine; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ConfigError(f"{option} {text!r}: this machine has {count} CUDA device(s)")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ConfigError(f"{option} {text!r}: not supported; use cpu, cuda, cuda:N or auto")
    elif dev.type != "cpu" and not getattr(torch, dev.type).is_available():
        raise ConfigError(f"{option} {text!r}: {dev.type} is not available on this machine; use cpu")
    return text


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

    def validate(self) -> TrainConfig:
        """Check every option (ranges, the preset, the model/quant/degradation sections, the device) before
        anything runs; returns ``self``, or raises :class:`ConfigError` naming the first bad option."""
        from ..models.presets import get_preset, list_presets

        if self.preset not in list_presets():
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of: {', '.join(list_presets())}")
        for name, low in (("batch", 0), ("patch", 0), ("seed", 0), ("workers", 0), ("threads", 0),
                          ("val_images", 0), ("val_crop", 0), ("val_tile", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"option {name} must be >= {low}, got {getattr(self, name)}")
        for name in ("lr", "gamma"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"option {name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip", "distill", "patch_min_std"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"option {name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"option val_fraction must be in [0, 1), got {self.val_fraction}")
        if any(not 0 <= b < 1 for b in self.betas):
            raise ConfigError(f"option betas must be two values in [0, 1), got {self.betas}")
        if self.val_tile == 1:
            raise ConfigError("option val_tile must be 0 (no tiling) or >= 2, got 1")
        from ..scan import BACKENDS

        if self.scan not in ("", "auto", *BACKENDS):
            choices = ", ".join(BACKENDS)
            raise ConfigError(f"option scan must be one of {choices} (or empty), got {self.scan!r}")
        check_device(self.device)
        preset = get_preset(self.preset)
        model = {**preset["model"], **_check_model_section(self.model)}
        quant = _check_quant_section(self.quant)
        deg = _check_degradation_section(self.degradation, preset.get("degradation", {}))
        if quant and quant.is_ptq:
            raise ConfigError(f"quant.method {quant.method!r} is a post-training method (calibration, no "
                              "training); QAT takes qmambair, lsq, lsq+, pams, dorefa, quantsr or n2uq")
        scale = int(model.get("upscale", 1)) if model.get("upsampler") else 1
        if not self.init and scale != deg.factor:
            raise ConfigError(f"the model upscales x{scale} but the degradation is {deg}; choose a matching "
                              "preset or set degradation.scale / model.upscale to agree")
        patch = self.patch or int(preset.get("train", {}).get("hr_patch", 64))
        if patch % deg.factor:
            raise ConfigError(f"option patch {patch} must be a multiple of the scale {deg.factor}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict, refusing unknown keys (with the list of valid ones) and coercing scalars."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"unknown training option(s) {', '.join(unknown)}; valid: {', '.join(fields)}")
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


def _as_type(value: Any, kind: type) -> Any:
    """``value`` as a ``kind`` (bool, int, float, str), strictly: no 2.5 -> 2, no "abc" -> anything."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(value)
    if isinstance(value, bool) or isinstance(value, dict | list | tuple):
        if kind is not str or isinstance(value, dict | list | tuple):
            raise ValueError(value)
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if isinstance(value, str):
            return int(value.strip())
        return int(value)
    if kind is float:
        return float(value)
    return str(value)


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Cast ``value`` to the type of the field's default (YAML may give 2 for 2.0, "1e-4" for 1e-4)."""
    if value is None:
        return default
    try:
        if isinstance(default, bool | int | float | str):
            return _as_type(value, type(default))
        if isinstance(default, list):
            return list(value) if isinstance(value, list | tuple) else [value]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"option {key}: cannot use {value!r} (expected {_type_word(default)})"
        ) from None
    return value


def _type_word(default: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "text", list: "a list",
            dict: "a section of key: value options"}.get(type(default), type(default).__name__)


def _model_keywords() -> dict[str, Any]:
    """The MambaIR keywords a config may set, with their defaults (which give their types)."""
    from ..models.mambair import MambaIR

    params = inspect.signature(MambaIR.__init__).parameters
    keys = {n: p.default for n, p in params.items()
            if n not in ("self", "kwargs", "norm_layer") and p.default is not inspect.Parameter.empty}
    keys["depths"] = list(keys["depths"])
    keys["num_feat"] = 64
    return keys


def _check_model_section(model: dict[str, Any]) -> dict[str, Any]:
    """``model`` overrides checked against MambaIR's keywords: names, types and ranges."""
    known = _model_keywords()
    unknown = sorted(set(model) - set(known))
    if unknown:
        raise ConfigError(f"unknown model option(s) {', '.join(f'model.{k}' for k in unknown)}; "
                          f"valid: {', '.join(sorted(known))}")
    out = {}
    for key, value in model.items():
        name, default = f"model.{key}", known[key]
        if isinstance(default, list):
            if not isinstance(value, list | tuple) or not value:
                raise ConfigError(f"option {name}: expected a non-empty list of integers, got {value!r}")
            value = [_coerce(name, v, 0) for v in value]
            if min(value) < 1:
                raise ConfigError(f"option {name}: every entry must be >= 1, got {value}")
        else:
            value = _coerce(name, value, default)
        if key in ("embed_dim", "d_state", "in_chans", "upscale", "img_size", "num_feat") and value < 1:
            raise ConfigError(f"option {name} must be >= 1, got {value}")
        if key in ("mlp_ratio", "img_range") and not value > 0:
            raise ConfigError(f"option {name} must be > 0, got {value}")
        if key in ("drop_rate", "drop_path_rate") and not 0 <= value < 1:
            raise ConfigError(f"option {name} must be in [0, 1), got {value}")
        out[key] = value
    return out


def _check_quant_section(quant: dict[str, Any]) -> Any:
    """The QuantConfig of a ``quant`` section (None when empty); unknown keys and bad values refused."""
    if not quant:
        return None
    from ..quant.convert import QuantConfig

    known = [f.name for f in dataclasses.fields(QuantConfig)] + ["bits"]
    unknown = sorted(set(quant) - set(known))
    if unknown:
        raise ConfigError(f"unknown quant option(s) {', '.join(f'quant.{k}' for k in unknown)}; "
                          f"valid: {', '.join(sorted(known))}")
    types = {"w_bits": 0, "a_bits": 0, "bits": 0, "use_dls": True, "use_rfa": True, "dls_per_sample": True,
             "dls_sigma_init": 0.0, "rfa_min_gap": 0.0, "method": ""}
    values = {k: (_coerce(f"quant.{k}", v, types[k]) if k in types and v is not None else v)
              for k, v in quant.items()}
    try:
        return QuantConfig(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"quant section: {exc}") from None


def _check_degradation_section(overrides: dict[str, Any], base: dict[str, Any]) -> Any:
    """The Degradation of a preset's ``base`` spec with ``overrides``; unknown keys and bad values refused."""
    from ..data.datasets import Degradation

    unknown = sorted(set(overrides) - set(DEGRADATION_KEYS))
    if unknown:
        raise ConfigError(f"unknown degradation option(s) {', '.join(f'degradation.{k}' for k in unknown)}; "
                          f"valid: {', '.join(DEGRADATION_KEYS)}")
    types = {"type": "", "kind": "", "scale": 0, "sigma": 0.0, "quality": 0}
    spec = {**base, **{k: _coerce(f"degradation.{k}", v, types[k]) for k, v in overrides.items()}}
    try:
        return Degradation.from_dict(spec)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"degradation section: {exc}") from None


def parse_set(text: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], value); the value is parsed as YAML (numbers, lists, true/false)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part.strip() for part in key.split(".")):
        raise ConfigError(f"--set needs KEY=VALUE (KEY like lr or model.embed_dim), got {text!r}")
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
                raise ConfigError(f"--set {text}: {part} is not a section")
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
    if not p.exists():
        shipped = resources.files("qmambair.presets").joinpath("train").joinpath(f"{path}.yaml")
        if not shipped.is_file():
            shipped_names = ", ".join(list_train_configs())
            raise ConfigError(f"training config {path}: no such file (shipped: {shipped_names})")
        text = shipped.read_text()
    else:
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"training config {path}: cannot be read ({why})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"training config {path}: not valid YAML{where} ({problem})") from None
    data = {} if data is None else data
    if isinstance(data, dict) and "training" in data:
        data = data["training"]
    if not isinstance(data, dict):
        raise ConfigError(f"training config {path}: must be a mapping of options (key: value), "
                          f"not {type(data).__name__}")
    return dict(data)


def make_config(
    file: str | None = None, sets: list[str] | None = None, **flags: Any
) -> TrainConfig:
    """Defaults < YAML ``file`` < ``flags`` (those not None) < ``sets``, validated; not yet ``resolved()``."""
    data: dict[str, Any] = load_config_file(file) if file else {}
    data.update({k: v for k, v in flags.items() if v is not None})
    try:
        config = TrainConfig.from_dict(apply_sets(data, sets or []))
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # __post_init__'s range checks
        raise ConfigError(str(exc)) from None
    return config.validate()
