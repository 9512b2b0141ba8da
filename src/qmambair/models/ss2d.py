"""SS2D: the 2-D selective-scan layer of MambaIR (four scan directions, one grouped selective scan).

The projection matmuls and the scan are small parameter-free modules (``Projection``, ``ScanOp``) so that
quantization can swap them for quantized versions without renaming any parameter of the official layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..scan import selective_scan
from ..scan.load_quant import LoadQuant

DIRECTIONS = 4


class Projection(nn.Module):
    """Per-direction linear map: (b, K, d, L) x (K, c, d) -> (b, K, c, L).

    Written as a broadcast matmul (W_k · x_bk for each sample and direction), not as the equivalent einsum
    "bkdl,kcd->bkcl": the einsum contracts through one GEMM per direction over (b·L, d) rows and returns its
    output, and autograd its input gradient, as permuted views (memory order K, b, L, c), which the split
    into Δ, B, C, the scan and every quantizer on the input then copy back into (b, K, ·, L) order. The
    matmul writes both in that order, and autograd's matmul backward (Wᵀ·grad per sample and direction,
    grad·xᵀ summed over the batch for W) does too. The same sums, so the same values up to float round-off.
    """

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.matmul(weight, x)


class ScanOp(nn.Module):
    """The selective scan with softplus on delta; A is already -exp(A_logs). ``u_quant`` / ``delta_quant``:
    fake quantization of u / delta applied by the scan as it reads them (inference only); ``delta_levels``:
    the values a quantized delta takes, a speed hint (``qmambair.scan.selective_scan``)."""

    def forward(
        self,
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor,
        delta_bias: torch.Tensor,
        u_quant: LoadQuant | None = None,
        delta_quant: LoadQuant | None = None,
        delta_levels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hints = {"u_quant": u_quant, "delta_quant": delta_quant, "delta_levels": delta_levels}
        hints = {k: v for k, v in hints.items() if v is not None}
        return selective_scan(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=True, **hints)


def scan_orders(x: torch.Tensor) -> torch.Tensor:
    """(b, d, H, W) -> (b, 4, d, L): row-major, column-major, and both reversed."""
    b, d, h, w = x.shape
    rows = x.reshape(b, d, h * w)
    cols = x.transpose(2, 3).reshape(b, d, h * w)
    forward = torch.stack([rows, cols], dim=1)
    return torch.cat([forward, forward.flip(-1)], dim=1)


def merge_orders(y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``scan_orders`` followed by the sum over directions: (b, 4, d, L) -> (b, d, L)."""
    b, _, d, length = y.shape
    rows = y[:, 0] + y[:, 2].flip(-1)
    cols = y[:, 1] + y[:, 3].flip(-1)
    cols = cols.reshape(b, d, w, h).transpose(2, 3).reshape(b, d, length)
    return rows + cols


class SS2D(nn.Module):
    """2-D selective scan over (B, H, W, C) tokens, with the parameter names of official MambaIR."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 3,
        expand: float = 2.0,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16)
        k, d, r, n = DIRECTIONS, self.d_inner, self.dt_rank, d_state

        self.in_proj = nn.Linear(d_model, 2 * d, bias=False)
        self.conv2d = nn.Conv2d(d, d, d_conv, padding=(d_conv - 1) // 2, groups=d, bias=True)
        self.act = nn.SiLU()
        bound = d**-0.5  # nn.Linear's default init for the per-direction projections
        self.x_proj_weight = nn.Parameter(torch.empty(k, r + 2 * n, d).uniform_(-bound, bound))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d, r).uniform_(-(r**-0.5), r**-0.5))
        dt = torch.exp(torch.rand(k, d) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        a = torch.arange(1, n + 1, dtype=torch.float32).repeat(k * d, 1)
        self.A_logs = nn.Parameter(torch.log(a))
        self.Ds = nn.Parameter(torch.ones(k * d))
        self.out_norm = nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, d_model, bias=False)

        self.x_proj_op = Projection()
        self.dt_proj_op = Projection()
        self.scan_op = ScanOp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2).contiguous()))
        length = h * w
        xs = scan_orders(x)  # (b, K, d, L)
        x_dbl = self.x_proj_op(xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = self.dt_proj_op(dts.contiguous(), self.dt_projs_weight)
        y = self.scan_op(
            xs.float().reshape(b, -1, length),
            dts.float().reshape(b, -1, length),
            -torch.exp(self.A_logs.float()),
            Bs.float().contiguous(),
            Cs.float().contiguous(),
            self.Ds.float(),
            self.dt_projs_bias.float().reshape(-1),
        ).reshape(b, DIRECTIONS, self.d_inner, length)
        y = merge_orders(y, h, w).transpose(1, 2).reshape(b, h, w, self.d_inner)
        y = self.out_norm(y.to(x.dtype)) * F.silu(z)
        return self.out_proj(y)
