"""numba kernels of int8 inference (``qmambair.quant.int8`` wraps them; docs/method.md §6).

Notation: activation codes q_a = round(clip((x + b)/s, Qn, Qp)) with x̂ = s·q_a − b; weight codes q_w with
Ŵ = α_n·q_w − β_n per output channel n. A product sum over the K real inputs of one output splits into
integer sums:

    Σ x̂·Ŵ = s·(α_n·Σ q_a q_w − β_n·Σ q_a) − b·(α_n·Σ q_w − β_n·K)

The first integer sum is an int8 x int8 -> int32 matrix product (``torch._int_mm``) or, for depthwise convs
and projections with a handful of inputs, integer loops here; the codes and their sums Σ q_a come from one
pass over x (``quantize_rows`` for (positions, channels) tensors, ``quantize_planes`` for (channels,
positions) ones), and an epilogue (``rescale_rows`` / ``rescale_planes``) turns the int32 sums into float
outputs, with the bias. Zero padding: padded taps hold code 0, so they add nothing to the first two sums,
and the last two count only real taps (per-position maps near the border).

Codes are computed with the quantizers' float32 expressions in the same order ((x + b)/s, clip, round half
to even), so they equal the fake-quant codes. DLS clips x̂ to [lo, hi] after dequantizing; ``count_clipped``
(or ``quantize_rows`` as it goes) and ``clipped_indices`` find the few elements where that changes the value,
which the caller corrects.
Loops are written branch-free over contiguous rows so that LLVM vectorizes them; blocks of rows or
channels run in parallel (``prange``), with integer sums, so results do not depend on the thread count.
"""

from __future__ import annotations

import numpy as np

try:
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised only on installs without numba
    njit = None

AVAILABLE = njit is not None
ROWS = 256  # rows per work item of ``quantize_rows`` / ``rescale_rows``
SPAN = 4096  # positions per work item of the (channels, positions) kernels
NORM_SPAN = 512  # positions per work item of ``norm_quantize_planes`` (its three reads stay in L2)
SMALL_K = 8  # projections with at most this many inputs use ``small_project`` instead of a GEMM


