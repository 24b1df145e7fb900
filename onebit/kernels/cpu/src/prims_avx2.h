/* AVX2 + FMA + F16C primitives, shared by the AVX2 and AVX-512 kernel files (see isa_avx2.c). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "ob.h"

#ifndef OB_TB
#define OB_TB 3
#endif

#define OB_INLINE static inline __attribute__((always_inline))

/* GEMV weight streams: one core's hardware prefetcher alone reaches ~2/3 of its read bandwidth on this access
 * pattern (measured on Zen 3: 8-9 GB/s vs a plain sum's 13); software prefetch OB_PF bytes ahead closes the gap.
 * Prefetching past the end of a matrix is harmless (a hint; it never faults). */
#ifndef OB_PF
#define OB_PF 2048
#endif
/* The int8 lm_head's one stream of 4-row tiles does better with a shorter distance (Zen 3, 2 threads, builds
 * alternating in one process, 3 runs of 8-24 rounds: 1024 B ahead read at 1.00-1.08 of a plain sum, 2048 B at
 * 0.92-0.95; the ternary GEMVs measured alike at 1024 and 2048). */
#ifndef OB_PF_I8
#define OB_PF_I8 1024
#endif
/* The dense kernel for several tokens reads 4 rows at a time, 4 streams; with OB_DENSE_PF_NEXT it prefetches each
 * 64-byte line of the next 4 rows as it reads the same line of these (set by the AVX-512 builds: Intel Xeon with
 * AVX-512 VNNI, 2 threads, the f16 lm_head alone 24.4 -> 29.8 GB/s against a plain sum's 29.6; a fixed distance
 * of 1 KB gave 27.6, 4 KB 21.6). Without it the hardware prefetcher alone (Zen 3, where it was measured).
 * One token (dense_4r) reads four sequential row streams; OB_DENSE_PF / OB_DENSE_PF_FAR: its prefetch distances
 * (0: none, the hardware prefetcher alone). */
#ifndef OB_DENSE_PF_NEXT
#define OB_DENSE_PF_NEXT 0
#endif
#ifndef OB_DENSE_PF
#define OB_DENSE_PF 0
#endif
#ifndef OB_DENSE_PF_FAR
#define OB_DENSE_PF_FAR 0
#endif
/* With OB_PF_FAR, a second prefetch OB_PF_FAR bytes ahead into L2 (T1), so the near one (into L1) mostly finds
 * its line in L2: a line fetched from memory into L1 holds one of the core's few L1 miss buffers for the whole
 * trip (set by the VNNI build, see isa_avx512.c). Not needed to stay correct: both are hints. */
#ifndef OB_PF_FAR
#define OB_PF_FAR 0
#endif
#define OB_PREFETCH_LINES(p, d, hint)                                       \
    do {                                                                    \
        _mm_prefetch((const char *)(p) + (d), hint);                        \
        _mm_prefetch((const char *)(p) + (d) + 64, hint);                   \
        _mm_prefetch((const char *)(p) + (d) + 128, hint);                  \
        _mm_prefetch((const char *)(p) + (d) + 192, hint);                  \
    } while (0)
#define OB_PREFETCH_BLOCK(p)                                                \
    do {                                                                    \
        OB_PREFETCH_LINES(p, OB_PF, _MM_HINT_T0);                           \
        if (OB_PF_FAR) OB_PREFETCH_LINES(p, OB_PF_FAR, _MM_HINT_T1);        \
    } while (0)

OB_INLINE __m128i hsum4_epi32(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
    __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
    return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

OB_INLINE __m128 hsum4_ps(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

OB_INLINE float hsum_ps(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#ifndef OB_WIDE_TERNARY /* AVX-512 files bring their own */
/* ---- ternary, int8 activations ---------------------------------------------------------------- */

#define OB_HAVE_TERN_DOT4
OB_INLINE __m256i tdot_half(__m256i w, __m256i m3, const int8_t *x) {
    /* w: 32 bytes of one row's block half; x: that half's elements, planes 64 apart */
    __m256i p0 = _mm256_maddubs_epi16(_mm256_and_si256(w, m3), _mm256_loadu_si256((const __m256i *)x));
    __m256i p1 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 2), m3),
                                      _mm256_loadu_si256((const __m256i *)(x + 64)));
    __m256i p2 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 4), m3),
                                      _mm256_loadu_si256((const __m256i *)(x + 128)));
    __m256i p3 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 6), m3),
                                      _mm256_loadu_si256((const __m256i *)(x + 192)));
    return _mm256_add_epi16(_mm256_add_epi16(p0, p1), _mm256_add_epi16(p2, p3));
}

static void prim_tern_dot4(const uint8_t *w, const int8_t *x, int nblk, int32_t acc[4]) {
    const __m256i m3 = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i a32[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                      _mm256_setzero_si256()};
    for (int b0 = 0; b0 < nblk; b0 += 4) {
        int b1 = b0 + 4 < nblk ? b0 + 4 : nblk;
        __m256i a16[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                          _mm256_setzero_si256()};
        for (int b = b0; b < b1; b++) {
            const int8_t *xb = x + (size_t)b * 256;
            const uint8_t *wb = w + (size_t)b * 256;
            OB_PREFETCH_BLOCK(wb);
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) {
                const uint8_t *wr = wb + r * 64;
                __m256i s0 = tdot_half(_mm256_loadu_si256((const __m256i *)wr), m3, xb);
                __m256i s1 = tdot_half(_mm256_loadu_si256((const __m256i *)(wr + 32)), m3, xb + 32);
                a16[r] = _mm256_add_epi16(a16[r], _mm256_add_epi16(s0, s1));
            }
        }
        for (int r = 0; r < 4; r++) a32[r] = _mm256_add_epi32(a32[r], _mm256_madd_epi16(a16[r], ones));
    }
    _mm_storeu_si128((__m128i *)acc, hsum4_epi32(a32[0], a32[1], a32[2], a32[3]));
}

