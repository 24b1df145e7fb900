/* ISA-independent helpers: the ternary repack (load time), half <-> float, the KV store. */
#include <stdlib.h>
#include <string.h>

#include "ob.h"

typedef struct {
    const uint8_t *packed;
    uint8_t *dst;
    int N, K, C, cg, gpad, Kp, src_row;
} repack_job;

/* One tile of 4 rows: canonical codes (4 per byte along the input axis) -> blocked layout. */
static void repack_task(void *p, int tile, int tid) {
    (void)tid;
    repack_job *j = p;
    int nblk = j->Kp / OB_BLK;
    uint8_t *base = j->dst + (size_t)tile * nblk * 4 * OB_BLKB;
    memset(base, 0x55, (size_t)nblk * 4 * OB_BLKB); /* code 1 (zero) everywhere, incl. padding */
    for (int r = 0; r < 4; r++) {
        int o = tile * 4 + r;
        if (o >= j->N) break;
        const uint8_t *src = j->packed + (size_t)o * j->src_row;
        for (int g = 0; g < j->C; g++) {
            for (int e = 0; e < j->cg; e++) {
                int i = g * j->cg + e;
                unsigned q = (src[i >> 2] >> (2 * (i & 3))) & 3;
                int pe = g * j->gpad + e; /* padded element index */
                int b = pe / OB_BLK, w = pe % OB_BLK, k = w / 64, jj = w % 64;
                uint8_t *byte = base + ((size_t)b * 4 + r) * OB_BLKB + jj;
                *byte = (uint8_t)((*byte & ~(3u << (2 * k))) | (q << (2 * k)));
            }
        }
    }
}

void ob_repack_ternary(ob_ctx *c, const uint8_t *packed, int N, int K, int C, uint8_t *dst) {
    repack_job j;
    j.packed = packed;
    j.dst = dst;
    j.N = N;
    j.K = K;
    j.C = C;
    j.cg = K / C;
    j.gpad = (j.cg + OB_BLK - 1) / OB_BLK * OB_BLK;
    j.Kp = C * j.gpad;
    j.src_row = (K + 3) / 4;
    ob_pool_run(c->pool, repack_task, &j, (N + 3) / 4);
}

float ob_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalize */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* float -> IEEE half, round to nearest even (as NumPy's astype(float16)); NaN stays NaN, overflow is inf. */
uint16_t ob_float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 | ((ax >> 13) & 0x3ff) : 0));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); /* >= 65520 rounds to inf */
    if (ax < 0x38800000u) {                                  /* below 2^-14: a subnormal half, or zero */
        if (ax < 0x33000000u) return (uint16_t)sign;         /* below 2^-25 */
        uint32_t m = (ax & 0x7fffff) | 0x800000, shift = 126 - (ax >> 23); /* in units of 2^-24 */
        uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t h = (ax - 0x38000000u) >> 13, rem = ax & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

/* src f32 [T, H, D] -> the cache [H, max_len, D] (one layer) at positions start.., f32 or f16. */
void ob_kv_store(ob_ctx *c, const float *src, int T, int H, int D, void *dst, int kvtype, int max_len, int start) {
    for (int t = 0; t < T; t++)
        for (int h = 0; h < H; h++) {
            const float *s = src + ((size_t)t * H + h) * D;
            size_t off = ((size_t)h * max_len + (size_t)(start + t)) * D;
            if (kvtype == OB_F32) {
                memcpy((float *)dst + off, s, sizeof(float) * (size_t)D);
            } else {
                c->k->to_half(s, (size_t)D, (uint16_t *)dst + off);
            }
        }
}

void *ob_scratch(ob_ctx *c, int slot, size_t n) {
    if (n < 64) n = 64;
    if (c->scratch_size[slot] < n) {
        free(c->scratch[slot]);
        size_t sz = (n + n / 4 + 4095) & ~(size_t)4095;
        c->scratch[slot] = aligned_alloc(64, sz);
        c->scratch_size[slot] = c->scratch[slot] ? sz : 0;
    }
    return c->scratch[slot];
}