if AVAILABLE:

    @njit(inline="always", cache=True, error_model="numpy")
    def _code(v, s, b, fqn, fqp):
        """The activation code of v as a float: round(clip((v + b)/s, Qn, Qp)), half to even, in the
        quantizers' float32 operation order (every kernel here computes its codes with this)."""
        return np.rint(min(max((v + b) / s, fqn), fqp))

    @njit(parallel=True, cache=True, error_model="numpy")
    def quantize_rows(x, s, b, qn, qp, lo, hi, codes, sums):
        """x (R, K) float32 -> codes (R, K) int8 and sums (R,) int32 = Σ_k codes[r, k]; returns how many
        elements DLS's outer clip to [lo, hi] changes (``count_clipped`` in the same pass; not counted, 0,
        when both bounds are infinite). Integer sums, which LLVM may reorder, so the loops vectorize."""
        rows, k = x.shape
        fqn, fqp = np.float32(qn), np.float32(qp)
        clip = np.isfinite(lo) or np.isfinite(hi)
        nblk = (rows + ROWS - 1) // ROWS
        outside = np.zeros(nblk, dtype=np.int64)
        for blk in prange(nblk):
            n_out = 0
            for r in range(blk * ROWS, min(rows, (blk + 1) * ROWS)):
                src, dst = x[r], codes[r]
                acc = np.int32(0)
                if clip:
                    n_r = np.int32(0)
                    for j in range(k):
                        q = _code(src[j], s, b, fqn, fqp)
                        dst[j] = np.int8(np.int32(q))
                        acc += np.int32(q)
                        y = s * q - b
                        n_r += np.int32((y < lo) | (y > hi))
                    n_out += n_r
                else:
                    for j in range(k):
                        qi = np.int32(_code(src[j], s, b, fqn, fqp))
                        dst[j] = np.int8(qi)
                        acc += qi
                sums[r] = acc
            outside[blk] = n_out
        return outside.sum()

    @njit(cache=True, error_model="numpy", fastmath={"reassoc"})
    def _row_moments(row, k):
        """(Σ row, Σ row²) of a float32 row in float64, summed in any order (so that it vectorizes)."""
        s1 = 0.0
        s2 = 0.0
        for j in range(k):
            v = np.float64(row[j])
            s1 += v
            s2 += v * v
        return s1, s2

    @njit(inline="always", cache=True, error_model="numpy")
    def _norm_scalars(s1, s2, k, eps):
        """float32 (mean, 1/sqrt(var + eps)) from float64 sums over k values (biased variance, as torch)."""
        mean = s1 / k
        var = max(s2 / k - mean * mean, 0.0)
        return np.float32(mean), np.float32(1.0 / np.sqrt(var + eps))

    @njit(parallel=True, cache=True, error_model="numpy")
    def norm_quantize_rows(x, gamma, beta, eps, s, b, qn, qp, codes, sums):
        """``quantize_rows`` (no outer clip) of LayerNorm(x) over each row of x (R, K), with weight γ and bias
        β: y = (x − mean)·rstd·γ + β in float32, mean and variance from float64 sums. Not torch's operation
        order: a y within an ulp of a rounding threshold may get the neighbouring code."""
        rows, k = x.shape
        fqn, fqp = np.float32(qn), np.float32(qp)
        for blk in prange((rows + ROWS - 1) // ROWS):
            for r in range(blk * ROWS, min(rows, (blk + 1) * ROWS)):
                src, dst = x[r], codes[r]
                s1, s2 = _row_moments(src, k)
                mean, rstd = _norm_scalars(s1, s2, k, eps)
                acc = np.int32(0)
                for j in range(k):
                    y = (src[j] - mean) * rstd * gamma[j] + beta[j]
                    qi = np.int32(_code(y, s, b, fqn, fqp))
                    dst[j] = np.int8(qi)
                    acc += qi
                sums[r] = acc

    @njit(parallel=True, cache=True, error_model="numpy")
    def norm_quantize_planes(x, gamma, beta, eps, s, b, qn, qp, codes, sums):
        """``quantize_planes`` of LayerNorm over the channels of x (K, R) (each position normalised across
        its K channels, as a LayerNorm on the channels-last layout), computed as ``norm_quantize_rows``
        does, with the positions as the vector lanes."""
        k, rows = x.shape
        fqn, fqp = np.float32(qn), np.float32(qp)
        for blk in prange((rows + NORM_SPAN - 1) // NORM_SPAN):
            start, stop = blk * NORM_SPAN, min(rows, (blk + 1) * NORM_SPAN)
            n = stop - start
            s1 = np.zeros(n)
            s2 = np.zeros(n)
            for j in range(k):
                src = x[j, start:stop]
                for r in range(n):
                    v = np.float64(src[r])
                    s1[r] += v
                    s2[r] += v * v
            mean = np.empty(n, np.float32)
            rstd = np.empty(n, np.float32)
            for r in range(n):
                mean[r], rstd[r] = _norm_scalars(s1[r], s2[r], k, eps)
            acc = np.zeros(n, dtype=np.int32)
            for j in range(k):
                src, dst = x[j, start:stop], codes[j, start:stop]
                g, bj = gamma[j], beta[j]
                for r in range(n):
                    y = (src[r] - mean[r]) * rstd[r] * g + bj
                    q = np.int32(_code(y, s, b, fqn, fqp))
                    dst[r] = np.int8(q)
                    acc[r] += q
            sums[start:stop] = acc

    @njit(parallel=True, cache=True, error_model="numpy")
    def quantize_planes(x, s, b, qn, qp, codes, sums):
        """x (K, R) float32 -> codes (K, R) int8 and sums (R,) int32 = Σ_k codes[k, r]."""
        k, rows = x.shape
        fqn, fqp = np.float32(qn), np.float32(qp)
        for blk in prange((rows + SPAN - 1) // SPAN):
            start, stop = blk * SPAN, min(rows, (blk + 1) * SPAN)
            acc = np.zeros(stop - start, dtype=np.int32)
            for j in range(k):
                src, dst = x[j, start:stop], codes[j, start:stop]
                for r in range(stop - start):
                    q = np.int32(_code(src[r], s, b, fqn, fqp))
                    dst[r] = np.int8(q)
                    acc[r] += q
            sums[start:stop] = acc

    @njit(cache=True, error_model="numpy")
    def _outside(v, s, b, fqn, fqp, lo, hi):
        y = s * _code(v, s, b, fqn, fqp) - b
        return (y < lo) | (y > hi)

    @njit(parallel=True, cache=True, error_model="numpy")
    def count_clipped(x, s, b, qn, qp, lo, hi):
        """#{elements of the flat float32 x whose s·q − b lies outside [lo, hi]}."""
        n = x.shape[0]
        fqn, fqp = np.float32(qn), np.float32(qp)
        nblk = (n + SPAN - 1) // SPAN
        counts = np.zeros(nblk, dtype=np.int64)
        for blk in prange(nblk):
            c = 0
            for i in range(blk * SPAN, min(n, (blk + 1) * SPAN)):
                c += np.int64(_outside(x[i], s, b, fqn, fqp, lo, hi))
            counts[blk] = c
        return counts.sum()

    @njit(cache=True, error_model="numpy")
    def clipped_indices(x, s, b, qn, qp, lo, hi, count):
        """The flat indices counted by ``count_clipped`` (``count`` of them), in increasing order."""
        fqn, fqp = np.float32(qn), np.float32(qp)
        idx = np.empty(count, dtype=np.int64)
        m = 0
        for i in range(x.shape[0]):
            if m < count and _outside(x[i], s, b, fqn, fqp, lo, hi):
                idx[m] = i
                m += 1
        return idx

    @njit(cache=True, error_model="numpy")
    def add_clip_rows(x, idx, s, b, qn, qp, lo, hi, w_hat, out):
        """out[r, :] += (clip(y, lo, hi) − y)·Ŵ[:, j] for each clipped element (r, j) = divmod(idx, K) of
        x (R, K), y = s·q − b in float32 as the quantizer computes it; w_hat (N, K) float64."""
        k = x.shape[1]
        fqn, fqp = np.float32(qn), np.float32(qp)
        for m in range(idx.shape[0]):
            r, j = idx[m] // k, idx[m] % k
            y = s * _code(x[r, j], s, b, fqn, fqp) - b
            diff = np.float64(min(max(y, lo), hi)) - np.float64(y)
            row = out[r]
            for n in range(w_hat.shape[0]):
                row[n] = np.float32(row[n] + diff * w_hat[n, j])

    @njit(inline="always", cache=True, error_model="numpy")
    def _rescaled(sa, sb, const, acc, code_sum):
        """float32(s·α·Σq_a·q_w − s·β·Σq_a + const), computed in float64 (sa = s·α, sb = s·β; const: the
        weight-sum terms and the bias): the epilogue of the planes kernels, one expression for all."""
        return np.float32(sa * np.float64(acc) - sb * np.float64(code_sum) + const)

    @njit(inline="always", cache=True, error_model="numpy")
    def _item_span(item, nblk, rows):
        """(output channel, first position, end) of work item ``item`` of a planes kernel: ``nblk`` blocks of
        SPAN positions per output channel."""
        n, blk = item // nblk, item % nblk
        return n, blk * SPAN, min(rows, (blk + 1) * SPAN)

    @njit(inline="always", cache=True, error_model="numpy")
    def _constant_terms(bias_n, b64, alpha_n, beta_n, wsum_n, count):
        """bias_n − b·(α_n·Σ q_w − β_n·count): the part of a planes output that the codes do not change."""
        return bias_n - (b64 * alpha_n * wsum_n - b64 * beta_n * count)

    @njit(parallel=True, cache=True, error_model="numpy")
    def rescale_rows(acc, sums, s, b, alpha, beta, wsum, k, bias, out):
        """out[r, n] = s·(α_n·acc[r, n] − β_n·sums[r]) − b·(α_n·wsum_n − β_n·k) + bias_n (float64 math)."""
        rows, n_out = acc.shape
        s64, b64 = np.float64(s), np.float64(b)
        sa = np.empty(n_out)
        sb = np.empty(n_out)
        col = np.empty(n_out)
        for n in range(n_out):
            sa[n] = s64 * alpha[n]
            sb[n] = s64 * beta[n]
            col[n] = bias[n] - b64 * (alpha[n] * wsum[n] - beta[n] * k)
        for blk in prange((rows + ROWS - 1) // ROWS):
            for r in range(blk * ROWS, min(rows, (blk + 1) * ROWS)):
                sr = np.float64(sums[r])
                src, dst = acc[r], out[r]
                for n in range(n_out):
                    dst[n] = np.float32(sa[n] * np.float64(src[n]) - sb[n] * sr + col[n])

    @njit(parallel=True, cache=True, error_model="numpy")
    def rescale_planes(acc, sums, s, b, alpha, beta, wsum_map, count_map, bias, out):
        """out[n, r] = s·(α_n·acc[n, r] − β_n·sums[r]) − b·(α_n·wsum_map[n, r'] − β_n·count_map[r']) + bias_n
        with r' = r when the maps have one entry per position (zero-padded convs) and r' = 0 otherwise."""
        n_out, rows = acc.shape
        s64, b64 = np.float64(s), np.float64(b)
        nblk = (rows + SPAN - 1) // SPAN
        for item in prange(n_out * nblk):
            n, start, stop = _item_span(item, nblk, rows)
            sa, sb = s64 * alpha[n], s64 * beta[n]
            ba, bb = b64 * alpha[n], b64 * beta[n]
            src, dst, sm = acc[n, start:stop], out[n, start:stop], sums[start:stop]
            if wsum_map.shape[1] > 1:
                wm, cm = wsum_map[n, start:stop], count_map[start:stop]
                for r in range(stop - start):
                    v = sa * np.float64(src[r]) - sb * np.float64(sm[r]) - (ba * wm[r] - bb * cm[r])
                    dst[r] = np.float32(v + bias[n])
            else:
                const = _constant_terms(bias[n], b64, alpha[n], beta[n], wsum_map[n, 0], count_map[0])
                for r in range(stop - start):
                    dst[r] = _rescaled(sa, sb, const, src[r], sm[r])

    @njit(parallel=True, cache=True, error_model="numpy")
    def rescale_planes_pair(acc, sums, s, b, alpha, beta, wsum, k, out, out_rev):
        """``rescale_planes`` without bias or border maps for two directions in one product: acc (2C, R) holds
        direction j's sums in rows < C and, for the same codes, those of the direction that reads the
        sequence backwards in rows >= C; out[n, r] and out_rev[n, R − 1 − r] get their values."""
        n_all, rows = acc.shape
        half = n_all // 2
        s64, b64 = np.float64(s), np.float64(b)
        nblk = (rows + SPAN - 1) // SPAN
        for item in prange(n_all * nblk):
            n, start, stop = _item_span(item, nblk, rows)
            sa, sb = s64 * alpha[n], s64 * beta[n]
            const = _constant_terms(np.float64(0.0), b64, alpha[n], beta[n], wsum[n], k)
            src, sm = acc[n, start:stop], sums[start:stop]
            if n < half:
                dst = out[n, start:stop]
                for r in range(stop - start):
                    dst[r] = _rescaled(sa, sb, const, src[r], sm[r])
            else:
                dst = out_rev[n - half]
                top = np.uint64(rows - 1 - start)  # unsigned: no negative-index wraparound to check
                for r in range(stop - start):
                    dst[top - np.uint64(r)] = _rescaled(sa, sb, const, src[r], sm[r])

    @njit(parallel=True, cache=True, error_model="numpy")
    def small_project(w, codes, sums, s, b, alpha, beta, wsum, k, out):
        """A projection with a few inputs k and its rescale in one pass: acc = Σ_k w[n, k]·codes[k, r] in
        int32 (w (N, K), codes (K, R) int8), held in a block-sized buffer rather than an (N, R) array, then
        out[n, r] = s·(α_n·acc − β_n·sums[r]) − b·(α_n·wsum_n − β_n·k), as ``rescale_planes`` computes it
        without bias or border maps."""
        n_out, k_in = w.shape
        rows = codes.shape[1]
        s64, b64 = np.float64(s), np.float64(b)
        nblk = (rows + SPAN - 1) // SPAN
        for item in prange(n_out * nblk):
            n, start, stop = _item_span(item, nblk, rows)
            acc = np.zeros(stop - start, dtype=np.int32)
            for j in range(k_in):
                wv = np.int32(w[n, j])
                src = codes[j, start:stop]
                for r in range(stop - start):
                    acc[r] += wv * np.int32(src[r])
            sa, sb = s64 * alpha[n], s64 * beta[n]
            const = _constant_terms(np.float64(0.0), b64, alpha[n], beta[n], wsum[n], k)
            dst, sm = out[n, start:stop], sums[start:stop]
            for r in range(stop - start):
                dst[r] = _rescaled(sa, sb, const, acc[r], sm[r])

    @njit(parallel=True, cache=True, error_model="numpy")
    def im2col_planes(codes, kh, kw, ph, pw, dh, dw, cols, sums):
        """codes (C, H, W) int8 -> cols (C·kh·kw, H·W) int8 for a stride-1 zero-padded conv (dilation dh, dw)
        with output size H x W; row c·kh·kw + i·kw + j holds tap (i, j) of channel c (padded taps: 0), which
        is the (N, C, kh, kw) weight layout flattened. sums (H·W,) int32 = Σ of each position's real taps."""
        c_in, h, w = codes.shape
        for c in prange(c_in):
            for i in range(kh):
                for j in range(kw):
                    row = (c * kh + i) * kw + j
                    dy, dx = i * dh - ph, j * dw - pw
                    for y in range(h):
                        yy = y + dy
                        base = y * w
                        if yy < 0 or yy >= h:
                            cols[row, base : base + w] = 0
                            continue
                        x0, x1 = max(0, -dx), min(w, w - dx)
                        cols[row, base : base + x0] = 0
                        cols[row, base + x1 : base + w] = 0
                        cols[row, base + x0 : base + x1] = codes[c, yy, x0 + dx : x1 + dx]
        n_rows = cols.shape[0]
        positions = h * w
        for blk in prange((positions + SPAN - 1) // SPAN):
            start, stop = blk * SPAN, min(positions, (blk + 1) * SPAN)
            acc = np.zeros(stop - start, dtype=np.int32)
            for row in range(n_rows):
                src = cols[row, start:stop]
                for p in range(stop - start):
                    acc[p] += np.int32(src[p])
            sums[start:stop] = acc

    @njit(parallel=True, cache=True, error_model="numpy")
    def depthwise_conv(
        x, s, b, qn, qp, wq, ph, pw, dh, dw, alpha, beta, bias, border, border_wsum, border_taps, out,
        acc_type,
    ):  # fmt: skip
        """Depthwise stride-1 zero-padded conv (dilation dh, dw, output size = input size) of one sample,
        x (C, H, W) float32 -> out (C, H, W): per channel plane, codes into a zero-bordered buffer, the two
        data sums (Σ q_a q_w, Σ q_a) accumulated tap by tap over whole rows, then the rescale, where the two
        weight sums (Σ q_w, #taps over the real taps) are constants away from the border. ``border`` (P,)
        lists the flat positions with padded taps, ``border_wsum`` (C, P) and ``border_taps`` (P,) their
        weight sums over the real taps (``int8._depthwise_border``); those positions are rescaled again.

        ``acc_type``: an empty array whose dtype (int16 or int32) the codes and both sums are held in. int16
        vectors hold twice the lanes of int32 ones; the caller picks int16 only where no sum can leave its
        range (``int8.accumulator_dtype``), so the sums are the same integers either way."""
        c_in, h, w = x.shape
        kh, kw = wq.shape[1], wq.shape[2]
        fqn, fqp = np.float32(qn), np.float32(qp)
        s64, b64 = np.float64(s), np.float64(b)
        hp, wp = h + 2 * ph, w + 2 * pw
        for c in prange(c_in):
            q = np.zeros((hp, wp), dtype=acc_type.dtype)
            for y in range(h):
                src, dst = x[c, y], q[y + ph, pw : pw + w]
                for xx in range(w):
                    dst[xx] = np.int32(_code(src[xx], s, b, fqn, fqp))
            s1 = np.zeros((h, w), dtype=acc_type.dtype)
            s2 = np.zeros((h, w), dtype=acc_type.dtype)
            for i in range(kh):
                for j in range(kw):
                    wv = wq[c, i, j]
                    for y in range(h):
                        src = q[y + i * dh, j * dw : j * dw + w]
                        d1, d2 = s1[y], s2[y]
                        for xx in range(w):
                            d1[xx] += wv * src[xx]
                            d2[xx] += src[xx]
            a_c, b_c = alpha[c], beta[c]
            wsum_c = 0
            for i in range(kh):
                for j in range(kw):
                    wsum_c += np.int32(wq[c, i, j])
            sa, sb = s64 * a_c, s64 * b_c
            const = bias[c] - b64 * (a_c * wsum_c - b_c * kh * kw)  # all taps real (interior)
            for y in range(h):
                d1, d2, dst = s1[y], s2[y], out[c, y]
                for xx in range(w):
                    dst[xx] = np.float32(sa * d1[xx] - sb * d2[xx] + const)
            flat1, flat2, plane = s1.reshape(-1), s2.reshape(-1), out[c].reshape(-1)
            for k in range(border.shape[0]):  # border: only the real taps count in Σ q_w and #taps
                p = border[k]
                v = sa * flat1[p] - sb * flat2[p] - b64 * (a_c * border_wsum[c, k] - b_c * border_taps[k])
                plane[p] = np.float32(v + bias[c])
