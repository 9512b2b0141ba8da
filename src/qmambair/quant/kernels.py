"""numba kernels of the fused fake quantizers (``qmambair.quant.fused`` wraps them as autograd Functions).

Two element maps cover ActQuant, LSQ and DLS:

    affine:  y = clip(s·round(clip((x + b)/s, Qn, Qp)) − b, lo, hi)     (lo, hi = ∓inf without the outer clip)
    rfa:     y = α·(Qn + #{i : u > t_i}) − β,  u = clip((W + β)/α, Qn, Qp)

applied per *group*: a (G, n) view of the tensor where each row has its own scalars (G = 1 per tensor, G = B
per sample). Each map has a forward kernel (one pass, writes y) and a backward kernel (one pass over x and
the upstream gradient, writes the gradient of x and per-chunk partial sums of the gradients of the scalars).
DLS adds a second backward pass (``stats_backward``) for the gradient that reaches x through its mean,
variance, minimum and maximum.

Arithmetic mirrors the eager quantizers operation by operation in float32 (no fast-math, so no fused
multiply-adds), which keeps the forward output bit-identical to them. Sums run in float64 over fixed chunks
of ``CHUNK`` elements and are added in chunk order, so results do not depend on the thread count.
The eager quantizers stay the oracle (``tests/test_fused_quant.py``).
"""

from __future__ import annotations

import numpy as np

try:
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised only on installs without numba
    njit = None

AVAILABLE = njit is not None
CHUNK = 16384  # elements per work item and per partial sum
SUMS = 6  # affine backward partials per chunk: dstep, doffset, dlo, dhi, #(x == lo), #(x == hi)


