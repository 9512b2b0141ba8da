"""Fused CPU selective scan (numba): forward and a chunk-checkpointed backward, as a torch autograd Function.

Why it is fast: each parallel work item is one (batch, group, block of channels); inside it the channels of
the block are the innermost, contiguous loop, so every state update ``h = exp(δ·A)·h + δ·u·B`` of 16
channels is one AVX-512 instruction stream. ``exp`` is a hand-written float32 polynomial (error < 1e-7
relative) because the libm call does not vectorize; softplus and sigmoid are built on it. (B, D', L) inputs
are transposed tile by tile (``TILE`` positions at a time in the forward, ``chunk`` in the backward) into
small scratch buffers inside the kernel, so no large copy is made. For a delta with at most 4 values per
sample (a 2-bit quantizer's), ``delta_levels`` lets the kernels look δ and exp(δ·A) up in per-item tables
instead of computing them, with the same float32 results (docs/method.md §2.2); for a delta quantized as it is
read into at most 16 codes, the forward looks δ = softplus(·) up by code (``_code_table``), also exactly.

Why it is lean: the forward keeps hidden states only at chunk starts, (batch, L/chunk, N, D'). The backward
walks the chunks from last to first, recomputes each chunk's states from its saved start state into a
(chunk+1, N, w) buffer, and runs the adjoint recurrence back through it. Memory is O(L·D' + L/chunk·D'·N),
never O(L·D'·N).

Grouped B/C gradients: every block of channels writes its own partial dB/dC, (batch, G, blocks, L, N),
reduced over blocks afterwards in torch, so there are no races and the result is deterministic. Per-channel
sums over time (dA, dD, d delta_bias) accumulate in float64.

Compilation: the kernels take about 13 s to compile on the 2-core development machine the first time;
``cache=True`` stores the machine code under ``__pycache__`` beside this file (or numba's user cache
directory), so later processes load them in well under a second. ``warm_up()`` compiles (or loads) them
explicitly.

Subnormal numbers: each work item runs with the x86 flush-to-zero and denormals-are-zero modes on (restored
when it ends; ``ieee_denormals()`` turns this off, for comparisons). Values below 1.2e-38 then count as 0;
they are 1e-30 or more below any output's scale, and subnormal arithmetic costs ~100 cycles per operation.

Computes in float32 whatever the input dtype (inputs are cast, results cast back).
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
from collections.abc import Iterator

import numpy as np
import torch

from .load_quant import CODE_LEVELS, FIELDS, INFERENCE_ONLY, MAX_LEVELS, LoadQuant

try:  # numba is optional: without it the dispatcher falls back to the chunked PyTorch scan
    import numba
    from llvmlite import ir as _llvm_ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.core.extending import intrinsic
except ImportError:  # pragma: no cover - exercised only on installs without numba
    numba = None

AVAILABLE = numba is not None
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
_FTZ_DAZ = 0x8040  # MXCSR bits: flush-to-zero (bit 15) and denormals-are-zero (bit 6)
_FTZ = [True]  # whether the kernels switch subnormals off (top of the stack; see ``ieee_denormals``)
CHUNK = 64  # positions between saved hidden states
_LANES = 16  # partial sums for the deterministic channel reduction of dB/dC
_SCRATCH_FLOATS = 65536  # per buffer: chunk * N * block width stays about 256 KB (L2-resident)
TILE = 256  # positions per forward tile (see ``_tile``)
LEVELS = MAX_LEVELS  # the most values of delta for which exp(δ·A) is looked up instead of computed

if AVAILABLE:

    @intrinsic
    def _bits_to_f32(typingctx, x):
        """Reinterpret int32 bits as float32 (builds 2**k for the exp below)."""
        sig = types.float32(types.int32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _llvm_ir.FloatType())

        return sig, codegen

    def _mxcsr_call(builder, name, ptr):
        i8p = _llvm_ir.IntType(8).as_pointer()
        fn = builder.module.declare_intrinsic(name, fnty=_llvm_ir.FunctionType(_llvm_ir.VoidType(), [i8p]))
        builder.call(fn, [builder.bitcast(ptr, i8p)])

    @intrinsic
    def _denormals_off(typingctx):
        """Switch the calling thread's x86 SSE unit to flush-to-zero and denormals-are-zero; return the old
        MXCSR word for ``_restore_fp_mode`` (0 and no effect on other CPUs).

        Subnormal float32 values (|v| < 1.2e-38) cost ~100 cycles per operation on x86. The scan's states and
        adjoints only decay where the quantized inputs are zero, and their products with small gates sink
        below that range: with LSQ W2A2 inputs a training step took 1.41x the float step instead of 1.19x
        (``benchmarks/quant_speed.py --denormals-ab``, 1 thread, README). The mode is per thread,
        so every parallel work item sets it and restores the old word before it ends (numba's worker threads
        and the other kernels keep IEEE behaviour)."""
        sig = types.uint32()

        def codegen(context, builder, signature, args):
            i32 = _llvm_ir.IntType(32)
            if not _X86:
                return _llvm_ir.Constant(i32, 0)
            ptr = cgutils.alloca_once(builder, i32)  # in the entry block: no stack growth in loops
            _mxcsr_call(builder, "llvm.x86.sse.stmxcsr", ptr)
            old = builder.load(ptr)
            builder.store(builder.or_(old, _llvm_ir.Constant(i32, _FTZ_DAZ)), ptr)
            _mxcsr_call(builder, "llvm.x86.sse.ldmxcsr", ptr)
            return old

        return sig, codegen

    @intrinsic
    def _restore_fp_mode(typingctx, old):
        """Load back the MXCSR word ``_denormals_off`` returned (no effect on other CPUs)."""
        sig = types.void(types.uint32)

        def codegen(context, builder, signature, args):
            if _X86:
                ptr = cgutils.alloca_once(builder, _llvm_ir.IntType(32))
                builder.store(args[0], ptr)
                _mxcsr_call(builder, "llvm.x86.sse.ldmxcsr", ptr)
            return context.get_dummy_value()

        return sig, codegen

    @njit(inline="always", cache=True, error_model="numpy")
    def _exp(x):
        """float32 exp that LLVM can vectorize: exp(x) = 2**k · p(r), r = x − k·ln2, |r| <= ln2/2."""
        xc = min(max(x, np.float32(-87.3)), np.float32(88.7))
        k = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))
        r = xc - k * np.float32(0.693359375)
        r = r - k * np.float32(-2.12194440e-4)
        p = np.float32(1.0 / 5040.0)
        p = p * r + np.float32(1.0 / 720.0)
        p = p * r + np.float32(1.0 / 120.0)
        p = p * r + np.float32(1.0 / 24.0)
        p = p * r + np.float32(1.0 / 6.0)
        p = p * r + np.float32(0.5)
        p = p * r + np.float32(1.0)
        p = p * r + np.float32(1.0)
        v = p * _bits_to_f32((np.int32(k) + np.int32(127)) << np.int32(23))
        if x < np.float32(-87.3):
            v = np.float32(0.0)
        if x != x:
            v = x
        return v

    @njit(inline="always", cache=True, error_model="numpy")
    def _log1p_small(e):
        """log(1 + e) for 0 <= e <= 1 as 2·atanh(e / (2 + e)), a series that converges fast and vectorizes."""
        s = e / (np.float32(2.0) + e)
        s2 = s * s
        p = np.float32(1.0 / 17.0)
        p = p * s2 + np.float32(1.0 / 15.0)
        p = p * s2 + np.float32(1.0 / 13.0)
        p = p * s2 + np.float32(1.0 / 11.0)
        p = p * s2 + np.float32(1.0 / 9.0)
        p = p * s2 + np.float32(1.0 / 7.0)
        p = p * s2 + np.float32(1.0 / 5.0)
        p = p * s2 + np.float32(1.0 / 3.0)
        p = p * s2 + np.float32(1.0)
        return np.float32(2.0) * s * p

    @njit(inline="always", cache=True, error_model="numpy")
    def _flush(v):
        """v, or 0 when |v| < 1e-30: keeps hidden states and their adjoints out of the subnormal range.

        A state that only decays (zero input, e.g. 2-bit quantized B·u) would otherwise sink into subnormal
        floats, whose arithmetic is many times slower on x86 (a light model's scan ran 1.6x slower with LSQ
        W2A2 inputs); the values flushed are 1e-29 or more below the outputs' scale.
        """
        return v if abs(v) >= np.float32(1e-30) else np.float32(0.0)

    @njit(inline="always", cache=True, error_model="numpy")
    def _sigmoid(x):
        e = _exp(-abs(x))
        inv = np.float32(1.0) / (np.float32(1.0) + e)
        return inv if x >= np.float32(0.0) else e * inv

    @njit(inline="always", cache=True, error_model="numpy")
    def _fake_quant(x, s, off, lo, hi, qn, qp):
        """min(max(s·rint(min(max((x + off)/s, qn), qp)) − off, lo), hi): the float32 operations of the fused
        quantizers' affine map (``qmambair.quant.kernels.affine_forward``), so the values agree to the bit."""
        t = min(max((x + off) / s, qn), qp)
        return min(max(s * np.rint(t) - off, lo), hi)

    @njit(inline="always", cache=True, error_model="numpy")
    def _softplus_and_slope(x):
        """(softplus(x), sigmoid(x)) = (max(x, 0) + log(1 + e), its derivative), e = exp(−|x|)."""
        e = _exp(-abs(x))
        inv = np.float32(1.0) / (np.float32(1.0) + e)
        return max(x, np.float32(0.0)) + _log1p_small(e), (inv if x >= np.float32(0.0) else e * inv)

    @njit(inline="always", cache=True, error_model="numpy")
    def _softplus(x):
        """softplus(x) alone, with the operations of ``_softplus_and_slope`` (the same value, to the bit)."""
        return max(x, np.float32(0.0)) + _log1p_small(_exp(-abs(x)))

    @njit(cache=True, error_model="numpy")
    def _load_delta(delta, bias, b, d0, w, t0, T, softplus, slope, dl, sg, q, lev, codes, dlt, sgt):
        """Tile of δ = softplus(delta + bias) (or delta + bias), transposed to (T, w); with ``slope``, sg =
        dδ/d(delta) (the backward's; the forward has no use for it).

        ``q`` (batch, 6) = (s, offset, lo, hi, qn, qp) per batch element fake-quantizes delta as it is read;
        an empty ``q`` reads it as it is. ``lev`` (batch, LEVELS): when not empty, the values delta (after q)
        is expected to take, and ``dlt`` / ``sgt`` (LEVELS, w) their δ and sg (``_level_tables``): if every
        value of the tile is one of them, codes[i, j] = its index and δ, sg are looked up. Returns how many
        values of the tile are none of them (0: looked up, codes valid), or −1 without ``lev``."""
        misses = -1
        if lev.shape[0] > 0 or q.shape[0] > 0:
            _load_tile_quant(delta, b, d0, w, t0, T, dl, q)
            if lev.shape[0] > 0:
                misses = _match_levels(dl, T, w, lev[b], codes)
                if misses == 0:
                    for i in range(T):
                        crow = codes[i]
                        for j in range(w):
                            dl[i, j] = _pick(crow[j], dlt[0, j], dlt[1, j], dlt[2, j], dlt[3, j])
                    if slope:
                        for i in range(T):
                            crow = codes[i]
                            for j in range(w):
                                sg[i, j] = _pick(crow[j], sgt[0, j], sgt[1, j], sgt[2, j], sgt[3, j])
                    return misses
            for i in range(T):
                for j in range(w):
                    dl[i, j] += bias[d0 + j]
        else:
            for j in range(w):
                bj = bias[d0 + j]
                for i in range(T):
                    dl[i, j] = delta[b, d0 + j, t0 + i] + bj
        if softplus and slope:
            for i in range(T):
                for j in range(w):
                    value, grad = _softplus_and_slope(dl[i, j])
                    dl[i, j] = value
                    sg[i, j] = grad
        elif softplus:
            for i in range(T):
                for j in range(w):
                    dl[i, j] = _softplus(dl[i, j])
        elif slope:
            for i in range(T):
                for j in range(w):
                    sg[i, j] = np.float32(1.0)
        return misses

    @njit(cache=True, error_model="numpy")
    def _code_table(dq, b, lev, bias, d0, w, softplus):
        """For a delta fake-quantized as it is read with q = dq[b] = (s, offset, lo, hi, qn, qp) into at most
        CODE_LEVELS values, without a ``lev`` table, and with softplus:
        table[k, j] = softplus(min(max(s·(qn + k) − offset, lo), hi) + bias[d0 + j]), the δ of code qn + k
        in channel d0 + j, with the float32 operations of ``_load_tile_quant`` and ``_load_delta`` (s·rint(t)
        is s·(qn + k) for the code qn + k), so a value looked up equals the one computed, to the bit.
        Otherwise an empty (0, w) table: δ is computed."""
        n = 0
        if dq.shape[0] > 0 and lev.shape[0] == 0 and softplus:
            n = np.int64(dq[b, 5] - dq[b, 4]) + 1
            n = n if 1 <= n <= CODE_LEVELS else 0
        table = np.empty((n, w), np.float32)
        if n == 0:
            return table
        s, off, lo, hi, qn = dq[b, 0], dq[b, 1], dq[b, 2], dq[b, 3], dq[b, 4]
        for k in range(n):
            v = min(max(s * (qn + np.float32(k)) - off, lo), hi)
            for j in range(w):
                table[k, j] = _softplus(v + bias[d0 + j])
        return table

    @njit(cache=True, error_model="numpy")
    def _load_delta_coded(delta, b, d0, w, t0, T, q, table, dl, codes):
        """Tile of δ transposed to (T, w) through ``_code_table``: each value's code
        rint(min(max((x + offset)/s, qn), qp)) − qn, computed as ``_fake_quant`` does, then δ looked up.
        Returns False, and leaves the tile to ``_load_delta``, when it holds a NaN (no code)."""
        _load_tile(delta, b, d0, w, t0, T, dl)
        s, off, qn, qp = q[0], q[1], q[4], q[5]
        top = np.int32(table.shape[0] - 1)
        nans = np.int32(0)
        for i in range(T):
            row, crow = dl[i], codes[i]
            for j in range(w):
                x = row[j]
                code = np.int32(np.rint(min(max((x + off) / s, qn), qp)) - qn)
                crow[j] = min(max(code, np.int32(0)), top)
                nans += np.int32(x != x)
        if nans > 0:
            return False
        for i in range(T):
            row, crow = dl[i], codes[i]
            for j in range(w):
                row[j] = table[crow[j], j]
        return True

    @njit(cache=True, error_model="numpy")
    def _match_levels(dl, T, w, lev, codes):
        """codes[i, j] = k where dl[i, j] == lev[k] (k < 4); returns the number of values equal to none."""
        l0, l1, l2, l3 = lev[0], lev[1], lev[2], lev[3]
        misses = 0
        for i in range(T):
            row = dl[i]
            crow = codes[i]
            for j in range(w):
                v = row[j]
                c = np.int32(0)
                c = np.int32(1) if v == l1 else c
                c = np.int32(2) if v == l2 else c
                c = np.int32(3) if v == l3 else c
                crow[j] = c
                hit = (v == l0) | (v == l1) | (v == l2) | (v == l3)
                misses += np.int32(0) if hit else np.int32(1)
        return misses

    @njit(cache=True, error_model="numpy")
    def _level_tables(lev, bias, d0, w, a_blk, softplus, dlt, sgt, tab):
        """For each level k of delta: dlt[k, j] = δ = softplus(lev[k] + bias[d0 + j]) (or without softplus),
        sgt[k, j] its slope, tab[n, k, j] = exp(δ·A[n, j]), each with the float32 operations of
        ``_load_delta`` and the scan loop, so a value looked up equals the one computed, to the bit."""
        N = a_blk.shape[0]
        for k in range(LEVELS):
            for j in range(w):
                x = lev[k] + bias[d0 + j]
                slope = np.float32(1.0)
                if softplus:
                    x, slope = _softplus_and_slope(x)
                dlt[k, j] = x
                sgt[k, j] = slope
                for n in range(N):
                    tab[n, k, j] = _exp(x * a_blk[n, j])

    @njit(cache=True, error_model="numpy")
    def _item_constants(At, bias, lev, b, d0, w, softplus):
        """A work item's A block (N, w) and, with levels, its level tables (``_level_tables``)."""
        N = At.shape[0]
        a_blk = np.empty((N, w), np.float32)
        for n in range(N):
            for j in range(w):
                a_blk[n, j] = At[n, d0 + j]
        tab = np.empty((N, LEVELS, w), np.float32)
        dlt = np.empty((LEVELS, w), np.float32)
        sgt = np.empty((LEVELS, w), np.float32)
        if lev.shape[0] > 0:
            _level_tables(lev[b], bias, d0, w, a_blk, softplus, dlt, sgt, tab)
        return a_blk, dlt, sgt, tab

    @njit(inline="always", cache=True, error_model="numpy")
    def _pick(c, x0, x1, x2, x3):
        """x_c for c in 0..3, as two levels of selects (vectorizes; a table index would not)."""
        odd = (c & np.int32(1)) != np.int32(0)
        low = x1 if odd else x0
        high = x3 if odd else x2
        return high if (c & np.int32(2)) != np.int32(0) else low

    @njit(cache=True, error_model="numpy")
    def _load_tile(src, b, d0, w, t0, T, dst):
        """dst[i, j] = src[b, d0 + j, t0 + i]: a (channels, time) slab transposed to (time, channels)."""
        for j in range(w):
            for i in range(T):
                dst[i, j] = src[b, d0 + j, t0 + i]

    @njit(cache=True, error_model="numpy")
    def _load_tile_quant(src, b, d0, w, t0, T, dst, q):
        """``_load_tile``, then (q not empty) each value fake-quantized with q[b] = (s, offset, lo, hi, qn,
        qp), in a second loop over the contiguous tile so that it vectorizes."""
        _load_tile(src, b, d0, w, t0, T, dst)
        if q.shape[0] == 0:
            return
        s, off, lo, hi, qn, qp = q[b, 0], q[b, 1], q[b, 2], q[b, 3], q[b, 4], q[b, 5]
        for i in range(T):
            row = dst[i]
            for j in range(w):
                row[j] = _fake_quant(row[j], s, off, lo, hi, qn, qp)

    @njit(cache=True, error_model="numpy")
    def _store_tile(src, dst, b, d0, w, t0, T):
        """dst[b, d0 + j, t0 + i] = src[i, j]."""
        for j in range(w):
            for i in range(T):
                dst[b, d0 + j, t0 + i] = src[i, j]

    @njit(cache=True, error_model="numpy")
    def _decay_row(dlrow, a_blk, out, w):
        """out[n, j] = exp(dlrow[j]·a_blk[n, j]): one position's decays, computed."""
        for n in range(a_blk.shape[0]):
            arow = a_blk[n]
            orow = out[n]
            for j in range(w):
                orow[j] = _exp(dlrow[j] * arow[j])

    @njit(cache=True, error_model="numpy")
    def _pick_row(crow, tab_n, out, w):
        """out[j] = tab_n[crow[j], j]: one position's decays from the level table."""
        t0row, t1row, t2row, t3row = tab_n[0], tab_n[1], tab_n[2], tab_n[3]
        for j in range(w):
            out[j] = _pick(crow[j], t0row[j], t1row[j], t2row[j], t3row[j])

    @njit(cache=True, error_model="numpy")
    def _save_state(hs, h, b, c, d0):
        """hs[b, c, n, d0 + j] = h[n, j]: the state at the start of chunk c, kept for the backward."""
        N, w = h.shape
        for n in range(N):
            for j in range(w):
                hs[b, c, n, d0 + j] = h[n, j]

    @njit(inline="always", cache=True, error_model="numpy")
    def _lanesum(row, wpad):
        """Sum of row[:wpad] (wpad a multiple of 16) in a fixed order: 16 partial sums held in scalars,
        which LLVM packs into one vector register, then a fixed tree. No float reassociation needed."""
        s0, s1, s2, s3, s4, s5, s6, s7 = row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7]
        s8, s9, s10, s11, s12, s13, s14, s15 = (
            row[8],
            row[9],
            row[10],
            row[11],
            row[12],
            row[13],
            row[14],
            row[15],
        )
        for k in range(_LANES, wpad, _LANES):
            s0, s1, s2, s3 = s0 + row[k], s1 + row[k + 1], s2 + row[k + 2], s3 + row[k + 3]
            s4, s5, s6, s7 = s4 + row[k + 4], s5 + row[k + 5], s6 + row[k + 6], s7 + row[k + 7]
            s8, s9, s10, s11 = s8 + row[k + 8], s9 + row[k + 9], s10 + row[k + 10], s11 + row[k + 11]
            s12, s13, s14, s15 = s12 + row[k + 12], s13 + row[k + 13], s14 + row[k + 14], s15 + row[k + 15]
        s0, s1, s2, s3 = (
            (s0 + s8) + (s4 + s12),
            (s1 + s9) + (s5 + s13),
            (s2 + s10) + (s6 + s14),
            (s3 + s11) + (s7 + s15),
        )
        return (s0 + s2) + (s1 + s3)

    @njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
    def _scan_fwd(
        u, delta, At, Bt, Ct, Dv, bias, z, out, hs, hlast, softplus, has_z, save, width, chunk, tile,
        uq, dq, lev, looked, coded, ftz,
    ):  # fmt: skip
        """Forward over items (batch, group, channel block), ``tile`` positions at a time (a multiple of
        ``chunk``). Writes out, hlast and (if save) hs[b, c] = state at the start of chunk c. ``uq`` / ``dq``:
        fake quantization of u / delta as they are read (``_load_tile_quant``; empty: none). ``lev``: the
        values delta takes (``_load_delta``; empty: none); a tile whose every value is one of them looks its
        δ and decays up in ``_level_tables`` instead of computing them, with the same result; ``looked[item]``
        counts those tiles. A delta quantized by ``dq`` into at most CODE_LEVELS values (and no ``lev``) has
        its δ looked up by code instead (``_code_table``, the same result); ``coded[item]`` counts those
        tiles."""
        nb, dp, L = u.shape
        N = At.shape[0]
        G = Bt.shape[1]
        dg = dp // G
        nblk = (dg + width - 1) // width
        for item in prange(nb * G * nblk):
            fp_mode = _denormals_off() if ftz else np.uint32(0)
            b = item // (G * nblk)
            g = (item // nblk) % G
            d0 = g * dg + (item % nblk) * width
            w = min(width, g * dg + dg - d0)
            a_blk, dlt, sgt, tab = _item_constants(At, bias, lev, b, d0, w, softplus)
            coded_table = _code_table(dq, b, lev, bias, d0, w, softplus)
            codes = np.empty((tile, w), np.int32)
            h = np.zeros((N, w), np.float32)
            dl = np.empty((tile, w), np.float32)
            sg = np.empty((tile, w), np.float32)
            uu = np.empty((tile, w), np.float32)
            du = np.empty((tile, w), np.float32)
            y = np.empty((tile, w), np.float32)
            for t0 in range(0, L, tile):
                T = min(tile, L - t0)
                by_code = coded_table.shape[0] > 0
                if by_code and _load_delta_coded(delta, b, d0, w, t0, T, dq[b], coded_table, dl, codes):
                    misses = -1  # δ looked up by code; the decays are computed
                    coded[item] += 1
                else:
                    misses = _load_delta(
                        delta, bias, b, d0, w, t0, T, softplus, False, dl, sg, dq, lev, codes, dlt, sgt
                    )
                looked[item] += 1 if misses == 0 else 0
                _load_tile_quant(u, b, d0, w, t0, T, uu, uq)
                for i in range(T):
                    for j in range(w):
                        du[i, j] = dl[i, j] * uu[i, j]
                        y[i, j] = Dv[d0 + j] * uu[i, j]
                # the state loop twice, looked up or computed: a choice inside it would stop it vectorizing
                if misses == 0:  # every decay of the tile is in the table
                    for i in range(T):
                        if save and (t0 + i) % chunk == 0:
                            _save_state(hs, h, b, (t0 + i) // chunk, d0)
                        crow = codes[i]
                        for n in range(N):
                            bn = Bt[b, g, t0 + i, n]
                            cn = Ct[b, g, t0 + i, n]
                            hrow = h[n]
                            yrow = y[i]
                            durow = du[i]
                            t0row, t1row, t2row, t3row = tab[n, 0], tab[n, 1], tab[n, 2], tab[n, 3]
                            for j in range(w):
                                a = _pick(crow[j], t0row[j], t1row[j], t2row[j], t3row[j])
                                hv = _flush(a * hrow[j] + durow[j] * bn)
                                hrow[j] = hv
                                yrow[j] += cn * hv
                else:
                    for i in range(T):
                        if save and (t0 + i) % chunk == 0:
                            _save_state(hs, h, b, (t0 + i) // chunk, d0)
                        for n in range(N):
                            bn = Bt[b, g, t0 + i, n]
                            cn = Ct[b, g, t0 + i, n]
                            hrow = h[n]
                            arow = a_blk[n]
                            yrow = y[i]
                            dlrow = dl[i]
                            durow = du[i]
                            for j in range(w):
                                hv = _flush(_exp(dlrow[j] * arow[j]) * hrow[j] + durow[j] * bn)
                                hrow[j] = hv
                                yrow[j] += cn * hv
                if has_z:
                    _load_tile(z, b, d0, w, t0, T, uu)
                    for i in range(T):
                        for j in range(w):
                            zv = uu[i, j]
                            y[i, j] *= zv * _sigmoid(zv)
                _store_tile(y, out, b, d0, w, t0, T)
            for n in range(N):
                for j in range(w):
                    hlast[b, n, d0 + j] = h[n, j]
            if ftz:
                _restore_fp_mode(fp_mode)

    @njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
    def _scan_bwd(
        u, delta, At, Bt, Ct, Dv, bias, z, dout, hs, softplus, has_z, width, chunk, lev, looked, ftz,
        du_out, ddelta_out, dz_out, dA_out, dD_out, dbias_out, dB_part, dC_part,
    ):  # fmt: skip
        """Backward over the items of ``_scan_fwd``, chunks last to first, recomputing each chunk's states
        (their decays looked up as in the forward where ``lev`` covers the tile).

        dA_out, dD_out, dbias_out are float64 per batch element; dB_part/dC_part are per channel block."""
        nb, dp, L = u.shape
        N = At.shape[0]
        G = Bt.shape[1]
        dg = dp // G
        nblk = (dg + width - 1) // width
        nchunks = (L + chunk - 1) // chunk
        for item in prange(nb * G * nblk):
            fp_mode = _denormals_off() if ftz else np.uint32(0)
            b = item // (G * nblk)
            g = (item // nblk) % G
            blk = item % nblk
            d0 = g * dg + blk * width
            w = min(width, g * dg + dg - d0)
            wpad = (w + _LANES - 1) // _LANES * _LANES
            a_blk, dlt, sgt, tab = _item_constants(At, bias, lev, b, d0, w, softplus)
            codes = np.empty((chunk, w), np.int32)
            hbuf = np.empty((chunk + 1, N, w), np.float32)  # hbuf[i] = state before step i of the chunk
            abuf = np.empty((chunk, N, w), np.float32)  # exp(δ·A) of each step
            carry = np.zeros((N, w), np.float32)  # exp(δ_{t+1}·A) · g_{t+1}
            da_c = np.zeros((N, w), np.float32)
            da_tot = np.zeros((N, w), np.float64)
            dl = np.empty((chunk, w), np.float32)
            sg = np.empty((chunk, w), np.float32)
            uu = np.empty((chunk, w), np.float32)
            du = np.empty((chunk, w), np.float32)
            dy = np.empty((chunk, w), np.float32)
            zt = np.empty((chunk, w), np.float32)
            gdl = np.empty((chunk, w), np.float32)  # dL/dδ
            gu = np.empty((chunk, w), np.float32)  # dL/du
            rowb = np.zeros(wpad, np.float32)
            rowc = np.zeros(wpad, np.float32)
            dd_tot = np.zeros(w, np.float64)
            db_tot = np.zeros(w, np.float64)
            no_quant = np.empty((0, 6), np.float32)
            for c in range(nchunks - 1, -1, -1):
                t0 = c * chunk
                T = min(chunk, L - t0)
                misses = _load_delta(
                    delta, bias, b, d0, w, t0, T, softplus, True, dl, sg, no_quant, lev, codes, dlt, sgt
                )
                looked[item] += 1 if misses == 0 else 0
                _load_tile(u, b, d0, w, t0, T, uu)
                _load_tile(dout, b, d0, w, t0, T, dy)
                for i in range(T):
                    for j in range(w):
                        du[i, j] = dl[i, j] * uu[i, j]
                        gdl[i, j] = np.float32(0.0)
                        gu[i, j] = np.float32(0.0)
                for n in range(N):
                    for j in range(w):
                        hbuf[0, n, j] = hs[b, c, n, d0 + j]
                # the chunk's decays exp(δ·A), looked up or computed, then its states (and y, needed for dz)
                for i in range(T):
                    if misses == 0:
                        for n in range(N):
                            _pick_row(codes[i], tab[n], abuf[i, n], w)
                    else:
                        _decay_row(dl[i], a_blk, abuf[i], w)
                for i in range(T):
                    if has_z:
                        for j in range(w):
                            zt[i, j] = Dv[d0 + j] * uu[i, j]
                    for n in range(N):
                        bn = Bt[b, g, t0 + i, n]
                        cn = Ct[b, g, t0 + i, n]
                        hprev = hbuf[i, n]
                        hnext = hbuf[i + 1, n]
                        arow = abuf[i, n]
                        durow = du[i]
                        for j in range(w):
                            hnext[j] = _flush(arow[j] * hprev[j] + durow[j] * bn)
                        if has_z:
                            yrow = zt[i]
                            for j in range(w):
                                yrow[j] += cn * hnext[j]
                if has_z:  # zt holds y; turn it into dz and dout into dy = dout·silu(z)
                    _load_tile(z, b, d0, w, t0, T, gu)
                    for i in range(T):
                        for j in range(w):
                            zv = gu[i, j]
                            s = _sigmoid(zv)
                            go = dy[i, j]
                            dy[i, j] = go * zv * s
                            zt[i, j] = go * zt[i, j] * s * (np.float32(1.0) + zv * (np.float32(1.0) - s))
                            gu[i, j] = np.float32(0.0)
                    _store_tile(zt, dz_out, b, d0, w, t0, T)
                # adjoint recurrence back through the chunk
                for i in range(T - 1, -1, -1):
                    dlrow = dl[i]
                    durow = du[i]
                    uurow = uu[i]
                    dyrow = dy[i]
                    gdlrow = gdl[i]
                    gurow = gu[i]
                    for n in range(N):
                        bn = Bt[b, g, t0 + i, n]
                        cn = Ct[b, g, t0 + i, n]
                        hprev = hbuf[i, n]
                        hnext = hbuf[i + 1, n]
                        arow = abuf[i, n]
                        ablk = a_blk[n]
                        crow = carry[n]
                        darow = da_c[n]
                        for j in range(w):
                            gh = dyrow[j] * cn + crow[j]
                            a = arow[j]
                            ga = gh * hprev[j] * a
                            rowc[j] = dyrow[j] * hnext[j]
                            rowb[j] = gh * durow[j]
                            darow[j] += ga * dlrow[j]
                            gb = gh * bn
                            gdlrow[j] += ga * ablk[j] + gb * uurow[j]
                            gurow[j] += gb * dlrow[j]
                            crow[j] = _flush(a * gh)
                        dB_part[b, g, blk, t0 + i, n] = _lanesum(rowb, wpad)
                        dC_part[b, g, blk, t0 + i, n] = _lanesum(rowc, wpad)
                for n in range(N):
                    for j in range(w):
                        da_tot[n, j] += da_c[n, j]
                        da_c[n, j] = np.float32(0.0)
                for i in range(T):
                    for j in range(w):
                        gy = dy[i, j]
                        gu[i, j] += gy * Dv[d0 + j]
                        dd_tot[j] += gy * uu[i, j]
                        gdl[i, j] *= sg[i, j]
                        db_tot[j] += gdl[i, j]
                _store_tile(gu, du_out, b, d0, w, t0, T)
                _store_tile(gdl, ddelta_out, b, d0, w, t0, T)
            for j in range(w):
                dD_out[b, d0 + j] = dd_tot[j]
                dbias_out[b, d0 + j] = db_tot[j]
                for n in range(N):
                    dA_out[b, n, d0 + j] = da_tot[n, j]
            if ftz:
                _restore_fp_mode(fp_mode)


@contextlib.contextmanager
def ieee_denormals() -> Iterator[None]:
    """Inside the block the scan kernels keep IEEE subnormal arithmetic (the module docstring): for tests and
    for timing what the flush-to-zero mode saves."""
    _FTZ.append(False)
    try:
        yield
    finally:
        _FTZ.pop()


_NO_LEVELS = np.empty((0, LEVELS), np.float32)
_LOOKUPS: dict[str, tuple[int, int]] = {}


def _record_lookups(kernel: str, looked: np.ndarray, tiles_per_item: int) -> None:
    _LOOKUPS[kernel] = (int(looked.sum()), looked.size * tiles_per_item)


def decay_lookups() -> dict[str, tuple[int, int]]:
    """For the last forward and the last backward kernel call: (tiles whose decays were looked up in the
    level table, tiles). For tests and benchmarks: the table is a speed path with the same results."""
    return {kernel: _LOOKUPS[kernel] for kernel in ("forward", "backward") if kernel in _LOOKUPS}


def delta_code_lookups() -> tuple[int, int]:
    """For the last forward kernel call: (tiles whose δ was looked up by its quantization code
    (``_code_table``), tiles); (0, 0) before any call. For tests and benchmarks, like ``decay_lookups``."""
    return _LOOKUPS.get("forward δ by code", (0, 0))


def _tile(chunk: int) -> int:
    """Positions per forward tile: the largest multiple of ``chunk`` up to TILE (at least ``chunk``).

    The kernels transpose (channels, time) inputs tile by tile; each tile reads ``tile`` consecutive floats
    from each of its channels' rows, which lie a whole sequence apart in memory, and with 64 the
    hardware prefetchers do not keep up: the forward reads 4-5x faster in tiles of 256."""
    return max(chunk, TILE // chunk * chunk)


def _level_rows(levels: torch.Tensor, batch: int) -> np.ndarray:
    """``delta_levels`` as the kernels read it: (batch, LEVELS) float32, short rows padded with their last
    value (a repeated level looks up the same decay)."""
    lev = levels.detach().to(device="cpu", dtype=torch.float32)
    if lev.dim() != 2 or lev.shape[0] not in (1, batch) or not 1 <= lev.shape[1] <= LEVELS:
        raise ValueError(f"delta_levels must have shape (batch or 1, 1..{LEVELS}), got {tuple(lev.shape)}")
    pad = lev[:, -1:].expand(-1, LEVELS - lev.shape[1])
    return np.ascontiguousarray(torch.cat([lev, pad], 1).expand(batch, -1).numpy())


def _block_width(batch: int, groups: int, per_group: int, n_state: int, chunk: int) -> int:
    """Channels per work item: small enough that the backward's buffers stay in L2, and enough items to keep
    every numba thread busy."""
    cap = max(_LANES, _SCRATCH_FLOATS // max(1, chunk * n_state) // _LANES * _LANES)
    nblk = max(1, math.ceil(per_group / cap))
    threads = numba.get_num_threads() if AVAILABLE else 1
    while batch * groups * nblk < threads and math.ceil(per_group / (nblk + 1)) >= _LANES:
        nblk += 1
    return math.ceil(per_group / nblk)


def _forward(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, save, chunk, u_quant=None, delta_quant=None, lev=None
):
    """Run ``_scan_fwd``: (out, hlast) in float32, the float32 inputs it read, hs and the block width.
    ``lev``: the (batch, LEVELS) float32 array of ``_level_rows``, or None."""
    nb, dp, L = u.shape
    G, N = B.shape[1], A.shape[1]
    if dp % G:
        raise ValueError(f"{dp} channels cannot be split into {G} groups")
    width = _block_width(nb, G, dp // G, N, chunk)
    f32 = torch.float32
    u32 = u.detach().to(f32).contiguous()
    d32 = delta.detach().to(f32).contiguous()
    at = A.detach().to(f32).t().contiguous()
    bt = B.detach().to(f32).transpose(2, 3).contiguous()
    ct = C.detach().to(f32).transpose(2, 3).contiguous()
    dv = D.detach().to(f32).contiguous() if D is not None else u32.new_zeros(dp)
    bias = delta_bias.detach().to(f32).contiguous() if delta_bias is not None else u32.new_zeros(dp)
    z32 = z.detach().to(f32).contiguous() if z is not None else u32.new_zeros(1, 1, 1)
    nchunks = (L + chunk - 1) // chunk
    hs = u32.new_empty(nb, nchunks, N, dp) if save else u32.new_empty(1, 1, 1, 1)
    out = torch.empty_like(u32)
    hlast = u32.new_empty(nb, N, dp)
    uq, dq = (np.empty((0, FIELDS), np.float32) if q is None else q.rows(nb) for q in (u_quant, delta_quant))
    lev = _NO_LEVELS if lev is None else lev
    looked = np.zeros(nb * G * math.ceil(dp // G / width), np.int64)
    coded = np.zeros_like(looked)
    tile = _tile(chunk)
    _scan_fwd(
        u32.numpy(), d32.numpy(), at.numpy(), bt.numpy(), ct.numpy(), dv.numpy(), bias.numpy(),
        z32.numpy(), out.numpy(), hs.numpy(), hlast.numpy(),
        bool(delta_softplus), z is not None, save, width, chunk, tile, uq, dq, lev, looked, coded, _FTZ[-1],
    )  # fmt: skip
    _record_lookups("forward", looked, math.ceil(L / tile))
    _record_lookups("forward δ by code", coded, math.ceil(L / tile))
    return out, hlast, (u32, d32, at, bt, ct, dv, bias, z32, hs), width


class FusedSelectiveScan(torch.autograd.Function):
    """autograd Function around the numba kernels; see the module docstring."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, save, chunk, lev):
        args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, save, chunk)
        out, hlast, inputs, width = _forward(*args, lev=lev)
        if save:
            ctx.save_for_backward(*inputs)
            ctx.lev = lev
            G = B.shape[1]
            ctx.meta = (delta_softplus, z is not None, width, chunk, G, D is not None, delta_bias is not None)
            ctx.dtypes = (u.dtype, delta.dtype, A.dtype, B.dtype, C.dtype)
        out = out.to(u.dtype)
        last = hlast.transpose(1, 2).to(u.dtype)
        ctx.mark_non_differentiable(last)
        return out, last

    @staticmethod
    def backward(ctx, dout, _dlast):
        u32, d32, at, bt, ct, dv, bias, z32, hs = ctx.saved_tensors
        softplus, has_z, width, chunk, G, has_d, has_bias = ctx.meta
        nb, dp, L = u32.shape
        N = at.shape[0]
        nblk = math.ceil((dp // G) / width)
        g32 = dout.detach().to(torch.float32).contiguous()
        du = torch.empty_like(u32)
        ddelta = torch.empty_like(u32)
        dz = torch.empty_like(u32) if has_z else u32.new_empty(1, 1, 1)
        f64 = torch.float64
        dA = torch.empty(nb, N, dp, dtype=f64)
        dD = torch.empty(nb, dp, dtype=f64)
        dbias = torch.empty(nb, dp, dtype=f64)
        dB_part = u32.new_empty(nb, G, nblk, L, N)
        dC_part = u32.new_empty(nb, G, nblk, L, N)
        looked = np.zeros(nb * G * nblk, np.int64)
        _scan_bwd(
            u32.numpy(), d32.numpy(), at.numpy(), bt.numpy(), ct.numpy(), dv.numpy(), bias.numpy(),
            z32.numpy(), g32.numpy(), hs.numpy(), softplus, has_z, width, chunk,
            _NO_LEVELS if ctx.lev is None else ctx.lev, looked, _FTZ[-1],
            du.numpy(), ddelta.numpy(), dz.numpy(), dA.numpy(), dD.numpy(), dbias.numpy(),
            dB_part.numpy(), dC_part.numpy(),
        )  # fmt: skip
        _record_lookups("backward", looked, math.ceil(L / chunk))
        tu, tdelta, tA, tB, tC = ctx.dtypes
        dB = dB_part.sum(2).transpose(2, 3).to(tB)
        dC = dC_part.sum(2).transpose(2, 3).to(tC)
        grad_A = dA.sum(0).t().to(tA)
        grad_D = dD.sum(0).to(dv.dtype) if has_d else None
        grad_bias = dbias.sum(0).to(bias.dtype) if has_bias else None
        grad_z = dz.to(tu) if has_z else None
        return du.to(tu), ddelta.to(tdelta), grad_A, dB, dC, grad_D, grad_z, grad_bias, None, None, None, None


def selective_scan_cpu(
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
    u_quant: LoadQuant | None = None,
    delta_quant: LoadQuant | None = None,
    delta_levels: torch.Tensor | None = None,
):
    """Fused numba scan with mamba_ssm's ``selective_scan_fn`` semantics (B, C: (batch, G, N, L)).

    ``u_quant`` / ``delta_quant`` fake-quantize u / delta as the kernel reads them (inference only; see
    ``load_quant``): the result equals scanning the fake-quantized tensors, without writing them.
    ``delta_levels`` (batch or 1, k ≤ 4): the values each sample's delta takes (after ``delta_quant``, before
    delta_bias), e.g. those of a 2-bit quantizer; a hint only, the result is the same with it or without
    it: where every value of a tile is one of them, the decays exp(δ·A) are looked up in a table of the k
    levels instead of computed (docs/method.md §2.2). Training and inference alike."""
    if not AVAILABLE:
        raise RuntimeError("the 'cpu' scan backend needs numba (pip install numba); use backend='chunked'")
    if B.dim() != 4 or C.dim() != 4:
        raise ValueError("the fused CPU scan takes grouped B and C of shape (batch, groups, N, L)")
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    lev = None if delta_levels is None else _level_rows(delta_levels, u.shape[0])
    if u_quant is None and delta_quant is None:
        out, last = FusedSelectiveScan.apply(*tensors, bool(delta_softplus), save, int(chunk), lev)
        return (out, last) if return_last_state else out
    if save:
        raise ValueError(INFERENCE_ONLY)
    args = (*tensors, bool(delta_softplus), False, int(chunk), u_quant, delta_quant, lev)
    out, hlast, _, _ = _forward(*args)
    out = out.to(u.dtype)
    return (out, hlast.transpose(1, 2).to(u.dtype)) if return_last_state else out


def warm_up() -> float:
    """Compile (or load from the on-disk cache) both kernels on a tiny problem; returns the seconds taken."""
    start = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, 2, 3, generator=g, requires_grad=True)
    B = torch.randn(1, 1, 2, 3, generator=g)
    out = selective_scan_cpu(
        u, torch.rand(1, 2, 3, generator=g), -torch.ones(2, 2), B, B, z=torch.randn(1, 2, 3)
    )
    out.sum().backward()
    return time.perf_counter() - start
