"""Triton kernels of the `cuda` backend, and the Python launchers that size their grids.

Portable Triton only (no inline assembly), so Triton's AMD backend can compile them too. Conventions:

- Ternary weights are repacked at load into paired-row int32 words (``TernaryLayout``): one word holds two
  rows' codes (t + 1) for 8 inputs, row A's in the low 16 bits and row B's in the high 16, so one integer
  multiply-add covers both rows; tiles of PAIR_TILE pairs are contiguous. Scales are float32 ``[C, out]``
  (one row per input-column group).
- int8 activations: per-token absmax, ``s = 127 / max(|x|, 1e-5)``, ``q = round_half_even(x s)`` clamped to
  [-128, 127], exactly ``numpy_ref.act_quant``. Dot products accumulate in int32 (integer-exact against the
  reference: ``sum((code - 1) q) = sum(code q) - sum(q)``) and one float rescale ``acc / s * scale`` follows.
  The scale s and the norm's mean are ``tl.div_rn``: Triton's float32 ``/`` is ``div.full.f32`` on NVIDIA (up to 2
  ulp off), and an ulp in s moves a rounding tie of the quantization. Per element (x / rstd, acc / s) it stays
  ``/``, whose ulps fall under every bar: ``div_rn`` in every division made a bitnet-2b4t decode step 1054 ->
  1399 us (H200); in s and the mean alone it costs ~4 us.
- KV caches are float16 ``[layers, 2, max_len, Hkv, D]`` per sequence; batched decode kernels find each
  sequence's cache through a table of base addresses, so one CUDA graph serves any set of sequences.

Kernel families: ternary ``tgemv`` (1-4 tokens: GEMV_MAX_TOKENS; CUDA cores, RMSNorm + quantization once per
program in its prologue for one token and a grid of <= 2 programs per SM, else ``norm_quant`` first and int8
input: PROLOGUE_*; residual add, gated activation or RoPE + KV append in its epilogue) and ``tgemm``
(more tokens: the same words unpacked for tensor-core ``tl.dot``; ``tgemm_few`` for FEW_MIN..FEW_MAX tokens,
from FEW_DEEP_MIN for matrices of FEW_DEEP_K inputs or more: read as bytes, four codes per op, split over K, with
the gemv's residual and gated-activation epilogues);
dense ``gemv`` / ``gemm`` (the lm_head; the int8 head on the tensor cores at any token count); ``norm_quant``;
split-KV decode attention (CUDA-core FMAs, 16-byte vector loads of the cache; a softmax state per warp in
splits of ATTN_WARP_STATES_MIN_BLOCKS blocks or more) + merge, and sequences of at most ATTN_SHORT_MAX positions
taken whole (no merge); causal prefill attention;
RoPE; embedding gather. Every kernel takes a GDC flag: launched with programmatic dependent launch (``PDL``), it
waits for its producer in ``_after_producers``, and what it does before that (the gemv: its whole weight tile and
norm weight; with EARLY, the decode step's position / length / cache tables: ``EARLY_TABLES``) reads no kernel's
output.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# constexpr selectors
W_TERNARY, W_INT8, W_FLOAT = 0, 1, 2
EPI_STORE, EPI_RESIDUAL, EPI_GLU, EPI_QKV = 0, 1, 2, 3
ACT_RELU2, ACT_SILU = 0, 1
# argmax keys (see _argmax_update): the low 32 bits' mask (the column field) and the key no logit gives
ARGMAX_COLS = 0xFFFFFFFF
ARGMAX_EMPTY = -(1 << 63)
_KEY_COLS = tl.constexpr(ARGMAX_COLS)
_KEY_EMPTY = tl.constexpr(ARGMAX_EMPTY)
if os.environ.get("TRITON_INTERPRET") == "1":  # Triton's CPU interpreter (tests) has no libdevice.rint
    _RNE = tl.constexpr(12582912.0)

    @triton.jit
    def _round_half_even(v):
        return (v + _RNE) - _RNE  # 1.5 * 2**23: exact round-half-even for |v| < 2**22 in NumPy's float32

    @triton.jit
    def _mul_rn(a, b):
        return a * b
else:
    @triton.jit
    def _round_half_even(v):
        # rint, not the magic-number trick: the compiler may contract v = x * s into an FMA there, rounding the
        # exact product instead of its float32 value as the reference does
        return libdevice.rint(v)

    @triton.jit
    def _mul_rn(a, b):
        # a product never contracted with a later add into an FMA (a residual add must round like torch's)
        return libdevice.mul_rn(a, b)


@triton.jit
def _after_producers(GDC: tl.constexpr):
    """With programmatic dependent launch (GDC): wait until the previous kernel of the stream has finished and
    its writes are visible, then let the next kernel's programs start (they wait here in turn). What a kernel
    does before this call may only read data no kernel of the step writes (weights, scales, tables)."""
    if GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _row_stats(x_ptr, nw_ptr, m, K, eps, NORM: tl.constexpr, QUANT: tl.constexpr, BK: tl.constexpr,
               CM: tl.constexpr):
    """For row m of x [M, K]: (den, s) with den = sqrt(mean(x^2) + eps) (1 without NORM) and the int8 scale
    s = 127 / max(|y|, 1e-5) of y = (x / den) * w (1 without QUANT), the reference's order of operations.
    CM: the cache modifier of x's loads (see _prep_row)."""
    offs = tl.arange(0, BK)
    rstd = 1.0
    if NORM:
        acc = tl.zeros([BK], dtype=tl.float32)
        for k0 in range(0, K, BK):
            x = tl.load(x_ptr + m * K + k0 + offs, mask=k0 + offs < K, other=0.0, cache_modifier=CM)
            acc += x * x
        rstd = tl.sqrt_rn(tl.div_rn(tl.sum(acc, 0), K + 0.0) + eps)
    s = 1.0
    if QUANT:
        amax = tl.zeros([BK], dtype=tl.float32)
        for k0 in range(0, K, BK):
            mask = k0 + offs < K
            y = tl.load(x_ptr + m * K + k0 + offs, mask=mask, other=0.0, cache_modifier=CM)
            if NORM:
                y = (y / rstd) * tl.load(nw_ptr + k0 + offs, mask=mask, other=0.0)
            amax = tl.maximum(amax, tl.abs(y))
        s = tl.div_rn(127.0, tl.maximum(tl.max(amax, 0), 1e-5))
    return rstd, s


@triton.jit
def _norm_weight(nw_ptr, K, NORM: tl.constexpr, BK: tl.constexpr, ONE: tl.constexpr):
    """The RMSNorm weight of a one-block row, loaded ahead (weights are no kernel's output: a kernel reads it
    before it waits for its producers); zeros where _prep_row reads it block by block."""
    offs = tl.arange(0, BK)
    if NORM and ONE:
        nwv = tl.load(nw_ptr + offs, mask=offs < K, other=0.0)
    else:
        nwv = tl.zeros([BK], dtype=tl.float32)
    return nwv


@triton.jit
def _prep_row(x_ptr, nw_ptr, nwv, q_ptr, y_ptr, m, K, eps, NORM: tl.constexpr, QUANT: tl.constexpr,
              BK: tl.constexpr, ONE: tl.constexpr, CM: tl.constexpr):
    """Row m of x [M, K]: y = rmsnorm(x) (NORM), then with QUANT q = int8(y) into q_ptr [M, K] (returns s),
    without it y into y_ptr. ONE: the row is one BK block (read once, kept in registers; nwv is the norm weight
    from _norm_weight); else three passes. CM: the cache modifier of x's loads ("", or ".cg", past L1, for a
    row that other programs of the same kernel wrote)."""
    offs = tl.arange(0, BK)
    s = 1.0
    if ONE:
        mask = offs < K
        y = tl.load(x_ptr + m * K + offs, mask=mask, other=0.0, cache_modifier=CM)
        if NORM:
            rstd = tl.sqrt_rn(tl.div_rn(tl.sum(y * y, 0), K + 0.0) + eps)
            y = (y / rstd) * nwv
        if QUANT:
            s = tl.div_rn(127.0, tl.maximum(tl.max(tl.abs(y), 0), 1e-5))
            q = tl.minimum(tl.maximum(_round_half_even(y * s), -128.0), 127.0)
            tl.store(q_ptr + m * K + offs, q.to(tl.int8), mask=mask)
        else:
            tl.store(y_ptr + m * K + offs, y, mask=mask)
    else:
        rstd, s = _row_stats(x_ptr, nw_ptr, m, K, eps, NORM, QUANT, BK, CM)
        for k0 in range(0, K, BK):
            mask = k0 + offs < K
            y = tl.load(x_ptr + m * K + k0 + offs, mask=mask, other=0.0, cache_modifier=CM)
            if NORM:
                y = (y / rstd) * tl.load(nw_ptr + k0 + offs, mask=mask, other=0.0)
            if QUANT:
                q = tl.minimum(tl.maximum(_round_half_even(y * s), -128.0), 127.0)
                tl.store(q_ptr + m * K + k0 + offs, q.to(tl.int8), mask=mask)
            else:
                tl.store(y_ptr + m * K + k0 + offs, y, mask=mask)
    return s


@triton.jit
def _norm_quant_kernel(x_ptr, nw_ptr, q_ptr, s_ptr, y_ptr, K, eps,
                       NORM: tl.constexpr, QUANT: tl.constexpr, BK: tl.constexpr, ONE: tl.constexpr,
                       GDC: tl.constexpr):
    """Row m: y = rmsnorm(x) (NORM) then, with QUANT, q = int8(y) and s; without QUANT y is stored in float."""
    nwv = _norm_weight(nw_ptr, K, NORM, BK, ONE)
    _after_producers(GDC)
    m = tl.program_id(0)
    s = _prep_row(x_ptr, nw_ptr, nwv, q_ptr, y_ptr, m, K, eps, NORM, QUANT, BK, ONE, "")
    if QUANT:
        tl.store(s_ptr + m, s)


@triton.jit
def _rotate(lo, hi, c, sn):
    """RoPE of halves (lo, hi): (lo c - hi sn, hi c + lo sn), each product rounded before the sum as the
    reference rounds it (not contracted into an FMA, whose choice would follow the compiler's code layout)."""
    return _mul_rn(lo, c) - _mul_rn(hi, sn), _mul_rn(hi, c) + _mul_rn(lo, sn)


@triton.jit
def _rope_tables(head, row, pos_ptr, cos_ptr, sin_ptr, base_ptr, maxlen_ptr, d, HQ, HKV, HALF: tl.constexpr):
    """What head ``head`` of sequence ``row`` needs from the step's tables to store its elements d: (pos, cos,
    sin, cache address as int64, cache size); cos / sin are 1 / 0 for v heads, the cache entries 0 for q heads."""
    pos = tl.load(pos_ptr + row)
    sn = tl.zeros_like(d).to(tl.float32)
    c = sn + 1.0
    if head < HQ + HKV:
        c = tl.load(cos_ptr + pos * HALF + d)
        sn = tl.load(sin_ptr + pos * HALF + d)
    base = tl.zeros([], dtype=tl.int64)
    maxlen = tl.zeros([], dtype=tl.int64)
    if head >= HQ:
        base = tl.load(base_ptr + row)
        maxlen = tl.load(maxlen_ptr + row).to(tl.int64)
    return pos, c, sn, base, maxlen


@triton.jit
def _rope_store_head(lo, hi, d, head, row, pos, c, sn, base_i, maxlen, q_out_ptr, layer, HQ, HKV,
                     HALF: tl.constexpr, KVF32: tl.constexpr):
    """Halves lo, hi [HALF] (offsets d) of head ``head`` of a fused q/k/v row of sequence ``row``, with its
    ``_rope_tables``: q heads are rotated into q_out [rows, HQ, 2 HALF]; k heads rotated and v heads copied into
    the sequence's cache [L, 2, max_len, HKV, 2 HALF]."""
    if head < HQ + HKV:
        lo, hi = _rotate(lo, hi, c, sn)
    if head < HQ:
        qo = q_out_ptr + (row * HQ + head) * 2 * HALF + d
        tl.store(qo, lo)
        tl.store(qo + HALF, hi)
    else:
        if KVF32:
            base = base_i.to(tl.pointer_type(tl.float32))
        else:
            base = base_i.to(tl.pointer_type(tl.float16))
        kv = (head >= HQ + HKV).to(tl.int64)
        h = head - HQ - kv * HKV
        off = ((layer * 2 + kv) * maxlen + pos) * HKV * 2 * HALF + h * 2 * HALF + d
        tl.store(base + off, lo.to(base.dtype.element_ty))
        tl.store(base + off + HALF, hi.to(base.dtype.element_ty))


