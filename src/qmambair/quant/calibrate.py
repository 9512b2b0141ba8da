"""Initialising quantizers from data: ``calibrate`` (PTQ methods), ``initialize_quantizers`` (QAT)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .base import broadcast_quantizer_state, iter_quantizers
from .ptq import StaticQuantizer


def _batches(images: torch.Tensor | Iterable, batch_size: int) -> Iterable[torch.Tensor]:
    """Yield (B, C, H, W) batches from a 4-D tensor or an iterable of tensors / (input, target) pairs."""
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size]
        return
    for item in images:
        if isinstance(item, tuple | list):
            item = item[0]
        if not isinstance(item, torch.Tensor):
            raise TypeError(
                f"calibration items must be tensors or (input, target) pairs, got {type(item).__name__}"
            )
        yield item.unsqueeze(0) if item.dim() == 3 else item


def _count(images: torch.Tensor | Iterable, batch_size: int) -> int | None:
    if isinstance(images, torch.Tensor):
        n = 1 if images.dim() == 3 else images.shape[0]
        return -(-n // batch_size)
    return len(images) if hasattr(images, "__len__") else None


@torch.no_grad()
def calibrate(
    model: nn.Module,
    images: torch.Tensor | Iterable,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> nn.Module:
    """Fix the ranges of a quantized model's static PTQ quantizers from calibration images (in place).

    ``images``: low-quality network inputs, a (N, C, H, W) tensor or an iterable of tensors or
    (input, target) pairs. Static quantizers observe the float activations of every batch, then fix their
    range; QAT quantizers that are not initialised yet initialise from the first batch. Runs in eval mode
    and restores the previous mode; with ``torch.distributed`` up, rank 0's result is broadcast.
    """
    static = [q for _, q in iter_quantizers(model) if isinstance(q, StaticQuantizer)]
    for q in static:
        q.start_calibration()
    was_training = model.training
    model.eval()
    if device is None:
        device = next(model.parameters()).device
    seen = 0
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*initialised from an evaluation batch.*")
            for batch in tqdm(_batches(images, batch_size), total=_count(images, batch_size),
                              desc="calibrating", unit="batch", disable=not progress):
                model(batch.to(device))
                seen += 1
        if seen == 0:
            raise ValueError("calibrate() got no images")
        for q in static:
            q.finish_calibration()
    finally:
        for q in static:
            q.calibrating = False
        model.train(was_training)
    broadcast_quantizer_state(model)
    return model


@torch.no_grad()
def initialize_quantizers(model: nn.Module, batch: torch.Tensor) -> nn.Module:
    """QAT start: run one batch so every quantizer initialises from it, then broadcast from rank 0.

    Call it with the first training batch before wrapping the model in DistributedDataParallel; the
    model's mode is kept (quantizers initialise the same way in either mode).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*initialised from an evaluation batch.*")
        model(batch.to(next(model.parameters()).device))
    broadcast_quantizer_state(model)
    return model
