"""An independent oracle for MambaIR: the official forward pass re-stated from docs/method.md §1.

Purely functional: ``mambair_forward(state_dict, config, x)`` reads the tensors by their official names and
applies F.conv2d / F.linear / F.layer_norm to them directly, in float64. The four scan directions are
explicit index permutations of the row-major pixel order and the selective scan is a plain sequential loop.
Nothing here imports ``qmambair.models`` or ``qmambair.scan``: a bug shared by both cannot hide.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

RGB_MEAN = (0.4488, 0.4371, 0.4040)
LN_EPS = 1e-5


def _conv(sd: dict[str, Tensor], name: str, x: Tensor, padding: int = 0, groups: int = 1, dilation: int = 1):
    w, b = sd[name + ".weight"], sd[name + ".bias"]
    return F.conv2d(x, w, b, padding=padding, groups=groups, dilation=dilation)


def _ln(sd: dict[str, Tensor], name: str, x: Tensor) -> Tensor:
    w = sd[name + ".weight"]
    return F.layer_norm(x, (w.shape[0],), w, sd[name + ".bias"], eps=LN_EPS)


def _nhwc(x: Tensor) -> Tensor:
    return x.permute(0, 2, 3, 1)


def _nchw(x: Tensor) -> Tensor:
    return x.permute(0, 3, 1, 2)


def direction_permutations(h: int, w: int) -> list[Tensor]:
    """perm[k][t] = row-major pixel index visited at step t of direction k (rows, columns, both reversed)."""
    grid = torch.arange(h * w).view(h, w)
    rows = grid.reshape(-1)
    cols = grid.t().reshape(-1)
    return [rows, cols, rows.flip(0), cols.flip(0)]


def sequential_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, bias: Tensor):
    """One direction. u, delta: (b, d, L); A: (d, N); B, C: (b, N, L); D, bias: (d,). Returns y (b, d, L)."""
    delta = F.softplus(delta + bias[None, :, None])
    b, d, length = u.shape
    h = u.new_zeros(b, d, A.shape[1])
    y = u.new_empty(b, d, length)
    for t in range(length):
        dt = delta[:, :, t, None]  # (b, d, 1)
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]
        y[:, :, t] = (h * C[:, None, :, t]).sum(-1) + D * u[:, :, t]
    return y


def ss2d(sd: dict[str, Tensor], p: str, x: Tensor, d_inner: int, d_state: int) -> Tensor:
    """SS2D on (b, H, W, C) tokens, parameters under prefix ``p``."""
    b, h, w, c = x.shape
    rank = math.ceil(c / 16)
    xz = F.linear(x, sd[p + "in_proj.weight"])
    xi, z = xz[..., :d_inner], xz[..., d_inner:]
    xi = F.silu(_conv(sd, p + "conv2d", _nchw(xi), padding=1, groups=d_inner))  # (b, d, H, W)
    flat = xi.reshape(b, d_inner, h * w)
    A_all = -torch.exp(sd[p + "A_logs"])
    merged = torch.zeros_like(flat)
    for k, perm in enumerate(direction_permutations(h, w)):
        seq = flat[:, :, perm]  # (b, d, L) in the visiting order of direction k
        proj = torch.matmul(sd[p + "x_proj_weight"][k], seq)  # (b, r + 2N, L)
        dts = proj[:, :rank]
        Bk = proj[:, rank : rank + d_state]
        Ck = proj[:, rank + d_state :]
        delta = torch.matmul(sd[p + "dt_projs_weight"][k], dts)  # (b, d, L)
        channels = slice(k * d_inner, (k + 1) * d_inner)
        Dk, bias = sd[p + "Ds"][channels], sd[p + "dt_projs_bias"][k]
        yk = sequential_scan(seq, delta, A_all[channels], Bk, Ck, Dk, bias)
        back = torch.empty_like(yk)
        back[:, :, perm] = yk  # pixel perm[t] receives step t
        merged = merged + back
    y = merged.permute(0, 2, 1).reshape(b, h, w, d_inner)
    y = _ln(sd, p + "out_norm", y) * F.silu(z)
    return F.linear(y, sd[p + "out_proj.weight"])


def channel_attention(sd: dict[str, Tensor], p: str, x: Tensor) -> Tensor:
    s = x.mean(dim=(2, 3), keepdim=True)
    s = F.relu(_conv(sd, p + "attention.1", s))
    s = torch.sigmoid(_conv(sd, p + "attention.3", s))
    return x * s


def cab(sd: dict[str, Tensor], p: str, x: Tensor, light: bool) -> Tensor:
    """Channel-attention block on NCHW input, parameters under ``p`` (ending in ``cab.``)."""
    c = x.shape[1]
    if light:
        y = _conv(sd, p + "0", x)
        y = _conv(sd, p + "1", y, padding=1, groups=c // 2)
        y = F.gelu(y)
        y = _conv(sd, p + "3", y)
        y = _conv(sd, p + "4", y, padding=2, dilation=2, groups=c)
        return channel_attention(sd, p + "5.", y)
    y = F.gelu(_conv(sd, p + "0", x, padding=1))
    y = _conv(sd, p + "2", y, padding=1)
    return channel_attention(sd, p + "3.", y)


def block(sd: dict[str, Tensor], p: str, x: Tensor, cfg: dict[str, Any]) -> Tensor:
    c = x.shape[-1]
    d_inner = int(cfg["mlp_ratio"] * c)
    light = cfg["upsampler"] == "pixelshuffledirect"
    attn = ss2d(sd, p + "self_attention.", _ln(sd, p + "ln_1", x), d_inner, cfg["d_state"])
    z = sd[p + "skip_scale"] * x + attn
    conv = _nhwc(cab(sd, p + "conv_blk.cab.", _nchw(_ln(sd, p + "ln_2", z)), light))
    return sd[p + "skip_scale2"] * z + conv


def mambair_forward(state_dict: dict[str, Tensor], cfg: dict[str, Any], x: Tensor) -> Tensor:
    """Official MambaIR forward (eval mode, resi_connection '1conv'), computed in float64.

    ``cfg`` keys: in_chans, depths, d_state, mlp_ratio, upsampler, upscale, img_range (default 1).
    """
    sd = {k: v.detach().to(torch.float64) for k, v in state_dict.items()}
    x = x.to(torch.float64)
    in_chans = cfg["in_chans"]
    img_range = cfg.get("img_range", 1.0)
    mean = RGB_MEAN if in_chans == 3 else (0.0,) * in_chans
    mean = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    x = (x - mean) * img_range

    first = _conv(sd, "conv_first", x, padding=1)
    t = _ln(sd, "patch_embed.norm", _nhwc(first))
    for g, depth in enumerate(cfg["depths"]):
        res = t
        for j in range(depth):
            t = block(sd, f"layers.{g}.residual_group.blocks.{j}.", t, cfg)
        t = _nhwc(_conv(sd, f"layers.{g}.conv", _nchw(t), padding=1)) + res
    body = _conv(sd, "conv_after_body", _nchw(_ln(sd, "norm", t)), padding=1) + first

    scale = cfg["upscale"]
    if cfg["upsampler"] == "pixelshuffledirect":
        out = F.pixel_shuffle(_conv(sd, "upsample.0", body, padding=1), scale)
    elif cfg["upsampler"] == "pixelshuffle":
        f = F.leaky_relu(_conv(sd, "conv_before_upsample.0", body, padding=1), 0.01)
        if scale == 3:
            f = F.pixel_shuffle(_conv(sd, "upsample.0", f, padding=1), 3)
        else:
            for i in range(int(math.log2(scale))):
                f = F.pixel_shuffle(_conv(sd, f"upsample.{2 * i}", f, padding=1), 2)
        out = _conv(sd, "conv_last", f, padding=1)
    else:
        out = x + _conv(sd, "conv_last", body, padding=1)
    return out / img_range + mean
