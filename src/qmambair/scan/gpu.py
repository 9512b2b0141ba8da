"""Optional CUDA scan: mamba_ssm's ``selective_scan_fn`` when it is installed, else a Triton forward kernel.

The package never imports this module on machines without CUDA (the dispatcher checks CUDA first); here,
triton is imported when present (a missing or broken one only disables the Triton path) and mamba_ssm is
probed on first use.

Triton path: the forward kernel runs one program per (batch, group, block of ``BLOCK_D`` channels); the
state (BLOCK_D, N) lives in registers and the program walks the sequence position by position, writing y
(and the last state). It stores no intermediate states. The backward recomputes the scan with the chunked
PyTorch implementation (``chunked.py``, recomputed chunk by chunk, so memory stays bounded) and
differentiates it with autograd: slower than a dedicated backward kernel but exact, and it reuses the tested
CPU code path."""

from __future__ import annotations

import functools
import importlib.util

import torch

from .chunked import selective_scan_chunked

GPU_CHUNK = 128  # the recomputing backward launches fewer, larger kernels on the GPU


@functools.cache
def _mamba_ssm_fn():
    """mamba_ssm's selective_scan_fn, or None."""
    if importlib.util.find_spec("mamba_ssm") is None:
        return None
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # noqa: BLE001 - a broken mamba_ssm build must not break the Triton fallback
        return None
    return selective_scan_fn


try:  # only this module imports triton, and the dispatcher imports this module only when CUDA is usable
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - missing or broken triton: the Triton path reports itself unavailable
    triton = tl = None

if triton is not None:

    @triton.jit
    def scan_fwd_kernel(
        u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, dvec_ptr, bias_ptr, z_ptr, out_ptr, last_ptr,
        L, DP, DG, N, G,
        HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_b = tl.program_id(0)
        pid_g = tl.program_id(1)
        pid_d = tl.program_id(2)
        loc = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = loc < DG
        d = pid_g * DG + loc
        n = tl.arange(0, BLOCK_N)
        nmask = n < N
        m2 = dmask[:, None] & nmask[None, :]
        a = tl.load(a_ptr + d[:, None] * N + n[None, :], mask=m2, other=0.0)
        dvec = tl.load(dvec_ptr + d, mask=dmask, other=0.0)
        bias = tl.load(bias_ptr + d, mask=dmask, other=0.0)
        row = (pid_b * DP + d).to(tl.int64) * L  # (BLOCK_D,) offsets of each channel's sequence
        bc = (pid_b * G + pid_g).to(tl.int64) * N * L + n.to(tl.int64) * L  # (BLOCK_N,) into B and C
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        for t in range(0, L):
            uv = tl.load(u_ptr + row + t, mask=dmask, other=0.0)
            dv = tl.load(delta_ptr + row + t, mask=dmask, other=0.0) + bias
            if SOFTPLUS:
                dv = tl.maximum(dv, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(dv)))
            bv = tl.load(b_ptr + bc + t, mask=nmask, other=0.0)
            cv = tl.load(c_ptr + bc + t, mask=nmask, other=0.0)
            h = tl.exp(dv[:, None] * a) * h + (dv * uv)[:, None] * bv[None, :]
            y = tl.sum(h * cv[None, :], axis=1) + dvec * uv
            if HAS_Z:
                zv = tl.load(z_ptr + row + t, mask=dmask, other=0.0)
                y = y * zv * tl.sigmoid(zv)
            tl.store(out_ptr + row + t, y, mask=dmask)
        last = (pid_b * DP + d).to(tl.int64) * N
        tl.store(last_ptr + last[:, None] + n[None, :], h, mask=m2)


def _triton_kernel():
    """(kernel, triton module), or None when triton is missing."""
    return None if triton is None else (scan_fwd_kernel, triton)


def available() -> bool:
    """True when CUDA is usable and either mamba_ssm or triton can run the scan."""
    if not torch.cuda.is_available():
        return False
    return _mamba_ssm_fn() is not None or _triton_kernel() is not None


def implementation() -> str | None:
    """'mamba_ssm', 'triton' or None: what ``selective_scan_gpu(impl='auto')`` would use."""
    if not torch.cuda.is_available():
        return None
    if _mamba_ssm_fn() is not None:
        return "mamba_ssm"
    return "triton" if _triton_kernel() is not None else None


