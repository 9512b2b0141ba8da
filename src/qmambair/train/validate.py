"""Validation during training: PSNR/SSIM of the model and of the no-network baseline on held-out images.

Protocol (docs/evaluation.md §2): for super-resolution the Y channel, border crop = scale, baseline = MATLAB
bicubic upsampling; for denoising / JPEG all channels, no crop, baseline = the degraded input itself. Images
are shared out over processes (image i goes to rank i mod world) and the sums all-reduced, so every rank gets
the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data.datasets import Degradation, EvalImages
from ..data.imresize import imresize
from ..eval.metrics import psnr, ssim
from ..eval.tiling import restore_tiled
from .distributed import DistInfo, all_reduce_sum

__all__ = ["evaluate", "metric_settings", "baseline_output"]


def metric_settings(degradation: Degradation) -> tuple[int, bool]:
    """(crop_border, y_channel) of the protocol for this degradation."""
    if degradation.kind == "bicubic":
        return degradation.factor, True
    return 0, False


def baseline_output(lq: torch.Tensor, degradation: Degradation) -> torch.Tensor:
    """The no-network output: MATLAB-bicubic upsampling for SR, the degraded input itself otherwise."""
    if degradation.kind == "bicubic":
        return imresize(lq.double(), float(degradation.factor)).float().clamp(0, 1)
    return lq.clamp(0, 1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: EvalImages,
    info: DistInfo | None = None,
    tile: int = 0,
    baseline: bool = False,
) -> dict[str, float]:
    """Mean ``psnr``/``ssim`` over ``images`` (with ``baseline`` also ``psnr_base``/``ssim_base``) and ``n``.

    ``model`` is put in eval mode and back. ``tile`` > 0 runs inputs larger than it with MambaIR tiling. An
    output with NaN or inf values (a model that is unstable on full-size images, e.g. a quantized scan input
    that turned a decay into growth) is a result, not an error: it counts in ``nonfinite`` and makes the mean
    PSNR and SSIM NaN.
    """
    info = info or DistInfo()
    crop, y_channel = metric_settings(images.degradation)
    was_training = model.training
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64)  # psnr, ssim, base psnr, base ssim, count, non-finite
    try:
        for i in range(info.rank, len(images), info.world):
            _, lq, hr = images[i]
            x = lq[None].to(info.device)
            if tile and max(x.shape[-2:]) > tile:
                out = restore_tiled(model, x, mode="mambair", tile=tile)
            else:
                out = model(x)
            out = out[0].float().cpu()
            if torch.isfinite(out).all():
                out = out.clamp(0, 1)
                sums[0] += psnr(out, hr, crop, y_channel)
                sums[1] += ssim(out, hr, crop, y_channel)
            else:
                sums[5] += 1
            if baseline:
                base = baseline_output(lq, images.degradation)
                sums[2] += psnr(base, hr, crop, y_channel)
                sums[3] += ssim(base, hr, crop, y_channel)
            sums[4] += 1
    finally:
        model.train(was_training)
    sums = all_reduce_sum(sums.to(info.device)).cpu()  # nccl needs the tensor on the GPU
    n = max(int(sums[4].item()), 1)
    result = {"psnr": sums[0].item() / n, "ssim": sums[1].item() / n, "n": int(sums[4].item())}
    if sums[5] > 0:
        result.update(psnr=float("nan"), ssim=float("nan"), nonfinite=int(sums[5].item()))
    if baseline:
        result.update(psnr_base=sums[2].item() / n, ssim_base=sums[3].item() / n)
    return result
