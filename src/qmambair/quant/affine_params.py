"""An activation quantizer as an affine map: what integer inference and the QDQ ONNX export both need."""

from __future__ import annotations

import torch
from torch import nn

from .act import ActQuant
from .base import MIN_STEP
from .baselines import LSQ, LSQPlus
from .dls import DLS


def affine_params(
    quantizer: nn.Module, x: torch.Tensor, copies: int = 1
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """(s, b, clip) with quantizer(x) = s·round(clip((x + b)/s, Qn, Qp)) − b, then clipped to ``clip``.

    ``b`` None means 0, ``clip`` None means no final clip (only DLS has one). The tensors come from the same
    float expressions as the quantizer's forward: detached 0-d parameters, except DLS's, which are computed
    from ``x`` (traceable, for the ONNX export) and broadcast against it (per tensor or per sample).
    Raises ``NotImplementedError`` for other quantizers. ``copies``: the map for a tensor holding every sample
    of ``x`` that many times (see ``DLS.step_and_offset``).
    """
    if isinstance(quantizer, DLS):
        delta, beta, lo, hi = quantizer.step_and_offset(x, copies)
        return delta, beta, (lo, hi)
    if isinstance(quantizer, ActQuant | LSQ | LSQPlus):
        step = quantizer.step.detach().clamp_min(MIN_STEP)
        if isinstance(quantizer, ActQuant):
            return step, quantizer.offset.detach(), None
        if isinstance(quantizer, LSQPlus):  # x̂ = s·q + β: the offset enters with the opposite sign
            return step, -quantizer.offset.detach(), None
        return step, None, None
    raise NotImplementedError(f"{type(quantizer).__name__} activations have no affine form here")