def chunk_layout(groups: int, n: int) -> tuple[int, int]:
    """(chunks per group, total chunks) for a (groups, n) tensor."""
    per_group = max(1, -(-n // CHUNK))
    return per_group, groups * per_group


if AVAILABLE:

    @njit(parallel=True, cache=True, error_model="numpy")
    def affine_forward(x, step, offset, lo, hi, qn, qp, out):
        """out[g, i] = min(max(step_g·round(clip((x + offset_g)/step_g, qn, qp)) − offset_g, lo_g), hi_g)."""
        groups, n = x.shape
        per_group = max(1, (n + CHUNK - 1) // CHUNK)
        fqn, fqp = np.float32(qn), np.float32(qp)
        for c in prange(groups * per_group):
            g = c // per_group
            start = (c % per_group) * CHUNK
            stop = min(start + CHUNK, n)
            s, b, low, high = step[g], offset[g], lo[g], hi[g]
            src, dst = x[g, start:stop], out[g, start:stop]  # zero-based loops over slices vectorize
            for i in range(stop - start):
                t = (src[i] + b) / s
                t = min(max(t, fqn), fqp)
                y = s * np.rint(t) - b
                dst[i] = min(max(y, low), high)

    @njit(parallel=True, cache=True, error_model="numpy", fastmath={"reassoc"})
    def group_sums(x, partial):
        """Per chunk: (Σ(x − K), Σ(x − K)²) with K = the group's first element, in float64.

        Shifting by K keeps the variance formula (Σd² − (Σd)²/n)/(n − 1) free of cancellation for data far
        from zero; float64 sums make the float32-rounded mean and variance those of an exact computation.
        (Minimum and maximum come from torch's amin/amax: numba does not vectorize a min/max reduction, which
        made this pass 10x slower when it computed them too.)
        """
        groups, n = x.shape
        per_group = max(1, (n + CHUNK - 1) // CHUNK)
        for c in prange(groups * per_group):
            g = c // per_group
            start = (c % per_group) * CHUNK
            stop = min(start + CHUNK, n)
            k = np.float64(x[g, 0])
            xg = x[g, start:stop]
            s1 = 0.0
            s2 = 0.0
            for i in range(stop - start):
                d = np.float64(xg[i]) - k
                s1 += d
                s2 += d * d
            partial[c, 0] = s1
            partial[c, 1] = s2

    @njit(parallel=True, cache=True, error_model="numpy", fastmath={"reassoc"})
    def affine_backward(x, grad, step, offset, lo, hi, qn, qp, grad_x, partial):
        """Gradient of ``affine_forward``: grad_x, and per chunk the sums in ``partial[c, :SUMS]``.

        Follows the eager graph: the inner clip passes gradient where qn <= t <= qp; round is straight
        through; the outer clip is torch.minimum(torch.maximum(y, lo), hi), which splits the gradient in
        half on ties. partial[c] = (d step, d offset, d lo, d hi, #(x == lo), #(x == hi)).
        Branch-free (selects) and with reassociable sums, so the loop vectorizes; ``reassoc`` only reorders
        the chunk's sums, whose order is fixed for a given build, so results stay deterministic.
        """
        groups, n = x.shape
        per_group = max(1, (n + CHUNK - 1) // CHUNK)
        fqn, fqp = np.float32(qn), np.float32(qp)
        one, half, zero = np.float32(1.0), np.float32(0.5), np.float32(0.0)
        for c in prange(groups * per_group):
            g = c // per_group
            start = (c % per_group) * CHUNK
            stop = min(start + CHUNK, n)
            s, b, low, high = step[g], offset[g], lo[g], hi[g]
            xg, gg, out = x[g, start:stop], grad[g, start:stop], grad_x[g, start:stop]
            d_step = zero
            d_offset = zero
            d_lo = zero
            d_hi = zero
            n_lo = zero
            n_hi = zero
            for i in range(stop - start):
                xi = xg[i]
                gi = gg[i]
                t = (xi + b) / s
                inside = (t >= fqn) & (t <= fqp)
                q = np.rint(min(max(t, fqn), fqp))
                y = s * q - b
                m = max(y, low)
                g_m = gi * (one if m < high else (half if m == high else zero))  # torch.minimum(m, high)
                g_y = g_m * (one if y > low else (half if y == low else zero))  # torch.maximum(y, low)
                out[i] = g_y if inside else zero
                d_step += g_y * (q - (t if inside else zero))
                d_offset -= zero if inside else g_y
                d_lo += g_m - g_y
                d_hi += gi - g_m
                n_lo += one if xi == low else zero
                n_hi += one if xi == high else zero
            partial[c, 0] = d_step
            partial[c, 1] = d_offset
            partial[c, 2] = d_lo
            partial[c, 3] = d_hi
            partial[c, 4] = n_lo
            partial[c, 5] = n_hi

    @njit(parallel=True, cache=True, error_model="numpy")
    def stats_backward(x, grad_x, mean, g_mean, g_var, lo, g_lo, hi, g_hi, n):
        """grad_x[g, i] += the gradient through the group's mean, unbiased variance, minimum and maximum.

        d mean/dx = 1/n; d var/dx = 2(x − mean)/(n − 1); min and max share their gradient evenly among
        tied elements (as torch.amin/amax do): ``g_lo``/``g_hi`` arrive already divided by the tie counts.
        """
        groups, size = x.shape
        per_group = max(1, (size + CHUNK - 1) // CHUNK)
        for c in prange(groups * per_group):
            g = c // per_group
            start = (c % per_group) * CHUNK
            stop = min(start + CHUNK, size)
            a = np.float32(g_mean[g] / n)
            v = np.float32(2.0 * g_var[g] / (n - 1)) if n > 1 else np.float32(0.0)
            mu, low, high, gl, gh = mean[g], lo[g], hi[g], g_lo[g], g_hi[g]
            src, dst = x[g, start:stop], grad_x[g, start:stop]
            zero = np.float32(0.0)
            for i in range(stop - start):
                xi = src[i]
                d = a + v * (xi - mu)
                d += gl if xi == low else zero
                d += gh if xi == high else zero
                dst[i] += d

    @njit(inline="always", cache=True, error_model="numpy")
    def _count_below(u, thresholds):
        """#{i : thresholds[i] < u} for increasing thresholds (binary search)."""
        lo, hi = 0, thresholds.shape[0]
        while lo < hi:
            mid = (lo + hi) // 2
            if thresholds[mid] < u:
                lo = mid + 1
            else:
                hi = mid
        return lo

    @njit(inline="always", cache=True, error_model="numpy")
    def _count_at_most(u, knots):
        """#{i : knots[i] <= u} for increasing knots (binary search)."""
        lo, hi = 0, knots.shape[0]
        while lo < hi:
            mid = (lo + hi) // 2
            if knots[mid] <= u:
                lo = mid + 1
            else:
                hi = mid
        return lo

    @njit(parallel=True, cache=True, error_model="numpy")
    def rfa_forward(w, alpha, beta, thresholds, qn, qp, out):
        """out = α·(qn + #{i : u > t_i}) − β with u = clip((w + β)/α, qn, qp), over a flat tensor."""
        n = w.shape[0]
        fqn, fqp = np.float32(qn), np.float32(qp)
        for c in prange(max(1, (n + CHUNK - 1) // CHUNK)):
            for i in range(c * CHUNK, min((c + 1) * CHUNK, n)):
                u = min(max((w[i] + beta) / alpha, fqn), fqp)
                q = fqn + np.float32(_count_below(u, thresholds))
                out[i] = alpha * q - beta

    @njit(parallel=True, cache=True, error_model="numpy")
    def rfa_backward(w, grad, alpha, beta, thresholds, anchors, qn, qp, outer_slope, grad_w, partial):
        """Gradient of RFA through its piecewise-linear surrogate ŝ (anchors ``anchors``, ordered).

        Per chunk, ``partial[c]`` = (d α, d β, d anchor_0, ..., d anchor_last).
        """
        n = w.shape[0]
        k = anchors.shape[0]
        fqn, fqp = np.float32(qn), np.float32(qp)
        for c in prange(max(1, (n + CHUNK - 1) // CHUNK)):
            d_alpha = 0.0
            d_beta = 0.0
            for i in range(c * CHUNK, min((c + 1) * CHUNK, n)):
                gi = grad[i]
                t = (w[i] + beta) / alpha
                inside = t >= fqn and t <= fqp
                u = min(max(t, fqn), fqp)
                q = fqn + np.float32(_count_below(u, thresholds))
                seg = _count_at_most(u, anchors) - 1
                g_s = gi * alpha  # y = α·(q + ŝ(u) − stopgrad ŝ(u)) − β
                if seg < 0:
                    slope = np.float32(outer_slope)
                    partial[c, 2] -= g_s * outer_slope
                elif seg >= k - 1:
                    slope = np.float32(outer_slope)
                    partial[c, 2 + k - 1] -= g_s * outer_slope
                else:
                    a0, a1 = anchors[seg], anchors[seg + 1]
                    h = a1 - a0
                    slope = np.float32(1.0) / h
                    partial[c, 2 + seg] += g_s * ((u - a1) / (h * h))
                    partial[c, 3 + seg] -= g_s * ((u - a0) / (h * h))
                if inside:
                    d = gi * slope
                    grad_w[i] = d
                    d_alpha += gi * q - d * t
                    d_beta += d - gi
                else:
                    grad_w[i] = np.float32(0.0)
                    d_alpha += gi * q
                    d_beta -= gi
            partial[c, 0] = d_alpha
            partial[c, 1] = d_beta


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel on tiny inputs."""
    if not AVAILABLE:
        return
    f32 = np.float32
    x = np.linspace(-1, 1, 8, dtype=f32).reshape(1, 8)
    one = np.ones(1, f32)
    neg, pos = np.full(1, -np.inf, f32), np.full(1, np.inf, f32)
    out = np.empty_like(x)
    affine_forward(x, one, one * 0, neg, pos, -2.0, 1.0, out)
    partial = np.zeros((1, SUMS), np.float64)
    affine_backward(x, x, one, one * 0, neg, pos, -2.0, 1.0, out, partial)
    stats_backward(x, out, one * 0, np.zeros(1), np.zeros(1), neg, one * 0, pos, one * 0, 8)
    anchors = np.arange(-2, 2, dtype=f32)
    thresholds = ((anchors[1:] + anchors[:-1]) / 2).astype(f32)
    flat = x.reshape(-1)
    res = np.empty_like(flat)
    rfa_forward(flat, f32(1.0), f32(0.0), thresholds, -2.0, 1.0, res)
    rfa_backward(flat, flat, f32(1.0), f32(0.0), thresholds, anchors, -2.0, 1.0, 0.1, res,
                 np.zeros((1, 2 + 4), np.float64))
