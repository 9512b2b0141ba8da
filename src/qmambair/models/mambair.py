"""MambaIR (ECCV 2024) with the official constructor keywords and parameter names.

A state dict saved by the official code loads here with ``strict=True`` and gives the same output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import CAB, DropPath, Upsample, UpsampleOneStep
from .ss2d import SS2D

RGB_MEAN = (0.4488, 0.4371, 0.4040)
UPSAMPLERS = ("pixelshuffle", "pixelshuffledirect", "")


class VSSBlock(nn.Module):
    """z = s1*x + SS2D(ln_1(x)); out = s2*z + CAB(ln_2(z)), on (B, H, W, C)."""

    def __init__(
        self, dim: int, d_state: int, mlp_ratio: float, drop_path: float, light: bool, norm_layer=nn.LayerNorm
    ):
        super().__init__()
        self.ln_1 = norm_layer(dim)
        self.self_attention = SS2D(dim, d_state=d_state, expand=mlp_ratio)
        self.drop_path = DropPath(drop_path)
        self.skip_scale = nn.Parameter(torch.ones(dim))
        self.ln_2 = norm_layer(dim)
        self.conv_blk = CAB(dim, light=light)
        self.skip_scale2 = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.skip_scale + self.drop_path(self.self_attention(self.ln_1(x)))
        cab = self.conv_blk(self.ln_2(x).permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)
        return x * self.skip_scale2 + cab


class BasicLayer(nn.Module):
    """A stack of VSS blocks (``residual_group``)."""

    def __init__(
        self, dim, depth, d_state, mlp_ratio, drop_path: Sequence[float], light, norm_layer, use_checkpoint
    ):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            VSSBlock(dim, d_state, mlp_ratio, drop_path[i], light, norm_layer) for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.use_checkpoint and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class ResidualGroup(nn.Module):
    """RSSG: tokens -> blocks -> conv 3x3 on the image layout -> plus the input."""

    def __init__(
        self, dim, depth, d_state, mlp_ratio, drop_path, light, norm_layer, use_checkpoint, resi_connection
    ):
        super().__init__()
        self.residual_group = BasicLayer(
            dim, depth, d_state, mlp_ratio, drop_path, light, norm_layer, use_checkpoint
        )
        self.conv = make_body_conv(dim, resi_connection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.residual_group(x)  # (B, H, W, C)
        return self.conv(y.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1) + x


def make_body_conv(dim: int, resi_connection: str) -> nn.Module:
    """The conv closing a residual group or the body: '1conv' (3x3) or '3conv' (bottleneck)."""
    if resi_connection == "1conv":
        return nn.Conv2d(dim, dim, 3, padding=1)
    if resi_connection == "3conv":
        return nn.Sequential(
            nn.Conv2d(dim, dim // 4, 3, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim // 4, dim // 4, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim // 4, dim, 3, padding=1),
        )
    raise ValueError(f"resi_connection must be '1conv' or '3conv', got {resi_connection!r}")


class PatchEmbed(nn.Module):
    """Holds the LayerNorm applied to the tokens after the first conv (``patch_embed.norm``)."""

    def __init__(self, dim: int, norm_layer=None):
        super().__init__()
        self.norm = norm_layer(dim) if norm_layer is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) if self.norm is not None else x


class MambaIR(nn.Module):
    """MambaIR for super-resolution (``pixelshuffle`` / ``pixelshuffledirect``) and restoration (``''``).

    Input: (B, in_chans, H, W) in [0, 1] (times img_range); any H, W >= 1. Keywords are the official ones;
    ``img_size``, ``patch_size`` and ``drop_rate`` are accepted for compatibility (patch size must be 1).
    """

    def __init__(
        self,
        img_size: int = 64,
        patch_size: int = 1,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (6, 6, 6, 6),
        drop_rate: float = 0.0,
        d_state: int = 16,
        mlp_ratio: float = 2.0,
        drop_path_rate: float = 0.1,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        patch_norm: bool = True,
        use_checkpoint: bool = False,
        upscale: int = 2,
        img_range: float = 1.0,
        upsampler: str = "",
        resi_connection: str = "1conv",
        **kwargs,
    ):
        super().__init__()
        if patch_size != 1:
            raise ValueError("MambaIR works on pixels: patch_size must be 1")
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler must be one of {UPSAMPLERS}, got {upsampler!r}")
        unknown = set(kwargs) - {"num_feat"}
        if unknown:
            raise TypeError(f"MambaIR got unexpected keyword arguments: {sorted(unknown)}")
        self.img_range = img_range
        self.upscale = upscale if upsampler else 1
        self.upsampler = upsampler
        self.in_chans = in_chans
        mean = RGB_MEAN if in_chans == 3 else (0.0,) * in_chans
        self.register_buffer("mean", torch.tensor(mean).view(1, in_chans, 1, 1), persistent=False)
        light = upsampler == "pixelshuffledirect"
        num_feat = kwargs.get("num_feat", 64)

        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, padding=1)
        self.patch_embed = PatchEmbed(embed_dim, norm_layer if patch_norm else None)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        start = 0
        for depth in depths:
            self.layers.append(
                ResidualGroup(
                    embed_dim,
                    depth,
                    d_state,
                    mlp_ratio,
                    rates[start : start + depth],
                    light,
                    norm_layer,
                    use_checkpoint,
                    resi_connection,
                )
            )
            start += depth
        self.norm = norm_layer(embed_dim)
        self.conv_after_body = make_body_conv(embed_dim, resi_connection)
        if upsampler == "pixelshuffle":
            self.conv_before_upsample = nn.Sequential(
                nn.Conv2d(embed_dim, num_feat, 3, padding=1), nn.LeakyReLU(inplace=True)
            )
            self.upsample = Upsample(upscale, num_feat)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, padding=1)
        elif upsampler == "pixelshuffledirect":
            self.upsample = UpsampleOneStep(upscale, embed_dim, in_chans)
        else:
            self.conv_last = nn.Conv2d(embed_dim, in_chans, 3, padding=1)
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Body on (B, C, H, W) features: tokens, residual groups, final norm, back to (B, C, H, W)."""
        x = self.pos_drop(self.patch_embed(x.permute(0, 2, 3, 1)))
        for layer in self.layers:
            x = layer(x)
        return self.norm(x).permute(0, 3, 1, 2).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        mean = self.mean.to(x.dtype)
        x = (x - mean) * self.img_range
        first = self.conv_first(x)
        body = self.conv_after_body(self.forward_features(first)) + first
        if self.upsampler == "pixelshuffle":
            out = self.conv_last(self.upsample(self.conv_before_upsample(body)))
        elif self.upsampler == "pixelshuffledirect":
            out = self.upsample(body)
        else:
            out = x + self.conv_last(body)
        return out / self.img_range + mean


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
