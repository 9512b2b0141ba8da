"""``quantize_model(model, QuantConfig(...))``: swap the quantized places of a MambaIR for quantized modules.

The places are exactly those of the table in docs/method.md §4.1, and each has one of three quantizer *slots*:

- ``act``: the input of in_proj, the depthwise conv2d, x_proj, dt_proj, the CAB convs and the RSSG tail conv
  (Q-MambaIR: Act_Quant);
- ``dls``: the seven scan inputs and the input of out_proj (Q-MambaIR: DLS);
- ``weight``: every weight of those layers (Q-MambaIR: RFA).

A baseline method puts its own activation quantizer in both ``act`` and ``dls`` and its weight quantizer in
``weight``; everything else (conv_first, conv_after_body, the head, channel attention, LayerNorms, skip
scales, biases) stays float. Like torchao's ``quantize_``, the swap is in place and ``filter_fn`` may skip
places.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from ..models.blocks import CAB
from ..models.mambair import ResidualGroup
from ..models.ss2d import DIRECTIONS, SS2D
from .act import ActQuant
from .base import Quantizer
from .baselines import (
    LSQ,
    N2UQ,
    PAMS,
    DoReFa,
    DoReFaWeight,
    LSQPlus,
    LSQPlusWeight,
    LSQWeight,
    MaxAbsWeight,
    N2UQWeight,
    PAMSWeight,
    QuantSR,
)
from .dls import DLS
from .layers import SCAN_INPUTS, QConv2d, QLinear, QProjection, QScan
from .ptq import DynamicTokenQuant, MinMaxQuant, PercentileQuant
from .rfa import RFA

METHODS = ("qmambair", "lsq", "lsq+", "pams", "dorefa", "quantsr", "n2uq", "minmax", "percentile", "dynamic")
PTQ_METHODS = ("minmax", "percentile", "dynamic")
_ALIASES = {"q-mambair": "qmambair", "lsqplus": "lsq+", "lsq_plus": "lsq+", "dynamic-token": "dynamic"}
SUPPORTED_BITS = (2, 3, 4, 8)


@dataclasses.dataclass
class QuantConfig:
    """What to quantize with: method, bit-widths and the Q-MambaIR ablation switches.

    ``bits`` sets both ``w_bits`` and ``a_bits`` (those given explicitly win); the default is W4A4.
    ``use_dls`` / ``use_rfa`` only affect ``method="qmambair"``: with both off the DLS slots get Act_Quant and
    the weights LSQ (the paper's baseline). ``dls_per_sample`` makes DLS statistics per sample.
    ``skip`` lists module paths of places kept float (``quantize_model`` records ``filter_fn``'s choices here,
    so a checkpoint's config rebuilds the same model).
    """

    method: str = "qmambair"
    w_bits: int | None = None
    a_bits: int | None = None
    bits: dataclasses.InitVar[int | None] = None
    use_dls: bool = True
    use_rfa: bool = True
    dls_per_sample: bool = False
    dls_sigma_init: float = 3.0
    rfa_min_gap: float = 0.1
    skip: tuple[str, ...] = ()

    def __post_init__(self, bits: int | None) -> None:
        method = _ALIASES.get(str(self.method).lower(), str(self.method).lower())
        if method not in METHODS:
            choices = ", ".join(METHODS)
            raise ValueError(f"unknown quantization method {self.method!r}; choose one of {choices}")
        self.method = method
        default = 4 if bits is None else int(bits)
        self.w_bits = default if self.w_bits is None else int(self.w_bits)
        self.a_bits = default if self.a_bits is None else int(self.a_bits)
        self.skip = tuple(self.skip)
        for name in ("w_bits", "a_bits"):
            if getattr(self, name) not in SUPPORTED_BITS:
                raise ValueError(f"{name} must be one of {SUPPORTED_BITS}, got {getattr(self, name)}")

    @property
    def is_ptq(self) -> bool:
        """True for the post-training methods (they need ``calibrate``)."""
        return self.method in PTQ_METHODS

    def to_dict(self) -> dict[str, Any]:
        """Plain dict that ``QuantConfig(**d)`` turns back into an equal config (stored in checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        return cls(**data)


# --- quantizer factory -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ActSpec:
    """Where an activation sits: its channel dim (per-token / per-channel rules) and whether it is batched.

    ``channel_shape`` is the broadcast shape of a per-channel parameter; None means per-tensor.
    """

    channel_dim: int | None = None
    channel_shape: tuple[int, ...] | None = None
    batched: bool = True


def make_act_quantizer(config: QuantConfig, slot: str, spec: ActSpec) -> Quantizer:
    """The activation quantizer of ``config`` for slot ``act`` or ``dls`` at a place described by ``spec``."""
    b, m = config.a_bits, config.method
    if m == "qmambair":
        if slot == "dls" and config.use_dls:
            return DLS(b, per_sample=config.dls_per_sample and spec.batched, sigma_init=config.dls_sigma_init)
        return ActQuant(b)
    simple = {"lsq": LSQ, "lsq+": LSQPlus, "pams": PAMS, "dorefa": DoReFa, "n2uq": N2UQ,
              "minmax": MinMaxQuant, "percentile": PercentileQuant}
    if m in simple:
        return simple[m](b)
    if m == "quantsr":
        return QuantSR(b, channel_shape=spec.channel_shape)
    if m == "dynamic":
        return DynamicTokenQuant(b, token_dim=spec.channel_dim)
    raise AssertionError(m)


def make_weight_quantizer(config: QuantConfig, weight: torch.Tensor, out_dims: int) -> Quantizer:
    """The weight quantizer of ``config`` for ``weight`` (its first ``out_dims`` dims are output channels)."""
    b, m = config.w_bits, config.method
    if m == "qmambair":
        return RFA(b, min_gap=config.rfa_min_gap) if config.use_rfa else LSQWeight(b)
    if m in ("lsq", "quantsr"):
        return LSQWeight(b)
    if m == "lsq+":
        shape = tuple(weight.shape[:out_dims]) + (1,) * (weight.dim() - out_dims)
        return LSQPlusWeight(b, channel_shape=shape)
    if m == "pams":
        return PAMSWeight(b)
    if m == "dorefa":
        return DoReFaWeight(b)
    if m == "n2uq":
        return N2UQWeight(b)
    if m in ("minmax", "percentile"):
        return MaxAbsWeight(b, out_dims=0)
    if m == "dynamic":
        return MaxAbsWeight(b, out_dims=out_dims)
    raise AssertionError(m)


# --- the places of docs/method.md §4.1 ---------------------------------------------------------------------


class _Place(NamedTuple):
    parent: nn.Module
    attr: str
    fqn: str
    build: Callable[[QuantConfig], nn.Module]


def _qconv(conv: nn.Conv2d, slot: str = "act") -> Callable[[QuantConfig], nn.Module]:
    spec = ActSpec(channel_dim=1, channel_shape=(conv.in_channels, 1, 1))
    return lambda cfg: QConv2d.from_float(conv, make_act_quantizer(cfg, slot, spec),
                                          make_weight_quantizer(cfg, conv.weight, 1))


def _qlinear(linear: nn.Linear, slot: str) -> Callable[[QuantConfig], nn.Module]:
    spec = ActSpec(channel_dim=-1, channel_shape=(linear.in_features,))
    return lambda cfg: QLinear.from_float(linear, make_act_quantizer(cfg, slot, spec),
                                          make_weight_quantizer(cfg, linear.weight, 1))


def _ss2d_places(fqn: str, m: SS2D) -> list[_Place]:
    k, d, n = DIRECTIONS, m.d_inner, m.d_state
    device = m.x_proj_weight.device

    def projection(weight: torch.Tensor, orders: bool = False) -> Callable[[QuantConfig], nn.Module]:
        # input (b, K, c_in, L): channels on dim 2, per (direction, channel) shape (K, c_in, 1)
        spec = ActSpec(channel_dim=2, channel_shape=(k, weight.shape[2], 1))
        return lambda cfg: QProjection(
            make_act_quantizer(cfg, "act", spec), make_weight_quantizer(cfg, weight, 2),
            reversed_halves=orders,
        ).to(device)

    scan_specs = {
        "u": ActSpec(1, (k * d, 1)), "delta": ActSpec(1, (k * d, 1)),
        "A": ActSpec(-1, None, batched=False),  # (K*d, N): a parameter, no batch dim
        "B": ActSpec(2, (k, n, 1)), "C": ActSpec(2, (k, n, 1)),
        "D": ActSpec(None, None, batched=False), "delta_bias": ActSpec(None, None, batched=False),
    }

    def scan(cfg: QuantConfig) -> nn.Module:
        quantizers = {name: make_act_quantizer(cfg, "dls", scan_specs[name]) for name in SCAN_INPUTS}
        return QScan(quantizers, u_orders=k).to(device)  # u: the K scan orders of one tensor

    return [
        _Place(m, "in_proj", f"{fqn}.in_proj", _qlinear(m.in_proj, "act")),
        _Place(m, "conv2d", f"{fqn}.conv2d", _qconv(m.conv2d)),
        _Place(m, "x_proj_op", f"{fqn}.x_proj_op", projection(m.x_proj_weight, orders=True)),  # scan_orders
        _Place(m, "dt_proj_op", f"{fqn}.dt_proj_op", projection(m.dt_projs_weight)),
        _Place(m, "scan_op", f"{fqn}.scan_op", scan),
        _Place(m, "out_proj", f"{fqn}.out_proj", _qlinear(m.out_proj, "dls")),
    ]


def _conv_children(parent: nn.Module, fqn: str) -> list[_Place]:
    """The plain Conv2d direct children of a Sequential (channel attention sits one level deeper)."""
    return [_Place(parent, name, f"{fqn}.{name}", _qconv(child))
            for name, child in parent.named_children() if type(child) is nn.Conv2d]


def quantization_places(model: nn.Module) -> list[_Place]:
    """Every float module that docs/method.md §4.1 quantizes, with the builder of its replacement."""
    places: list[_Place] = []
    for fqn, module in model.named_modules():
        if isinstance(module, SS2D):
            places += _ss2d_places(fqn, module)
        elif isinstance(module, CAB):
            places += _conv_children(module.cab, f"{fqn}.cab")
        elif isinstance(module, ResidualGroup):
            if type(module.conv) is nn.Conv2d:
                places.append(_Place(module, "conv", f"{fqn}.conv", _qconv(module.conv)))
            elif isinstance(module.conv, nn.Sequential):  # '3conv' variant: its convs
                places += _conv_children(module.conv, f"{fqn}.conv")
    return places


def quantize_model(
    model: nn.Module,
    config: QuantConfig | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Quantize ``model`` in place (and return it): swap the places of docs/method.md §4.1 for quantized ones.

    ``config`` defaults to ``QuantConfig(**kwargs)``; ``filter_fn(float_module, fqn)`` returning False keeps
    a place float (its path is recorded in the stored config's ``skip``). Parameters are shared with the
    float modules, so a float state dict still loads (``load_float_state_dict``). The config is stored as
    ``model.quant_config``; quantizers initialise on the first training batch (``initialize_quantizers``,
    which also broadcasts from rank 0) or in ``calibrate`` (PTQ).
    """
    if config is None:
        config = QuantConfig(**kwargs)
    elif kwargs:
        raise TypeError("pass either a QuantConfig or keyword arguments, not both")
    if getattr(model, "quant_config", None) is not None:
        raise ValueError("model is already quantized (it has a quant_config); start from the float model")
    places = quantization_places(model)
    if not places:
        raise ValueError(f"no quantizable place found in {type(model).__name__}; expected a MambaIR network")
    unknown = set(config.skip) - {p.fqn for p in places}
    if unknown:
        raise ValueError(f"QuantConfig.skip names no quantizable place: {sorted(unknown)[:5]}")
    skipped = list(config.skip)
    for place in places:
        if place.fqn in config.skip:
            continue
        if filter_fn is not None and not filter_fn(getattr(place.parent, place.attr), place.fqn):
            skipped.append(place.fqn)
            continue
        setattr(place.parent, place.attr, place.build(config))
    model.quant_config = dataclasses.replace(config, skip=tuple(skipped)) if filter_fn else config
    return model


# --- inspection and loading ------------------------------------------------------------------------------


class QuantRow(NamedTuple):
    """One quantized tensor: the module path, which tensor, the quantizer class and its bit-width."""

    path: str
    tensor: str
    quantizer: str
    bits: int | None


def _row(path: str, tensor: str, q: nn.Module) -> QuantRow | None:
    if isinstance(q, Quantizer):
        return QuantRow(path, tensor, type(q).__name__, q.bits)
    return None


def describe_quantization(model: nn.Module, include_float: bool = False) -> list[QuantRow]:
    """Every quantized tensor of ``model`` as a row; with ``include_float`` also the float Conv2d/Linear.

    Rows of float layers have quantizer "float" and bits None. ``format_quantization_table`` prints them.
    """
    rows: list[QuantRow] = []
    for path, m in model.named_modules():
        if isinstance(m, QConv2d | QLinear | QProjection):
            rows += [r for r in (_row(path, "input", m.act_quant), _row(path, "weight", m.weight_quant)) if r]
        elif isinstance(m, QScan):
            rows += [r for name in SCAN_INPUTS if (r := _row(path, name, m.quantizer(name)))]
        elif include_float and type(m) in (nn.Conv2d, nn.Linear):
            rows += [QuantRow(path, "input", "float", None), QuantRow(path, "weight", "float", None)]
    return rows


def format_quantization_table(rows: list[QuantRow]) -> str:
    """A plain-text table of ``describe_quantization`` rows, with a count per quantizer class."""
    header = QuantRow("module", "tensor", "quantizer", "bits")  # type: ignore[arg-type]
    table = [header] + rows
    widths = [max(len(str(r[i])) for r in table) for i in range(4)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    counts = Counter(r.quantizer for r in rows)
    lines.append("")
    lines.append("total: " + ", ".join(f"{name} x{n}" for name, n in sorted(counts.items())))
    return "\n".join(lines)


def quantizer_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys that belong to quantizers (absent from a float checkpoint)."""
    keys: set[str] = set()
    for path, m in model.named_modules():
        if isinstance(m, Quantizer):
            keys.update(f"{path}.{k}" for k in m.state_dict())
    return keys


def load_float_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a float (official or FP-trained) state dict into a quantized model.

    Every float tensor must fit; only quantizer state may be missing, and it is left as is (uninitialised
    quantizers then initialise on the first batch). Raises ``ValueError`` naming what did not fit.
    """
    own = model.state_dict()
    allowed = quantizer_state_keys(model)
    missing = [k for k in own if k not in state_dict and k not in allowed]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
              if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        groups = (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        problems = [f"{label}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                    for label, keys in groups if keys]
        raise ValueError("float state dict does not fit the quantized model (" + "; ".join(problems)
                         + "); was the float model built with the same preset and overrides?")
    model.load_state_dict(state_dict, strict=False)
