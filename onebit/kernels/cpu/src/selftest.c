/* Cross-ISA self-test: every kernel table this CPU runs against the scalar one, on random data (int8
 * ternary path, quantization, RMSNorm, relu2 bit-exact; float paths within rounding). Not part of the
 * extension; for checking ISAs a development machine lacks, e.g. NEON under qemu-user:
 *   S=onebit/kernels/cpu/src
 *   aarch64-linux-gnu-gcc -O2 -march=armv8.2-a+dotprod -ffp-contract=off -fno-trapping-math -I$S $S/selftest.c \
 *     $S/isa_scalar.c $S/isa_neon.c $S/isa_neondot.c $S/pool.c $S/common.c $S/dispatch.c -static -lm -pthread -o /tmp/st
 *   qemu-aarch64 -cpu max /tmp/st
 * On x86, link the objects of a setup.py build (all but module.o) instead. Exit status = failing ISAs. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ob.h"

extern const ob_kernels ob_kernels_scalar;

static unsigned long long rs = 88172645463325252ULL;
static unsigned long long rnd(void) {
    rs ^= rs << 13;
    rs ^= rs >> 7;
    rs ^= rs << 17;
    return rs;
}
static float frand(void) { return (float)((double)(rnd() % 2000001) / 1000000.0 - 1.0); }
static void fill(float *x, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) x[i] = frand() * scale;
}

static ob_ctx *new_ctx(const ob_kernels *k) {
    ob_ctx *c = calloc(1, sizeof *c);
    c->k = k;
    c->pool = ob_pool_new(2);
    c->nthreads = ob_pool_threads(c->pool);
    pthread_mutex_init(&c->mu, NULL);
    return c;
}

/* int8 path exact (quantized activations, per-group accumulators, outputs); float path within rounding */
static int check_ternary(ob_ctx *a, ob_ctx *b, int T, int N, int K, int C) {
    int cg = K / C, gpad = (cg + 255) / 256 * 256, Kp = C * gpad, src_row = (K + 3) / 4, bad = 0;
    uint8_t *packed = malloc((size_t)N * src_row), *dst = malloc((size_t)(N + 3) / 4 * 4 * Kp / 4);
    for (size_t i = 0; i < (size_t)N * src_row; i++) {
        unsigned v = 0;
        for (int k = 0; k < 4; k++) v |= (unsigned)(rnd() % 3) << (2 * k);
        packed[i] = (uint8_t)v;
    }
    ob_repack_ternary(a, packed, N, K, C, dst);
    float *scale = malloc(sizeof(float) * C * N), *x = malloc(sizeof(float) * T * K);
    float *ya = malloc(sizeof(float) * T * N), *yb = malloc(sizeof(float) * T * N);
    for (int i = 0; i < C * N; i++) scale[i] = frand() + 1.5f;
    fill(x, (size_t)T * K, 3.0f);
    ob_tern w = {dst, scale, N, K, C, cg, gpad, Kp};
    int8_t *qa = malloc((size_t)T * Kp), *qb = malloc((size_t)T * Kp);
    int32_t *sa = malloc(4 * T * C), *sb = malloc(4 * T * C);
    int32_t *acca = malloc(4 * (size_t)C * T * N), *accb = malloc(4 * (size_t)C * T * N);
    float *xa = malloc(4 * T), *xb = malloc(4 * T);
    a->k->quant(a, x, T, K, C, cg, gpad, qa, sa, xa);
    b->k->quant(b, x, T, K, C, cg, gpad, qb, sb, xb);
    if (memcmp(qa, qb, (size_t)T * Kp) || memcmp(xa, xb, 4 * T) || memcmp(sa, sb, 4 * T * C)) bad |= 1;
    a->k->tern_i8(a, &w, qa, sa, xa, T, ya, acca, NULL, 0);
    b->k->tern_i8(b, &w, qb, sb, xb, T, yb, accb, NULL, 0);
    if (memcmp(acca, accb, 4 * (size_t)C * T * N) || memcmp(ya, yb, 4 * (size_t)T * N)) bad |= 2;
    a->k->tern_f32(a, &w, x, T, ya, NULL, 0);
    b->k->tern_f32(b, &w, x, T, yb, NULL, 0);
    for (int i = 0; i < T * N; i++) { /* float sums: error relative to sum |x| * max scale (2.5) */
        float sum = 0.0f;
        for (int k = 0; k < K; k++) sum += fabsf(x[(i / N) * K + k]);
        if (fabsf(ya[i] - yb[i]) > 2e-6f * 2.5f * sum + 1e-6f) {
            bad |= 4;
            break;
        }
    }
    free(packed), free(dst), free(scale), free(x), free(ya), free(yb), free(qa), free(qb);
    free(sa), free(sb), free(acca), free(accb), free(xa), free(xb);
    return bad;
}

