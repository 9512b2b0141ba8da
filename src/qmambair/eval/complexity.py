"""Multiply-accumulate counts (MACs) and parameter counts of a restoration network, scan included.

Convention (one MAC = one multiply, with or without the add; batch 1; bias adds, normalisations, activations,
residual adds, skip scales and other element-wise ops are not counted):

- ``conv``: every ``nn.Conv2d`` (and subclass): output elements x (in_channels / groups) x kh x kw;
- ``linear``: every ``nn.Linear``: output elements x in_features;
- ``einsum``: the per-direction projections of SS2D (``Projection``: x_proj, dt_proj): output elements x d;
- ``scan``: the selective scan, counted explicitly. Per channel d, state n and step t: Δ·A 1 mult (then exp),
  Δ·B·u 2 mults, h = exp(ΔA)·h + ΔBu 1 MAC, C·h 1 MAC -> 5 per (d, n, t); per (d, t) the skip D·u 1 MAC.
  So scan MACs = D' x L x (5N + 1) with D' = K·d_inner channels and L = H·W. The transcendental functions are
  reported apart (``scan_exp`` = D'·N·L, ``scan_softplus`` = D'·L) and are not in ``total``.

Every operation of MambaIR runs at a fixed multiple of the input resolution (or on a pooled 1x1 vector), so
each module's MACs are exactly a + b·H·W. ``count_macs`` measures each module with forward hooks on two tiny
forward passes, solves for a and b, checks the fit on a third size, and evaluates at the requested H x W:
correct for any size without running the network on it. A module nested inside an already counted one (a
wrapper that is itself a Conv2d, say) is not counted twice.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models.ss2d import Projection, ScanOp
from .tiling import model_channels

PARTS = ("conv", "linear", "einsum", "scan")
_PROBE_SIZES = ((3, 4), (4, 6), (5, 7))  # two to fit a + b*H*W, one to check it


def _kind(module: nn.Module) -> str | None:
    name = type(module).__name__
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, Projection) or name.endswith("Projection"):
        return "einsum"
    if isinstance(module, ScanOp) or name.endswith("ScanOp"):
        return "scan"
    return None


def _arg(args: tuple, kwargs: dict[str, Any], index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs[name]


def _module_cost(kind: str, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> dict[str, int]:
    """MACs (and scan transcendentals) of one call, per sample."""
    if kind == "conv":
        kh, kw = module.kernel_size
        per_out = module.in_channels // module.groups * kh * kw
        return {"macs": out[0].numel() * per_out}
    if kind == "linear":
        return {"macs": out[0].numel() * module.in_features}
    if kind == "einsum":
        weight = _arg(args, kwargs, 1, "weight")
        return {"macs": out[0].numel() * weight.shape[-1]}
    u, A = _arg(args, kwargs, 0, "u"), _arg(args, kwargs, 2, "A")  # u: (b, D', L), A: (D', N)
    channels, length = u.shape[1], u.shape[2]
    n = A.shape[-1]
    steps = channels * length
    return {"macs": steps * (5 * n + 1), "exp": steps * n, "softplus": steps}


def _probe(model: nn.Module, h: int, w: int, in_chans: int) -> dict[str, tuple[str, dict[str, int]]]:
    """One forward pass on a (1, in_chans, h, w) input; cost of every counted module by name."""
    costs: dict[str, tuple[str, dict[str, int]]] = {}
    handles = []
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is None:
            continue

        def hook(mod, args, kwargs, out, name=name, kind=kind):
            cost = _module_cost(kind, mod, args, kwargs, out)
            prev = costs.get(name, (kind, {}))[1]
            costs[name] = (kind, {k: prev.get(k, 0) + v for k, v in cost.items()})

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    param = next(model.parameters(), None)
    device = param.device if param is not None else "cpu"
    try:
        with torch.inference_mode():
            model(torch.rand(1, in_chans, h, w, device=device))
    finally:
        for handle in handles:
            handle.remove()
    counted = sorted(costs)
    nested = {n for n in counted for p in counted if n != p and n.startswith(p + ".")}
    return {n: c for n, c in costs.items() if n not in nested}


def macs_by_module(model: nn.Module, h: int, w: int) -> dict[str, dict[str, Any]]:
    """Per counted module: ``{"kind": part, "macs": int, ...}`` for a 1 x C x h x w input (see module doc)."""
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {h}x{w}")
    in_chans = model_channels(model)
    was_training = model.training
    model.eval()
    try:
        probes = [_probe(model, ph, pw, in_chans) for ph, pw in _PROBE_SIZES]
    finally:
        model.train(was_training)
    (h0, w0), (h1, w1), (h2, w2) = _PROBE_SIZES
    result: dict[str, dict[str, Any]] = {}
    for name, (kind, c0) in probes[0].items():
        entry: dict[str, Any] = {"kind": kind}
        for key, v0 in c0.items():
            v1, v2 = probes[1][name][1][key], probes[2][name][1][key]
            per_pixel, rem = divmod(v1 - v0, h1 * w1 - h0 * w0)
            const = v0 - per_pixel * h0 * w0
            if rem or const + per_pixel * h2 * w2 != v2:
                raise RuntimeError(f"{name}: {key} do not grow linearly with H*W; cannot extrapolate")
            entry[key] = const + per_pixel * h * w
        result[name] = entry
    return result


def count_macs(model: nn.Module, h: int, w: int) -> dict[str, int]:
    """MACs of one forward pass on an h x w input, by part, and the parameter count.

    Keys: ``conv``, ``linear``, ``einsum``, ``scan`` (MACs), ``total`` (their sum), ``scan_exp`` and
    ``scan_softplus`` (function evaluations, not in the total), ``params`` (unique parameters).
    """
    parts = dict.fromkeys(PARTS, 0)
    extra = {"scan_exp": 0, "scan_softplus": 0}
    for entry in macs_by_module(model, h, w).values():
        parts[entry["kind"]] += entry["macs"]
        extra["scan_exp"] += entry.get("exp", 0)
        extra["scan_softplus"] += entry.get("softplus", 0)
    return {
        **parts,
        "total": sum(parts.values()),
        **extra,
        "params": sum(p.numel() for p in model.parameters()),
    }
