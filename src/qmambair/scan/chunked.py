"""Pure-PyTorch chunked selective scan: bounded memory, no loop over positions, autograd and ONNX friendly.

The sequence is cut into chunks of ``chunk`` positions; the hidden state (batch, D', N) is carried from one
chunk to the next by a Python loop over chunks. Inside a chunk everything is vectorised over positions with
a doubling (Hillis-Steele) scan of the pairs (decay, input) in log2(chunk) steps:

    step with offset o:  x[t] += P[t] · x[t − o],   P[t] *= P[t − o]      (t >= o)

where P starts as the one-step decay exp(δ·A) and ends as the decay from the chunk start. Decays are
multiplied, never divided, so nothing can overflow for A <= 0, δ >= 0, and large |A|·δ simply underflows to
0. (The alternative, differences of a cumulative sum of δ·A in log space, is also overflow-free but loses
relative accuracy when the cumulative sum is large; products keep it.) Each chunk materialises (batch, D',
chunk, N) tensors only.

Training: when gradients are needed, each chunk is an autograd Function that saves only its inputs (the
chunk's δ, δ·u, B, C and the carried state) and builds no graph in the forward; its backward recomputes the
chunk with autograd and differentiates it locally. So autograd holds O(L·D' + L/chunk·D'·N) floats, not the
(batch, D', L, N) intermediates, and one chunk's graph at a time in the backward. (torch.utils.checkpoint
does the same in principle, but its forward still builds per-chunk graph nodes that, interleaved with the
chunk-sized buffers, fragmented glibc's heap to ~5x the live memory here.) ``checkpoint=False`` turns it
off (autograd then keeps every chunk's intermediates: memory O(L·D'·N·log chunk)). Without autograd the
doubling steps update in place and the output is written into one preallocated buffer.

ONNX: exports with both torch.onnx exporters (dynamo=True and the TorchScript one), and onnxruntime
reproduces the PyTorch output to ~4e-6. The graph holds only Softplus, Exp, Mul, Add, Slice, Concat,
ReduceSum, Sigmoid, Transpose, Reshape/Unsqueeze, Gather and (dynamo) Where/Greater/ConstantOfShape; no
CumSum, Loop or Scan. The chunk loop is unrolled at export, so the sequence length is fixed in the exported
graph (export per input size; the graph grows with L / chunk). ``segmented=True`` runs the chunks as
``segmented.segmented_chunk`` instead (O(chunk) work rather than O(chunk·log chunk): what the ONNX export
uses)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..tracing import capturing_graph
from .segmented import segment_length, segmented_chunk

CHUNK = 64


def _scan_chunk(
    delta: torch.Tensor, du: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, h0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk. delta, du: (b, G, Dg, T); A: (G, Dg, N); B, C: (b, G, N, T); h0: (b, G, Dg, N).

    Returns y (b, G, Dg, T) without the D term, and the state after the last position."""
    length = delta.shape[-1]
    bt = B.transpose(-1, -2).unsqueeze(2)  # (b, G, 1, T, N)
    ct = C.transpose(-1, -2).unsqueeze(2)
    decay = torch.exp(delta.unsqueeze(-1) * A.unsqueeze(2))  # (b, G, Dg, T, N), in (0, 1] for A <= 0
    x = du.unsqueeze(-1) * bt
    inplace = not torch.is_grad_enabled() and not capturing_graph()
    o = 1
    while o < length:
        if inplace:  # fewer allocations; each right-hand side is evaluated before it is written
            x[..., o:, :] += decay[..., o:, :] * x[..., :-o, :]
            decay[..., o:, :] = decay[..., o:, :] * decay[..., :-o, :]
        else:
            head_x, head_p = x[..., :o, :], decay[..., :o, :]
            x = torch.cat([head_x, x[..., o:, :] + decay[..., o:, :] * x[..., :-o, :]], dim=-2)
            decay = torch.cat([head_p, decay[..., o:, :] * decay[..., :-o, :]], dim=-2)
        o *= 2
    h = x + decay * h0.unsqueeze(-2)
    y = (h * ct).sum(-1)
    # A fresh (b, G, Dg, N) tensor, not a view of h: a view would keep the whole chunk alive.
    return y, x[..., -1, :] + decay[..., -1, :] * h0


