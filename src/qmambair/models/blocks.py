"""Small building blocks of MambaIR: stochastic depth, channel attention, CAB, upsampling heads."""

from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p`` (training only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}"


class ChannelAttention(nn.Module):
    """x * sigmoid(conv1x1(ReLU(conv1x1(avgpool(x))))): squeeze to C // squeeze channels.

    Below ``squeeze`` channels (tiny test models only; the official code has no such case) one hidden
    channel is kept.
    """

    def __init__(self, channels: int, squeeze: int = 30):
        super().__init__()
        hidden = max(1, channels // squeeze)
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class CAB(nn.Module):
    """Channel-attention block (``conv_blk``) on NCHW input.

    light: 1x1 C->C/2, depthwise 3x3, GELU, 1x1 C/2->C, depthwise 3x3 dilation 2, channel attention;
    classic: 3x3 C->C/3, GELU, 3x3 C/3->C, channel attention.
    """

    def __init__(self, channels: int, light: bool, squeeze: int = 30):
        super().__init__()
        if light:
            mid = channels // 2
            self.cab = nn.Sequential(
                nn.Conv2d(channels, mid, 1),
                nn.Conv2d(mid, mid, 3, padding=1, groups=mid),
                nn.GELU(),
                nn.Conv2d(mid, channels, 1),
                nn.Conv2d(channels, channels, 3, padding=2, dilation=2, groups=channels),
                ChannelAttention(channels, squeeze),
            )
        else:
            mid = channels // 3
            self.cab = nn.Sequential(
                nn.Conv2d(channels, mid, 3, padding=1),
                nn.GELU(),
                nn.Conv2d(mid, channels, 3, padding=1),
                ChannelAttention(channels, squeeze),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cab(x)


class Upsample(nn.Sequential):
    """Classic-SR upsampler: (conv 3x3 -> 4C, PixelShuffle(2)) per factor 2, or conv -> 9C, shuffle 3."""

    def __init__(self, scale: int, channels: int):
        layers: list[nn.Module] = []
        if scale >= 2 and scale & (scale - 1) == 0:
            for _ in range(scale.bit_length() - 1):
                layers += [nn.Conv2d(channels, 4 * channels, 3, padding=1), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [nn.Conv2d(channels, 9 * channels, 3, padding=1), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"pixelshuffle upsampler supports scales 2^n and 3, got {scale}")
        super().__init__(*layers)


class UpsampleOneStep(nn.Sequential):
    """Light-SR head: one 3x3 conv to out_ch * s^2 channels, then PixelShuffle(s)."""

    def __init__(self, scale: int, channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(channels, scale * scale * out_channels, 3, padding=1), nn.PixelShuffle(scale)
        )
