/* AVX-512 F/BW/VL kernels; with OB_VNNI (isa_avx512vnni.c) the ternary dot uses VNNI dpbusd.
 * A whole 64-byte block of one row is one zmm load: plane k (shift 2k, mask 3) holds elements 64k..64k+63,
 * matching one 64-byte load of activations. VNNI: dpbusd(q u8, x s8) accumulates exact int32 directly.
 * Without VNNI: maddubs pair sums in int16 (|.| <= 512 each, 16 per 1024 elements), then widened.
 * The float, dense and attention primitives are the AVX2 ones (prims_avx2.h). */
#include <immintrin.h>
#include <stdint.h>

#ifdef OB_VNNI
#define OB_ISA avx512vnni
#define OB_ISA_NAME "avx512vnni"
#else
#define OB_ISA avx512
#define OB_ISA_NAME "avx512"
#endif
#define OB_TB 3
#define OB_WIDE_TERNARY 1
/* Measured on an Intel Xeon with AVX-512 VNNI (2 threads, bitnet-2b4t shapes, decode step at 64 tokens of
 * context): the int8 lm_head's prefetch 4 KB ahead, 33.3-33.5 ms a step against 35.0-35.2 at 1 or 2 KB (34.4 at
 * 8 KB); the ternary GEMVs' OB_PF (planes shifted down) alike at 2 and 8 KB, worse at 1 KB. The dense prefetch:
 * see prims_avx2.h. */
#define OB_PF_I8 4096
#define OB_DENSE_PF_NEXT 1
#ifndef OB_DENSE_PF
#define OB_DENSE_PF 2048
#endif
#ifndef OB_DENSE_PF_FAR
#define OB_DENSE_PF_FAR 16384
#endif
#ifdef OB_VNNI
/* The VNNI ternary GEMV prefetches each line 2 KB ahead into L1 and 16 KB ahead into L2 (OB_PF_FAR). Same Xeon,
 * 2 threads, builds loaded side by side in one process (benchmarks/ab_cpu.py, 16 rounds), against one prefetch
 * 4 KB ahead: the 120 GEMVs of a bitnet-2b4t token 0.948-0.957x the time (8 / 1, 16 / 4 and 32 / 2 KB alike,
 * 0.955-0.960x; a T2 hint at 8-16 KB 0.957-0.961x), the decode step 0.964-0.968x. Before that, with one
 * prefetch and every tile through prim_tern_dot4: planes shifted down, 2 KB: 22.2-22.9 ms; in place, 2 KB:
 * 21.3-22.0; in place, 4 KB: 20.6-21.5. */
#ifndef OB_PF
#define OB_PF 2048
#endif
#ifndef OB_PF_FAR
#define OB_PF_FAR 16384
#endif
#endif
#include "prims_avx2.h"

OB_INLINE __m512i plane(__m512i w, int k, __m512i m3) {
    return _mm512_and_si512(_mm512_srli_epi16(w, 2 * k), m3);
}

#ifdef OB_VNNI
#define DOT_ACC(acc, q, x) _mm512_dpbusd_epi32((acc), (q), (x))
#else
#define DOT_ACC(acc, q, x) _mm512_add_epi16((acc), _mm512_maddubs_epi16((q), (x)))
#endif