#define OB_HAVE_TERN_UNPACK4
static void prim_tern_unpack4(const uint8_t *w, int nblk, uint8_t *q, size_t qstride) {
    const __m256i m3 = _mm256_set1_epi8(3);
    for (int b = 0; b < nblk; b++)
        for (int r = 0; r < 4; r++) {
            const uint8_t *wb = w + ((size_t)b * 4 + r) * 64;
            uint8_t *qr = q + r * qstride + (size_t)b * 256;
            for (int h = 0; h < 2; h++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(wb + 32 * h));
                _mm256_storeu_si256((__m256i *)(qr + 32 * h), _mm256_and_si256(v, m3));
                _mm256_storeu_si256((__m256i *)(qr + 64 + 32 * h), _mm256_and_si256(_mm256_srli_epi16(v, 2), m3));
                _mm256_storeu_si256((__m256i *)(qr + 128 + 32 * h), _mm256_and_si256(_mm256_srli_epi16(v, 4), m3));
                _mm256_storeu_si256((__m256i *)(qr + 192 + 32 * h), _mm256_and_si256(_mm256_srli_epi16(v, 6), m3));
            }
        }
}

/* NR rows x NT tokens over len elements (any multiple of 32), rows qs apart, tokens xs apart. 3 x 3 is the
 * largest block whose int16 accumulators (9) + activations (3) + codes + product fit AVX2's 16 ymm registers,
 * and it needs the fewest instructions per multiply: per 32 elements 6 loads, 9 maddubs, 9 adds and one index
 * step (27 per 288 multiply-adds; the 2 x 3 C loop it replaces compiled to 30 per 192). Measured on Zen 3 with
 * L1-resident data: 85-110 GMAC/s per core; a 4 x 3 block with the activations as memory operands: 85-102;
 * 9 maddubs + 9 adds from registers alone: 111-144 (the pair issues at ~1.2-1.5 per cycle there, not 2). The
 * int16 sums are widened every 1024 elements (|sum| <= 32 x 508 < 2^15) into int32 vectors, reduced across
 * lanes once at the end. */