class _RecomputedChunk(torch.autograd.Function):
    """One chunk that keeps only its inputs: the forward builds no graph, the backward recomputes the chunk
    with autograd and differentiates it locally (so outer ``torch.autograd.grad`` calls work too)."""

    @staticmethod
    def forward(ctx, delta, du, A, B, C, h0):
        ctx.save_for_backward(delta, du, A, B, C, h0)
        return _scan_chunk(delta, du, A, B, C, h0)

    @staticmethod
    def backward(ctx, gy, gh):
        inputs = [
            t.detach().requires_grad_(need)
            for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad, strict=True)
        ]
        wanted = [t for t in inputs if t.requires_grad]
        if not wanted:
            return (None,) * 6
        with torch.enable_grad():
            y, h = _scan_chunk(*inputs)
            outs, grads_out = [y], [gy]
            if gh is not None:
                outs.append(h)
                grads_out.append(gh)
            got = iter(torch.autograd.grad(outs, wanted, grads_out, allow_unused=True))
        return tuple(next(got) if t.requires_grad else None for t in inputs)


def _positions(t: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
    """Positions t0..t1 − 1 (last axis) of ``t``; ``t`` itself when that is all of them (no Slice node in an
    exported graph)."""
    return t if t0 == 0 and t1 == t.shape[-1] else t[..., t0:t1]


def selective_scan_chunked(
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
    chunk: int = CHUNK,
    checkpoint: bool | None = None,
    segmented: bool = False,
):
    """Chunked scan with mamba_ssm's ``selective_scan_fn`` semantics (B, C: (batch, G, N, L)).

    Computes in float64 for float64 inputs, else float32. ``checkpoint=None`` checkpoints each chunk exactly
    when autograd is recording. ``segmented``: each chunk whose length has a segment length runs as
    ``segmented.segmented_chunk`` (O(T) work in few nodes: for exported graphs), unless checkpointed."""
    if B.dim() != 4 or C.dim() != 4:
        raise ValueError("the chunked scan takes grouped B and C of shape (batch, groups, N, L)")
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    dtype_in = u.dtype
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    nb, dp, length = u.shape
    groups, n_state = B.shape[1], A.shape[1]
    if dp % groups:
        raise ValueError(f"{dp} channels cannot be split into {groups} groups")
    dg = dp // groups

    def per_group(t: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
        return None if t is None else t.to(work).reshape(shape)

    u4 = per_group(u, (nb, groups, dg, length))
    delta4 = per_group(delta, (nb, groups, dg, length))
    z4 = per_group(z, (nb, groups, dg, length))
    A3 = per_group(A, (groups, dg, n_state))
    bias3 = per_group(delta_bias, (groups, dg, 1))
    D3 = per_group(D, (groups, dg, 1))
    B, C = B.to(work), C.to(work)
    if checkpoint is None:
        tensors = [u4, delta4, A3, B, C] + ([bias3] if bias3 is not None else [])
        checkpoint = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    # Plain inference writes into one output buffer; autograd and exporters get a functional concatenation.
    out = u4.new_empty(u4.shape) if not torch.is_grad_enabled() and not capturing_graph() else None
    h = u4.new_zeros(nb, groups, dg, n_state)
    ys = []
    for t0 in range(0, length, chunk):
        t1 = min(t0 + chunk, length)
        d_c, u_c = _positions(delta4, t0, t1), _positions(u4, t0, t1)
        if bias3 is not None:
            d_c = d_c + bias3
        if delta_softplus:
            d_c = F.softplus(d_c)
        args = (d_c, d_c * u_c, A3, _positions(B, t0, t1), _positions(C, t0, t1), h)
        segment = segment_length(t1 - t0) if segmented and not checkpoint else None
        if segment is not None:
            y_c, h = segmented_chunk(*args, segment)
        else:
            y_c, h = _RecomputedChunk.apply(*args) if checkpoint else _scan_chunk(*args)
        if D3 is not None:
            y_c = y_c + D3 * u_c
        if z4 is not None:
            y_c = y_c * F.silu(_positions(z4, t0, t1))
        if out is not None:
            out[..., t0:t1] = y_c
        else:
            ys.append(y_c)
    if out is None:
        out = torch.cat(ys, dim=-1) if len(ys) > 1 else ys[0]
    y = out.reshape(nb, dp, length).to(dtype_in)
    if return_last_state:
        return y, h.reshape(nb, dp, n_state).to(dtype_in)
    return y