static int check_misc(ob_ctx *a, ob_ctx *b) {
    int bad = 0, T = 5, n = 333, H = 4, Hkv = 2, D = 72, L = 300, start = 290, N = 37, K32 = 96;
    float *x = malloc(4 * T * n), *w = malloc(4 * n), *ya = malloc(4 * T * n), *yb = malloc(4 * T * n);
    fill(x, (size_t)T * n, 1.0f);
    for (int i = 0; i < n; i++) w[i] = 1 + frand() / 10;
    a->k->rmsnorm(a, x, w, T, n, 1e-5f, ya);
    b->k->rmsnorm(b, x, w, T, n, 1e-5f, yb);
    if (memcmp(ya, yb, 4 * T * n)) bad |= 8;
    a->k->glu(a, x, w, n, 0, ya);
    b->k->glu(b, x, w, n, 0, yb);
    if (memcmp(ya, yb, 4 * n)) bad |= 16;
    float *q = malloc(4 * T * H * D), *kc = malloc(4 * (size_t)Hkv * L * D), *vc = malloc(4 * (size_t)Hkv * L * D);
    float *oa = malloc(4 * T * H * D), *ob = malloc(4 * T * H * D);
    fill(q, (size_t)T * H * D, 1.0f);
    fill(kc, (size_t)Hkv * L * D, 1.0f);
    fill(vc, (size_t)Hkv * L * D, 1.0f);
    a->k->attention(a, q, T, H, D, kc, vc, OB_F32, Hkv, L, start, oa);
    b->k->attention(b, q, T, H, D, kc, vc, OB_F32, Hkv, L, start, ob);
    for (int i = 0; i < T * H * D; i++)
        if (fabsf(oa[i] - ob[i]) > 1e-5f) {
            bad |= 32;
            break;
        }
    a->k->dense(a, kc, OB_F32, N, D, q, 3, oa);
    b->k->dense(b, kc, OB_F32, N, D, q, 3, ob);
    for (int i = 0; i < 3 * N; i++)
        if (fabsf(oa[i] - ob[i]) > 1e-5f) {
            bad |= 64;
            break;
        }
    int8_t *w8 = malloc((size_t)(N + 3) / 4 * 4 * K32), *x8 = malloc(3 * K32);
    for (int i = 0; i < (N + 3) / 4 * 4 * K32; i++) w8[i] = (int8_t)(rnd() % 255 - 127);
    for (int i = 0; i < 3 * K32; i++) x8[i] = (int8_t)(rnd() % 255 - 127);
    float sx[3] = {1.5f, 0.25f, 3.0f}, *rsc = w; /* any positive scales */
    a->k->dense_i8(a, w8, rsc, N, K32, x8, sx, 3, oa);
    b->k->dense_i8(b, w8, rsc, N, K32, x8, sx, 3, ob);
    if (memcmp(oa, ob, 4 * 3 * N)) bad |= 128;
    free(x), free(w), free(ya), free(yb), free(q), free(kc), free(vc), free(oa), free(ob), free(w8), free(x8);
    return bad;
}

int main(void) {
    static const int shapes[][4] = {{1, 37, 1029, 1}, {1, 6, 7, 7}, {3, 130, 300, 3}, {4, 64, 512, 2},
                                    {16, 128, 2560, 1}, {33, 19, 513, 1}, {1, 250, 2560, 1}, {7, 33, 768, 3}};
    ob_ctx *ref = new_ctx(&ob_kernels_scalar);
    int fails = 0;
    for (const char *const *name = ob_isa_all(); *name; name++) {
        const ob_kernels *k = ob_find_kernels(*name);
        if (!k) {
            printf("%-10s not supported by this CPU\n", *name);
            continue;
        }
        ob_ctx *c = new_ctx(k);
        int bad = check_misc(ref, c);
        for (unsigned s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
            bad |= check_ternary(ref, c, shapes[s][0], shapes[s][1], shapes[s][2], shapes[s][3]);
        printf("%-10s %s (flags %d)\n", *name, bad ? "MISMATCH" : "agrees with scalar", bad);
        fails += bad != 0;
    }
    return fails;
}