OB_INLINE void tern_mk_rt(const uint8_t *q, size_t qs, const int8_t *x, size_t xs, const int NR, const int NT,
                          int len, int32_t *acc, int astride) {
    const __m256i ones = _mm256_set1_epi16(1), z = _mm256_setzero_si256();
    const uint8_t *q0 = q, *q1 = q + qs, *q2 = q + 2 * qs;
    const int8_t *x0 = x, *x1 = x + xs, *x2 = x + 2 * xs;
    __m256i s32[3][3];
#pragma GCC unroll 3
    for (int r = 0; r < NR; r++)
#pragma GCC unroll 3
        for (int t = 0; t < NT; t++) s32[r][t] = z;
    for (int e0 = 0; e0 < len; e0 += 1024) {
        const int e1 = len - e0 < 1024 ? len : e0 + 1024;
        __m256i a00 = z, a01 = z, a02 = z, a10 = z, a11 = z, a12 = z, a20 = z, a21 = z, a22 = z;
#if defined(__GNUC__) && defined(__x86_64__)
        if (NR == 3 && NT == 3) { /* the hot case in asm: GCC spills the 9 accumulators from the C loop below */
            size_t i = (size_t)e0, end = (size_t)e1;
            __asm__("1:\n\t"
                    "vmovdqu (%[x0],%[i]), %%ymm11\n\t"
                    "vmovdqu (%[x1],%[i]), %%ymm12\n\t"
                    "vmovdqu (%[x2],%[i]), %%ymm13\n\t"
                    "vmovdqu (%[q0],%[i]), %%ymm14\n\t"
                    "vpmaddubsw %%ymm11, %%ymm14, %%ymm15\n\t"
                    "vpaddw %%ymm15, %[a00], %[a00]\n\t"
                    "vpmaddubsw %%ymm12, %%ymm14, %%ymm15\n\t"
                    "vpaddw %%ymm15, %[a01], %[a01]\n\t"
                    "vpmaddubsw %%ymm13, %%ymm14, %%ymm15\n\t"
                    "vpaddw %%ymm15, %[a02], %[a02]\n\t"
                    "vmovdqu (%[q1],%[i]), %%ymm14\n\t"
                    "vpmaddubsw %%ymm11, %%ymm14, %%ymm15\n\t"
                    "vpaddw %%ymm15, %[a10], %[a10]\n\t"
                    "vpmaddubsw %%ymm12, %%ymm14, %%ymm15\n\t"
                    "vpaddw %%ymm15, %[a11], %[a11]\n\t"
                    "vpmaddubsw %%ymm13, %%ymm14, %%ymm15\n\t"
                    "vpaddw %%ymm15, %[a12], %[a12]\n\t"
                    "vmovdqu (%[q2],%[i]), %%ymm14\n\t"
                    "vpmaddubsw %%ymm11, %%ymm14, %%ymm15\n\t"
                    "vpaddw %%ymm15, %[a20], %[a20]\n\t"
                    "vpmaddubsw %%ymm12, %%ymm14, %%ymm15\n\t"
                    "vpaddw %%ymm15, %[a21], %[a21]\n\t"
                    "vpmaddubsw %%ymm13, %%ymm14, %%ymm15\n\t"
                    "vpaddw %%ymm15, %[a22], %[a22]\n\t"
                    "add $32, %[i]\n\t"
                    "cmp %[end], %[i]\n\t"
                    "jb 1b\n\t"
                    : [a00] "+x"(a00), [a01] "+x"(a01), [a02] "+x"(a02), [a10] "+x"(a10), [a11] "+x"(a11),
                      [a12] "+x"(a12), [a20] "+x"(a20), [a21] "+x"(a21), [a22] "+x"(a22), [i] "+r"(i)
                    : [x0] "r"(x0), [x1] "r"(x1), [x2] "r"(x2), [q0] "r"(q0), [q1] "r"(q1), [q2] "r"(q2),
                      [end] "r"(end)
                    : "cc", "memory", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
        } else
#endif
        for (int e = e0; e < e1; e += 32) {
            __m256i v0, v1 = z, v2 = z, w;
            v0 = _mm256_loadu_si256((const __m256i *)(x0 + e));
            if (NT > 1) v1 = _mm256_loadu_si256((const __m256i *)(x1 + e));
            if (NT > 2) v2 = _mm256_loadu_si256((const __m256i *)(x2 + e));
            w = _mm256_loadu_si256((const __m256i *)(q0 + e));
            a00 = _mm256_add_epi16(a00, _mm256_maddubs_epi16(w, v0));
            if (NT > 1) a01 = _mm256_add_epi16(a01, _mm256_maddubs_epi16(w, v1));
            if (NT > 2) a02 = _mm256_add_epi16(a02, _mm256_maddubs_epi16(w, v2));
            if (NR > 1) {
                w = _mm256_loadu_si256((const __m256i *)(q1 + e));
                a10 = _mm256_add_epi16(a10, _mm256_maddubs_epi16(w, v0));
                if (NT > 1) a11 = _mm256_add_epi16(a11, _mm256_maddubs_epi16(w, v1));
                if (NT > 2) a12 = _mm256_add_epi16(a12, _mm256_maddubs_epi16(w, v2));
            }
            if (NR > 2) {
                w = _mm256_loadu_si256((const __m256i *)(q2 + e));
                a20 = _mm256_add_epi16(a20, _mm256_maddubs_epi16(w, v0));
                if (NT > 1) a21 = _mm256_add_epi16(a21, _mm256_maddubs_epi16(w, v1));
                if (NT > 2) a22 = _mm256_add_epi16(a22, _mm256_maddubs_epi16(w, v2));
            }
        }
        const __m256i a[3][3] = {{a00, a01, a02}, {a10, a11, a12}, {a20, a21, a22}};
#pragma GCC unroll 3
        for (int r = 0; r < NR; r++)
#pragma GCC unroll 3
            for (int t = 0; t < NT; t++) s32[r][t] = _mm256_add_epi32(s32[r][t], _mm256_madd_epi16(a[r][t], ones));
    }
#pragma GCC unroll 3
    for (int t = 0; t < NT; t++) {
        __m128i s = hsum4_epi32(s32[0][t], NR > 1 ? s32[1][t] : z, NR > 2 ? s32[2][t] : z, z);
        int32_t *dst = acc + t * astride;
        dst[0] += _mm_cvtsi128_si32(s);
        if (NR > 1) dst[1] += _mm_extract_epi32(s, 1);
        if (NR > 2) dst[2] += _mm_extract_epi32(s, 2);
    }
}

#define OB_HAVE_TERN_MK_ROWS
/* nrows rows (qs apart) x nt tokens: blocks of 3 rows, then the 1-2 left over. */
static void prim_tern_mk_rows(const uint8_t *q, size_t qs, int nrows, const int8_t *x, size_t xs, int nt, int len,
                              int32_t *acc, int astride) {
#define OB_MK_NT(NR)                                                                              \
    do {                                                                                          \
        if (nt == 3) tern_mk_rt(q + (size_t)r * qs, qs, x, xs, NR, 3, len, acc + r, astride);     \
        else if (nt == 2) tern_mk_rt(q + (size_t)r * qs, qs, x, xs, NR, 2, len, acc + r, astride); \
        else tern_mk_rt(q + (size_t)r * qs, qs, x, xs, NR, 1, len, acc + r, astride);             \
    } while (0)
    int r = 0;
    for (; r + 3 <= nrows; r += 3) OB_MK_NT(3);
    if (nrows - r == 2) OB_MK_NT(2);
    else if (nrows - r == 1) OB_MK_NT(1);
#undef OB_MK_NT
}

#endif

/* ---- ternary, float activations ------------------------------------------------------------- */

OB_INLINE __m256i tern_lut(void) { /* q (0, 1, 2) -> t (-1, 0, 1) as int8, via pshufb */
    return _mm256_setr_epi8(-1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                            0, 0, 0);
}

OB_INLINE __m256 fdot32(__m256i t, const float *x, __m256 acc) {
    __m128i lo = _mm256_castsi256_si128(t), hi = _mm256_extracti128_si256(t, 1);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), _mm256_loadu_ps(x), acc);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), _mm256_loadu_ps(x + 8), acc);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), _mm256_loadu_ps(x + 16), acc);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), _mm256_loadu_ps(x + 24),
                          acc);
    return acc;
}

#define OB_HAVE_TERNF_DOT4
static void prim_ternf_dot4(const uint8_t *w, const float *x, int nblk, float acc[4]) {
    const __m256i m3 = _mm256_set1_epi8(3), lut = tern_lut();
    __m256 a[4][2];
    for (int r = 0; r < 4; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
    for (int b = 0; b < nblk; b++) {
        const float *xb = x + (size_t)b * 256;
        for (int r = 0; r < 4; r++) {
            const uint8_t *wr = w + ((size_t)b * 4 + r) * 64;
            for (int h = 0; h < 2; h++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(wr + 32 * h));
                for (int k = 0; k < 4; k++) {
                    __m256i tq = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 2 * k), m3));
                    a[r][k & 1] = fdot32(tq, xb + 64 * k + 32 * h, a[r][k & 1]);
                }
            }
        }
    }
    _mm_storeu_ps(acc, hsum4_ps(_mm256_add_ps(a[0][0], a[0][1]), _mm256_add_ps(a[1][0], a[1][1]),
                                _mm256_add_ps(a[2][0], a[2][1]), _mm256_add_ps(a[3][0], a[3][1])));
}