#define OB_HAVE_TERN_DOT4
static void prim_tern_dot4(const uint8_t *w, const int8_t *x, int nblk, int32_t acc[4]) {
    const __m512i m3 = _mm512_set1_epi8(3);
    __m512i a32[4];
    for (int r = 0; r < 4; r++) a32[r] = _mm512_setzero_si512();
#ifdef OB_VNNI
    /* One tile alone (the GEMV reads two at once with prim_tern_dot8; this takes the last tile of a part with an
     * odd number of them). Plane k is masked in place (w & 3 << 2k: its codes times 4^k, <= 192 as u8) and
     * not shifted down: the shifts ran on the same port as dpbusd (GEMVs of L2-resident weights, 1 thread: 22 ->
     * 26-28 GB/s; see OB_PF above). Each plane keeps its own sums, exact multiples of 4^k (dpbusd does not
     * saturate), divided exactly at the end. */
    const __m512i m[4] = {m3, _mm512_set1_epi8(0x0C), _mm512_set1_epi8(0x30), _mm512_set1_epi8((char)0xC0)};
    __m512i p32[4][4];
    for (int r = 0; r < 4; r++)
        for (int k = 0; k < 4; k++) p32[r][k] = _mm512_setzero_si512();
    for (int b = 0; b < nblk; b++) {
        const int8_t *xb = x + (size_t)b * 256;
        const uint8_t *wb = w + (size_t)b * 256;
        OB_PREFETCH_BLOCK(wb);
        __m512i xv[4] = {_mm512_loadu_si512(xb), _mm512_loadu_si512(xb + 64), _mm512_loadu_si512(xb + 128),
                         _mm512_loadu_si512(xb + 192)};
        for (int r = 0; r < 4; r++) {
            __m512i wv = _mm512_loadu_si512(wb + r * 64);
            for (int k = 0; k < 4; k++) p32[r][k] = DOT_ACC(p32[r][k], _mm512_and_si512(wv, m[k]), xv[k]);
        }
    }
    for (int r = 0; r < 4; r++)
        a32[r] = _mm512_add_epi32(_mm512_add_epi32(p32[r][0], _mm512_srai_epi32(p32[r][1], 2)),
                                  _mm512_add_epi32(_mm512_srai_epi32(p32[r][2], 4), _mm512_srai_epi32(p32[r][3], 6)));
#else
    const __m512i ones = _mm512_set1_epi16(1);
    for (int b0 = 0; b0 < nblk; b0 += 4) {
        int b1 = b0 + 4 < nblk ? b0 + 4 : nblk;
        __m512i a16[4];
        for (int r = 0; r < 4; r++) a16[r] = _mm512_setzero_si512();
        for (int b = b0; b < b1; b++) { /* per block and lane: 4 pair sums, |.| <= 2048; 4 blocks <= 8192 */
            const int8_t *xb = x + (size_t)b * 256;
            const uint8_t *wb = w + (size_t)b * 256;
            OB_PREFETCH_BLOCK(wb);
            __m512i x0 = _mm512_loadu_si512(xb), x1 = _mm512_loadu_si512(xb + 64);
            __m512i x2 = _mm512_loadu_si512(xb + 128), x3 = _mm512_loadu_si512(xb + 192);
            for (int r = 0; r < 4; r++) {
                __m512i wv = _mm512_loadu_si512(wb + r * 64);
                a16[r] = DOT_ACC(a16[r], plane(wv, 0, m3), x0);
                a16[r] = DOT_ACC(a16[r], plane(wv, 1, m3), x1);
                a16[r] = DOT_ACC(a16[r], plane(wv, 2, m3), x2);
                a16[r] = DOT_ACC(a16[r], plane(wv, 3, m3), x3);
            }
        }
        for (int r = 0; r < 4; r++) a32[r] = _mm512_add_epi32(a32[r], _mm512_madd_epi16(a16[r], ones));
    }
#endif
    for (int r = 0; r < 4; r++) acc[r] = _mm512_reduce_add_epi32(a32[r]);
}

#ifdef OB_VNNI
/* Two 4-row tiles at once: two weight streams in flight on the core, not one (the GEMV pairs tile i of a part's
 * first half with tile i of its second). 8 rows of in-place planes would need 32 accumulators, so the word is
 * shifted once: planes 0 / 1 (w & 3, (w >> 2) & 3) sum at scale 1, planes 2 / 3 (w & 0x30, (w >> 2) & 0x30) at 16.
 * Same Xeon, 2 threads, builds alternating: the 120 GEMVs of a token 20.6-21.0 -> 19.6-19.9 ms; the decode step's
 * layers 20.9-21.0 -> 20.3-20.7 ms. The sixteen sums are named variables, not arrays indexed in an unrolled loop:
 * with arrays GCC 12 kept copying sums between registers and spilling six of them every block, and the function
 * was not inlined; the 120 GEMVs took 0.947x the time written this way (14 rounds, the same sums), the decode step
 * 0.977x. */
