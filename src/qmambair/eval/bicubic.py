"""The bicubic baseline as a model, so that ``qmambair test -m bicubic`` scores it like any network."""

from __future__ import annotations

import torch
from torch import nn

from ..data.imresize import imresize


class BicubicUpsampler(nn.Module):
    """MATLAB-bicubic upsampling by ``scale`` (``imresize``); no parameters, any number of channels."""

    def __init__(self, scale: int, in_chans: int = 3):
        super().__init__()
        if scale < 2:
            raise ValueError(f"the bicubic baseline upsamples: scale must be >= 2, got {scale}")
        self.upscale = int(scale)
        self.in_chans = int(in_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return imresize(x, scale=self.upscale)