#define OB_HAVE_TERNF_UNPACK4
static void prim_ternf_unpack4(const uint8_t *w, int nblk, int8_t *t, size_t tstride) {
    const __m256i m3 = _mm256_set1_epi8(3), lut = tern_lut();
    for (int b = 0; b < nblk; b++)
        for (int r = 0; r < 4; r++) {
            const uint8_t *wb = w + ((size_t)b * 4 + r) * 64;
            int8_t *tr = t + r * tstride + (size_t)b * 256;
            for (int h = 0; h < 2; h++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(wb + 32 * h));
                for (int k = 0; k < 4; k++)
                    _mm256_storeu_si256((__m256i *)(tr + 64 * k + 32 * h),
                                        _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 2 * k), m3)));
            }
        }
}

OB_INLINE void ternf_mk_n(const int8_t *tw, size_t ts, const float *x, size_t xs, const int NT, int len, float *acc,
                          int astride) {
    __m256 a[4][OB_TB];
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < NT; t++) a[r][t] = _mm256_setzero_ps();
    for (int e = 0; e < len; e += 8) {
        for (int r = 0; r < 4; r++) {
            __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(tw + r * ts + e))));
            for (int t = 0; t < NT; t++) a[r][t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * xs + e), a[r][t]);
        }
    }
    for (int t = 0; t < NT; t++) {
        float *dst = acc + t * astride;
        _mm_storeu_ps(dst, _mm_add_ps(_mm_loadu_ps(dst), hsum4_ps(a[0][t], a[1][t], a[2][t], a[3][t])));
    }
}

#define OB_HAVE_TERNF_MK
static void prim_ternf_mk(const int8_t *tw, size_t ts, const float *x, size_t xs, int nt, int len, float *acc,
                          int astride) {
    if (nt == 3) ternf_mk_n(tw, ts, x, xs, 3, len, acc, astride);
    else if (nt == 2) ternf_mk_n(tw, ts, x, xs, 2, len, acc, astride);
    else ternf_mk_n(tw, ts, x, xs, 1, len, acc, astride);
}

/* ---- activation quantization (bit-identical: max is exact, round is half-to-even) ------------ */

#define OB_HAVE_QUANT
static float prim_absmax(const float *x, int n) {
    const __m256 mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m0 = _mm256_setzero_ps(), m1 = m0;
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        m0 = _mm256_max_ps(m0, _mm256_and_ps(_mm256_loadu_ps(x + i), mask));
        m1 = _mm256_max_ps(m1, _mm256_and_ps(_mm256_loadu_ps(x + i + 8), mask));
    }
    m0 = _mm256_max_ps(m0, m1);
    float buf[8], m = 0.0f;
    _mm256_storeu_ps(buf, m0);
    for (int k = 0; k < 8; k++) m = buf[k] > m ? buf[k] : m;
    for (; i < n; i++) {
        float a = __builtin_fabsf(x[i]);
        m = a > m ? a : m;
    }
    return m;
}

OB_INLINE __m256i q8(const float *x, __m256 s, __m256 lo, __m256 hi) {
    __m256 p = _mm256_mul_ps(_mm256_loadu_ps(x), s);
    p = _mm256_min_ps(_mm256_max_ps(p, lo), hi);
    return _mm256_cvtps_epi32(p); /* MXCSR default: round half to even */
}

static int32_t prim_quant_seg(const float *x, int n, float s, int8_t *q) {
    const __m256 sv = _mm256_set1_ps(s), lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i sum = _mm256_setzero_si256();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i a = q8(x + i, sv, lo, hi), b = q8(x + i + 8, sv, lo, hi);
        __m256i c = q8(x + i + 16, sv, lo, hi), d = q8(x + i + 24, sv, lo, hi);
        sum = _mm256_add_epi32(sum, _mm256_add_epi32(_mm256_add_epi32(a, b), _mm256_add_epi32(c, d)));
        __m256i v = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_permutevar8x32_epi32(v, perm));
    }
    int32_t buf[8], total = 0;
    _mm256_storeu_si256((__m256i *)buf, sum);
    for (int k = 0; k < 8; k++) total += buf[k];
    for (; i < n; i++) {
        float p = x[i] * s;
        p = p < -128.0f ? -128.0f : p > 127.0f ? 127.0f : p;
        int v = (int)__builtin_nearbyintf(p);
        q[i] = (int8_t)v;
        total += v;
    }
    return total;
}

/* ---- dense (lm_head) ------------------------------------------------------------------------ */

OB_INLINE __m256 ld8w(const void *w, const int wt, size_t i) {
    if (wt == 0) return _mm256_loadu_ps((const float *)w + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    if (wt == 1) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

static float ld1w(const void *w, int wt, size_t i);

OB_INLINE void dense_mk_n(const void *w, const int wt, size_t K, const float *x, const int NT, float *out,
                          size_t os) {
    __m256 a[4][OB_TB];
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < NT; t++) a[r][t] = _mm256_setzero_ps();
    const size_t esz = wt == 0 ? 4 : 2;
    size_t k = 0;
    for (; k + 8 <= K; k += 8)
        for (int r = 0; r < 4; r++) {
            if (OB_DENSE_PF_NEXT && (k * esz) % 64 == 0)
                _mm_prefetch((const char *)w + esz * ((r + 4) * K + k), _MM_HINT_T0);
            __m256 wv = ld8w(w, wt, r * K + k);
            for (int t = 0; t < NT; t++) a[r][t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * K + k), a[r][t]);
        }
    for (int t = 0; t < NT; t++) {
        float s[4];
        _mm_storeu_ps(s, hsum4_ps(a[0][t], a[1][t], a[2][t], a[3][t]));
        for (int r = 0; r < 4; r++) {
            for (size_t kk = k; kk < K; kk++) s[r] += ld1w(w, wt, r * K + kk) * x[t * K + kk];
            out[t * os + r] = s[r];
        }
    }
}

