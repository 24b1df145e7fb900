/* ARM NEON kernels (aarch64); with OB_DOTPROD (isa_neondot.c) the ternary dot uses SDOT (vdotq_s32).
 * A 64-byte block of one row is four 16-byte loads; plane k (shift 2k, mask 3) of load h holds elements
 * 64k + 16h .. +15. q (0..2) fits int8, so SDOT q x is exact; without it, vmull_s8/vmlal_high_s8 give
 * int16 pair sums (|.| <= 512) and vpadalq_s16 widens them. Everything else is the portable C in
 * kernels_impl.h, which gcc vectorizes for NEON. */
#include <arm_neon.h>
#include <stdint.h>

#include "ob.h"

#ifdef OB_DOTPROD
#define OB_ISA neondot
#define OB_ISA_NAME "neondot"
#else
#define OB_ISA neon
#define OB_ISA_NAME "neon"
#endif
#define OB_TB 3
#define OB_INLINE static inline __attribute__((always_inline))

#ifdef OB_DOTPROD
OB_INLINE int32x4_t dot16(int32x4_t acc, uint8x16_t q, int8x16_t x) {
    return vdotq_s32(acc, vreinterpretq_s8_u8(q), x);
}
#else
OB_INLINE int32x4_t dot16(int32x4_t acc, uint8x16_t q, int8x16_t x) {
    int8x16_t qs = vreinterpretq_s8_u8(q);
    int16x8_t p = vmull_s8(vget_low_s8(qs), vget_low_s8(x));
    p = vmlal_high_s8(p, qs, x);
    return vpadalq_s16(acc, p);
}
#endif

OB_INLINE int32x4_t tdot16(int32x4_t acc, uint8x16_t w, const int8_t *x, uint8x16_t m3) {
    acc = dot16(acc, vandq_u8(w, m3), vld1q_s8(x));
    acc = dot16(acc, vandq_u8(vshrq_n_u8(w, 2), m3), vld1q_s8(x + 64));
    acc = dot16(acc, vandq_u8(vshrq_n_u8(w, 4), m3), vld1q_s8(x + 128));
    acc = dot16(acc, vshrq_n_u8(w, 6), vld1q_s8(x + 192));
    return acc;
}

#define OB_HAVE_TERN_DOT4
static void prim_tern_dot4(const uint8_t *w, const int8_t *x, int nblk, int32_t acc[4]) {
    const uint8x16_t m3 = vdupq_n_u8(3);
    int32x4_t a[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
    for (int b = 0; b < nblk; b++) {
        const int8_t *xb = x + (size_t)b * 256;
        const uint8_t *wb = w + (size_t)b * 256;
        for (int r = 0; r < 4; r++)
            for (int h = 0; h < 4; h++) a[r] = tdot16(a[r], vld1q_u8(wb + r * 64 + 16 * h), xb + 16 * h, m3);
    }
    for (int r = 0; r < 4; r++) acc[r] = vaddvq_s32(a[r]);
}

#define OB_HAVE_TERN_UNPACK4
static void prim_tern_unpack4(const uint8_t *w, int nblk, uint8_t *q, size_t qstride) {
    const uint8x16_t m3 = vdupq_n_u8(3);
    for (int b = 0; b < nblk; b++)
        for (int r = 0; r < 4; r++) {
            const uint8_t *wb = w + ((size_t)b * 4 + r) * 64;
            uint8_t *qr = q + r * qstride + (size_t)b * 256;
            for (int h = 0; h < 4; h++) {
                uint8x16_t v = vld1q_u8(wb + 16 * h);
                vst1q_u8(qr + 16 * h, vandq_u8(v, m3));
                vst1q_u8(qr + 64 + 16 * h, vandq_u8(vshrq_n_u8(v, 2), m3));
                vst1q_u8(qr + 128 + 16 * h, vandq_u8(vshrq_n_u8(v, 4), m3));
                vst1q_u8(qr + 192 + 16 * h, vshrq_n_u8(v, 6));
            }
        }
}

OB_INLINE void tern_mk_n(const uint8_t *q, size_t qs, const int8_t *x, size_t xs, const int NT, int len,
                         int32_t *acc, int astride) {
    int32x4_t a[4][OB_TB];
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < NT; t++) a[r][t] = vdupq_n_s32(0);
    for (int e = 0; e < len; e += 16) {
        int8x16_t xv[OB_TB];
        for (int t = 0; t < NT; t++) xv[t] = vld1q_s8(x + t * xs + e);
        for (int r = 0; r < 4; r++) {
            uint8x16_t qv = vld1q_u8(q + r * qs + e);
            for (int t = 0; t < NT; t++) a[r][t] = dot16(a[r][t], qv, xv[t]);
        }
    }
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < 4; r++) acc[t * astride + r] += vaddvq_s32(a[r][t]);
}

#define OB_HAVE_TERN_MK
static void prim_tern_mk(const uint8_t *q, size_t qs, const int8_t *x, size_t xs, int nt, int len, int32_t *acc,
                         int astride) {
    if (nt == 3) tern_mk_n(q, qs, x, xs, 3, len, acc, astride);
    else if (nt == 2) tern_mk_n(q, qs, x, xs, 2, len, acc, astride);
    else tern_mk_n(q, qs, x, xs, 1, len, acc, astride);
}

#include "kernels_impl.h"