@triton.jit
def _argmax_update(y, cols, cmask, key_ptr, m, mmask, AXIS: tl.constexpr):
    """Fold logits y (columns cols along AXIS) of token rows m into key_ptr[m] (int64, reset to ARGMAX_EMPTY by the
    step's first kernel) with one atomic max per row and program: key = (the float's bits, ordered like the
    floats, as a signed int32) << 32 | (2**32 - 1 - column), so the largest logit wins and, among equal ones,
    the lowest column, as NumPy's argmax. -0.0 counts as 0.0 and NaN as -inf (the sampler's nan_to_num)."""
    v = tl.where(y == 0.0, 0.0, y)
    v = tl.where(v != v, float("-inf"), v)
    b = v.to(tl.int32, bitcast=True)
    k = b ^ ((b >> 31) & 0x7FFFFFFF)
    key = (k.to(tl.int64) << 32) | (_KEY_COLS - cols.to(tl.int64))
    key = tl.where(cmask, key, _KEY_EMPTY)
    tl.atomic_max(key_ptr + m, tl.max(key, AXIS), mask=mmask, sem="relaxed")


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, sc_ptr, out_ptr, key_ptr, M, K, N, RESIDUAL: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BKW: tl.constexpr, ARGMAX: tl.constexpr, GDC: tl.constexpr):
    """Dense rows (the 16-bit lm_head) times float32 x: out[m, n] = (x[m] . W[n]) * scale[n] (+= with RESIDUAL)
    for M <= BM tokens (int8 activations go to the tensor-core gemm). ARGMAX: each token's argmax into key_ptr
    (see _argmax_update)."""
    _after_producers(GDC)
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    kb = tl.arange(0, BKW)
    scale = tl.load(sc_ptr + rows, mask=rmask, other=0.0)
    for mi in tl.static_range(BM):
        if mi < M:
            acc = tl.zeros([BN, BKW], dtype=tl.float32)
            for k0 in range(0, K, BKW):
                kk = k0 + kb
                x = tl.load(x_ptr + mi * K + kk, mask=kk < K, other=0.0)
                w = tl.load(w_ptr + rows[:, None] * K + kk[None, :], mask=rmask[:, None] & (kk[None, :] < K),
                            other=0)
                acc += w.to(tl.float32) * x[None, :]
            y = tl.sum(acc, 1) * scale
            if RESIDUAL:
                y += tl.load(out_ptr + mi * N + rows, mask=rmask, other=0.0)
            tl.store(out_ptr + mi * N + rows, y, mask=rmask)
            if ARGMAX:
                mrow = tl.full([1], mi, tl.int32)  # a one-element atomic, as the gemm's (not a scalar one)
                _argmax_update(y[None, :], rows[None, :], rmask[None, :], key_ptr, mrow, mrow < M, 1)


@triton.jit
def _glu(gate, up, ACT: tl.constexpr):
    """The gated activation: relu(gate)^2 * up (ACT_RELU2) or silu(gate) * up (ACT_SILU)."""
    if ACT == 0:
        gg = tl.maximum(gate, 0.0)
        a = gg * gg
    else:
        a = gate / (1.0 + tl.exp(-gate))
    return a * up