def _block_d(batch: int, groups: int, per_group: int) -> int:
    """Channels per Triton program: 16, or fewer when that leaves most streaming multiprocessors idle."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    block = 16
    while block > 4 and batch * groups * -(-per_group // block) < 2 * sms:
        block //= 2
    return block


def _triton_forward(u, delta, A, B, C, D, z, delta_bias, softplus, block_d=None):
    kernel, triton = _triton_kernel()
    nb, dp, length = u.shape
    groups, n_state = B.shape[1], A.shape[1]
    dg = dp // groups
    f32 = torch.float32
    u32, d32 = u.detach().to(f32).contiguous(), delta.detach().to(f32).contiguous()
    a32 = A.detach().to(f32).contiguous()
    b32, c32 = B.detach().to(f32).contiguous(), C.detach().to(f32).contiguous()
    dv = D.detach().to(f32).contiguous() if D is not None else u32.new_zeros(dp)
    bias = delta_bias.detach().to(f32).contiguous() if delta_bias is not None else u32.new_zeros(dp)
    z32 = z.detach().to(f32).contiguous() if z is not None else u32  # never read without HAS_Z
    out = torch.empty_like(u32)
    last = u32.new_empty(nb, dp, n_state)
    block_d = block_d or _block_d(nb, groups, dg)
    block_n = max(16, triton.next_power_of_2(n_state))
    grid = (nb, groups, triton.cdiv(dg, block_d))
    with torch.cuda.device(u.device):
        kernel[grid](
            u32, d32, a32, b32, c32, dv, bias, z32, out, last,
            length, dp, dg, n_state, groups,
            HAS_Z=z is not None, SOFTPLUS=bool(softplus), BLOCK_D=block_d, BLOCK_N=block_n,
            num_warps=1 if block_d * block_n <= 64 else 2,
        )  # fmt: skip
    return out, last


class TritonSelectiveScan(torch.autograd.Function):
    """Triton forward; backward by autograd through the chunked PyTorch scan, recomputed."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, block_d):
        out, last = _triton_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, block_d)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.softplus = delta_softplus
        ctx.mark_non_differentiable(last)
        return out.to(u.dtype), last.to(u.dtype)

    @staticmethod
    def backward(ctx, dout, _dlast):
        saved = ctx.saved_tensors
        inputs = [
            t.detach().requires_grad_(need) if t is not None else None
            for t, need in zip(saved, ctx.needs_input_grad[:8], strict=True)
        ]
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads: list[torch.Tensor | None] = [None] * 8
        if wanted:
            with torch.enable_grad():
                y = selective_scan_chunked(*inputs[:5], inputs[5], inputs[6], inputs[7], ctx.softplus,
                                           chunk=GPU_CHUNK, checkpoint=True)  # fmt: skip
                got = iter(torch.autograd.grad(y, wanted, dout, allow_unused=True))
            grads = [next(got) if t is not None and t.requires_grad else None for t in inputs]
        return (*grads, None, None)


def selective_scan_gpu(
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
    impl: str = "auto",
    block_d: int | None = None,
):
    """CUDA scan with mamba_ssm's ``selective_scan_fn`` semantics; ``impl``: 'auto', 'mamba_ssm', 'triton'."""
    if not u.is_cuda:
        raise ValueError("the 'gpu' scan backend needs CUDA tensors; use backend='cpu' or 'chunked' on CPU")
    if B.dim() != 4 or C.dim() != 4:
        raise ValueError("the GPU scan takes grouped B and C of shape (batch, groups, N, L)")
    if impl == "auto":
        impl = "mamba_ssm" if _mamba_ssm_fn() is not None else "triton"
    if impl == "mamba_ssm":
        fn = _mamba_ssm_fn()
        if fn is None:
            raise RuntimeError("mamba_ssm is not importable; pip install mamba-ssm or use impl='triton'")
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if impl != "triton":
        raise ValueError(f"unknown GPU scan implementation {impl!r}; use 'auto', 'mamba_ssm' or 'triton'")
    if _triton_kernel() is None:
        raise RuntimeError("neither mamba_ssm nor triton is importable; pip install triton, or use 'chunked'")
    if u.shape[1] % B.shape[1]:
        raise ValueError(f"{u.shape[1]} channels cannot be split into {B.shape[1]} groups")
    out, last = TritonSelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), block_d)
    return (out, last) if return_last_state else out