/* One token, four rows from four places (w[i]: row i's first element; the lm_head's one-token path takes row u of
 * each quarter of a thread's part): four sequential weight streams, each row summed exactly as dense_mk_n sums
 * it (one 8-lane accumulator over k, the same horizontal sum, then the tail). With OB_DENSE_PF, each stream asks
 * for its line OB_DENSE_PF bytes ahead into L1 and OB_DENSE_PF_FAR bytes ahead into L2. Xeon VNNI VM, 2 threads,
 * the f16 bitnet-2b4t head: 4 row streams with 2 / 16 KB ahead 31.6 GB/s where two groups of 4 rows side by side
 * (eight rows, 5 KB each, then a jump) read 30.1 (a C model of both, same run). */
OB_INLINE void dense_4r(const char *const *w, const int wt, size_t K, const float *x, float *out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const size_t esz = wt == 0 ? 4 : 2;
    const char *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
    size_t k = 0;
    for (; k + 8 <= K; k += 8) {
        if (OB_DENSE_PF && (k * esz) % 64 == 0) {
            for (int r = 0; r < 4; r++) {
                _mm_prefetch(w[r] + esz * k + OB_DENSE_PF, _MM_HINT_T0);
                if (OB_DENSE_PF_FAR) _mm_prefetch(w[r] + esz * k + OB_DENSE_PF_FAR, _MM_HINT_T1);
            }
        }
        __m256 xv = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(ld8w(w0, wt, k), xv, a0);
        a1 = _mm256_fmadd_ps(ld8w(w1, wt, k), xv, a1);
        a2 = _mm256_fmadd_ps(ld8w(w2, wt, k), xv, a2);
        a3 = _mm256_fmadd_ps(ld8w(w3, wt, k), xv, a3);
    }
    _mm_storeu_ps(out, hsum4_ps(a0, a1, a2, a3));
    for (int r = 0; r < 4; r++)
        for (size_t kk = k; kk < K; kk++) out[r] += ld1w(w[r], wt, kk) * x[kk];
}

#define OB_HAVE_DENSE_4R
static void prim_dense_4r(const char *const *w, int wt, size_t K, const float *x, float *out) {
    if (wt == 0) dense_4r(w, 0, K, x, out);
    else if (wt == 1) dense_4r(w, 1, K, x, out);
    else dense_4r(w, 2, K, x, out);
}

#define OB_HAVE_DENSE
static void prim_dense_generic(const void *w, int wt, size_t K, int nr, const float *x, int nt, float *out, size_t os) {
    for (int t = 0; t < nt; t++)
        for (int r = 0; r < nr; r++) {
            __m256 a = _mm256_setzero_ps();
            size_t k = 0;
            for (; k + 8 <= K; k += 8) a = _mm256_fmadd_ps(ld8w(w, wt, r * K + k), _mm256_loadu_ps(x + t * K + k), a);
            float s = hsum_ps(a);
            for (; k < K; k++) s += ld1w(w, wt, r * K + k) * x[t * K + k];
            out[t * os + r] = s;
        }
}

#define DENSE_CASE(WT)                                                    \
    if (nt == 3) dense_mk_n(w, WT, K, x, 3, out, os);                     \
    else if (nt == 2) dense_mk_n(w, WT, K, x, 2, out, os);                \
    else dense_mk_n(w, WT, K, x, 1, out, os);

static void prim_dense_mk(const void *w, int wt, size_t K, int nr, const float *x, int nt, float *out, size_t os) {
    if (nr != 4) {
        prim_dense_generic(w, wt, K, nr, x, nt, out, os);
        return;
    }
    if (wt == 0) { DENSE_CASE(0) }
    else if (wt == 1) { DENSE_CASE(1) }
    else { DENSE_CASE(2) }
}

/* int8 x int8 on 4-row interleaved tiles: maddubs(|w|, sign(x, w)) is exact because |x|, |w| <= 127 */
#define OB_HAVE_DENSE_I8
OB_INLINE void i8_mk_n(const int8_t *w, size_t K32, const int8_t *x, const int NT, int32_t *out, size_t os) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a[4][OB_TB];
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < NT; t++) a[r][t] = _mm256_setzero_si256();
    for (size_t k = 0; k < K32; k += 32) {
        /* one stream: 128 B per step */
        _mm_prefetch((const char *)(w + (k / 32 * 4) * 32) + OB_PF_I8, _MM_HINT_T0);
        _mm_prefetch((const char *)(w + (k / 32 * 4) * 32) + OB_PF_I8 + 64, _MM_HINT_T0);
        for (int r = 0; r < 4; r++) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w + (k / 32 * 4 + r) * 32)), aw = _mm256_abs_epi8(wv);
            for (int t = 0; t < NT; t++) {
                __m256i sx = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(x + t * K32 + k)), wv);
                a[r][t] = _mm256_add_epi32(a[r][t], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones));
            }
        }
    }
    for (int t = 0; t < NT; t++)
        _mm_storeu_si128((__m128i *)(out + t * os), hsum4_epi32(a[0][t], a[1][t], a[2][t], a[3][t]));
}

static void prim_i8_mk(const int8_t *w, size_t K32, const int8_t *x, int nt, int32_t *out, size_t os) {
    if (nt == 3) i8_mk_n(w, K32, x, 3, out, os);
    else if (nt == 2) i8_mk_n(w, K32, x, 2, out, os);
    else i8_mk_n(w, K32, x, 1, out, os);
}