@triton.jit
def _pair_rows(p, P, NP, N):
    """For row pairs p: (pair valid, row A, row B, row A valid, row B valid); see ``TernaryLayout``."""
    pmask = p < NP
    ra = (p // P) * (2 * P) + p % P
    rb = ra + P
    return pmask, ra, rb, pmask & (ra < N), pmask & (rb < N)


@triton.jit
def _segment_scales(sc_ptr, g, N, ra, rb, ma, mb, sca, scb, C: tl.constexpr):
    """Scales of rows ra / rb for input segment g: the one column group's (already loaded) or group g's."""
    if C == 1:
        return sca, scb
    return tl.load(sc_ptr + g * N + ra, mask=ma, other=0.0), tl.load(sc_ptr + g * N + rb, mask=mb, other=0.0)


@triton.jit
def _add2(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _tile_dot(wt, xrow, wq, gq, jq, s, sca, scb, KIN, KWT: tl.constexpr, GW: tl.constexpr, GS: tl.constexpr,
              GLIM: tl.constexpr, MASKK: tl.constexpr, SU: tl.constexpr):
    """(row A, row B) outputs of a whole tile wt [KWP words, BP pairs] (int8 input row xrow, one column group):
    word wq holds input gq * GS + s * GW + jq in slot s; 8 products per 16-bit lane, then one split. sum(x) is
    kept per word (xw) and subtracted before the one reduction over words that gives both rows: every
    reduction crosses warps, and one per slot for sum(x) cost ~7% of a decode step (H100). The slots run SU at
    a time in a loop (SLOT_UNROLL)."""
    t = tl.zeros_like(wt)
    xw = tl.zeros_like(wq)
    for s0 in range(0, 8, SU):
        for su in tl.static_range(SU):
            si = s0 + su
            kk = si * GW + jq
            xm = wq < KWT
            if MASKK:
                xm = xm & (kk < GLIM) & (gq * GS + kk < KIN)
            x = tl.load(xrow + gq * GS + kk, mask=xm, other=0).to(tl.int32)
            t += ((wt >> (2 * si)) & 0x00030003) * x[:, None]
            xw += x
    lo = (t << 16) >> 16  # the low lane, sign-extended; the high lane is what remains
    ia, ib = tl.reduce((lo - xw[:, None], ((t - lo) >> 16) - xw[:, None]), 0, _add2)
    ya = _mul_rn(ia.to(tl.float32) / s, sca)
    yb = _mul_rn(ib.to(tl.float32) / s, scb)
    return ya, yb


@triton.jit
def _chunked_dot(xrow, wbase, sc_ptr, s, sca, scb, ra, rb, ma, mb, jb, pl, N, NSEG, KIN, GW: tl.constexpr,
                 GS: tl.constexpr, GLIM: tl.constexpr, C: tl.constexpr, MASKK: tl.constexpr, INT: tl.constexpr,
                 NCG: tl.constexpr, BP: tl.constexpr, BKW: tl.constexpr, GSP: tl.constexpr):
    """(row A, row B) outputs of the tile at wbase for input row xrow, a chunk of [BKW words, BP pairs] at a
    time (any column grid, int8 or float input; see _tgemv_kernel)."""
    ia = tl.zeros([BKW, BP], dtype=tl.int32)
    ib = tl.zeros([BKW, BP], dtype=tl.int32)
    fa = tl.zeros([BKW, BP], dtype=tl.float32)
    fb = tl.zeros([BKW, BP], dtype=tl.float32)
    ca = tl.zeros([BP], dtype=tl.float32)
    cb = tl.zeros([BP], dtype=tl.float32)
    xs = 0
    for g in range(NSEG):
        t = tl.zeros([BKW, BP], dtype=tl.int32)
        ga = tl.zeros([BKW, BP], dtype=tl.int32)
        gb = tl.zeros([BKW, BP], dtype=tl.int32)
        ta = tl.zeros([BKW, BP], dtype=tl.float32)
        tb = tl.zeros([BKW, BP], dtype=tl.float32)
        for cc in tl.static_range(NCG):
            jj = cc * BKW + jb
            # rows of BP words, 16-byte aligned (said, as the offsets' arithmetic hides it: 4-byte loads else)
            w = tl.load(tl.max_contiguous(tl.multiple_of(wbase + (g * GW + jj)[:, None] * BP + pl[None, :],
                                                         [16, 16]), [1, BP]))
            for si in tl.static_range(8):
                kk = si * GW + jj
                if MASKK:
                    x = tl.load(xrow + g * GS + kk, mask=(kk < GLIM) & (g * GS + kk < KIN), other=0)
                else:
                    x = tl.load(xrow + g * GS + kk)
                if INT:
                    t += ((w >> (2 * si)) & 0x00030003) * x.to(tl.int32)[:, None]
                else:  # float activations: t x directly (sum(code x) - sum(x) would cancel in float32)
                    ta += (((w >> (2 * si)) & 3) - 1).to(tl.float32) * x[:, None]
                    tb += (((w >> (16 + 2 * si)) & 3) - 1).to(tl.float32) * x[:, None]
            if INT:
                if (cc % 16 == 15) or (cc == NCG - 1):
                    lo = (t << 16) >> 16  # the low lane, sign-extended; the high lane is what remains
                    ga += lo
                    gb += (t - lo) >> 16
                    t = tl.zeros([BKW, BP], dtype=tl.int32)
        if INT:  # sum(x) of the segment, in a 1-D layout (inside the loop above x would be loaded twice)
            kx = tl.arange(0, GSP)
            xv = tl.load(xrow + g * GS + kx, mask=(kx < GLIM) & (g * GS + kx < KIN), other=0)
            xsum = tl.sum(xv.to(tl.int32), 0)
        if INT and C == 1:
            ia += ga
            ib += gb
            xs += xsum
        else:
            sa, sb = _segment_scales(sc_ptr, g, N, ra, rb, ma, mb, sca, scb, C)
            if INT:
                fa += ga.to(tl.float32) * sa[None, :]
                fb += gb.to(tl.float32) * sb[None, :]
                ca += xsum.to(tl.float32) * sa
                cb += xsum.to(tl.float32) * sb
            else:
                fa += ta * sa[None, :]
                fb += tb * sb[None, :]
    if INT and C == 1:
        ya = _mul_rn((tl.sum(ia, 0) - xs).to(tl.float32) / s, sca)
        yb = _mul_rn((tl.sum(ib, 0) - xs).to(tl.float32) / s, scb)
    else:
        ya = (tl.sum(fa, 0) - ca) / s
        yb = (tl.sum(fb, 0) - cb) / s
    return ya, yb


@triton.jit
def _tgemv_kernel(x_ptr, sx_ptr, nw_ptr, w_ptr, sc_ptr, out_ptr, scq_ptr, scf_ptr, ss_ptr, M, N, NP, P, NSEG, eps,
                  # EPI_QKV: q out, RoPE tables, positions, cache tables
                  q_out_ptr, cos_ptr, sin_ptr, pos_ptr, base_ptr, maxlen_ptr, layer, HQ, HKV,
                  # NEXT: the next norm's weight, its int8 rows and scales out, the programs' counter, its eps
                  nx_nw_ptr, nx_q_ptr, nx_s_ptr, cnt_ptr, nx_eps,
                  KIN: tl.constexpr, KWT: tl.constexpr, GW: tl.constexpr, GS: tl.constexpr, GLIM: tl.constexpr,
                  C: tl.constexpr, MASKK: tl.constexpr, XQ: tl.constexpr, NORM: tl.constexpr, QUANT: tl.constexpr,
                  EPI: tl.constexpr, ACT: tl.constexpr, HALF_D: tl.constexpr, KVF32: tl.constexpr,
                  BP: tl.constexpr, BKW: tl.constexpr, BK: tl.constexpr, ONE: tl.constexpr, GSP: tl.constexpr,
                  TILE: tl.constexpr, KWP: tl.constexpr, EARLY: tl.constexpr, NEXT: tl.constexpr,
                  NBK: tl.constexpr, NONE: tl.constexpr, SU: tl.constexpr, GDC: tl.constexpr):
    """Ternary GEMV for M <= GEMV_MAX_TOKENS tokens; program = one tile of BP row pairs (see ``TernaryLayout``).

    Prologue (x float, NORM and/or QUANT): every program normalizes and quantizes the M rows once, in a 1-D
    layout, into a scratch buffer its threads then read (identical bytes from every program). The dot loop
    multiplies a word's two rows at once: ``(w >> 2s) & 0x00030003`` holds row A's code in the low 16 bits and
    row B's in the high 16, so one integer multiply-add by x accumulates both; 16 chunks (<= 128 products of
    |code x| <= 256) fit a signed 16-bit lane, then the lanes are split into int32 accumulators. Codes are
    t + 1, so sum(t x) = sum(code x) - sum(x) (integer-exact; sum(x) per segment from a 1-D load). Column
    groups (C > 1) are scaled per segment. Float activations (no quantization) take t x in float32.

    TILE (int8 products, one column group): the program's whole tile [KWT words, BP pairs] is loaded at once
    (KWP >= KWT, a power of two) before the kernel waits for its producers (GDC), so the weight reads overlap
    the previous kernel, and serves every token; the dot product is one pass of 8 slots (8 products per 16-bit
    lane) and one split into rows A and B.

    EPI_STORE: out[m, row] = y. EPI_RESIDUAL: out[m, row] += y. EPI_GLU (pairs are (gate n, up n)):
    out[m, n] = act(gate) * up. EPI_QKV (pairs are rows d and d + HALF_D of one head): q heads are rotated
    (RoPE at pos[m]) into q_out, k heads rotated and v heads copied into each sequence's cache. EARLY (the
    decode step's tables were written before its first kernel): the first token's positions, RoPE rows and
    cache entries are read before the wait. The norm weight is read before it always, the first token's
    residual row right after it, so neither load waits behind the dot product.

    NEXT (EPI_RESIDUAL): the next linear's RMSNorm + int8 quantization of the updated rows out[m] (N wide; NBK /
    NONE as BK / ONE) into nx_q_ptr [M, N] and nx_s_ptr [M], instead of a kernel of its own. Each program counts
    itself at cnt_ptr once its rows are stored (a release); the last to count (an acquire: it sees every row)
    does the norm and resets the counter to 0 for the next launch."""
    INT: tl.constexpr = XQ or QUANT
    PREP: tl.constexpr = (not XQ) and (NORM or QUANT)
    NCG: tl.constexpr = GW // BKW
    pid = tl.program_id(0)
    pl = tl.arange(0, BP)
    p = pid * BP + pl
    jb = tl.arange(0, BKW)
    wbase = w_ptr + pid * (KWT * BP)  # int32 offsets: data holds < 2**31 words
    pmask, ra, rb, ma, mb = _pair_rows(p, P, NP, N)
    sca = tl.load(sc_ptr + ra, mask=ma, other=0.0)
    scb = tl.load(sc_ptr + rb, mask=mb, other=0.0)
    if TILE:
        wq = tl.arange(0, KWP)
        wt = tl.load(tl.max_contiguous(tl.multiple_of(wbase + wq[:, None] * BP + pl[None, :], [16, 16]), [1, BP]),
                     mask=(wq < KWT)[:, None], other=0)
        gq = wq // GW  # word wq: segment gq, word jq of the segment
        jq = wq - gq * GW
    nwv = _norm_weight(nw_ptr, KIN, NORM and PREP, BK, ONE)
    if EPI == 3:
        head = (pid * BP) // HALF_D
        d_h = p % HALF_D
        if EARLY:
            t_pos, t_c, t_s, t_base, t_len = _rope_tables(head, 0, pos_ptr, cos_ptr, sin_ptr, base_ptr, maxlen_ptr,
                                                          d_h, HQ, HKV, HALF_D)
    _after_producers(GDC)
    if EPI == 1:  # the first token's residual row, now that its producer has finished
        old_a = tl.load(out_ptr + ra, mask=ma, other=0.0)
        old_b = tl.load(out_ptr + rb, mask=mb, other=0.0)
    if PREP:
        for mi in range(M):
            s_m = _prep_row(x_ptr, nw_ptr, nwv, scq_ptr, scf_ptr, mi, KIN, eps, NORM, QUANT, BK, ONE, "")
            if QUANT:
                tl.store(ss_ptr + mi, s_m)
        tl.debug_barrier()  # the scratch rows written above are read below by other threads of this program
    if XQ:
        xsrc = x_ptr
    elif QUANT:
        xsrc = scq_ptr
    elif NORM:
        xsrc = scf_ptr
    else:
        xsrc = x_ptr
    for mi in range(M):
        s = 1.0
        if XQ:
            s = tl.load(sx_ptr + mi)
        elif QUANT:
            s = tl.load(ss_ptr + mi)
        xrow = xsrc + mi * KIN
        if TILE:
            ya, yb = _tile_dot(wt, xrow, wq, gq, jq, s, sca, scb, KIN, KWT, GW, GS, GLIM, MASKK, SU)
        else:
            ya, yb = _chunked_dot(xrow, wbase, sc_ptr, s, sca, scb, ra, rb, ma, mb, jb, pl, N, NSEG, KIN, GW, GS,
                                  GLIM, C, MASKK, INT, NCG, BP, BKW, GSP)
        if EPI == 0:
            tl.store(out_ptr + mi * N + ra, ya, mask=ma)
            tl.store(out_ptr + mi * N + rb, yb, mask=mb)
        elif EPI == 1:
            if mi > 0:
                old_a = tl.load(out_ptr + mi * N + ra, mask=ma, other=0.0)
                old_b = tl.load(out_ptr + mi * N + rb, mask=mb, other=0.0)
            tl.store(out_ptr + mi * N + ra, old_a + ya, mask=ma)
            tl.store(out_ptr + mi * N + rb, old_b + yb, mask=mb)
        elif EPI == 2:
            tl.store(out_ptr + mi * P + p, _glu(ya, yb, ACT), mask=pmask)
        else:
            if EARLY:
                if mi > 0:
                    t_pos, t_c, t_s, t_base, t_len = _rope_tables(head, mi, pos_ptr, cos_ptr, sin_ptr, base_ptr,
                                                                  maxlen_ptr, d_h, HQ, HKV, HALF_D)
            else:
                t_pos, t_c, t_s, t_base, t_len = _rope_tables(head, mi, pos_ptr, cos_ptr, sin_ptr, base_ptr,
                                                              maxlen_ptr, d_h, HQ, HKV, HALF_D)
            _rope_store_head(ya, yb, d_h, head, mi, t_pos, t_c, t_s, t_base, t_len, q_out_ptr, layer, HQ, HKV,
                             HALF_D, KVF32)
    if NEXT:
        tl.debug_barrier()  # every thread's rows are stored before the count releases them
        if tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") == tl.num_programs(0) - 1:
            tl.store(cnt_ptr, 0)
            nx_nwv = _norm_weight(nx_nw_ptr, N, True, NBK, NONE)
            for mi in range(M):
                tl.store(nx_s_ptr + mi, _prep_row(out_ptr, nx_nw_ptr, nx_nwv, nx_q_ptr, out_ptr, mi, N, nx_eps, True,
                                                  True, NBK, NONE, ".cg"))


@triton.jit
def _tgemm_kernel(x_ptr, sx_ptr, w_ptr, sc_ptr, out_ptr, M, N, NP, P, NSEG,
                  KIN: tl.constexpr, KWT: tl.constexpr, GW: tl.constexpr, GS: tl.constexpr, GLIM: tl.constexpr,
                  C: tl.constexpr, PB: tl.constexpr, XQ: tl.constexpr, EPI: tl.constexpr, ACT: tl.constexpr,
                  BM: tl.constexpr, BPG: tl.constexpr, BKW: tl.constexpr, GDC: tl.constexpr):
    """Ternary tiles for many tokens on the tensor cores: int8 x int8 -> int32 (XQ) or float32 IEEE. A tile of
    BPG row pairs; each slot s of a word block [BKW, BPG] is unpacked into row A's and row B's codes. EPI_STORE,
    EPI_RESIDUAL or EPI_GLU (as ``_tgemv_kernel``'s)."""
    _after_producers(GDC)
    pm, pn = tl.program_id(0), tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    mmask = rm < M
    p = pn * BPG + tl.arange(0, BPG)
    pmask, ra, rb, ma, mb = _pair_rows(p, P, NP, N)
    wrow = (p // PB) * (KWT * PB) + p % PB  # int32 offsets: data holds < 2**31 words
    jb = tl.arange(0, BKW)
    sx = 1.0
    if XQ:
        sx = tl.load(sx_ptr + rm, mask=mmask, other=1.0)
    sca = tl.load(sc_ptr + ra, mask=ma, other=0.0)
    scb = tl.load(sc_ptr + rb, mask=mb, other=0.0)
    oa = tl.zeros([BM, BPG], dtype=tl.float32)
    ob = tl.zeros([BM, BPG], dtype=tl.float32)
    if XQ:
        aa = tl.zeros([BM, BPG], dtype=tl.int32)
        ab = tl.zeros([BM, BPG], dtype=tl.int32)
    else:
        aa = tl.zeros([BM, BPG], dtype=tl.float32)
        ab = tl.zeros([BM, BPG], dtype=tl.float32)
    for g in range(NSEG):  # one column group: the accumulators run over every segment, scaled once at the end
        if C > 1:
            aa = tl.zeros_like(aa)
            ab = tl.zeros_like(ab)
        for c0 in range(0, GW, BKW):
            jj = c0 + jb
            w = tl.load(tl.max_contiguous(tl.multiple_of(w_ptr + wrow[None, :] + (g * GW + jj)[:, None] * PB,
                                                         [16, 16]), [1, PB]), mask=pmask[None, :], other=0x55555555)
            for si in tl.static_range(8):
                kk = si * GW + jj
                k = g * GS + kk
                xm = mmask[:, None] & ((kk < GLIM) & (k < KIN))[None, :]
                ta = ((w >> (2 * si)) & 3) - 1
                tb = ((w >> (16 + 2 * si)) & 3) - 1
                if XQ:
                    x = tl.load(x_ptr + rm[:, None] * KIN + k[None, :], mask=xm, other=0)
                    aa += tl.dot(x, ta.to(tl.int8))
                    ab += tl.dot(x, tb.to(tl.int8))
                else:
                    x = tl.load(x_ptr + rm[:, None] * KIN + k[None, :], mask=xm, other=0.0)
                    aa += tl.dot(x, ta.to(tl.float32), input_precision="ieee")
                    ab += tl.dot(x, tb.to(tl.float32), input_precision="ieee")
        if C > 1:
            sa, sb = _segment_scales(sc_ptr, g, N, ra, rb, ma, mb, sca, scb, C)
            if XQ:
                oa += (aa.to(tl.float32) / sx[:, None]) * sa[None, :]
                ob += (ab.to(tl.float32) / sx[:, None]) * sb[None, :]
            else:
                oa += aa * sa[None, :]
                ob += ab * sb[None, :]
    if C == 1:
        if XQ:
            oa = _mul_rn(aa.to(tl.float32) / sx[:, None], sca[None, :])
            ob = _mul_rn(ab.to(tl.float32) / sx[:, None], scb[None, :])
        else:
            oa = _mul_rn(aa, sca[None, :])
            ob = _mul_rn(ab, scb[None, :])
    if EPI == 2:
        tl.store(out_ptr + rm[:, None] * P + p[None, :], _glu(oa, ob, ACT), mask=mmask[:, None] & pmask[None, :])
    else:
        pa = out_ptr + rm[:, None] * N + ra[None, :]
        pb = out_ptr + rm[:, None] * N + rb[None, :]
        oma = mmask[:, None] & ma[None, :]
        omb = mmask[:, None] & mb[None, :]
        if EPI == 1:
            oa += tl.load(pa, mask=oma, other=0.0)
            ob += tl.load(pb, mask=omb, other=0.0)
        tl.store(pa, oa, mask=oma)
        tl.store(pb, ob, mask=omb)


@triton.jit
def _few_block(w_ptr, boff, jb, b, NB: tl.constexpr, GW: tl.constexpr, PB: tl.constexpr):
    """Block b of a program's pair columns in ``_tgemm_few_kernel``: bytes int8 [BKW words, 4 BPG]."""
    g = b // NB
    return tl.load(w_ptr + boff[None, :] + ((g * GW + (b - g * NB) * jb.shape[0] + jb) * (PB * 4))[:, None])


@triton.jit
def _tgemm_few_kernel(x_ptr, sx_ptr, w_ptr, sc_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, NP, P, NBLK, BPS,
                      KIN: tl.constexpr, KWT: tl.constexpr, GW: tl.constexpr, GS: tl.constexpr, MASKK: tl.constexpr,
                      PB: tl.constexpr, EPI: tl.constexpr, ACT: tl.constexpr, KS: tl.constexpr, WSN: tl.constexpr,
                      BM: tl.constexpr, BPG: tl.constexpr, BKW: tl.constexpr, GDC: tl.constexpr):
    """Ternary GEMM for a few tokens (int8 activations, one column group) on the tensor cores, split over K.

    The paired-row words are read as bytes: byte c of a word holds slots 4 (c % 2) .. 4 (c % 2) + 3 of row A
    (c < 2) or row B, so ``(byte >> 2 s) & 3`` (s = 0..3) gives the codes of slots s and s + 4 of both rows at
    once, one op per byte for four codes (``_tgemm_kernel`` unpacks one code per op). Each s is one int8 dot of
    [BM, 2 BKW] inputs (slots s and s + 4) by [2 BKW, 2 BPG] codes (t + 1; sum(x) is subtracted: integer-exact).

    Program (m block, pair block, k split): its blocks of BKW words, the first read before the wait for the
    producers (PDL), each next one while the current one's dots run. With KS > 1 the splits store their int32
    sums in ws_ptr [KS, rows, WSN]; the last of a tile's splits to count itself at cnt_ptr (acquire) adds them,
    resets the counter and runs the epilogue: EPI_STORE, EPI_RESIDUAL or EPI_GLU (as ``_tgemv_kernel``'s)."""
    pm, pn, pk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NB: tl.constexpr = GW // BKW
    cols = tl.arange(0, 4 * BPG)  # byte columns: pair cols // 4, byte cols % 4
    pc = pn * BPG + cols // 4
    boff = ((pc // PB) * (KWT * PB) + pc % PB) * 4 + cols % 4  # byte offset of the column's word 0
    jb = tl.arange(0, BKW)
    b0 = pk * BPS
    b1 = tl.minimum(NBLK, b0 + BPS)
    wb = _few_block(w_ptr, boff, jb, b0, NB, GW, PB)
    _after_producers(GDC)
    rm = pm * BM + tl.arange(0, BM)
    mmask = rm < M
    kk2 = tl.arange(0, 2 * BKW)  # a dot's inputs: (slot s or s + 4, word)
    acc = tl.zeros([BM, 2 * BPG], dtype=tl.int32)
    xs = tl.zeros([BM], dtype=tl.int32)
    for b in range(b0, b1):
        g = b // NB
        c0 = (b - g * NB) * BKW
        nxt = _few_block(w_ptr, boff, jb, tl.minimum(b + 1, b1 - 1), NB, GW, PB)
        for sp in tl.static_range(4):
            cb = tl.reshape((wb >> (2 * sp)) & 3, [BKW, BPG, 2, 2])  # (word, pair, A/B, slot s / s + 4)
            cb = tl.reshape(tl.permute(cb, [3, 0, 1, 2]), [2 * BKW, 2 * BPG])
            k = g * GS + (sp + 4 * (kk2 // BKW)) * GW + c0 + kk2 % BKW
            xm = mmask[:, None]
            if MASKK:
                xm = xm & (k < KIN)[None, :]
            x = tl.load(x_ptr + rm[:, None] * KIN + k[None, :], mask=xm, other=0)
            acc += tl.dot(x, cb)
            xs += tl.sum(x.to(tl.int32), 1)
        wb = nxt
    acc -= xs[:, None]
    n2 = tl.arange(0, 2 * BPG)  # output columns: (pair, A/B)
    last = True
    if KS > 1:
        wsp = ws_ptr + rm[:, None] * WSN + (pn * 2 * BPG + n2)[None, :]
        split = tl.num_programs(0) * BM * WSN
        tl.store(wsp + pk * split, acc, mask=mmask[:, None])
        tl.debug_barrier()  # every thread's sums are stored before the count releases them
        cnt = cnt_ptr + pm * tl.num_programs(1) + pn
        last = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu") == KS - 1
    if last:
        if KS > 1:
            acc = tl.zeros_like(acc)
            for j in range(KS):
                acc += tl.load(wsp + j * split, mask=mmask[:, None], other=0, cache_modifier=".cg")
            tl.store(cnt, 0)
        p = pn * BPG + n2 // 2
        pmask, ra, rb, ma, mb = _pair_rows(p, P, NP, N)
        isb = (n2 % 2) == 1
        row = tl.where(isb, rb, ra)
        rmask = tl.where(isb, mb, ma)
        sc = tl.load(sc_ptr + row, mask=rmask, other=0.0)
        sx = tl.load(sx_ptr + rm, mask=mmask, other=1.0)
        y = _mul_rn(acc.to(tl.float32) / sx[:, None], sc[None, :])
        if EPI == 2:
            ya, yb = tl.split(tl.reshape(y, [BM, BPG, 2]))
            pp = pn * BPG + tl.arange(0, BPG)
            tl.store(out_ptr + rm[:, None] * P + pp[None, :], _glu(ya, yb, ACT),
                     mask=mmask[:, None] & (pp < NP)[None, :])
        else:
            om = mmask[:, None] & rmask[None, :]
            optr = out_ptr + rm[:, None] * N + row[None, :]
            if EPI == 1:
                y += tl.load(optr, mask=om, other=0.0)
            tl.store(optr, y, mask=om)


@triton.jit
def _gemm_kernel(x_ptr, sx_ptr, w_ptr, sc_ptr, out_ptr, key_ptr, M, K, N,
                 XQ: tl.constexpr, RESIDUAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr,
                 ARGMAX: tl.constexpr, GDC: tl.constexpr):
    """Dense rows (int8 or 16-bit) for many tokens, and the int8 lm_head at any token count, on the tensor
    cores: int8 x int8 -> int32 (XQ) or float32 IEEE. ARGMAX: each token's argmax into key_ptr
    (see _argmax_update)."""
    _after_producers(GDC)
    pm, pn = tl.program_id(0), tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    jb = tl.arange(0, BKW)
    mmask = rm < M
    nmask = rn < N
    if XQ:
        acc = tl.zeros([BM, BN], dtype=tl.int32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BKW):
        kk = k0 + jb
        xm = mmask[:, None] & (kk[None, :] < K)
        w = tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=nmask[:, None] & (kk[None, :] < K), other=0)
        if XQ:
            x = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=xm, other=0)
            acc += tl.dot(x, tl.trans(w.to(tl.int8)))
        else:
            x = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=xm, other=0.0)
            acc += tl.dot(x, tl.trans(w.to(tl.float32)), input_precision="ieee")
    scale = tl.load(sc_ptr + rn, mask=nmask, other=0.0)
    if XQ:
        sx = tl.load(sx_ptr + rm, mask=mmask, other=1.0)
        out = (acc.to(tl.float32) / sx[:, None]) * scale[None, :]
    else:
        out = acc * scale[None, :]
    omask = mmask[:, None] & nmask[None, :]
    optr = out_ptr + rm[:, None] * N + rn[None, :]
    if RESIDUAL:
        out += tl.load(optr, mask=omask, other=0.0)
    tl.store(optr, out, mask=omask)
    if ARGMAX:
        _argmax_update(out, rn[None, :], omask, key_ptr, rm, mmask, 1)


@triton.jit
def _kv_rows(base, pos, d, ROW: tl.constexpr):
    """Pointers to rows pos [BLOCK] (elements d [D]) of a cache found through a table (ROW elements apart).
    The table's addresses carry no alignment Triton can see; the caches are whole allocations (256-byte
    aligned) with 16-element-aligned rows, and saying so lets the loads be 16-byte vectors, not 2-byte ones."""
    ptrs = base + pos[:, None] * ROW + d[None, :]
    return tl.max_contiguous(tl.multiple_of(ptrs, [16, 16]), [1, 16])


@triton.jit
def _split_chunk(n, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """Positions per split of an n-position context: whole BLOCKs, at least one."""
    return tl.maximum(tl.cdiv(tl.cdiv(n, SPLITS), BLOCK), 1) * BLOCK


@triton.jit
def _attn_one_state(q_rows, scale, k_base, v_base, lo, hi, d, GROUP: tl.constexpr, HKV: tl.constexpr,
                    D: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr):
    """Positions [lo, hi) BLOCK at a time with one running softmax state per query head: (acc [GP, D], max [GP],
    sum [GP]); q_rows: the group's first query row. Each step's sums over D and over the block cross the warps."""
    g = tl.arange(0, GP)
    q = tl.load(q_rows + g[:, None] * D + d[None, :], mask=g[:, None] < GROUP, other=0.0) * scale
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    for p0 in range(lo, hi, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        pmask = p < hi
        k = tl.load(_kv_rows(k_base, p, d, HKV * D), mask=pmask[:, None], other=0.0).to(tl.float32)
        v = tl.load(_kv_rows(v_base, p, d, HKV * D), mask=pmask[:, None], other=0.0).to(tl.float32)
        sc = tl.sum(q[:, None, :] * k[None, :, :], 2)
        sc = tl.where(pmask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.exp(m_i - m_new)
        pr = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, 1)
        acc = acc * alpha[:, None] + tl.sum(pr[:, :, None] * v[None, :, :], 1)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _warp_rows(k_base, v_base, p, valid, d, HKV: tl.constexpr, D: tl.constexpr):
    """Keys and values of positions p [PB, W] where ``valid`` [PB, W] (zeros elsewhere) as float32 [1, PB, W, D]."""
    pmask = valid[None, :, :, None]
    rows = p[None, :, :, None] * (HKV * D) + d[None, None, None, :]
    k = tl.load(tl.max_contiguous(tl.multiple_of(k_base + rows, [1, 1, 1, 16]), [1, 1, 1, 16]),
                mask=pmask, other=0.0).to(tl.float32)
    v = tl.load(tl.max_contiguous(tl.multiple_of(v_base + rows, [1, 1, 1, 16]), [1, 1, 1, 16]),
                mask=pmask, other=0.0).to(tl.float32)
    return k, v


@triton.jit
def _attn_warp_states(q_rows, scale, k_base, v_base, lo, hi, d, GROUP: tl.constexpr, HKV: tl.constexpr,
                      D: tl.constexpr, GP: tl.constexpr, W: tl.constexpr, PB: tl.constexpr,
                      PRE: tl.constexpr = False, k_first=None, v_first=None, FIRST: tl.constexpr = False):
    """_attn_one_state with W running states per query head, one per warp: a step takes W x PB positions (warp
    w: PB of them) and the W states are merged once, at the end. The tensors are [GP, PB, W, D] throughout
    (the states keep size-1 dims) and the keys and values are loaded in that shape, so every op keeps the
    loads' layout (lanes along D and PB, warps along W): a step's sums over D and PB stay in a warp, with no
    layout exchange through shared memory. Dearer than one state for a single step (the final merge). PRE: each
    step's keys and values are asked for before the step before it computes (two steps' rows in registers);
    FIRST (with PRE): the first step's are k_first, v_first (_warp_rows of lo + wj), loaded by the caller."""
    wj = tl.arange(0, PB)[:, None] + tl.arange(0, W)[None, :] * PB  # [PB, W]
    g4 = tl.arange(0, GP)[:, None, None, None]
    q4 = tl.load(q_rows + g4 * D + d[None, None, None, :], mask=g4 < GROUP, other=0.0) * scale  # [GP, 1, 1, D]
    m_i = tl.full([GP, 1, W, 1], float("-inf"), tl.float32)
    l_i = tl.zeros([GP, 1, W, 1], dtype=tl.float32)
    acc = tl.zeros([GP, 1, W, D], dtype=tl.float32)
    if PRE:
        if FIRST:
            k_n, v_n = k_first, v_first
        else:
            k_n, v_n = _warp_rows(k_base, v_base, lo + wj, lo + wj < hi, d, HKV, D)
    for p0 in range(lo, hi, W * PB):
        p = p0 + wj
        pmask = (p < hi)[None, :, :, None]
        if PRE:
            k, v = k_n, v_n
            k_n, v_n = _warp_rows(k_base, v_base, p + W * PB, p + W * PB < hi, d, HKV, D)
        else:
            k, v = _warp_rows(k_base, v_base, p, p < hi, d, HKV, D)
        sc = tl.sum(q4 * k, 3, keep_dims=True)  # [GP, PB, W, 1]
        sc = tl.where(pmask, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1, keep_dims=True))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a warp with no position yet keeps zeros
        alpha = tl.exp(m_i - m_use)
        pr = tl.exp(sc - m_use)
        l_i = l_i * alpha + tl.sum(pr, 1, keep_dims=True)
        acc = acc * alpha + tl.sum(pr * v, 1, keep_dims=True)
        m_i = m_new
    m = tl.max(m_i, 2, keep_dims=True)  # [GP, 1, 1, 1]: the W states merged
    wt = tl.where(m_i == float("-inf"), 0.0, tl.exp(m_i - m))
    return (tl.reshape(tl.sum(acc * wt, 2), [GP, D]), tl.reshape(m, [GP]),
            tl.reshape(tl.sum(l_i * wt, 2), [GP]))


@triton.jit
def _attn_store(acc, m_i, l_i, part_o_ptr, part_ml_ptr, row, g, d, GROUP: tl.constexpr, D: tl.constexpr):
    """A split's partial output [GP, D] and (max, sum) [GP] into rows ``row`` of the merge's inputs."""
    tl.store(part_o_ptr + row[:, None] * D + d[None, :], acc, mask=g[:, None] < GROUP)
    tl.store(part_ml_ptr + row * 2, m_i, mask=g < GROUP)
    tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g < GROUP)


@triton.jit
def _kv_bases(base_ptr, maxlen_ptr, b, h, layer, HKV: tl.constexpr, D: tl.constexpr, KVF32: tl.constexpr):
    """Where kv head h's keys and values of layer ``layer`` start in sequence b's cache (found through the tables)."""
    if KVF32:
        base = tl.load(base_ptr + b).to(tl.pointer_type(tl.float32))
    else:
        base = tl.load(base_ptr + b).to(tl.pointer_type(tl.float16))
    maxlen = tl.load(maxlen_ptr + b).to(tl.int64)
    k_base = base + (layer * 2 * maxlen) * HKV * D + h * D
    return k_base, k_base + maxlen * HKV * D


@triton.jit
def _attn_short_heads(q_ptr, out_ptr, k_base, v_base, n, b, h, j, scale, HQ: tl.constexpr, HKV: tl.constexpr,
                      D: tl.constexpr, GS: tl.constexpr, W: tl.constexpr, PB: tl.constexpr, PRE: tl.constexpr,
                      k_first=None, v_first=None, FIRST: tl.constexpr = False):
    """Query heads h * GROUP + j * GS .. + GS of sequence b over all its n positions (_attn_warp_states; FIRST:
    the first step's rows given), their normalized output written to out (no merge)."""
    GROUP: tl.constexpr = HQ // HKV
    d = tl.arange(0, D)
    head0 = b * HQ + h * GROUP + j * GS
    acc, m_i, l_i = _attn_warp_states(q_ptr + head0 * D, scale, k_base, v_base, 0, n, d, GS, HKV, D, GS, W, PB,
                                      PRE, k_first, v_first, FIRST)
    g = tl.arange(0, GS)
    tl.store(out_ptr + (head0 + g)[:, None] * D + d[None, :], acc / l_i[:, None])


@triton.jit
def _decode_attn_kernel(q_ptr, base_ptr, maxlen_ptr, len_ptr, part_o_ptr, part_ml_ptr, out_ptr, layer, scale,
                        HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, GP: tl.constexpr,
                        SPLITS: tl.constexpr, BLOCK: tl.constexpr, KVF32: tl.constexpr, EARLY: tl.constexpr,
                        W: tl.constexpr, PB: tl.constexpr, WMIN: tl.constexpr, SHORT: tl.constexpr,
                        GS: tl.constexpr, SW: tl.constexpr, SPB: tl.constexpr, PRE: tl.constexpr,
                        GDC: tl.constexpr):
    """One (sequence b, kv head h, split s): the group's query heads (GP >= the group, padded) over positions
    [s * chunk, (s + 1) * chunk) of the first len[b]; partial output and (max, sum) for the merge. Scores and
    the weighted sum are float32 FMAs on CUDA cores (one query per head: no tensor-core tile to fill). A split
    of fewer than WMIN BLOCKs takes one softmax state per head (_attn_one_state); a longer one, with W (> 0) x
    PB = BLOCK, one per warp (_attn_warp_states); see ATTN_WARP_STATES. A sequence of at most SHORT (> 0)
    positions is taken whole instead, GS query heads at a time on SW warps (the number it runs), and written to
    out (no merge; the arithmetic of _decode_attn_short_kernel). EARLY (the decode step's tables were written before
    its first kernel): lengths and cache addresses are read, and splits past the context leave, before the wait
    for the producer of q and the newest K/V row."""
    if not EARLY:
        _after_producers(GDC)
    b, h, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    GROUP: tl.constexpr = HQ // HKV
    n = tl.load(len_ptr + b)
    if SHORT > 0:
        if n <= SHORT:
            if sp < GROUP // GS:
                k_base, v_base = _kv_bases(base_ptr, maxlen_ptr, b, h, layer, HKV, D, KVF32)
                if EARLY:
                    _after_producers(GDC)
                for j in range(sp, GROUP // GS, SPLITS):
                    _attn_short_heads(q_ptr, out_ptr, k_base, v_base, n, b, h, j, scale, HQ, HKV, D, GS, SW, SPB,
                                      PRE)
            return
    chunk = _split_chunk(n, SPLITS, BLOCK)
    lo = sp * chunk
    if lo >= n:  # past the context: the merge reads only the splits that hold positions
        return
    hi = tl.minimum(lo + chunk, n)
    k_base, v_base = _kv_bases(base_ptr, maxlen_ptr, b, h, layer, HKV, D, KVF32)
    if EARLY:
        _after_producers(GDC)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    # each path loads q and stores its results in its own layouts (nothing crosses the branch to be converted)
    q_rows = q_ptr + (b * HQ + h * GROUP) * D
    row = (b * HQ + h * GROUP + g) * SPLITS + sp
    if W == 0:
        acc, m_i, l_i = _attn_one_state(q_rows, scale, k_base, v_base, lo, hi, d, GROUP, HKV, D, GP, BLOCK)
        _attn_store(acc, m_i, l_i, part_o_ptr, part_ml_ptr, row, g, d, GROUP, D)
    elif chunk >= WMIN * BLOCK:
        acc, m_i, l_i = _attn_warp_states(q_rows, scale, k_base, v_base, lo, hi, d, GROUP, HKV, D, GP, W, PB)
        _attn_store(acc, m_i, l_i, part_o_ptr, part_ml_ptr, row, g, d, GROUP, D)
    else:
        acc, m_i, l_i = _attn_one_state(q_rows, scale, k_base, v_base, lo, hi, d, GROUP, HKV, D, GP, BLOCK)
        _attn_store(acc, m_i, l_i, part_o_ptr, part_ml_ptr, row, g, d, GROUP, D)


@triton.jit
def _decode_attn_short_kernel(q_ptr, base_ptr, maxlen_ptr, len_ptr, out_ptr, layer, scale,
                              HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, GS: tl.constexpr,
                              KVF32: tl.constexpr, EARLY: tl.constexpr, W: tl.constexpr, PB: tl.constexpr,
                              PRE: tl.constexpr, OLD: tl.constexpr, GDC: tl.constexpr):
    """Decode attention of short contexts, no merge: program (sequence b, kv head h, j) takes query heads
    h * GROUP + j * GS .. + GS over all len[b] positions, W x PB at a time with a softmax state per warp, and
    writes their normalized output once (see ATTN_SHORT_MAX). EARLY as in _decode_attn_kernel; OLD (with EARLY
    and PRE): the first step's cached rows older than the newest are read before the wait as well (no kernel of
    the step writes them; the newest, which the q/k/v gemv just appended, after it)."""
    if not EARLY:
        _after_producers(GDC)
    b, h, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = tl.load(len_ptr + b)
    k_base, v_base = _kv_bases(base_ptr, maxlen_ptr, b, h, layer, HKV, D, KVF32)
    if OLD:
        d = tl.arange(0, D)
        wj = tl.arange(0, PB)[:, None] + tl.arange(0, W)[None, :] * PB
        k_old, v_old = _warp_rows(k_base, v_base, wj, wj < n - 1, d, HKV, D)
    if EARLY:
        _after_producers(GDC)
    if OLD:
        newest = wj == n - 1
        k_new, v_new = _warp_rows(k_base, v_base, wj, newest, d, HKV, D)
        _attn_short_heads(q_ptr, out_ptr, k_base, v_base, n, b, h, j, scale, HQ, HKV, D, GS, W, PB, PRE,
                          tl.where(newest[None, :, :, None], k_new, k_old),
                          tl.where(newest[None, :, :, None], v_new, v_old), True)
    else:
        _attn_short_heads(q_ptr, out_ptr, k_base, v_base, n, b, h, j, scale, HQ, HKV, D, GS, W, PB, PRE)


@triton.jit
def _merge_kernel(part_o_ptr, part_ml_ptr, out_ptr, len_ptr, HQ: tl.constexpr, D: tl.constexpr,
                  SPLITS: tl.constexpr, SP: tl.constexpr, BLOCK: tl.constexpr, EARLY: tl.constexpr,
                  SHORT: tl.constexpr, GDC: tl.constexpr):
    """Program (sequence b, query head h): log-sum-exp merge of the head's split partials -> out [D]; only the
    splits that hold positions (a short context fills a few of the graph's fixed count) are read; nothing for a
    sequence of at most SHORT (> 0) positions (the split kernel wrote its output). EARLY: the length is read
    before the wait (see _decode_attn_kernel)."""
    if not EARLY:
        _after_producers(GDC)
    row0 = tl.program_id(0) * SPLITS  # rows of (b * HQ + h) * SPLITS + split
    n = tl.load(len_ptr + tl.program_id(0) // HQ)
    if EARLY:
        _after_producers(GDC)
    if SHORT > 0:
        if n <= SHORT:
            return
    ss = tl.arange(0, SP)
    d = tl.arange(0, D)
    smask = ss * _split_chunk(n, SPLITS, BLOCK) < n
    m = tl.load(part_ml_ptr + (row0 + ss) * 2, mask=smask, other=float("-inf"))
    l = tl.load(part_ml_ptr + (row0 + ss) * 2 + 1, mask=smask, other=0.0)
    mmax = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - mmax))
    o = tl.load(part_o_ptr + (row0 + ss[:, None]) * D + d[None, :], mask=smask[:, None], other=0.0)
    o = tl.sum(o * w[:, None], 0) / tl.sum(w * l, 0)
    tl.store(out_ptr + tl.program_id(0) * D + d, o)


@triton.jit
def _rope_append_kernel(qkv_ptr, q_out_ptr, cos_ptr, sin_ptr, pos_ptr, base_ptr, maxlen_ptr, layer,
                        HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, KVF32: tl.constexpr,
                        GDC: tl.constexpr):
    """Decode, many sequences: program (b, head) of a fused q/k/v row: RoPE q into q_out, RoPE k and copy v
    into sequence b's cache at pos[b] (the gemv's EPI_QKV epilogue, for the tensor-core path)."""
    _after_producers(GDC)
    b, head = tl.program_id(0), tl.program_id(1)
    D: tl.constexpr = 2 * HALF
    d = tl.arange(0, HALF)
    src = qkv_ptr + (b * (HQ + 2 * HKV) + head) * D + d
    lo = tl.load(src)
    hi = tl.load(src + HALF)
    pos, c, sn, base, maxlen = _rope_tables(head, b, pos_ptr, cos_ptr, sin_ptr, base_ptr, maxlen_ptr, d, HQ, HKV,
                                            HALF)
    _rope_store_head(lo, hi, d, head, b, pos, c, sn, base, maxlen, q_out_ptr, layer, HQ, HKV, HALF, KVF32)


@triton.jit
def _prefill_attn_kernel(q_ptr, k_ptr, v_ptr, out_ptr, T, start, scale, stride_kv,
                         HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                         BM: tl.constexpr, BLOCK: tl.constexpr, KVF32: tl.constexpr):
    """Causal flash attention for T new queries at positions start.. over a float16 cache [max_len, HKV, D]."""
    pm, hq = tl.program_id(0), tl.program_id(1)
    h = hq // (HQ // HKV)
    t = pm * BM + tl.arange(0, BM)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (t[:, None] * HQ + hq) * D + d[None, :], mask=t[:, None] < T, other=0.0)
    q = q * scale
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, D], dtype=tl.float32)
    qpos = start + t
    hi = tl.minimum(start + pm * BM + BM, start + T)
    for p0 in range(0, hi, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        k = tl.load(k_ptr + (p[:, None] * stride_kv + h * D) + d[None, :], mask=p[:, None] < hi,
                    other=0.0).to(tl.float32)
        sc = tl.dot(q, tl.trans(k), input_precision="ieee")
        ok = (p[None, :] <= qpos[:, None]) & (p[None, :] < hi)
        sc = tl.where(ok, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        pr = tl.exp(sc - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(pr, 1)
        v = tl.load(v_ptr + (p[:, None] * stride_kv + h * D) + d[None, :], mask=p[:, None] < hi,
                    other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(pr, v, input_precision="ieee")
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + (t[:, None] * HQ + hq) * D + d[None, :], out, mask=t[:, None] < T)


@triton.jit
def _embed_kernel(table_ptr, ids_ptr, out_ptr, key_ptr, H, BH: tl.constexpr, KEYS: tl.constexpr,
                  GDC: tl.constexpr):
    """out[t] = float32(table[ids[t]]) (the decode step's embedding gather, one launch). KEYS: an id of -1 takes
    the token the last step's lm_head left in key_ptr[t], and key_ptr[t] is reset to ARGMAX_EMPTY for this
    step's (see _argmax_update)."""
    _after_producers(GDC)
    t = tl.program_id(0)
    row = tl.load(ids_ptr + t)
    if KEYS:  # an id of -1: the argmax the last step left in this row's key
        key = tl.load(key_ptr + t)
        row = tl.where(row < 0, _KEY_COLS - (key & _KEY_COLS), row)
        tl.debug_barrier()  # every thread has read the key before it is reset
        tl.store(key_ptr + t, _KEY_EMPTY)
    for h0 in range(0, H, BH):
        h = h0 + tl.arange(0, BH)
        v = tl.load(table_ptr + row * H + h, mask=h < H, other=0.0)
        tl.store(out_ptr + t * H + h, v.to(tl.float32), mask=h < H)


@triton.jit
def _rope_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, pos_ptr, H, HALF: tl.constexpr, HP: tl.constexpr):
    """x [T, H, 2 HALF] rotate-half RoPE at pos[t] -> out."""
    t = tl.program_id(0)
    h = tl.arange(0, HP)
    d = tl.arange(0, HALF)
    mask = h[:, None] < H
    pos = tl.load(pos_ptr + t)
    c = tl.load(cos_ptr + pos * HALF + d)[None, :]
    s = tl.load(sin_ptr + pos * HALF + d)[None, :]
    base = (t * H + h[:, None]) * 2 * HALF + d[None, :]
    lo = tl.load(x_ptr + base, mask=mask, other=0.0)
    hi = tl.load(x_ptr + base + HALF, mask=mask, other=0.0)
    lo, hi = _rotate(lo, hi, c, s)
    tl.store(out_ptr + base, lo, mask=mask)
    tl.store(out_ptr + base + HALF, hi, mask=mask)


# ---------------------------------------------------------------------------------------------------------
# launchers

GEMV_MAX_TOKENS = 4
SCRATCH_K = 65536  # the fused prologue's scratch holds GEMV_MAX_TOKENS rows of up to this many inputs
# Positions per decode-attention step (16 and 32 measured alike on an H200; 64 slower). H200, decode step of one
# sequence at 64 / 1024 / 4096 tokens of context: 8 took 964-972 / 1281-1285 / 2058-2063 us against 980-983 /
# 1175-1178 / 1618-1620 (a gain at short contexts only, where its 8 splits of 8 positions run side by side); splits
# of 8 positions in blocks of 16 (the rest masked) lost at both: 992-993 / 1183-1184 against 983 / 1178.
ATTN_BLOCK = 16
# decode attention's warps (H100, decode step at 64 / 1024 tokens of context: 4 warps 1105 / 1339 us, 8 warps
# 1106 / 1296, 2 warps 1126 / 1291) and the merge's (1, 2, 4 alike)
ATTN_WARPS, MERGE_WARPS = 8, 2
# choose_splits aims at this many (sequence, kv head, split) programs per SM. H200, decode step of one sequence
# at 64 / 1024 / 4096 tokens of context: 4 (64 splits: 320 programs of 146 registers, one an SM, 2.4 waves)
# 980 / 1175 / 1618 us, 2 (52 splits) 982 / 1177 / 1621, 1 (26) 983 / 1322 / 2304; nor a register cap on the
# attention kernel (96: two programs an SM, no spills) 982 / 1173 / 1615, (64: 56 bytes of stack) 1012 / 1458 /
# 2284: its time at long contexts is not waves of programs waiting for an SM.
ATTN_PROGRAMS_PER_SM = 4
# Splits of at least ATTN_WARP_STATES_MIN_BLOCKS blocks keep a softmax state per warp (_attn_warp_states: no
# layout exchange or cross-warp sum per step; one merge of the warps' states at the end), shorter ones one state
# per head. H200, decode step of one sequence, variants alternating in one run (us, warp states / one state):
# 1024 tokens of context (splits of 2 blocks) 1260 / 1173, 2048 (3 blocks) 1303 / 1321, 4096 (5 blocks)
# 1395-1399 / 1621-1623; at 64 (1 block, the one-state path in both) 984 / 980. Before the branch loaded q and
# stored the results in each path's own layout, the one-state path in the same kernel cost 1004 at 64.
ATTN_WARP_STATES = True
ATTN_WARP_STATES_MIN_BLOCKS = 3
# Decode attention takes a sequence of at most ATTN_SHORT_MAX positions (0: none) whole, with no splits and no
# merge: a program per (sequence, kv head, ATTN_SHORT_HEADS query heads), ATTN_WARPS softmax states of
# ATTN_SHORT_PB positions a step, each step's rows asked for during the step before (ATTN_SHORT_PREFETCH). The
# fused decode step captures a graph for steps whose sequences are all that short (one attention kernel a layer:
# _decode_attn_short_kernel) and one for the others (the split kernel takes the short ones the same way, and the
# merge skips them), so a sequence's result never depends on the batch around it. H200, decode step of one
# sequence, us, alternating in one run (no short path / short / short with prefetch / 16 warps with prefetch):
# 64 tokens of context 984.0 / 964.3 / 958.7 / 973.9, 96 1020.1 / 1002.8 / 997.0 / 995.2, 128 1031.2 / 1040.2 /
# 1034.8 / 1017.7, 192 1033.9 / 1115.5 / 1110.6 / 1062.8; 16 sequences at 64: 2859.0 / 2690.5 / 2693.4. 8
# positions a warp (a step of 64) 1213.7 at 64 tokens; 4 query heads a program (5 programs) 1104.0.
ATTN_SHORT_MAX = 96
ATTN_SHORT_HEADS, ATTN_SHORT_PB, ATTN_SHORT_PREFETCH = 1, 2, True
# With early tables, steps of at most this many (sequence, query head) rows read the first step's cached rows
# older than the newest before the short kernel waits for q (_decode_attn_short_kernel's OLD). H200, decode step
# at 64 tokens of context, alternating in one run: one sequence 952.0 us against 958.5 without; 16 sequences (320
# rows) 2696.8 against 2696.7.
ATTN_SHORT_OLD_HEADS = 64
PAIR_TILE = 16  # row pairs per ternary tile and gemv program (64 contiguous bytes per word row)
GEMM_WORDS = 64  # words per ternary GEMM step (64 / 32: 157 / 200 us per layer at 64 tokens on an H200)
GEMV_WARPS = 8  # tiles of 8 / 16 pairs with 2 / 4 / 8 warps measured on an H200: 16 pairs, 8 warps fastest
# with the fused prologue; an int8 input (no prologue) of <= 512 words per pair runs faster on 4 warps (H200, us:
# qkv 3.75 -> 3.17, o 3.42 -> 3.00, gate_up 7.22 -> 6.05; down, 896 words, 6.21 -> 9.40 so it keeps 8)
GEMV_XQ_WARPS = 4
# The gemv's fused RMSNorm + quantization prologue runs in every program. With more programs than this per SM
# (they queue on the SMs) or more tokens than PROLOGUE_MAX_TOKENS, norm_quant quantizes the rows once and the
# gemv reads int8. H200: gate_up (432 programs, 132 SMs) at one token 11.0 -> 8.5 us; qkv / o / down (80-120
# programs) stay fused at one token; decode steps of 2 / 4 sequences 2.72 -> 2.26 / 4.46 -> 3.38 ms.
PROLOGUE_PROGRAMS_PER_SM = 2
PROLOGUE_MAX_TOKENS = 1
# A gemv of int8 products with one column group and at most this many words per pair (rounded up to a power of
# two) loads its whole tile at once, before waiting for its producers (``_tgemv_kernel``'s TILE); 0: never.
GEMV_TILE_WORDS = 1024
# Slots of the whole-tile dot product per pass of its loop (1, 2, 4 or 8; ``_tile_dot``). Unrolled whole (8),
# the compiler hoisted every slot's x loads and their 64-bit addresses: 247-255 registers, with spills in gate/up
# (1168 bytes of stack) and down (2432), and gate/up ran 2 programs per SM (432 in 1.6 waves; 3 per SM now). A
# loop of 4 passes of 2 slots keeps them at 125-215 registers (8 bytes of stack in o; Triton 3.6, sm_90). H200
# decode step at 64 / 1024 tokens of context (with a preload since dropped): 8 slots 1033 / 1382 us, 1 slot
# 1001 / 1341, 2 slots 972 / 1311, 4 slots 994 / 1336. The qkv, o and down gemvs run 8 warps, gate/up 4 (8 warps
# with 1 or 2 slots: 1092 / 1029 us at 64).
SLOT_UNROLL = 2
# A register cap for the one-token gemv of more than 512 words per pair (bitnet-2b4t's down: 215 -> 168 registers,
# 144 bytes of stack): its programs, launched early (PDL), then fit on an SM beside one program of the gate/up gemv
# before it (18K + 43K registers of 64K, not 18K + 57K), so they start reading their tiles sooner. H200, decode step
# at 64 / 1024 tokens of context, alternating in one run: 980.7-981.0 / 1176.4-1177.3 us with it, 989.9-990.2 /
# 1185.5-1187.0 without; 152 registers 996 / 1192, 184 992 / 1188; 128 (beside a q/k/v program too, which then took
# 5.4 us, not ~6.1) 1095 / 1336 as down spilled. Capping q/k/v at 88 (to fit beside down) and o at 112 (two gate/up
# programs beside it) as well: 982.4-983.0 / 1176.4-1177.2 against 979.6-980.7 / 1173.7-1173.8 (another run).
# CUDA only (the launch option is NVIDIA's); None: no cap.
GEMV_WIDE_MAXNREG = 168
# Ternary GEMMs of FEW_MIN..FEW_MAX tokens on int8 activations with one column group (batched decode of 17-32
# sequences, prefill chunks of as many tokens) take ``_tgemm_few_kernel``: tiles of FEW_PAIRS pairs x FEW_WORDS
# words a block on FEW_WARPS warps, split over K to ~FEW_PROGRAMS_PER_SM programs per SM. H200, bitnet-2b4t: a
# decode step of 32 sequences 4246 us against 7081 with _tgemm_kernel (whose 16-pair tiles of 32 tokens are slow),
# of 8 sequences 2942 against 3019, of 16 3522 against 3245 and of 4 (its gate/up and down; the gemv's fusions
# kept for q/k/v and o) 3210 against 2769, so it starts at 17 tokens. Timed alone with the weights in L2 (CUDA
# graphs of 20 launches of one linear) it looked better everywhere from 3 tokens (a layer's four linears at 8 / 16
# tokens: 44 / 47 us against 74 / 75): its K-split programs wait on DRAM in the step. Tried there: 32 pairs, 64
# words, 4 or 8 warps, half / twice the programs; the splits' sums added with int32 atomics gave wrong sums for
# 32-pair x 32-word tiles (stores + one counter kept: exact). A matrix of FEW_DEEP_K inputs or more takes it from
# FEW_DEEP_MIN tokens: _tgemm_kernel's 32-pair tiles give bitnet-2b4t's down (6912 inputs, 2560 rows) only 40
# programs there, each over all of K. H200, decode step at 64 tokens of context, alternating twice in one run: 8 /
# 16 sequences 2540 / 2889 us a step against 2879 / 3108; every linear from 5 tokens: 2946 / 3522. (And no tiles of
# 16 pairs for _tgemm_kernel: at 16 tokens they were slower.)
FEW_MIN, FEW_MAX = 17, 32
FEW_DEEP_MIN, FEW_DEEP_K = 5, 4096
FEW_PAIRS, FEW_WORDS, FEW_WARPS, FEW_PROGRAMS_PER_SM = 16, 32, 2, 8
FEW_WS_INTS, FEW_COUNTERS = 1 << 21, 4096  # its splits' int32 sums and the tiles' counters (_few_scratch)
# The decode step's o gemv (up to FOLD_MAX_TOKENS tokens, int8 activations): its last program normalizes and
# quantizes the residual rows for gate/up (``matmul``'s next_norm), no norm + quantization kernel of its own. That
# program takes the rows one after another, so for 2-4 sequences norm_quant's one program per row wins (H200,
# decode step at 64 tokens of context, alternating in one run: 2 / 4 sequences 1642.5 / 2620 us a step against
# 1720-1725 / 2776-2785 with the fold).
FOLD_NORM = os.environ.get("ONEBIT_FOLD_NORM", "1") != "0"
FOLD_MAX_TOKENS = 1
# _tgemm_kernel's gated-activation epilogue for a gate/up of (gate n, up n) pairs (False: three torch kernels
# after it). H200, decode step at 64 tokens of context: 8 / 16 / 64 sequences 2860 / 3076-3088 / 5413 us a step
# against 3018 / 3259 / 5968 with torch's.
GEMM_GLU = True
# Programmatic dependent launch (CUDA, compute capability >= 9): each kernel of a step is launched while the
# previous one runs and waits for it in ``_after_producers``. ONEBIT_PDL=0 turns it off.
PDL = os.environ.get("ONEBIT_PDL", "1") != "0"
# Tables a decode step's kernels look up (positions, lengths, cache addresses and sizes, RoPE rows) are written
# before its first kernel (one host-to-device copy), never by a kernel of the step. With PDL a kernel starts only
# once the kernel two before it has finished, so callers that say so (``early``) let kernels read them before
# they wait for their producer: the lookups leave the chain of dependent loads that follows the wait.
EARLY_TABLES = True


def _per_device(make):
    """``make(device)`` once per device, kept for the process: CUDA graphs keep the addresses they captured."""
    made: dict = {}

    @functools.wraps(make)
    def get(device):
        key = str(device)
        if key not in made:
            made[key] = make(device)
        return made[key]
    return get


@_per_device
def _dummy(device) -> torch.Tensor:
    """What a kernel's unused pointer arguments point at."""
    return torch.zeros(16, dtype=torch.float32, device=device)


@_per_device
def _scratch(device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ternary gemv's buffers: its fused prologue's (int8 and float32 views of one allocation, and the token
    scales) and its programs' int32 counter (NEXT: zero between launches, as the last program resets it; the
    kernels that use it run one after another on the stream)."""
    f = torch.zeros(GEMV_MAX_TOKENS * SCRATCH_K, dtype=torch.float32, device=device)
    return (f.view(torch.int8), f, torch.zeros(16, dtype=torch.float32, device=device),
            torch.zeros(1, dtype=torch.int32, device=device))


@_per_device
def _few_scratch(device) -> tuple[torch.Tensor, torch.Tensor]:
    """``_tgemm_few_kernel``'s split sums (int32 [FEW_WS_INTS]) and tile counters (zero between launches: the
    last split resets its tile's)."""
    return (torch.zeros(FEW_WS_INTS, dtype=torch.int32, device=device),
            torch.zeros(FEW_COUNTERS, dtype=torch.int32, device=device))


@functools.lru_cache(maxsize=None)
def _nvidia(device: str) -> bool:
    """A CUDA device that Triton compiles for with its NVIDIA backend (not the CPU interpreter, not HIP): where
    NVIDIA's launch options (launch_pdl, maxnreg) apply."""
    return (torch.device(device).type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.version.hip is None)


@functools.lru_cache(maxsize=None)
def _pdl_capable(device: str) -> bool:
    return _nvidia(device) and torch.cuda.get_device_capability(device)[0] >= 9


def _pdl(device) -> dict:
    """Launch options: GDC (the kernels' constexpr) and, where it is on, launch_pdl."""
    if not PDL or not _pdl_capable(str(torch.device(device))):
        return {"GDC": False}
    return {"GDC": True, "launch_pdl": True}


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _prep_block(k: int) -> tuple[int, bool]:
    """Block size of the RMSNorm + quantization of a k-wide row, and whether the row is one block."""
    bk = _pow2(k) if k <= 8192 else 1024
    return bk, bk >= k


class TernaryLayout:
    """How a ternary [n, k] matrix sits in int32 words for the kernels.

    Rows are paired: pair p holds rows A(p) = (p // P) * 2P + p % P and B(p) = A(p) + P (P = ``pair``: n / 2 by
    default, so (gate n, up n) of a fused gate/up matrix share a pair; half a head for q/k/v, so a head's RoPE
    halves do). Inputs are cut into segments (the column groups of the scale grid, or, with one group, up to
    4096 inputs) of ``gw`` words; word j of a segment holds, for slot s = 0..7, input ``s * gw + j`` of the
    segment: row A's code (t + 1) in bits 2s, row B's in bits 16 + 2s. Pairs come in tiles of PAIR_TILE whose
    words are contiguous: data int32 [tiles, kwt, PAIR_TILE] (kwt = segments * gw words per pair). Padding
    (inputs past k, rows past n) holds code 1 = 0."""

    def __init__(self, n: int, k: int, groups: int = 1, pair: int | None = None):
        self.n, self.k, self.c = n, k, groups
        g = k // groups
        if groups == 1:
            self.bkw = 64
            kw8 = -(-k // 8)
            self.nseg = -(-kw8 // 512)
            self.gw = _round_up(-(-kw8 // self.nseg), self.bkw)
            self.gs = self.glim = 8 * self.gw
            self.maskk = self.nseg * self.gs != k
        else:
            self.bkw = max(32, min(64, _pow2(-(-g // 8))))
            self.gw = _round_up(-(-g // 8), self.bkw)
            self.nseg, self.gs, self.glim = groups, g, g
            self.maskk = 8 * self.gw != g
        self.kwt = self.nseg * self.gw
        self.pair = pair or max(1, -(-n // 2))
        self.np = _round_up(n, 2 * self.pair) // 2
        self.tiles = -(-self.np // PAIR_TILE)

    def _segments(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [r, k] -> [r, kwt, 8] (word, slot), padded with code 1."""
        r = codes.shape[0]
        if self.c == 1:
            full = torch.ones((r, self.nseg * self.gs), dtype=torch.int8, device=codes.device)
            full[:, :self.k] = codes
        else:
            full = torch.ones((r, self.c, 8 * self.gw), dtype=torch.int8, device=codes.device)
            full[:, :, :self.gs] = codes.view(r, self.c, self.gs)
        return full.view(r, self.nseg, 8, self.gw).transpose(2, 3).reshape(r, self.kwt, 8)

    def _rows(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ra = (p // self.pair) * (2 * self.pair) + p % self.pair
        return ra, ra + self.pair

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (t + 1) [n, k] (any integer dtype, on any device) -> data int32 [tiles, kwt, PAIR_TILE]."""
        dev = codes.device
        words = torch.full((self.tiles * PAIR_TILE, self.kwt), 0x55555555, dtype=torch.int32, device=dev)
        shifts = 2 * torch.arange(8, dtype=torch.int64, device=dev)
        step = max(1, (1 << 20) // max(1, self.kwt))  # pairs per pass: int64 temporaries of ~64 MB
        for p0 in range(0, self.np, step):
            p = torch.arange(p0, min(self.np, p0 + step), device=dev)
            halves = []
            for rows in self._rows(p):
                r = torch.ones((len(p), self.k), dtype=torch.int8, device=dev)
                ok = rows < self.n
                r[ok] = codes[rows[ok]].to(torch.int8)
                halves.append(self._segments(r).to(torch.int64))
            w = (halves[0] << shifts).sum(-1) | (halves[1] << (shifts + 16)).sum(-1)
            words[p0:p0 + len(p)] = torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32)
        return words.view(self.tiles, PAIR_TILE, self.kwt).transpose(1, 2).contiguous()

    def unpack(self, data: torch.Tensor) -> torch.Tensor:
        """data [tiles, kwt, PAIR_TILE] -> codes int8 [n, k] (the inverse of ``pack``)."""
        dev = data.device
        w = data.transpose(1, 2).reshape(-1, self.kwt)[:self.np].to(torch.int64) & 0xFFFFFFFF
        shifts = 2 * torch.arange(8, dtype=torch.int64, device=dev)
        rows = torch.ones((2 * self.np, self.kwt, 8), dtype=torch.int8, device=dev)
        ra, rb = self._rows(torch.arange(self.np, device=dev))
        rows[ra] = ((w[..., None] >> shifts) & 3).to(torch.int8)
        rows[rb] = ((w[..., None] >> (shifts + 16)) & 3).to(torch.int8)
        rows = rows.view(-1, self.nseg, self.gw, 8).transpose(2, 3).reshape(-1, self.nseg, 8 * self.gw)
        if self.c == 1:
            return rows.reshape(rows.shape[0], -1)[:self.n, :self.k].contiguous()
        return rows[:, :, :self.gs].reshape(rows.shape[0], -1)[:self.n].contiguous()


class Matrix:
    """A weight as the kernels read it: ``data`` (ternary: int32 words in ``layout``; int8 or float16/bfloat16
    [N, K]), ``scales`` float32 [C, N] (C column groups of k / C inputs each)."""

    def __init__(self, kind: int, data: torch.Tensor, scales: torch.Tensor, n: int, k: int, groups: int = 1,
                 layout: TernaryLayout | None = None):
        self.kind, self.data, self.scales, self.n, self.k = kind, data, scales, n, k
        self.c = groups
        self.layout = layout

    @classmethod
    def ternary(cls, codes: torch.Tensor, scales: torch.Tensor, groups: int = 1, pair: int | None = None):
        """From codes (t + 1) [n, k] on the device and scales float32 [C, n]."""
        n, k = codes.shape
        lay = TernaryLayout(n, k, groups, pair)
        return cls(W_TERNARY, lay.pack(codes), scales, n, k, groups, lay)

    def repair(self, pair: int) -> None:
        """Re-pack a ternary matrix with rows ``pair`` apart in each pair (in place)."""
        if self.layout.pair != pair:
            codes = self.layout.unpack(self.data)
            self.layout = TernaryLayout(self.n, self.k, self.c, pair)
            self.data = self.layout.pack(codes)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scales.numel() * 4


def norm_quant(x: torch.Tensor, weight: torch.Tensor | None, eps: float, quant: bool = True):
    """x float32 [M, K] -> (q int8 [M, K], s float32 [M]) with quant, else the normalized float32 rows."""
    m, k = x.shape
    dev = x.device
    d = _dummy(dev)
    bk, one = _prep_block(k)
    if quant:
        q = torch.empty((m, k), dtype=torch.int8, device=dev)
        s = torch.empty((m,), dtype=torch.float32, device=dev)
        # the gemv's warp count: the same reduction tree, so its fused prologue gives these bits exactly
        _norm_quant_kernel[(m,)](x, weight if weight is not None else d, q, s, d, k, eps,
                                 NORM=weight is not None, QUANT=True, BK=bk, ONE=one, num_warps=GEMV_WARPS,
                                 **_pdl(dev))
        return q, s
    y = torch.empty_like(x)
    _norm_quant_kernel[(m,)](x, weight, d, d, y, k, eps, NORM=True, QUANT=False, BK=bk, ONE=one,
                             num_warps=GEMV_WARPS, **_pdl(dev))
    return y


def _glu_torch(y: torch.Tensor, act: int, out: torch.Tensor | None) -> torch.Tensor:
    half = y.shape[1] // 2
    g, u = y[:, :half], y[:, half:]
    a = torch.square(torch.clamp_min(g, 0)) if act == ACT_RELU2 else g / (1.0 + torch.exp(-g))
    return a * u if out is None else out.copy_(a * u)


def matmul(x, w: Matrix, *, sx: torch.Tensor | None = None, norm: torch.Tensor | None = None, eps: float = 0.0,
           quant: bool = False, out: torch.Tensor | None = None, residual: bool = False,
           glu: int | None = None, qkv: dict | None = None, argmax: torch.Tensor | None = None,
           next_norm: tuple | None = None) -> torch.Tensor:
    """y = x @ W.T (scaled), x float32 [M, K] (or int8 with its scales ``sx``).

    ``norm``: RMSNorm x first (its weight); ``quant``: then quantize per token to int8 (fused into the ternary
    gemv's prologue for up to GEMV_MAX_TOKENS tokens, its own kernel otherwise). ``residual``: add into ``out``
    in place. ``glu``: ACT_RELU2 / ACT_SILU of W's two row halves (gate, up) -> [M, N/2]. ``qkv``: RoPE + KV
    append epilogue (decode, ternary, pairs of half a head: ``Matrix.repair``; see ``_tgemv_kernel``; its key
    ``early``: the tables may be read before the wait, as in ``decode_attention_tables``). ``argmax`` (a dense
    W, int64 [M] keys from ``new_argmax_keys`` or reset by ``embed``): each token's argmax column is folded into
    its key as the logits are stored (``argmax_from_keys`` reads them), so a greedy step need not move the
    logits. ``next_norm`` (with ``residual``): (weight, eps, q int8 [M, N], s float32 [M]): the updated rows of
    ``out`` RMSNormed and quantized for the next linear into q / s, by the gemv's last program (no kernel of
    its own; a separate kernel on the other paths). ``out`` (contiguous float32 [M, N], or [M, N/2] with
    ``glu``): where every path writes the result (and returns it); without it, a new tensor."""
    m = x.shape[0]
    dev = x.device
    d = _dummy(dev)
    xq = sx is not None
    n_out = w.n // 2 if glu is not None else w.n
    # a few tokens on int8 go to _tgemm_few_kernel, but for the gemv's fusions at up to GEMV_MAX_TOKENS
    few = (w.kind == W_TERNARY and w.c == 1 and (xq or quant) and m <= FEW_MAX and qkv is None
           and (FEW_MIN <= m or (FEW_DEEP_MIN <= m and w.k >= FEW_DEEP_K))
           and (next_norm is None or m > GEMV_MAX_TOKENS))
    gemv = not few and w.kind == W_TERNARY and m <= GEMV_MAX_TOKENS and (xq or w.k <= SCRATCH_K)
    # the ternary kernels' gated-activation epilogues apply it to row pairs, which must be (gate n, up n)
    glu_pairs = glu is not None and w.kind == W_TERNARY and 2 * w.layout.pair == w.n
    if not gemv and qkv is not None:
        raise ValueError("the fused RoPE + KV append epilogue is for ternary decode steps")
    if glu is not None and residual:
        raise ValueError("glu and residual do not combine")
    if glu is not None and (gemv or few) and not glu_pairs:
        raise ValueError("the gated-activation epilogue needs (gate n, up n) row pairs")
    if out is None and residual:
        raise ValueError("residual=True adds into out: pass it")
    if out is not None and (tuple(out.shape) != (m, n_out) or out.dtype != torch.float32 or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float32 [{m}, {n_out}] tensor, got {out.dtype} "
                         f"{list(out.shape)}")
    if argmax is not None and (w.kind == W_TERNARY or glu is not None or residual or argmax.shape[0] < m):
        raise ValueError("argmax keys are for a dense matrix's plain output, one key per token")
    if next_norm is not None and not residual:
        raise ValueError("next_norm normalizes the rows a residual add updated: pass residual=True")
    if next_norm is not None and not gemv:  # the norm + quantization as a kernel of its own
        y = matmul(x, w, sx=sx, norm=norm, eps=eps, quant=quant, out=out, residual=True)
        nq, ns = norm_quant(y, next_norm[0], next_norm[1])
        next_norm[2].copy_(nq)
        next_norm[3].copy_(ns)
        return y
    # a gemv of many programs per SM, or of several tokens, quantizes once first (see PROLOGUE_PROGRAMS_PER_SM)
    once = gemv and not xq and quant and (m > PROLOGUE_MAX_TOKENS
                                          or w.layout.tiles > PROLOGUE_PROGRAMS_PER_SM * sm_count(dev))
    if (once or not gemv) and not xq and (norm is not None or quant):  # one norm (+ quantization) kernel first
        xn = norm_quant(x, norm, eps, quant=quant)
        x, sx, xq, norm = (xn[0], xn[1], True, None) if quant else (xn, None, False, None)
    if w.kind == W_TERNARY:
        lay = w.layout
        if gemv:
            return _ternary_gemv(x, w, lay, m, xq, sx, norm, eps, quant, out, residual, glu, qkv, n_out, next_norm)
        if few:
            return _ternary_few(x, sx, w, m, out, residual, glu, n_out)
        fuse_glu = glu_pairs and GEMM_GLU
        if fuse_glu:
            y = out if out is not None else torch.empty((m, n_out), dtype=torch.float32, device=dev)
        else:
            y = out if (out is not None and glu is None) else torch.empty((m, w.n), dtype=torch.float32, device=dev)
        epi = EPI_GLU if fuse_glu else EPI_RESIDUAL if residual else EPI_STORE
        bm = 64 if m > 32 else 32 if m > 16 else 16
        pairs = 16 if m > 16 else 32  # H200, per layer at 16 / 64 / 512 tokens: 70 / 157 / 539 us with 32 pairs,
        grid = (triton.cdiv(m, bm), triton.cdiv(lay.np, pairs))  # 183 / 108 / 468 us with 16
        _tgemm_kernel[grid](x, sx if xq else d, w.data, w.scales, y, m, w.n, lay.np, lay.pair, lay.nseg,
                            KIN=w.k, KWT=lay.kwt, GW=lay.gw, GS=lay.gs, GLIM=lay.glim, C=w.c, PB=PAIR_TILE,
                            XQ=xq, EPI=epi, ACT=glu or 0, BM=bm, BPG=pairs,
                            BKW=GEMM_WORDS if lay.gw % GEMM_WORDS == 0 else 32, num_warps=4, num_stages=2,
                            **_pdl(dev))
        return y if glu is None or fuse_glu else _glu_torch(y, glu, out)
    if m > GEMV_MAX_TOKENS or xq:
        # int8 activations (the int8 lm_head) go to the tensor cores even for one token: nothing to unpack, and
        # the int8 mma reads a 128k x 2560 head at ~94% of a plain read's pace (the gemv: ~73%)
        y = out if (out is not None and glu is None) else torch.empty((m, w.n), dtype=torch.float32, device=dev)
        bm = 64 if m > 32 else 32 if m > 16 or w.kind != W_INT8 else 16
        grid = (triton.cdiv(m, bm), triton.cdiv(w.n, 64))
        _gemm_kernel[grid](x, sx if xq else d, w.data, w.scales, y, argmax if argmax is not None else d, m, w.k,
                           w.n, XQ=xq, RESIDUAL=residual and glu is None, BM=bm, BN=64,
                           BKW=256 if bm == 16 else 64, ARGMAX=argmax is not None, num_warps=4, num_stages=2,
                           **_pdl(dev))
        return y if glu is None else _glu_torch(y, glu, out)
    if out is None:
        out = torch.empty((m, w.n), dtype=torch.float32, device=dev)
    y = out if glu is None else torch.empty((m, w.n), dtype=torch.float32, device=dev)
    _gemv_kernel[(triton.cdiv(w.n, 8),)](x, w.data, w.scales, y, argmax if argmax is not None else d, m, w.k, w.n,
                                         RESIDUAL=residual and glu is None, BM=_pow2(m), BN=8, BKW=256,
                                         ARGMAX=argmax is not None, num_warps=4, **_pdl(dev))
    return y if glu is None else _glu_torch(y, glu, out)


def gemv_constexprs(lay: TernaryLayout, *, xq: bool, norm: bool, quant: bool, epi: int, act: int = 0,
                    head_dim: int = 2, kv_f32: bool = False, early: bool = False,
                    next_norm: bool = False) -> tuple[dict, int]:
    """``_tgemv_kernel``'s compile-time arguments (GDC aside: ``_pdl``) and warps for a ternary matrix laid out
    as ``lay``: what ``_ternary_gemv`` launches, and what benchmarks/gpu_registers.py compiles without a GPU."""
    bk, one = _prep_block(lay.k)
    nbk, none = _prep_block(lay.n) if next_norm else (1, True)  # the next norm's block (unused without it)
    kwp = _pow2(lay.kwt)
    const = dict(KIN=lay.k, KWT=lay.kwt, GW=lay.gw, GS=lay.gs, GLIM=lay.glim, C=lay.c, MASKK=lay.maskk, XQ=xq,
                 NORM=norm, QUANT=quant and not xq, EPI=epi, ACT=act, HALF_D=max(1, head_dim // 2), KVF32=kv_f32,
                 BP=PAIR_TILE, BKW=lay.bkw, BK=bk, ONE=one, GSP=_pow2(lay.gs),
                 TILE=(xq or quant) and lay.c == 1 and kwp <= GEMV_TILE_WORDS, KWP=kwp,
                 EARLY=early and EARLY_TABLES, NEXT=next_norm, NBK=nbk, NONE=none, SU=SLOT_UNROLL)
    # NEXT: norm_quant's warps (the same reduction tree: the same bits)
    warps = GEMV_XQ_WARPS if xq and lay.kwt <= 512 and not next_norm else GEMV_WARPS
    return const, warps


def gemv_regs(lay: TernaryLayout, m: int, device) -> dict:
    """``_tgemv_kernel``'s register cap as a launch option (see GEMV_WIDE_MAXNREG), or none."""
    if not (GEMV_WIDE_MAXNREG and lay.kwt > 512 and m == 1) or not _nvidia(str(torch.device(device))):
        return {}
    return {"maxnreg": GEMV_WIDE_MAXNREG}


def _ternary_gemv(x, w: Matrix, lay: TernaryLayout, m: int, xq: bool, sx, norm, eps: float, quant: bool, out,
                  residual: bool, glu, qkv, n_out: int, next_norm: tuple | None = None) -> torch.Tensor:
    dev = x.device
    d = _dummy(dev)
    epi = EPI_QKV if qkv is not None else EPI_GLU if glu is not None else EPI_RESIDUAL if residual else EPI_STORE
    if epi == EPI_QKV and lay.pair != qkv["head_dim"] // 2:
        raise ValueError(f"the q/k/v epilogue needs rows paired half a head apart (pair {qkv['head_dim'] // 2}, "
                         f"this matrix has {lay.pair}): Matrix.repair")
    if out is None:
        out = torch.empty((m, n_out), dtype=torch.float32, device=dev) if epi != EPI_QKV else d
    scq, scf, ss, cnt = _scratch(dev)
    q = qkv or {}
    nx = next_norm or (d, 0.0, d, d)
    const, warps = gemv_constexprs(lay, xq=xq, norm=norm is not None, quant=quant, epi=epi, act=glu or 0,
                                   head_dim=q.get("head_dim", 2), kv_f32=q.get("kv_f32", False),
                                   early=bool(q.get("early")), next_norm=next_norm is not None)
    _tgemv_kernel[(lay.tiles,)](
        x, sx if xq else d, norm if norm is not None else d, w.data, w.scales, out, scq, scf, ss, m, w.n, lay.np,
        lay.pair, lay.nseg, eps, q.get("q_out", d), q.get("cos", d), q.get("sin", d), q.get("pos", d),
        q.get("base", d), q.get("maxlen", d), q.get("layer", 0), q.get("hq", 1), q.get("hkv", 1),
        nx[0], nx[2], nx[3], cnt, float(nx[1]), **const, num_warps=warps, **_pdl(dev), **gemv_regs(lay, m, dev))
    return out


def _ternary_few(x, sx, w: Matrix, m: int, out, residual: bool, glu, n_out: int) -> torch.Tensor:
    """``_tgemm_few_kernel`` on int8 rows x [m, k] with their scales sx (see FEW_*)."""
    dev = x.device
    lay = w.layout
    epi = EPI_GLU if glu is not None else EPI_RESIDUAL if residual else EPI_STORE
    if out is None:
        out = torch.empty((m, n_out), dtype=torch.float32, device=dev)
    bm = 16 if m <= 16 else 32
    mt, tn = triton.cdiv(m, bm), triton.cdiv(lay.np, FEW_PAIRS)
    nblk = lay.nseg * (lay.gw // FEW_WORDS)
    wsn = 2 * FEW_PAIRS * tn
    ws, cnt = _few_scratch(dev)
    ks = min(nblk, FEW_PROGRAMS_PER_SM * sm_count(dev) // (mt * tn), ws.numel() // (mt * bm * wsn))
    ks = max(1, ks) if mt * tn <= cnt.numel() else 1
    bps = triton.cdiv(nblk, ks)
    ks = triton.cdiv(nblk, bps)  # no split without blocks
    _tgemm_few_kernel[(mt, tn, ks)](x, sx, w.data.view(torch.int8), w.scales, out, ws, cnt, m, w.n, lay.np,
                                    lay.pair, nblk, bps, KIN=w.k, KWT=lay.kwt, GW=lay.gw, GS=lay.gs,
                                    MASKK=lay.maskk, PB=PAIR_TILE, EPI=epi, ACT=glu or 0, KS=ks, WSN=wsn, BM=bm,
                                    BPG=FEW_PAIRS, BKW=FEW_WORDS, num_warps=FEW_WARPS, **_pdl(dev))
    return out


def choose_splits(batch: int, hkv: int, max_ctx: int, sms: int) -> int:
    """Enough (sequence, kv head, split) programs to fill the SMs ATTN_PROGRAMS_PER_SM times, at most 64 splits,
    each split >= 64 positions (a split's loads are one round trip that the decode step waits for)."""
    want = max(1, (ATTN_PROGRAMS_PER_SM * sms) // max(1, batch * hkv))
    return max(1, min(want, 64, max(1, max_ctx // 64)))


def decode_attention_tables(q: torch.Tensor, base: torch.Tensor, maxlen: torch.Tensor, lengths: torch.Tensor,
                            layer: int, hkv: int, splits: int, *, scratch: dict | None = None,
                            kv_f32: bool = False, early: bool = False, short_max: int = 0,
                            short: bool = False) -> torch.Tensor:
    """Split-KV decode attention for B sequences (one query token each) whose caches are found through
    ``base`` (int64 addresses of [L, 2, max_len, Hkv, D] caches), ``maxlen`` and ``lengths`` (int32).
    q float32 [B, Hq, D] (already rotated) -> float32 [B, Hq * D]: the split kernel writes each split's
    partial output and (max, sum), the merge kernel combines them with log-sum-exp; a sequence of at most
    ``short_max`` positions is taken whole by the split kernel's programs, without splits or merge. ``short``
    (every length at most short_max): the short-context kernel alone, the same arithmetic per sequence, no merge
    kernel. ``early``: the tables came with the decode step's host-to-device copy, before its first kernel (no
    kernel writes them), so the kernels read them before they wait for their producer (see EARLY_TABLES)."""
    early = early and EARLY_TABLES
    b, hq, d = q.shape
    dev = q.device
    group = hq // hkv
    gs = ATTN_SHORT_HEADS if group % ATTN_SHORT_HEADS == 0 and _pow2(ATTN_SHORT_HEADS) == ATTN_SHORT_HEADS else 1
    short_args = dict(GS=gs, PRE=ATTN_SHORT_PREFETCH, num_warps=ATTN_WARPS, num_stages=1, **_pdl(dev))
    out = torch.empty((b, hq * d), dtype=torch.float32, device=dev)
    if short:
        old = early and ATTN_SHORT_PREFETCH and b * hq <= ATTN_SHORT_OLD_HEADS
        _decode_attn_short_kernel[(b, hkv, group // gs)](q, base, maxlen, lengths, out, layer, d ** -0.5, HQ=hq,
                                                         HKV=hkv, D=d, KVF32=kv_f32, EARLY=early, W=ATTN_WARPS,
                                                         PB=ATTN_SHORT_PB, OLD=old, **short_args)
        return out
    gp = max(2, _pow2(group))
    scr = scratch if scratch is not None else {}
    if scr.get("po") is None or scr["po"].shape[0] < b * hq * splits:
        scr["po"] = torch.empty((b * hq * splits, d), dtype=torch.float32, device=dev)
        scr["pml"] = torch.empty((b * hq * splits, 2), dtype=torch.float32, device=dev)
    pb = ATTN_BLOCK // ATTN_WARPS if ATTN_WARP_STATES and ATTN_BLOCK % ATTN_WARPS == 0 else 0
    _decode_attn_kernel[(b, hkv, splits)](q, base, maxlen, lengths, scr["po"], scr["pml"], out, layer, d ** -0.5,
                                          HQ=hq, HKV=hkv, D=d, GP=gp, SPLITS=splits, BLOCK=ATTN_BLOCK,
                                          KVF32=kv_f32, EARLY=early, W=ATTN_WARPS if pb else 0, PB=max(pb, 1),
                                          WMIN=ATTN_WARP_STATES_MIN_BLOCKS, SHORT=short_max, SW=ATTN_WARPS,
                                          SPB=ATTN_SHORT_PB, **short_args)
    _merge_kernel[(b * hq,)](scr["po"], scr["pml"], out, lengths, HQ=hq, D=d, SPLITS=splits,
                             SP=max(2, _pow2(splits)), BLOCK=ATTN_BLOCK, EARLY=early, SHORT=short_max,
                             num_warps=MERGE_WARPS, **_pdl(dev))
    return out


def rope_append(qkv: torch.Tensor, q_out: torch.Tensor, cos, sin, pos, base, maxlen, layer: int, hq: int,
                hkv: int, head_dim: int, kv_f32: bool) -> None:
    """Decode: RoPE + KV append for a fused q/k/v output [B, (Hq + 2 Hkv) * D] (see _rope_append_kernel)."""
    _rope_append_kernel[(qkv.shape[0], hq + 2 * hkv)](qkv, q_out, cos, sin, pos, base, maxlen, layer, HQ=hq,
                                                        HKV=hkv, HALF=head_dim // 2, KVF32=kv_f32, num_warps=1,
                                                        **_pdl(qkv.device))


def stack_kv(k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """k, v [B, max_len, Hkv, D] -> the kernels' cache layout [B, 1 layer, 2, max_len, Hkv, D] (a copy)."""
    return torch.stack([k_cache, v_cache], dim=1).unsqueeze(1).contiguous()


def decode_attention_kv(q: torch.Tensor, kv: torch.Tensor, lengths: torch.Tensor,
                        num_splits: int | None = None, early: bool = False, short_max: int = 0,
                        short: bool = False) -> torch.Tensor:
    """Split-KV decode attention over caches in the kernels' layout (``stack_kv``): q float32 [B, Hq, D],
    lengths int32 [B] -> float32 [B, Hq, D]. ``num_splits=1`` is the one-block-per-(sequence, kv head) kernel;
    None chooses the split count from the SM count. ``early``: the tables read before the wait, as the decode
    step runs it; ``short_max``, ``short``: sequences taken whole, no splits or merge (see
    ``decode_attention_tables``)."""
    b, hq, d = q.shape
    max_len, hkv = kv.shape[3], kv.shape[4]
    base = torch.tensor([kv[i].data_ptr() for i in range(b)], dtype=torch.int64, device=q.device)
    maxlen = torch.full((b,), max_len, dtype=torch.int32, device=q.device)
    if num_splits is None:
        num_splits = choose_splits(b, hkv, int(lengths.max()), sm_count(q.device))
    out = decode_attention_tables(q.contiguous(), base, maxlen, lengths.to(torch.int32), 0, hkv, num_splits,
                                  kv_f32=kv.dtype == torch.float32, early=early, short_max=short_max, short=short)
    return out.view(b, hq, d)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     num_splits: int | None = None, early: bool = False, short_max: int = 0,
                     short: bool = False) -> torch.Tensor:
    """``decode_attention_kv`` on k, v [B, max_len, Hkv, D] (float16 or float32), copied into the layout."""
    return decode_attention_kv(q, stack_kv(k_cache, v_cache), lengths, num_splits, early, short_max, short)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int) -> torch.Tensor:
    """q float32 [T, Hq, D] at positions start..start+T-1; k/v float16 [max_len, Hkv, D] holding them."""
    t, hq, d = q.shape
    hkv = k_cache.shape[1]
    out = torch.empty((t, hq, d), dtype=torch.float32, device=q.device)
    bm = 64 if t > 32 else 16
    _prefill_attn_kernel[(triton.cdiv(t, bm), hq)](q.contiguous(), k_cache, v_cache, out, t, start, d ** -0.5,
                                                   hkv * d, HQ=hq, HKV=hkv, D=d, BM=bm, BLOCK=64,
                                                   KVF32=k_cache.dtype == torch.float32, num_warps=4)
    return out


def embed(table: torch.Tensor, ids: torch.Tensor, out: torch.Tensor, keys: torch.Tensor | None = None):
    """out float32 [T, H] = table [V, H] (any float dtype) rows ids int64 [T]; ``keys`` (int64 [T]): an id of -1
    takes the argmax in its row's key (left by the last ``matmul(..., argmax=keys)``), then every key is reset
    to ARGMAX_EMPTY for the next."""
    _embed_kernel[(ids.shape[0],)](table, ids, out, keys if keys is not None else out, table.shape[1],
                                   BH=min(1024, _pow2(table.shape[1])), KEYS=keys is not None, **_pdl(out.device))
    return out


def new_argmax_keys(m: int, device) -> torch.Tensor:
    """int64 [m] argmax keys, empty, for ``matmul(..., argmax=keys)``."""
    return torch.full((m,), ARGMAX_EMPTY, dtype=torch.int64, device=device)


def argmax_from_keys(keys) -> np.ndarray:
    """Keys (int64, NumPy or torch) -> the argmax columns, int64; a row whose logits were all NaN / -inf (no
    finite maximum: the sampler refuses those too) or that no kernel wrote raises ValueError."""
    k = np.asarray(keys.cpu() if isinstance(keys, torch.Tensor) else keys, dtype=np.int64)
    top = (k >> 32).astype(np.int32)
    neg_inf = np.int32(np.float32(-np.inf).view(np.int32) ^ 0x7FFFFFFF)
    if (k == ARGMAX_EMPTY).any() or (top == neg_inf).any():
        raise ValueError("logits have no finite maximum; cannot pick a token")
    return ARGMAX_COLS - (k & ARGMAX_COLS)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    t, h, d = x.shape
    out = torch.empty_like(x)
    _rope_kernel[(t,)](x.contiguous(), out, cos, sin, pos, h, HALF=d // 2, HP=max(2, _pow2(h)))
    return out


@functools.lru_cache(maxsize=None)
def _sm_count(device: str) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def sm_count(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return 4
    return _sm_count(str(device if device.index is not None else torch.device("cuda", torch.cuda.current_device())))


def log2_ceil(n: int) -> int:
    return int(math.ceil(math.log2(max(1, n))))
