"""A selective-scan chunk in O(T) work from whole-tensor operations: the scan an exported graph runs.

The chunked scan's doubling steps (``chunked._scan_chunk``) touch all (position, channel, state) values
log2(T) times each; in an exported graph, where every step is a handful of Slice/Mul/Add/Concat nodes over
the whole chunk, that is most of the run time. Here the T positions of a chunk are cut into S segments of
length R (T = S·R), and the recurrence h[t] = P[t]·h[t − 1] + X[t] (P = exp(δ·A), X = δ·u·B) runs in three
phases, each a short unrolled loop of whole-tensor operations:

1. every segment at once from a zero state: R steps over (batch, channels, N, S) tensors, keeping only the
   end state E[s]; the segment's whole decay is exp(A·Σδ) over its positions;
2. across segments: S small steps carrying the state into each segment, c[s + 1] = exp(A·Σδ)[s]·c[s] +
   E[s] with c[0] = h0;
3. every segment again, from its carry: R steps of the recurrence, each read out with C (y = Σ_n h·C).

About 19 passes over the (T, channels, N) values where the doubling scan makes ~3·log2(T) + 4, in about
9R + 2S nodes (R ≈ S ≈ √T). Layout: the chunk is transposed once so that step r of every segment (positions
s·R + r, s = 0..S−1) is one contiguous block, and the per-step tensors are (…, N, S) with the segments
innermost. Every broadcast of a step (δ·A, δu·B, h·C) then runs along S contiguous values; with the state
index N innermost (N = 10 to 16 here) onnxruntime's broadcasting kernels, which work in runs of the innermost
dimension, spent most of the chunk's time in those short runs. Every decay is an exp of a non-positive
number: no overflow. Plain torch operations: autograd works (keeping every intermediate), but training uses
the chunked scan's checkpointed chunks instead.
"""

from __future__ import annotations

import math

import torch

MIN_SEGMENTS = 4  # below this many segments of a good length the doubling scan is used


def segment_length(length: int) -> int | None:
    """R for a chunk of ``length`` positions: the divisor of ``length`` nearest √length from below, or None
    when it is too short (under √length / 4, e.g. a prime length) or the chunk too short to split."""
    root = math.isqrt(length)
    for r in range(root, 0, -1):
        if length % r == 0:
            return r if 4 * r >= root and length // r >= MIN_SEGMENTS else None
    return None


def segmented_chunk(
    delta: torch.Tensor,
    du: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    h0: torch.Tensor,
    segment: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk, as ``chunked._scan_chunk``: delta, du (b, G, Dg, T); A (G, Dg, N); B, C (b, G, N, T); h0
    (b, G, Dg, N). ``segment``: R (a divisor of T), default ``segment_length(T)``.

    Returns y (b, G, Dg, T) without the D term, and the state after the last position."""
    nb, groups, dg, length = delta.shape
    n = A.shape[-1]
    r = segment or segment_length(length)
    if r is None or length % r:
        raise ValueError(f"no segment length for a chunk of {length} positions")
    s = length // r

    # The transposed chunk is reshaped to (…, 1, R·S) and split along its last axis into the R steps, already
    # shaped (…, 1, S): one Split node and no node per step. The Reshape between Transpose and Split matters:
    # onnxruntime's transpose optimiser moves a Transpose that feeds a Split past it (a strided Split, then a
    # Transpose per step), but not past a Reshape.
    def steps(t: torch.Tensor) -> list[torch.Tensor]:
        """(…, T) as R tensors (…, 1, S): step r of every segment, each a contiguous block."""
        lead = t.shape[:-1]
        by_step = t.reshape(*lead, s, r).transpose(-1, -2).reshape(*lead, 1, length)
        return list(by_step.split(s, -1))

    def steps_by_state(t: torch.Tensor) -> list[torch.Tensor]:
        """B or C (b, G, N, T) as R tensors (b, G, 1, N, S)."""
        by_step = t.reshape(nb, groups, n, s, r).transpose(-1, -2).reshape(nb, groups, 1, n, length)
        return list(by_step.split(s, -1))

    a = A.reshape(groups, dg, n, 1)
    decays = [torch.exp(d_t * a) for d_t in steps(delta)]  # (b, G, Dg, N, S) each
    inputs = [du_t * b_t for du_t, b_t in zip(steps(du), steps_by_state(B), strict=True)]

    # 1. every segment from a zero state, keeping only its end state; its whole decay from the sum of its δ
    h = inputs[0]
    for p_t, x_t in zip(decays[1:], inputs[1:], strict=True):
        h = p_t * h + x_t
    totals = torch.exp(delta.reshape(nb, groups, dg, s, r).sum(-1).unsqueeze(-2) * a)  # (b, G, Dg, N, S)
    # 2. the state entering each segment (c[0] = h0)
    carries = [h0.reshape(nb, groups, dg, n, 1)]
    for end, total in zip(h.split(1, -1), totals.split(1, -1), strict=True):
        carries.append(total * carries[-1] + end)
    last = carries.pop().reshape(h0.shape)
    # 3. every segment again, from its carry: the states and their read-out with C
    h = torch.cat(carries, -1)
    ys = []
    for p_t, x_t, c_t in zip(decays, inputs, steps_by_state(C), strict=True):
        h = p_t * h + x_t
        ys.append((h * c_t).sum(-2, keepdim=True))  # (b, G, Dg, 1, S)
    # (b, G, Dg, R, S) back to position order s·R + r
    return torch.cat(ys, -2).transpose(-1, -2).reshape(delta.shape), last