/* One token, two 4-row tiles (w0, w1: two weight streams): out0 / out1 as prim_i8_mk's for each (exact int32). */
#define OB_HAVE_DENSE_I8_2T
static void prim_i8_2t(const int8_t *w0, const int8_t *w1, size_t K32, const int8_t *x, int32_t *out0,
                       int32_t *out1) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a[8];
    for (int r = 0; r < 8; r++) a[r] = _mm256_setzero_si256();
    for (size_t k = 0; k < K32; k += 32) {
        const int8_t *p0 = w0 + k * 4, *p1 = w1 + k * 4; /* 128 B of each per step */
        _mm_prefetch((const char *)p0 + OB_PF_I8, _MM_HINT_T0);
        _mm_prefetch((const char *)p0 + OB_PF_I8 + 64, _MM_HINT_T0);
        _mm_prefetch((const char *)p1 + OB_PF_I8, _MM_HINT_T0);
        _mm_prefetch((const char *)p1 + OB_PF_I8 + 64, _MM_HINT_T0);
        if (OB_PF_FAR) {
            _mm_prefetch((const char *)p0 + OB_PF_FAR, _MM_HINT_T1);
            _mm_prefetch((const char *)p0 + OB_PF_FAR + 64, _MM_HINT_T1);
            _mm_prefetch((const char *)p1 + OB_PF_FAR, _MM_HINT_T1);
            _mm_prefetch((const char *)p1 + OB_PF_FAR + 64, _MM_HINT_T1);
        }
        __m256i xv = _mm256_loadu_si256((const __m256i *)(x + k));
        for (int r = 0; r < 8; r++) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)((r < 4 ? p0 : p1) + (r & 3) * 32));
            __m256i sx = _mm256_sign_epi8(xv, wv);
            a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(wv), sx), ones));
        }
    }
    _mm_storeu_si128((__m128i *)out0, hsum4_epi32(a[0], a[1], a[2], a[3]));
    _mm_storeu_si128((__m128i *)out1, hsum4_epi32(a[4], a[5], a[6], a[7]));
}

/* ---- attention ------------------------------------------------------------------------------ */

OB_INLINE __m256 exp256(__m256 x) { /* Cephes-style expf, ~1 ulp on [-87, 88] */
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.37626f));
    __m256 fx = _mm256_round_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)),
                                _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

OB_INLINE __m256 ld8kv(const void *p, int kvt, int i) {
    if (kvt == 0) return _mm256_loadu_ps((const float *)p + i);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
}

static float ld1w(const void *w, int wt, size_t i) {
    if (wt == 0) return ((const float *)w)[i];
    uint16_t h = ((const uint16_t *)w)[i];
    if (wt == 1) {
        union { uint32_t u; float f; } b = {(uint32_t)h << 16};
        return b.f;
    }
    return _cvtsh_ss(h);
}

#define OB_HAVE_ATTN
/* NQ (1..4) queries x one key per step: the key row is loaded once for all of them */
OB_INLINE void scores_n(const float *q, const int NQ, const char *k, int kvt, size_t esz, int nk, int D, float scale,
                        float *s) {
    for (int j = 0; j < nk; j++) {
        const char *kj = k + (size_t)j * D * esz;
        __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        int d = 0;
        for (; d + 8 <= D; d += 8) {
            __m256 kv = ld8kv(kj, kvt, d);
            for (int r = 0; r < NQ; r++) a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (size_t)r * D + d), kv, a[r]);
        }
        float out[4];
        _mm_storeu_ps(out, hsum4_ps(a[0], a[1], a[2], a[3]));
        for (int r = 0; r < NQ; r++) {
            for (int dd = d; dd < D; dd++) out[r] += q[(size_t)r * D + dd] * ld1w(kj, kvt ? 2 : 0, (size_t)dd);
            s[r * OB_KB + j] = out[r] * scale;
        }
    }
}

/* 4 queries x 2 keys per step: each query vector is loaded once for both keys (the same FMAs per score as
 * scores_n, so the same values); 8 accumulators, no register spills. D a multiple of 8. Measured on Zen 3 at
 * 1024 positions: ~10% faster with a float16 cache, ~10% slower with a float32 one (which keeps scores_n). */
OB_INLINE void scores_4x2(const float *q, const char *k, int kvt, size_t esz, int nk, int D, float scale, float *s) {
    int j = 0;
    for (; j + 2 <= nk; j += 2) {
        const char *k0 = k + (size_t)j * D * esz, *k1 = k0 + (size_t)D * esz;
        __m256 a[4][2];
        for (int r = 0; r < 4; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
        for (int d = 0; d < D; d += 8) {
            __m256 kv0 = ld8kv(k0, kvt, d), kv1 = ld8kv(k1, kvt, d);
            for (int r = 0; r < 4; r++) {
                __m256 qv = _mm256_loadu_ps(q + (size_t)r * D + d);
                a[r][0] = _mm256_fmadd_ps(qv, kv0, a[r][0]);
                a[r][1] = _mm256_fmadd_ps(qv, kv1, a[r][1]);
            }
        }
        float o0[4], o1[4];
        _mm_storeu_ps(o0, hsum4_ps(a[0][0], a[1][0], a[2][0], a[3][0]));
        _mm_storeu_ps(o1, hsum4_ps(a[0][1], a[1][1], a[2][1], a[3][1]));
        for (int r = 0; r < 4; r++) {
            s[r * OB_KB + j] = o0[r] * scale;
            s[r * OB_KB + j + 1] = o1[r] * scale;
        }
    }
    if (j < nk) scores_n(q, 4, k + (size_t)j * D * esz, kvt, esz, nk - j, D, scale, s + j);
}

/* Prefill (many queries per key block): the block is transposed once into kt [D][OB_KB] (float32, keys past nk
 * zero; the caller's scratch), then NQ (<= 6) queries x 16 keys per step: per input 2 key loads, NQ broadcasts,
 * 2 NQ FMAs, no horizontal sums; the scores come out as whole rows. Zen 3, T = 512, 20 x 128 heads, 2 threads:
 * attention 19-23 -> 13-17 ms (float16 cache), 24-33 -> 13-17 ms (float32) with prim_pv's blocked path. */

OB_INLINE void transpose8(__m256 r[8]) {
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20), r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20), r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31), r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31), r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

