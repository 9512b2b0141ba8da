"""Interpolation start for training light-SR MambaIR from scratch on a small budget.

A randomly initialised MambaIR first has to learn to reproduce its input before it can improve on it; on a
CPU budget of a few thousand iterations it stays below bicubic upsampling. ``init_as_interpolation`` sets the
initial weights so that the untrained network *is* an interpolator, and training only learns the correction:

- ``conv_first`` passes the (mean-subtracted) input channels unchanged into the first feature channels;
- the last conv of ``conv_after_body`` is zero, so the deep body's residual branch starts at exactly 0
  (that conv gets gradients at once, the body's other weights as soon as it moves off zero);
- the pixel-shuffle head (``pixelshuffledirect``) maps those feature channels to every sub-pixel phase with
  the bicubic kernel (a = -0.5) restricted to the head's 3x3 window and renormalised. Denoising/JPEG models
  (no upsampler, output = input + conv_last(...)) get a zero ``conv_last`` instead, i.e. start as the
  identity.

The architecture, parameter names and shapes are unchanged; this is only a starting point for training.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["init_as_interpolation", "phase_taps"]


def _cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def phase_taps(scale: int) -> torch.Tensor:
    """(scale, 3) weights of LR pixels p-1, p, p+1 for the output sub-pixel phases of LR pixel p."""
    phase = (torch.arange(scale, dtype=torch.float64) + 0.5) / scale - 0.5  # offset from the LR pixel centre
    taps = _cubic(phase[:, None] - torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)[None, :])
    return taps / taps.sum(dim=1, keepdim=True)


def _last_conv(module: nn.Module) -> nn.Conv2d:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("conv_after_body holds no convolution")
    return convs[-1]


@torch.no_grad()
def init_as_interpolation(model: nn.Module) -> nn.Module:
    """Make a float MambaIR start as bicubic-like upsampling (SR, ``pixelshuffledirect``) or the identity
    (no upsampler); see the module docstring. Returns ``model`` (changed in place)."""
    upsampler = getattr(model, "upsampler", None)
    if upsampler not in ("pixelshuffledirect", ""):
        raise ValueError(f"interpolation start supports the light-SR head and restoration models, "
                         f"not upsampler {upsampler!r}")
    channels = model.in_chans
    if upsampler == "":
        model.conv_last.weight.zero_()  # out = x + conv_last(...): the identity
        model.conv_last.bias.zero_()
        return model
    last = _last_conv(model.conv_after_body)
    last.weight.zero_()
    if last.bias is not None:
        last.bias.zero_()
    first = model.conv_first
    first.weight[:channels].zero_()
    first.bias[:channels].zero_()
    for c in range(channels):
        first.weight[c, c, 1, 1] = 1.0
    head = model.upsample[0]
    s = model.upscale
    taps = phase_taps(s).to(head.weight.dtype)
    head.weight.zero_()
    head.bias.zero_()
    for c in range(channels):
        for i in range(s):
            for j in range(s):
                head.weight[c * s * s + i * s + j, c] = torch.outer(taps[i], taps[j])
    return model
