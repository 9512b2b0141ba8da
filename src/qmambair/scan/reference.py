"""The exact selective scan: a sequential loop over positions, the oracle every fast kernel is tested against.

Semantics follow mamba_ssm's ``selective_scan_fn`` for the grouped form SS2D uses:
u, delta: (batch, D, L); A: (D, N); B, C: (batch, G, N, L) with D divisible by G (channel d uses group
d // (D // G)); D: (D,); z: (batch, D, L); delta_bias: (D,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_groups(bc: torch.Tensor, channels: int) -> torch.Tensor:
    """(batch, G, N, L) -> (batch, channels, N, L), channel d reading group d // (channels // G)."""
    if bc.dim() != 4:
        raise ValueError(f"B/C must have shape (batch, groups, N, L); got {tuple(bc.shape)}")
    groups = bc.shape[1]
    if channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} groups")
    return bc.repeat_interleave(channels // groups, dim=1)


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """Sequential reference scan, computed in float32 (or float64 if the inputs are float64)."""
    dtype_in = u.dtype
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A = u.to(work), delta.to(work), A.to(work)
    channels = u.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias.to(work)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    Bx = expand_groups(B.to(work), channels)  # (b, D, N, L)
    Cx = expand_groups(C.to(work), channels)
    dA = torch.exp(delta.unsqueeze(2) * A[None, :, :, None])  # (b, D, N, L)
    dBu = delta.unsqueeze(2) * Bx * u.unsqueeze(2)
    # Split once along L: indexing a big tensor at every step makes autograd's backward quadratic in L.
    dA_t, dBu_t, C_t = dA.unbind(-1), dBu.unbind(-1), Cx.unbind(-1)
    h = u.new_zeros(u.shape[0], channels, A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = dA_t[t] * h + dBu_t[t]
        ys.append((h * C_t[t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(work)[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.to(work))
    y = y.to(dtype_in)
    if return_last_state:
        return y, h.to(dtype_in)
    return y