/* kt[d * OB_KB + j] = k[j, d] for j < nk, 0 for nk <= j < round_up(nk, 16); D a multiple of 8 */
static void transpose_keys(const char *k, int kvt, size_t esz, int nk, int D, float *kt) {
    int n16 = (nk + 15) & ~15;
    for (int j0 = 0; j0 < n16; j0 += 8)
        for (int d = 0; d < D; d += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; i++)
                r[i] = j0 + i < nk ? ld8kv(k + (size_t)(j0 + i) * D * esz, kvt, d) : _mm256_setzero_ps();
            transpose8(r);
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(kt + (size_t)(d + i) * OB_KB + j0, r[i]);
        }
}

OB_INLINE void scores_t(const float *q, const int NQ, const float *kt, int nk, int D, float scale, float *s) {
    for (int j = 0; j < nk; j += 16) {
        __m256 a[6][2];
        for (int r = 0; r < NQ; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
        for (int d = 0; d < D; d++) {
            const float *kd = kt + (size_t)d * OB_KB + j;
            __m256 k0 = _mm256_loadu_ps(kd), k1 = _mm256_loadu_ps(kd + 8);
            for (int r = 0; r < NQ; r++) {
                __m256 qb = _mm256_broadcast_ss(q + (size_t)r * D + d);
                a[r][0] = _mm256_fmadd_ps(qb, k0, a[r][0]);
                a[r][1] = _mm256_fmadd_ps(qb, k1, a[r][1]);
            }
        }
        __m256 sc = _mm256_set1_ps(scale);
        for (int r = 0; r < NQ; r++) {
            _mm256_storeu_ps(s + r * OB_KB + j, _mm256_mul_ps(a[r][0], sc));
            _mm256_storeu_ps(s + r * OB_KB + j + 8, _mm256_mul_ps(a[r][1], sc));
        }
    }
}

static void prim_scores(const float *q, int nq, const void *k, int kvt, int nk, int D, float scale, float *s,
                        float *kt) {
    size_t esz = kvt == 0 ? 4 : 2;
    if (nq >= 8 && D % 8 == 0) {
        transpose_keys(k, kvt, esz, nk, D, kt);
        for (int i = 0; i < nq; i += 6) {
            const float *qi = q + (size_t)i * D;
            float *si = s + (size_t)i * OB_KB;
            switch (nq - i) {
            case 1: scores_t(qi, 1, kt, nk, D, scale, si); break;
            case 2: scores_t(qi, 2, kt, nk, D, scale, si); break;
            case 3: scores_t(qi, 3, kt, nk, D, scale, si); break;
            case 4: scores_t(qi, 4, kt, nk, D, scale, si); break;
            case 5: scores_t(qi, 5, kt, nk, D, scale, si); break;
            default: scores_t(qi, 6, kt, nk, D, scale, si);
            }
        }
        return;
    }
    for (int i = 0; i < nq; i += 4) {
        const float *qi = q + (size_t)i * D;
        float *si = s + (size_t)i * OB_KB;
        switch (nq - i) {
        case 1: scores_n(qi, 1, k, kvt, esz, nk, D, scale, si); break;
        case 2: scores_n(qi, 2, k, kvt, esz, nk, D, scale, si); break;
        case 3: scores_n(qi, 3, k, kvt, esz, nk, D, scale, si); break;
        default:
            if (kvt && D % 8 == 0) scores_4x2(qi, k, kvt, esz, nk, D, scale, si); /* ~10% faster on f16 keys only */
            else scores_n(qi, 4, k, kvt, esz, nk, D, scale, si);
        }
    }
}

/* o[r, d0:d0+8C] += sum_j p[r, j] v[j, d0:d0+8C] for NQ queries, output held in registers over the keys */
OB_INLINE void pv_tile(const float *p, const int NQ, const char *v, int kvt, size_t esz, int nk, int D, int d0,
                       const int C, float *o) {
    __m256 a[4][4];
    for (int r = 0; r < NQ; r++)
        for (int c = 0; c < C; c++) a[r][c] = _mm256_loadu_ps(o + (size_t)r * D + d0 + 8 * c);
    for (int j = 0; j < nk; j++) {
        const char *vj = v + (size_t)j * D * esz;
        __m256 vv[4];
        for (int c = 0; c < C; c++) vv[c] = ld8kv(vj, kvt, d0 + 8 * c);
        for (int r = 0; r < NQ; r++) {
            __m256 pr = _mm256_broadcast_ss(p + r * OB_KB + j);
            for (int c = 0; c < C; c++) a[r][c] = _mm256_fmadd_ps(pr, vv[c], a[r][c]);
        }
    }
    for (int r = 0; r < NQ; r++)
        for (int c = 0; c < C; c++) _mm256_storeu_ps(o + (size_t)r * D + d0 + 8 * c, a[r][c]);
}

OB_INLINE void pv_n(const float *p, const int NQ, const char *v, int kvt, size_t esz, int nk, int D, float *o) {
    int d0 = 0;
    for (; d0 + 32 <= D; d0 += 32) pv_tile(p, NQ, v, kvt, esz, nk, D, d0, 4, o);
    for (; d0 + 8 <= D; d0 += 8) pv_tile(p, NQ, v, kvt, esz, nk, D, d0, 1, o);
    for (; d0 < D; d0++)
        for (int r = 0; r < NQ; r++)
            for (int j = 0; j < nk; j++)
                o[(size_t)r * D + d0] += p[r * OB_KB + j] * ld1w(v, kvt ? 2 : 0, (size_t)j * D + d0);
}

/* o[r, :] += sum_j p[r, j] v[j, :] for NQ (<= 6) queries from float32 values, 16 outputs per step (12 accumulators) */
OB_INLINE void pv_t(const float *p, const int NQ, const float *v, int nk, int D, float *o) {
    for (int d0 = 0; d0 < D; d0 += 16) {
        __m256 a[6][2];
        for (int r = 0; r < NQ; r++) {
            a[r][0] = _mm256_loadu_ps(o + (size_t)r * D + d0);
            a[r][1] = _mm256_loadu_ps(o + (size_t)r * D + d0 + 8);
        }
        for (int j = 0; j < nk; j++) {
            __m256 v0 = _mm256_loadu_ps(v + (size_t)j * D + d0), v1 = _mm256_loadu_ps(v + (size_t)j * D + d0 + 8);
            for (int r = 0; r < NQ; r++) {
                __m256 pr = _mm256_broadcast_ss(p + r * OB_KB + j);
                a[r][0] = _mm256_fmadd_ps(pr, v0, a[r][0]);
                a[r][1] = _mm256_fmadd_ps(pr, v1, a[r][1]);
            }
        }
        for (int r = 0; r < NQ; r++) {
            _mm256_storeu_ps(o + (size_t)r * D + d0, a[r][0]);
            _mm256_storeu_ps(o + (size_t)r * D + d0 + 8, a[r][1]);
        }
    }
}

static void prim_pv(const float *p, int nq, const void *v, int kvt, int nk, int D, float *o, float *vf) {
    size_t esz = kvt == 0 ? 4 : 2;
    if (nq >= 8 && D % 16 == 0) { /* prefill: float16 values converted once per block (into the scratch vf) */
        const float *vs = (const float *)v;
        if (kvt) {
            for (size_t i = 0; i < (size_t)nk * D; i += 8) _mm256_storeu_ps(vf + i, ld8kv(v, kvt, (int)i));
            vs = vf;
        }
        for (int i = 0; i < nq; i += 6) {
            const float *pi = p + (size_t)i * OB_KB;
            float *oi = o + (size_t)i * D;
            switch (nq - i) {
            case 1: pv_t(pi, 1, vs, nk, D, oi); break;
            case 2: pv_t(pi, 2, vs, nk, D, oi); break;
            case 3: pv_t(pi, 3, vs, nk, D, oi); break;
            case 4: pv_t(pi, 4, vs, nk, D, oi); break;
            case 5: pv_t(pi, 5, vs, nk, D, oi); break;
            default: pv_t(pi, 6, vs, nk, D, oi);
            }
        }
        return;
    }
    for (int i = 0; i < nq; i += 4) {
        const float *pi = p + (size_t)i * OB_KB;
        float *oi = o + (size_t)i * D;
        switch (nq - i) {
        case 1: pv_n(pi, 1, v, kvt, esz, nk, D, oi); break;
        case 2: pv_n(pi, 2, v, kvt, esz, nk, D, oi); break;
        case 3: pv_n(pi, 3, v, kvt, esz, nk, D, oi); break;
        default: pv_n(pi, 4, v, kvt, esz, nk, D, oi);
        }
    }
}

static void prim_exp(float *x, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp256(_mm256_loadu_ps(x + i)));
    if (i < n) {
        float buf[8] = {0};
        for (int k = i; k < n; k++) buf[k - i] = x[k];
        _mm256_storeu_ps(buf, exp256(_mm256_loadu_ps(buf)));
        for (int k = i; k < n; k++) x[k] = buf[k - i];
    }
}

