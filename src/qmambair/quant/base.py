"""Shared pieces of every quantizer: straight-through rounding, LSQ gradient scaling, the base module.

Notation (docs/method.md §3.1): b bits; signed range Qn = -2^(b-1), Qp = 2^(b-1) - 1; unsigned Qn = 0,
Qp = 2^b - 1.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import torch
from torch import nn

SIGN_THRESHOLD = -1e-5  # signed if the first-batch minimum is below this (docs/method.md §3.1)
MIN_STEP = 1e-8  # floor on learned steps/scales: a step driven to <= 0 by the optimiser would divide by zero


def _value_only() -> bool:
    """Only the forward value matters: no gradients, and not a torch.jit trace (whose check reruns the
    function under no_grad and compares graphs), unless the trace is an ONNX export."""
    return not torch.is_grad_enabled() and (torch.onnx.is_in_onnx_export() or not torch.jit.is_tracing())


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator).

    Written as round(x) + (x − stopgrad x) so the value is exactly round(x) (``(round(x) − x).detach() + x``
    can be off by one ulp, which would create spurious extra levels).
    """
    if _value_only():  # (x − x) is 0; an exported graph would carry it as two more passes over x
        return torch.round(x)
    return x.detach().round() + (x - x.detach())


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Value ``x``, gradient multiplied by ``scale`` (LSQ's step-size gradient scaling)."""
    if _value_only():
        return x
    y = x * scale
    return x.detach() + (y - y.detach())


def lsq_grad_factor(numel: int, qp: float) -> float:
    """LSQ's g = 1 / sqrt(numel * Qp), with numel the element count of the quantized tensor."""
    return 1.0 / math.sqrt(max(numel, 1) * max(qp, 1.0))


def qrange(bits: int, signed: bool) -> tuple[float, float]:
    """(Qn, Qp) of a b-bit integer grid."""
    if signed:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def ste_clamp(x: torch.Tensor, low: torch.Tensor | float, high: torch.Tensor | float) -> torch.Tensor:
    """min(max(x, low), high) with tensor bounds; gradients reach x inside and the bounds outside."""
    low_t = torch.as_tensor(low, dtype=x.dtype, device=x.device)
    high_t = torch.as_tensor(high, dtype=x.dtype, device=x.device)
    return torch.minimum(torch.maximum(x, low_t), high_t)


def own_tensors(module: nn.Module, buffers: bool = True) -> list[torch.Tensor]:
    """``module``'s parameters (and buffers). Read from the module's own dictionaries when it has no
    submodules (a quantizer), which costs a fraction of a ``parameters()`` walk: the inference caches call
    this on every layer call."""
    if module._modules:
        tensors = [*module.parameters(), *(module.buffers() if buffers else ())]
    else:
        tensors = [*module._parameters.values(), *(module._buffers.values() if buffers else ())]
    return [t for t in tensors if t is not None]


def state_versions(module: nn.Module) -> tuple[int, ...]:
    """The version counters of ``module``'s parameters and buffers, which in-place updates (optimiser steps,
    ``load_state_dict``, ``fill_``) advance: part of the keys of the inference caches."""
    return tuple(t._version for t in own_tensors(module))


class Quantizer(nn.Module):
    """Base of all quantizers: bit-width, signedness and first-call initialisation kept in buffers.

    ``signed`` and ``initialized`` are buffers, so they live in the state dict: a model saved after training
    loads into a freshly quantized model and evaluates identically (no re-initialisation, no re-deciding the
    sign on the first evaluation batch). ``signed=None`` means "decide from the first batch".

    The first call initialises (``initialize``) from that batch under ``no_grad``. This normally is the first
    training batch; initialising in eval mode works (one batch = calibration) but warns, because results then
    depend on which image came first. With several processes, call ``broadcast_quantizer_state`` after the
    initialising batch so every rank holds rank 0's values (the released code initialises per rank).
    """

    # Subclasses without data-dependent initialisation set this to False: they start initialised.
    needs_init: bool = True
    #: Quantizers that gather statistics over several batches (post-training ones) set this to True.
    calibratable: bool = False

    def __init__(self, bits: int, signed: bool | None = None):
        super().__init__()
        if not 2 <= int(bits) <= 16:
            raise ValueError(f"bits must be in 2..16, got {bits}")
        self.bits = int(bits)
        self.auto_signed = signed is None
        self.register_buffer("signed", torch.tensor(bool(signed)))
        self.register_buffer("initialized", torch.tensor(not self.needs_init))

    @property
    def is_signed(self) -> bool:
        return bool(self.signed)

    @property
    def qn(self) -> float:
        return qrange(self.bits, self.is_signed)[0]

    @property
    def qp(self) -> float:
        return qrange(self.bits, self.is_signed)[1]

    @property
    def bounds(self) -> tuple[float, float]:
        """(Qn, Qp) in one call (each of ``qn`` and ``qp`` reads the ``signed`` buffer)."""
        return qrange(self.bits, self.is_signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            if not self.training:
                warnings.warn(
                    f"{type(self).__name__} initialised from an evaluation batch; train or calibrate() first "
                    "for results that do not depend on the first image",
                    stacklevel=2,
                )
            with torch.no_grad():
                self.initialize(x.detach())
            self.initialized.fill_(True)
        return self.quantize(x)

    def decide_sign(self, x: torch.Tensor) -> None:
        """Set ``signed`` from a batch when it was left to the data (min(x) < -1e-5)."""
        if self.auto_signed:
            self.signed.fill_(bool(x.min() < SIGN_THRESHOLD))

    def initialize(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation from the first batch (runs under no_grad)."""
        self.decide_sign(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        sign = "auto" if self.auto_signed and not bool(self.initialized) else self.is_signed
        return f"bits={self.bits}, signed={sign}, initialized={bool(self.initialized)}"


class WeightQuantizer(Quantizer):
    """A weight quantizer whose output is ``scale * codes - offset`` with integer codes (deployable).

    Without autograd (eval mode, no gradient needed) the quantized weight is computed once and reused
    while the weight and the quantizer's own tensors are unchanged: the cache key holds the weight's storage,
    shape and dtype and the version counters of every tensor involved, which in-place updates (optimiser
    steps, ``load_state_dict``) advance. ``train()`` drops it; ``eval()`` keeps it.
    """

    def __init__(self, bits: int):
        super().__init__(bits, signed=True)
        self._cached: tuple[tuple, torch.Tensor] | None = None

    def _cache_key(self, w: torch.Tensor) -> tuple:
        return (w.data_ptr(), w._version, tuple(w.shape), w.dtype, w.device, state_versions(self))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        graph = torch.is_grad_enabled() and (
            w.requires_grad or any(p.requires_grad for p in self.parameters(recurse=False))
        )
        if self.training or graph or not bool(self.initialized):
            self._cached = None
            return super().forward(w)
        key = self._cache_key(w)
        cached = getattr(self, "_cached", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        out = super().forward(w)
        self._cached = (key, out)
        return out

    def train(self, mode: bool = True) -> WeightQuantizer:
        if mode:  # eval() keeps it: calling eval() before every batch must not re-quantize the weights
            self._cached = None
        return super().train(mode)

    def integer_codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, scale, offset) with forward(w) == scale * codes - offset; codes are int64 in [Qn, Qp]."""
        raise NotImplementedError(f"{type(self).__name__} has no integer export")


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """(name, quantizer) for every quantizer inside ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            yield name, module


def broadcast_quantizer_state(model: nn.Module, src: int = 0) -> None:
    """Copy every quantizer parameter and buffer from rank ``src`` to all ranks (no-op without distributed).

    Call it right after the batch that initialised the quantizers and before wrapping the model in
    DistributedDataParallel (DDP broadcasts parameters only at construction), so all ranks start equal.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    for _, quantizer in iter_quantizers(model):
        tensors = list(quantizer.parameters(recurse=False)) + list(quantizer.buffers(recurse=False))
        for t in tensors:
            if t.dtype == torch.bool:  # not every backend broadcasts bool
                tmp = t.detach().to(torch.uint8)
                dist.broadcast(tmp, src)
                t.data.copy_(tmp.bool())
            else:
                dist.broadcast(t.data, src)