#define OB_HAVE_TERN_DOT8
static void prim_tern_dot8(const uint8_t *wa, const uint8_t *wb, const int8_t *x, int nblk, int32_t acca[4],
                           int32_t accb[4]) {
    const __m512i m03 = _mm512_set1_epi8(0x03), m30 = _mm512_set1_epi8(0x30);
    __m512i l0 = _mm512_setzero_si512(), l1 = l0, l2 = l0, l3 = l0, l4 = l0, l5 = l0, l6 = l0, l7 = l0;
    __m512i h0 = l0, h1 = l0, h2 = l0, h3 = l0, h4 = l0, h5 = l0, h6 = l0, h7 = l0;
    for (int b = 0; b < nblk; b++) {
        const int8_t *xb = x + (size_t)b * 256;
        const uint8_t *pa = wa + (size_t)b * 256, *pb = wb + (size_t)b * 256;
        OB_PREFETCH_BLOCK(pa);
        OB_PREFETCH_BLOCK(pb);
        const __m512i x0 = _mm512_loadu_si512(xb), x1 = _mm512_loadu_si512(xb + 64);
        const __m512i x2 = _mm512_loadu_si512(xb + 128), x3 = _mm512_loadu_si512(xb + 192);
#define OB_DOT8_ROW(lo, hi, p)                                                       \
    do {                                                                             \
        const __m512i w = _mm512_loadu_si512(p), ws = _mm512_srli_epi16(w, 2);      \
        lo = _mm512_dpbusd_epi32(lo, _mm512_and_si512(w, m03), x0);                  \
        lo = _mm512_dpbusd_epi32(lo, _mm512_and_si512(ws, m03), x1);                 \
        hi = _mm512_dpbusd_epi32(hi, _mm512_and_si512(w, m30), x2);                  \
        hi = _mm512_dpbusd_epi32(hi, _mm512_and_si512(ws, m30), x3);                 \
    } while (0)
        OB_DOT8_ROW(l0, h0, pa);
        OB_DOT8_ROW(l1, h1, pa + 64);
        OB_DOT8_ROW(l2, h2, pa + 128);
        OB_DOT8_ROW(l3, h3, pa + 192);
        OB_DOT8_ROW(l4, h4, pb);
        OB_DOT8_ROW(l5, h5, pb + 64);
        OB_DOT8_ROW(l6, h6, pb + 128);
        OB_DOT8_ROW(l7, h7, pb + 192);
#undef OB_DOT8_ROW
    }
#define OB_DOT8_SUM(lo, hi) _mm512_reduce_add_epi32(_mm512_add_epi32(lo, _mm512_srai_epi32(hi, 4)))
    acca[0] = OB_DOT8_SUM(l0, h0), acca[1] = OB_DOT8_SUM(l1, h1), acca[2] = OB_DOT8_SUM(l2, h2);
    acca[3] = OB_DOT8_SUM(l3, h3), accb[0] = OB_DOT8_SUM(l4, h4), accb[1] = OB_DOT8_SUM(l5, h5);
    accb[2] = OB_DOT8_SUM(l6, h6), accb[3] = OB_DOT8_SUM(l7, h7);
#undef OB_DOT8_SUM
}
#endif

#define OB_HAVE_TERN_UNPACK4
static void prim_tern_unpack4(const uint8_t *w, int nblk, uint8_t *q, size_t qstride) {
    const __m512i m3 = _mm512_set1_epi8(3);
    for (int b = 0; b < nblk; b++)
        for (int r = 0; r < 4; r++) {
            __m512i wv = _mm512_loadu_si512(w + ((size_t)b * 4 + r) * 64);
            uint8_t *qr = q + r * qstride + (size_t)b * 256;
            for (int k = 0; k < 4; k++) _mm512_storeu_si512(qr + 64 * k, plane(wv, k, m3));
        }
}

/* 4 rows x NT tokens over len (multiple of 256, <= 1024) elements */
OB_INLINE void tern_mk_n(const uint8_t *q, size_t qs, const int8_t *x, size_t xs, const int NT, int len,
                         int32_t *acc, int astride) {
    __m512i a[4][OB_TB];
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < NT; t++) a[r][t] = _mm512_setzero_si512();
    for (int e = 0; e < len; e += 64) {
        __m512i xv[OB_TB];
        for (int t = 0; t < NT; t++) xv[t] = _mm512_loadu_si512(x + t * xs + e);
        for (int r = 0; r < 4; r++) {
            __m512i qv = _mm512_loadu_si512(q + r * qs + e);
            for (int t = 0; t < NT; t++) a[r][t] = DOT_ACC(a[r][t], qv, xv[t]);
        }
    }
#ifndef OB_VNNI
    const __m512i ones = _mm512_set1_epi16(1);
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < NT; t++) a[r][t] = _mm512_madd_epi16(a[r][t], ones);
#endif
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < 4; r++) acc[t * astride + r] += _mm512_reduce_add_epi32(a[r][t]);
}

#define OB_HAVE_TERN_MK
static void prim_tern_mk(const uint8_t *q, size_t qs, const int8_t *x, size_t xs, int nt, int len, int32_t *acc,
                         int astride) {
    if (nt == 3) tern_mk_n(q, qs, x, xs, 3, len, acc, astride);
    else if (nt == 2) tern_mk_n(q, qs, x, xs, 2, len, acc, astride);
    else tern_mk_n(q, qs, x, xs, 1, len, acc, astride);
}

#include "kernels_impl.h"