#define OB_HAVE_SQ8
/* r[k] = sum over b of a[8b + k]^2 in order, for n (a multiple of 8, >= 8) elements: NumPy's eight pairwise
 * accumulators as one vector (each square rounded, then added: no FMA) */
OB_INLINE void prim_sq8(const float *a, int n, float r[8]) {
    __m256 v = _mm256_loadu_ps(a), acc = _mm256_mul_ps(v, v);
    for (int b = 8; b < n; b += 8) {
        v = _mm256_loadu_ps(a + b);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
    }
    _mm256_storeu_ps(r, acc);
}

#define OB_HAVE_TO_HALF
/* F16C's conversion with round-to-nearest-even: the same halves as ob_float_to_half (NaN stays a quiet NaN) */
static void prim_to_half(const float *x, size_t n, uint16_t *y) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) y[i] = ob_float_to_half(x[i]);
}

#define OB_HAVE_SOFTMAX_STEP
/* prim_softmax_step (see kernels_impl.h) in 8-lane steps: the same exp256 per element, sums in lanes */
static float prim_softmax_step(float *s, int nv, int nk, float m, float *sum) {
    __m256 vm = _mm256_set1_ps(m);
    int j = 0;
    for (; j + 8 <= nv; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(s + j));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    float mx = _mm_cvtss_f32(h);
    for (; j < nv; j++) mx = s[j] > mx ? s[j] : mx;
    __m256 vx = _mm256_set1_ps(mx), acc = _mm256_setzero_ps();
    for (j = 0; j + 8 <= nv; j += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), vx));
        _mm256_storeu_ps(s + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    if (j < nv) { /* the tail through a buffer: lanes past nv hold exp(-inf) = 0 */
        float buf[8];
        for (int k = 0; k < 8; k++) buf[k] = j + k < nv ? s[j + k] - mx : -INFINITY;
        __m256 e = exp256(_mm256_loadu_ps(buf));
        e = _mm256_and_ps(e, _mm256_cmp_ps(_mm256_loadu_ps(buf), _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ));
        _mm256_storeu_ps(buf, e);
        acc = _mm256_add_ps(acc, e);
        for (int k = 0; k < 8 && j + k < nk; k++) s[j + k] = buf[k];
        j += 8;
    }
    for (; j < nk; j++) s[j] = 0.0f;
    *sum = hsum_ps(acc);
    return mx;
}

