/* The kernels, written once: included by each isa_*.c after it defines OB_ISA and its SIMD primitives
 * (each guarded by OB_HAVE_*; portable C fallbacks below). Drivers split work into pool tasks.
 * Exactness: the int8 ternary path, activation quantization, RMSNorm, RoPE and relu2 GLU follow
 * numpy_ref operation by operation (built with -ffp-contract=off), so they are bit-identical. */
#include <math.h>
#include <stdatomic.h>
#include <string.h>

#include "ob.h"

#define OB_CAT2(a, b) a##b
#define OB_CAT(a, b) OB_CAT2(a, b)

#ifndef OB_TB
#define OB_TB 3 /* tokens per GEMM micro-kernel call */
#endif
#define OB_RG 4  /* tiles (of 4 rows) per GEMM task */
#define OB_KCB 4 /* 256-blocks per GEMM K chunk: 1024 elements, int16 sums cannot overflow */
#define OB_QS (OB_KCB * OB_BLK)


static inline int ob_min(int a, int b) { return a < b ? a : b; }
static inline int ob_max(int a, int b) { return a > b ? a : b; }

/* ============================ primitives (portable fallbacks) ================================== */

#ifndef OB_HAVE_TERN_DOT4
/* Sum of q * x over nblk blocks for the 4 rows of a tile (w at the first block, x at its elements). */
static void prim_tern_dot4(const uint8_t *w, const int8_t *x, int nblk, int32_t acc[4]) {
    for (int r = 0; r < 4; r++) acc[r] = 0;
    for (int b = 0; b < nblk; b++) {
        const int8_t *xb = x + (size_t)b * OB_BLK;
        for (int r = 0; r < 4; r++) {
            const uint8_t *wb = w + ((size_t)b * 4 + r) * OB_BLKB;
            int32_t s = 0;
            for (int j = 0; j < 64; j++) {
                unsigned c = wb[j];
                s += (int32_t)(c & 3) * xb[j] + (int32_t)((c >> 2) & 3) * xb[64 + j] +
                     (int32_t)((c >> 4) & 3) * xb[128 + j] + (int32_t)(c >> 6) * xb[192 + j];
            }
            acc[r] += s;
        }
    }
}
#endif

#ifndef OB_HAVE_TERN_UNPACK4
/* 4 rows of codes q (0, 1, 2) in natural element order: q[r * qstride + e]. */
static void prim_tern_unpack4(const uint8_t *w, int nblk, uint8_t *q, size_t qstride) {
    for (int b = 0; b < nblk; b++)
        for (int r = 0; r < 4; r++) {
            const uint8_t *wb = w + ((size_t)b * 4 + r) * OB_BLKB;
            uint8_t *qr = q + r * qstride + (size_t)b * OB_BLK;
            for (int k = 0; k < 4; k++)
                for (int j = 0; j < 64; j++) qr[64 * k + j] = (wb[j] >> (2 * k)) & 3;
        }
}
#endif

#ifndef OB_HAVE_TERN_MK
/* acc[t * astride + r] += sum_e q[r][e] * x[t][e] for 4 rows, nt tokens, len elements. */
static void prim_tern_mk(const uint8_t *q, size_t qstride, const int8_t *x, size_t xstride, int nt, int len,
                         int32_t *acc, int astride) {
    for (int t = 0; t < nt; t++)
        for (int r = 0; r < 4; r++) {
            int32_t s = 0;
            for (int e = 0; e < len; e++) s += (int32_t)q[r * qstride + e] * x[t * xstride + e];
            acc[t * astride + r] += s;
        }
}
#endif

#ifndef OB_HAVE_TERNF_DOT4
static void prim_ternf_dot4(const uint8_t *w, const float *x, int nblk, float acc[4]) {
    for (int r = 0; r < 4; r++) acc[r] = 0.0f;
    for (int b = 0; b < nblk; b++) {
        const float *xb = x + (size_t)b * OB_BLK;
        for (int r = 0; r < 4; r++) {
            const uint8_t *wb = w + ((size_t)b * 4 + r) * OB_BLKB;
            float s = 0.0f;
            for (int k = 0; k < 4; k++)
                for (int j = 0; j < 64; j++) {
                    int t = (int)((wb[j] >> (2 * k)) & 3) - 1;
                    s += t > 0 ? xb[64 * k + j] : t < 0 ? -xb[64 * k + j] : 0.0f;
                }
            acc[r] += s;
        }
    }
}
#endif

#ifndef OB_HAVE_TERNF_UNPACK4
/* 4 rows of ternary values t (-1, 0, 1) as int8 in natural order. */
static void prim_ternf_unpack4(const uint8_t *w, int nblk, int8_t *t, size_t tstride) {
    for (int b = 0; b < nblk; b++)
        for (int r = 0; r < 4; r++) {
            const uint8_t *wb = w + ((size_t)b * 4 + r) * OB_BLKB;
            int8_t *tr = t + r * tstride + (size_t)b * OB_BLK;
            for (int k = 0; k < 4; k++)
                for (int j = 0; j < 64; j++) tr[64 * k + j] = (int8_t)((wb[j] >> (2 * k)) & 3) - 1;
        }
}
#endif

#ifndef OB_HAVE_TERNF_MK
static void prim_ternf_mk(const int8_t *tw, size_t tstride, const float *x, size_t xstride, int nt, int len,
                          float *acc, int astride) {
    for (int t = 0; t < nt; t++)
        for (int r = 0; r < 4; r++) {
            float s = 0.0f;
            for (int e = 0; e < len; e++) s += (float)tw[r * tstride + e] * x[t * xstride + e];
            acc[t * astride + r] += s;
        }
}
#endif

#ifndef OB_HAVE_QUANT
static float prim_absmax(const float *x, int n) {
    float m = 0.0f;
    for (int i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        m = a > m ? a : m;
    }
    return m;
}

/* q = clamp(round_half_even(x * s), -128, 127); returns sum(q). */
static int32_t prim_quant_seg(const float *x, int n, float s, int8_t *q) {
    int32_t sum = 0;
    for (int i = 0; i < n; i++) {
        float p = x[i] * s;
        p = p < -128.0f ? -128.0f : p > 127.0f ? 127.0f : p;
        int v = (int)nearbyintf(p);
        q[i] = (int8_t)v;
        sum += v;
    }
    return sum;
}
#endif

static float ob_load_w(const void *w, int wtype, size_t i) {
    if (wtype == OB_F32) return ((const float *)w)[i];
    uint16_t h = ((const uint16_t *)w)[i];
    if (wtype == OB_BF16) {
        uint32_t b = (uint32_t)h << 16;
        float f;
        memcpy(&f, &b, 4);
        return f;
    }
    return ob_half_to_float(h);
}

#ifndef OB_HAVE_DENSE
/* out[t * ostride + r] = dot(w row r, x token t) for nr <= 4 rows, nt tokens. */
static void prim_dense_mk(const void *w, int wtype, size_t K, int nr, const float *x, int nt, float *out,
                          size_t ostride) {
    for (int t = 0; t < nt; t++)
        for (int r = 0; r < nr; r++) {
            float s = 0.0f;
            for (size_t k = 0; k < K; k++) s += ob_load_w(w, wtype, (size_t)r * K + k) * x[t * K + k];
            out[t * ostride + r] = s;
        }
}
#endif

#ifndef OB_HAVE_DENSE_4R
#ifdef OB_HAVE_DENSE
#error "an ISA with its own prim_dense_mk must sum one-token rows the same way in prim_dense_4r"
#endif
/* One token, four rows (w[i]: row i): out[i] = dot(row i, x), each row as prim_dense_mk sums it. */
static void prim_dense_4r(const char *const *w, int wtype, size_t K, const float *x, float *out) {
    for (int r = 0; r < 4; r++) prim_dense_mk(w[r], wtype, K, 1, x, 1, out + r, 1);
}
#endif

#ifndef OB_HAVE_DENSE_I8
/* int8 rows interleaved in tiles of 4: w[(k / 32 * 4 + r) * 32 + k % 32]; K32 = K rounded up to 32.
 * out[t * ostride + r] = sum_k w[r][k] x[t][k] for the 4 rows and nt tokens. */
static void prim_i8_mk(const int8_t *w, size_t K32, const int8_t *x, int nt, int32_t *out, size_t ostride) {
    for (int t = 0; t < nt; t++)
        for (int r = 0; r < 4; r++) {
            int32_t s = 0;
            for (size_t k = 0; k < K32; k++) s += (int32_t)w[(k / 32 * 4 + r) * 32 + k % 32] * x[t * K32 + k];
            out[t * ostride + r] = s;
        }
}
#endif

#ifndef OB_HAVE_DENSE_I8_2T
/* One token, two 4-row tiles of the layout above: out0 / out1 = prim_i8_mk's sums for each. */
static void prim_i8_2t(const int8_t *w0, const int8_t *w1, size_t K32, const int8_t *x, int32_t *out0,
                       int32_t *out1) {
    prim_i8_mk(w0, K32, x, 1, out0, 4);
    prim_i8_mk(w1, K32, x, 1, out1, 4);
}
#endif

#ifndef OB_HAVE_ATTN
static float prim_dot_kv(const float *q, const void *k, int kvtype, int D) {
    float s = 0.0f;
    if (kvtype == OB_F32)
        for (int i = 0; i < D; i++) s += q[i] * ((const float *)k)[i];
    else
        for (int i = 0; i < D; i++) s += q[i] * ob_half_to_float(((const uint16_t *)k)[i]);
    return s;
}

/* s[i * OB_KB + j] = dot(q_i, k_j) * scale for nq queries [nq, D] and nk keys [nk, D]; tmp: D * OB_KB floats of
 * scratch the SIMD versions may use */
static void prim_scores(const float *q, int nq, const void *k, int kvtype, int nk, int D, float scale, float *s,
                        float *tmp) {
    (void)tmp;
    size_t esz = kvtype == OB_F32 ? 4 : 2;
    for (int i = 0; i < nq; i++)
        for (int j = 0; j < nk; j++)
            s[i * OB_KB + j] = prim_dot_kv(q + (size_t)i * D, (const char *)k + (size_t)j * D * esz, kvtype, D) * scale;
}

/* o[i] += sum_j p[i * OB_KB + j] * v_j (tmp: as prim_scores') */
static void prim_pv(const float *p, int nq, const void *v, int kvtype, int nk, int D, float *o, float *tmp) {
    (void)tmp;
    for (int i = 0; i < nq; i++)
        for (int j = 0; j < nk; j++) {
            float a = p[i * OB_KB + j];
            float *oi = o + (size_t)i * D;
            if (kvtype == OB_F32)
                for (int d = 0; d < D; d++) oi[d] += a * ((const float *)v)[(size_t)j * D + d];
            else
                for (int d = 0; d < D; d++) oi[d] += a * ob_half_to_float(((const uint16_t *)v)[(size_t)j * D + d]);
        }
}

static void prim_exp(float *x, int n) {
    for (int i = 0; i < n; i++) x[i] = expf(x[i]);
}
#endif

#ifndef OB_HAVE_TO_HALF
static void prim_to_half(const float *x, size_t n, uint16_t *y) {
    for (size_t i = 0; i < n; i++) y[i] = ob_float_to_half(x[i]);
}
#endif

#ifndef OB_HAVE_SOFTMAX_STEP
/* One online-softmax step on a score row s[0:nk] of which the first nv (>= 1) count: mx = max(m, s[0:nv]),
 * s[j] = exp(s[j] - mx) for j < nv and 0 past it; returns mx and the sum of the new s in *sum. */
static float prim_softmax_step(float *s, int nv, int nk, float m, float *sum) {
    float mx = m, acc = 0.0f;
    for (int j = 0; j < nv; j++) mx = s[j] > mx ? s[j] : mx;
    for (int j = 0; j < nv; j++) s[j] -= mx;
    prim_exp(s, nv);
    for (int j = 0; j < nv; j++) acc += s[j];
    for (int j = nv; j < nk; j++) s[j] = 0.0f;
    *sum = acc;
    return mx;
}
#endif

/* ============================ activation quantization ========================================== */

typedef struct {
    const float *x;
    int K, C, cg, gpad;
    int8_t *xq;
    int32_t *sums;
    float *sx;
} quant_job;

static void quant_task(void *p, int t, int tid) {
    (void)tid;
    quant_job *j = p;
    const float *xr = j->x + (size_t)t * j->K;
    float m = prim_absmax(xr, j->K);
    float s = 127.0f / (m > 1e-5f ? m : 1e-5f);
    j->sx[t] = s;
    int Kp = j->C * j->gpad;
    for (int g = 0; g < j->C; g++) {
        int8_t *dst = j->xq + (size_t)t * Kp + (size_t)g * j->gpad;
        j->sums[t * j->C + g] = prim_quant_seg(xr + (size_t)g * j->cg, j->cg, s, dst);
        memset(dst + j->cg, 0, (size_t)(j->gpad - j->cg));
    }
}

static void OB_CAT(quant_, OB_ISA)(ob_ctx *c, const float *x, int T, int K, int C, int cg, int gpad, int8_t *xq,
                                    int32_t *sums, float *sx) {
    quant_job j = {x, K, C, cg, gpad, xq, sums, sx};
    if (T * K < 65536)
        for (int t = 0; t < T; t++) quant_task(&j, t, 0);
    else
        ob_pool_run(c->pool, quant_task, &j, T);
}

/* ============================ ternary matmul, int8 activations ================================= */

typedef struct {
    const ob_tern *w;
    const int8_t *xq;
    const int32_t *sums;
    const float *sx;
    const float *xf; /* float path: padded activations */
    int T, ntiles, per_task;
    float *y;
    int32_t *acc;
    uint8_t *scr;
    size_t scr_per_thread;
    int rg;           /* int8 GEMM: tiles (of 4 rows) per task */
    const float *res; /* epilogue: y = res + x W^T (the residual add), or NULL */
    int glu;          /* epilogue: 0, or OB_GLU_RELU2 / OB_GLU_SILU: y [T, N/2] = act(gate) * up */
    struct ob_parts *parts; /* GEMV: the tiles in one contiguous part per thread (ob_parts_claim) */
} tern_job;

static inline const uint8_t *tile_ptr(const ob_tern *w, int tile, int blk) {
    return w->data + ((size_t)tile * (w->Kp / OB_BLK) + blk) * 4 * OB_BLKB;
}

/* act(g) * u for n values, exactly as the glu kernel computes them (elementwise, same operations). */
static inline void glu_vals(const float *restrict g, const float *restrict u, int n, int silu, float *restrict y) {
    if (!silu) {
        for (int i = 0; i < n; i++) {
            float a = g[i] <= 0.0f ? 0.0f : g[i]; /* np.maximum(g, 0), NaN propagates */
            y[i] = (a * a) * u[i];
        }
        return;
    }
    float e[4];
    for (int i = 0; i < n; i++) e[i] = -g[i];
    prim_exp(e, n);
    for (int i = 0; i < n; i++) y[i] = g[i] / (1.0f + e[i]) * u[i];
}

/* GEMV epilogue for one tile of 4 outputs (yv) or, with glu, of 4 gate (yv) and 4 up (uv) outputs. */
static inline void gemv_store(const tern_job *j, int tile, const float yv[4], const float uv[4]) {
    int o0 = tile * 4;
    if (j->glu) { /* N/2 is a multiple of 4: whole tiles */
        glu_vals(yv, uv, 4, j->glu == OB_GLU_SILU, j->y + o0);
        return;
    }
    for (int r = 0; r < 4 && o0 + r < j->w->N; r++) j->y[o0 + r] = j->res ? j->res[o0 + r] + yv[r] : yv[r];
}

/* yv[r] += group g's output of row tile * 4 + r from its int32 sums a (acc gets the exact sums) */
static inline void tern_i8_scale(const tern_job *j, int tile, int g, const int32_t a[4], float yv[4]) {
    const ob_tern *w = j->w;
    for (int r = 0; r < 4; r++) {
        int o = tile * 4 + r;
        if (o >= w->N) break;
        int32_t v = a[r] - j->sums[g];
        if (j->acc) j->acc[(size_t)g * w->N + o] = v;
        yv[r] += ((float)v / j->sx[0]) * w->rs[(size_t)g * w->N + o];
    }
}

static inline void tern_i8_tile(const tern_job *j, int tile, float yv[4]) {
    const ob_tern *w = j->w;
    int gblk = w->gpad / OB_BLK;
    yv[0] = yv[1] = yv[2] = yv[3] = 0.0f;
    for (int g = 0; g < w->C; g++) {
        int32_t a[4];
        prim_tern_dot4(tile_ptr(w, tile, g * gblk), j->xq + (size_t)g * w->gpad, gblk, a);
        tern_i8_scale(j, tile, g, a, yv);
    }
}

#ifdef OB_HAVE_TERN_DOT8
/* Tiles ta and tb together (prim_tern_dot8: two streams); the same sums, so the same outputs as one at a time. */
static inline void tern_i8_tile2(const tern_job *j, int ta, int tb, float ya[4], float yb[4]) {
    const ob_tern *w = j->w;
    int gblk = w->gpad / OB_BLK;
    for (int r = 0; r < 4; r++) ya[r] = yb[r] = 0.0f;
    for (int g = 0; g < w->C; g++) {
        int32_t a[4], b[4];
        prim_tern_dot8(tile_ptr(w, ta, g * gblk), tile_ptr(w, tb, g * gblk), j->xq + (size_t)g * w->gpad, gblk, a,
                       b);
        tern_i8_scale(j, ta, g, a, ya);
        tern_i8_scale(j, tb, g, b, yb);
    }
}
#endif

/* Work split for the bandwidth-bound GEMV: the units in one contiguous part per thread, so each thread's weight
 * reads stay one long stream (its prefetch runs on from chunk to chunk instead of restarting at every task). A
 * part's owner claims OB_GEMV_CHUNK-byte chunks from its front; a thread done with its own part claims
 * OB_GEMV_STEAL-byte chunks from the back of the others', so an op still ends within a small chunk on every
 * thread. Measured on an Intel Xeon with AVX-512 VNNI (2 threads, the 120 ternary GEMVs of a bitnet-2b4t token,
 * the two builds alternating in one process, 20 rounds): 0.95x the time of ~16 equal tasks per thread claimed
 * from one counter (32 / 8 KB; 64 / 8 and 16 / 4 KB alike); 4 tasks per thread: 0.97-1.00x, 32: 1.04x. */
#ifndef OB_GEMV_CHUNK
#define OB_GEMV_CHUNK 32768
#endif
#ifndef OB_GEMV_STEAL
#define OB_GEMV_STEAL 8192
#endif
#define OB_MAX_PARTS 64
typedef struct {
    _Atomic uint64_t fb; /* front unit (low 32 bits), back unit (high 32 bits) */
    char pad[56];
} ob_part;
typedef struct ob_parts {
    int n, chunk, steal; /* parts; units per owner claim; units per stolen claim */
    int start[OB_MAX_PARTS + 1];
    ob_part part[OB_MAX_PARTS];
} ob_parts;

/* items (tiles, row groups) in nparts contiguous parts, start[k] to start[k + 1]; a unit of a part is `per` of its
 * items (the caller's function maps unit u of part k to them), so a part of m items has ceil(m / per) units. */
static void ob_parts_init(ob_parts *ps, int items, int nparts, int per, int chunk, int steal) {
    ps->n = ob_max(1, ob_min(nparts, OB_MAX_PARTS)), ps->chunk = ob_max(1, chunk), ps->steal = ob_max(1, steal);
    for (int k = 0; k <= ps->n; k++) ps->start[k] = (int)((int64_t)items * k / ps->n);
    for (int k = 0; k < ps->n; k++)
        atomic_init(&ps->part[k].fb, (uint64_t)((ps->start[k + 1] - ps->start[k] + per - 1) / per) << 32);
}

/* Claims up to n units of part k from its front (or back): -> how many, their first unit (part-relative) in u0. */
static int ob_parts_claim(ob_parts *ps, int k, int front, int n, int *u0) {
    ob_part *pt = &ps->part[k];
    uint64_t s = atomic_load_explicit(&pt->fb, memory_order_relaxed);
    for (;;) {
        uint32_t f = (uint32_t)s, b = (uint32_t)(s >> 32);
        if (f >= b) return 0;
        uint32_t take = b - f < (uint32_t)n ? b - f : (uint32_t)n;
        uint64_t next = front ? s + take : s - ((uint64_t)take << 32);
        if (atomic_compare_exchange_weak_explicit(&pt->fb, &s, next, memory_order_relaxed, memory_order_relaxed)) {
            *u0 = front ? (int)f : (int)(b - take);
            return (int)take;
        }
    }
}

/* Task `task` of a parts job (one per part): its own part's chunks from the front, then the others' from the back;
 * units(job, k, u0, n) runs units [u0, u0 + n) of part k. */
static void ob_parts_task(ob_parts *ps, int task, void (*units)(const void *job, int k, int u0, int n),
                          const void *job) {
    for (int i = 0; i < ps->n; i++) {
        int k = (task + i) % ps->n, u0, n;
        while ((n = ob_parts_claim(ps, k, i == 0, i == 0 ? ps->chunk : ps->steal, &u0)) > 0) units(job, k, u0, n);
    }
}

/* Units [u0, u0 + n) of part k (units are part-relative): a pair of tiles, tile i of the part's first half with
 * tile i of its second (two weight streams). One token's glu runs after the GEMV, over its whole output (the glu
 * kernel: the same values as the fused epilogue). Units of a gate tile and its up tile, with the glu in the
 * epilogue, were slower: Xeon VNNI VM, 2 threads, builds alternating in one process (14 rounds), the bitnet-2b4t
 * decode step at 64 tokens took 0.978x the time without them (the gate/up GEMV alone: ~0.94x). */
static void tern_i8_gemv_units(const void *job, int k, int u0, int n) {
    const tern_job *j = job;
    int a = j->parts->start[k], b = j->parts->start[k + 1];
    for (int u = u0; u < u0 + n; u++) {
        float ya[4], yb[4];
        int h = (b - a + 1) / 2, ta = a + u, tb = a + h + u;
        if (tb >= b) {
            tern_i8_tile(j, ta, ya);
        } else {
#ifdef OB_HAVE_TERN_DOT8
            tern_i8_tile2(j, ta, tb, ya, yb);
#else
            tern_i8_tile(j, ta, ya);
            tern_i8_tile(j, tb, yb);
#endif
            gemv_store(j, tb, yb, yb); /* (no glu here: its up values are not read) */
        }
        gemv_store(j, ta, ya, ya);
    }
}

static void tern_i8_gemv_part_task(void *p, int task, int tid) {
    (void)tid;
    ob_parts_task(((tern_job *)p)->parts, task, tern_i8_gemv_units, p);
}

static void gemm_residual(const tern_job *j, int o0, int nrow) {
    if (!j->res) return;
    for (int t = 0; t < j->T; t++) {
        float *yt = j->y + (size_t)t * j->w->N + o0;
        const float *rt = j->res + (size_t)t * j->w->N + o0;
        for (int r = 0; r < nrow; r++) yt[r] = rt[r] + yt[r];
    }
}

/* GEMM with a glu epilogue: the full [T, N] product went to j->y (scratch); act(gate) * up -> out [T, N/2] */
static void gemm_glu(ob_ctx *c, const float *full, int T, int N, int silu, float *out) {
    for (int t = 0; t < T; t++)
        c->k->glu(c, full + (size_t)t * N, full + (size_t)t * N + N / 2, (size_t)(N / 2), silu,
                  out + (size_t)t * (N / 2));
}

/* One token: j's tiles in a part per thread, fn(ctx, part, tid) run for each. The run points j->parts at its own
 * (stack) parts and, with glu, j->y at scratch for the whole output, which the glu kernel then reads (see
 * tern_i8_gemv_units): j is the caller's to drop afterwards. */
static void tern_i8_gemv_run(ob_ctx *c, tern_job *j, ob_task_fn fn, void *ctx) {
    const ob_tern *w = j->w;
    int glu = j->glu;
    float *y = j->y;
    ob_parts ps;
    size_t unit = 2 * (size_t)w->Kp; /* weight bytes per unit: two tiles */
    ob_parts_init(&ps, j->ntiles, c->nthreads, 2, (int)(OB_GEMV_CHUNK / unit), (int)(OB_GEMV_STEAL / unit));
    j->parts = &ps;
    j->glu = 0;
    if (glu) j->y = ob_scratch(c, 1, sizeof(float) * (size_t)w->N);
    ob_pool_run(c->pool, fn, ctx, ps.n);
    if (glu) gemm_glu(c, j->y, 1, w->N, glu == OB_GLU_SILU, y);
}

#ifndef OB_GEMM_Q_BYTES
#define OB_GEMM_Q_BYTES (192 * 1024)
#endif
/* Tiles per int8 GEMM task: as many rows as keep a group's unpacked codes within OB_GEMM_Q_BYTES (L2), at most
 * 16 tiles and at least 4 tasks per thread. Every task streams all T tokens' activations once, so more rows per
 * task means fewer passes over them. */
static int gemm_rows_per_task(int ntiles, int gpad, int nthreads) {
    int rg = OB_GEMM_Q_BYTES / (4 * gpad);
    rg = ob_min(rg, ntiles / (4 * nthreads));
    rg = rg < 1 ? 1 : rg > 16 ? 16 : rg;
#ifdef OB_HAVE_TERN_MK_ROWS
    if (rg > 3) rg -= rg % 3; /* whole 3-row blocks for the micro-kernel (4 x rg rows) */
#endif
    return rg;
}

/* A task: rg tiles (4 rows each) x all T tokens. Per column group the tiles' codes are unpacked once (rg x 4 x gpad
 * bytes, L2-resident), then each block of OB_TB tokens runs over all the rows. Where the ISA has a rows
 * micro-kernel (OB_HAVE_TERN_MK_ROWS: AVX2's 3 x 3 blocks) it takes the task's rows and the whole group in one
 * call, reducing its accumulators once per group; otherwise 4-row tiles in 1024-element chunks. */
static void tern_i8_gemm_task(void *p, int task, int tid) {
    tern_job *j = p;
    const ob_tern *w = j->w;
    const int RG = j->rg;
    int T = j->T, gblk = w->gpad / OB_BLK, tile0 = task * RG, ntl = ob_min(RG, j->ntiles - tile0);
    size_t qs = (size_t)w->gpad;
    uint8_t *q = j->scr + (size_t)tid * j->scr_per_thread;  /* [RG * 4 rows][gpad]: one group's codes */
    int32_t *ab = (int32_t *)(q + (size_t)RG * 4 * qs);     /* [T][RG * 4] */
    int o0 = tile0 * 4, nrow = ob_min(ntl * 4, w->N - o0);
    for (int g = 0; g < w->C; g++) {
        memset(ab, 0, sizeof(int32_t) * (size_t)T * RG * 4);
        for (int tl = 0; tl < ntl; tl++)
            prim_tern_unpack4(tile_ptr(w, tile0 + tl, g * gblk), gblk, q + (size_t)tl * 4 * qs, qs);
        for (int t0 = 0; t0 < T; t0 += OB_TB) {
            int nt = ob_min(OB_TB, T - t0);
            const int8_t *xt = j->xq + (size_t)t0 * w->Kp + (size_t)g * w->gpad;
#ifdef OB_HAVE_TERN_MK_ROWS
            prim_tern_mk_rows(q, qs, ntl * 4, xt, w->Kp, nt, gblk * OB_BLK, ab + (size_t)t0 * RG * 4, RG * 4);
#else
            for (int tl = 0; tl < ntl; tl++)
                for (int kb = 0; kb < gblk; kb += OB_KCB)
                    prim_tern_mk(q + (size_t)tl * 4 * qs + (size_t)kb * OB_BLK, qs, xt + (size_t)kb * OB_BLK, w->Kp, nt,
                                 ob_min(OB_KCB, gblk - kb) * OB_BLK, ab + (size_t)t0 * RG * 4 + tl * 4, RG * 4);
#endif
        }
        const float *rs = w->rs + (size_t)g * w->N + o0;
        for (int t = 0; t < T; t++) {
            const int32_t *at = ab + (size_t)t * RG * 4;
            int32_t sm = j->sums[t * w->C + g];
            float sx = j->sx[t], *yt = j->y + (size_t)t * w->N + o0;
            if (j->acc) {
                int32_t *ac = j->acc + ((size_t)g * T + t) * w->N + o0;
                for (int r = 0; r < nrow; r++) ac[r] = at[r] - sm;
            }
            if (g == 0 && w->C == 1 && j->res) { /* one group: the residual add in the same pass (same sums) */
                const float *rt = j->res + (size_t)t * w->N + o0;
                for (int r = 0; r < nrow; r++) yt[r] = rt[r] + (0.0f + ((float)(at[r] - sm) / sx) * rs[r]);
            } else if (g == 0) {
                for (int r = 0; r < nrow; r++) yt[r] = 0.0f + ((float)(at[r] - sm) / sx) * rs[r];
            } else {
                for (int r = 0; r < nrow; r++) yt[r] += ((float)(at[r] - sm) / sx) * rs[r];
            }
        }
    }
    if (w->C > 1) gemm_residual(j, o0, nrow);
}

/* ~16 tasks per thread: whichever thread finishes first takes the next, so the end of an op waits for at most
 * one small task (for o_proj's 1.6 MB, ~50 KB) on the other thread. */
static int gemv_per_task(int ntiles, int nthreads) {
    int per = ntiles / (16 * nthreads);
    return per < 1 ? 1 : per > 128 ? 128 : per;
}

static void OB_CAT(tern_i8_, OB_ISA)(ob_ctx *c, const ob_tern *w, const int8_t *xq, const int32_t *sums,
                                      const float *sx, int T, float *y, int32_t *acc, const float *res, int glu) {
    tern_job j;
    memset(&j, 0, sizeof j);
    j.w = w, j.xq = xq, j.sums = sums, j.sx = sx, j.T = T, j.y = y, j.acc = acc, j.res = res, j.glu = glu;
    j.ntiles = (w->N + 3) / 4;
    if (T == 1) {
        tern_i8_gemv_run(c, &j, tern_i8_gemv_part_task, &j);
        return;
    }
    size_t full = glu ? ((size_t)T * w->N * sizeof(float) + 63) & ~(size_t)63 : 0;
    j.rg = gemm_rows_per_task(j.ntiles, w->gpad, c->nthreads);
    j.scr_per_thread = ((size_t)j.rg * 4 * w->gpad + sizeof(int32_t) * (size_t)T * j.rg * 4 + 63) & ~(size_t)63;
    uint8_t *scr = ob_scratch(c, 1, full + j.scr_per_thread * (size_t)c->nthreads);
    j.scr = scr + full;
    j.glu = 0;
    if (glu) j.y = (float *)scr;
    ob_pool_run(c->pool, tern_i8_gemm_task, &j, (j.ntiles + j.rg - 1) / j.rg);
    if (glu) gemm_glu(c, j.y, T, w->N, glu == OB_GLU_SILU, y);
}

/* ============================ ternary matmul, float activations ================================ */

static inline void tern_f32_tile(const tern_job *j, int tile, float yv[4]) {
    const ob_tern *w = j->w;
    int gblk = w->gpad / OB_BLK;
    yv[0] = yv[1] = yv[2] = yv[3] = 0.0f;
    for (int g = 0; g < w->C; g++) {
        float a[4];
        prim_ternf_dot4(tile_ptr(w, tile, g * gblk), j->xf + (size_t)g * w->gpad, gblk, a);
        for (int r = 0; r < 4 && tile * 4 + r < w->N; r++) yv[r] += a[r] * w->rs[(size_t)g * w->N + tile * 4 + r];
    }
}

static void tern_f32_gemv_task(void *p, int task, int tid) {
    (void)tid;
    tern_job *j = p;
    int t1 = ob_min(j->ntiles, (task + 1) * j->per_task);
    for (int tile = task * j->per_task; tile < t1; tile++) {
        float yv[4], uv[4];
        tern_f32_tile(j, tile, yv);
        if (j->glu) tern_f32_tile(j, tile + j->ntiles, uv);
        gemv_store(j, tile, yv, uv);
    }
}

static void tern_f32_gemm_task(void *p, int task, int tid) {
    tern_job *j = p;
    const ob_tern *w = j->w;
    int T = j->T, gblk = w->gpad / OB_BLK, tile0 = task * OB_RG, ntl = ob_min(OB_RG, j->ntiles - tile0);
    int8_t *tq = (int8_t *)(j->scr + (size_t)tid * j->scr_per_thread);
    float *ab = (float *)(tq + (size_t)OB_RG * 4 * OB_QS);
    int o0 = tile0 * 4, nrow = ob_min(ntl * 4, w->N - o0);
    for (int g = 0; g < w->C; g++) {
        for (size_t i = 0; i < (size_t)T * OB_RG * 4; i++) ab[i] = 0.0f;
        for (int kb = 0; kb < gblk; kb += OB_KCB) {
            int nb = ob_min(OB_KCB, gblk - kb);
            for (int tl = 0; tl < ntl; tl++)
                prim_ternf_unpack4(tile_ptr(w, tile0 + tl, g * gblk + kb), nb, tq + (size_t)tl * 4 * OB_QS, OB_QS);
            for (int t0 = 0; t0 < T; t0 += OB_TB) {
                int nt = ob_min(OB_TB, T - t0);
                const float *xt = j->xf + (size_t)t0 * w->Kp + (size_t)g * w->gpad + (size_t)kb * OB_BLK;
                for (int tl = 0; tl < ntl; tl++)
                    prim_ternf_mk(tq + (size_t)tl * 4 * OB_QS, OB_QS, xt, w->Kp, nt, nb * OB_BLK,
                                  ab + (size_t)t0 * OB_RG * 4 + tl * 4, OB_RG * 4);
            }
        }
        const float *rs = w->rs + (size_t)g * w->N + o0;
        for (int t = 0; t < T; t++) {
            float *yt = j->y + (size_t)t * w->N + o0;
            const float *at = ab + (size_t)t * OB_RG * 4;
            if (g == 0)
                for (int r = 0; r < nrow; r++) yt[r] = at[r] * rs[r];
            else
                for (int r = 0; r < nrow; r++) yt[r] += at[r] * rs[r];
        }
    }
    gemm_residual(j, o0, nrow);
}

typedef struct {
    const float *x;
    float *xp;
    int K, C, cg, gpad;
} pad_job;

static void pad_task(void *p, int t, int tid) {
    (void)tid;
    pad_job *j = p;
    for (int g = 0; g < j->C; g++) {
        float *d = j->xp + (size_t)t * j->C * j->gpad + (size_t)g * j->gpad;
        memcpy(d, j->x + (size_t)t * j->K + (size_t)g * j->cg, sizeof(float) * (size_t)j->cg);
        for (int e = j->cg; e < j->gpad; e++) d[e] = 0.0f;
    }
}

static void OB_CAT(tern_f32_, OB_ISA)(ob_ctx *c, const ob_tern *w, const float *x, int T, float *y,
                                       const float *res, int glu) {
    tern_job j;
    memset(&j, 0, sizeof j);
    j.w = w, j.T = T, j.y = y, j.res = res, j.glu = glu;
    j.ntiles = (w->N + 3) / 4;
    size_t xbytes = ((size_t)T * w->Kp * sizeof(float) + 63) & ~(size_t)63;
    size_t full = glu && T > 1 ? ((size_t)T * w->N * sizeof(float) + 63) & ~(size_t)63 : 0;
    j.scr_per_thread = ((size_t)OB_RG * 4 * OB_QS + sizeof(float) * (size_t)T * OB_RG * 4 + 63) & ~(size_t)63;
    uint8_t *scr = ob_scratch(c, 1, xbytes + full + j.scr_per_thread * (size_t)c->nthreads);
    float *xp = (float *)scr;
    j.scr = scr + xbytes + full;
    pad_job pj = {x, xp, w->K, w->C, w->cg, w->gpad};
    for (int t = 0; t < T; t++) pad_task(&pj, t, 0);
    j.xf = xp;
    if (T == 1) {
        if (glu) j.ntiles = w->N / 8;
        j.per_task = gemv_per_task(j.ntiles * (glu ? 2 : 1), c->nthreads) / (glu ? 2 : 1);
        if (j.per_task < 1) j.per_task = 1;
        ob_pool_run(c->pool, tern_f32_gemv_task, &j, (j.ntiles + j.per_task - 1) / j.per_task);
    } else {
        j.glu = 0;
        if (glu) j.y = (float *)(scr + xbytes);
        ob_pool_run(c->pool, tern_f32_gemm_task, &j, (j.ntiles + OB_RG - 1) / OB_RG);
        if (glu) gemm_glu(c, j.y, T, w->N, glu == OB_GLU_SILU, y);
    }
}

/* ============================ dense matmul (lm_head): 16-bit / f32 and int8 ==================== */

#define OB_DROWS 16 /* rows per dense task block */

typedef struct {
    const void *w;
    int wtype, N, K, T;
    const float *x;
    float *y;
    const int8_t *w8, *xq;
    const float *rscale, *sx;
    int per_task;
    int32_t *iscr;
    struct ob_parts *parts; /* one token: rows (f16 / f32) or 4-row tiles (int8) in a contiguous part per thread */
} dense_job;

static size_t wsize(int wtype) { return wtype == OB_F32 ? 4 : 2; }

static void dense_task(void *p, int task, int tid) {
    (void)tid;
    dense_job *j = p;
    int r0 = task * j->per_task, r1 = ob_min(j->N, r0 + j->per_task);
    for (int rb = r0; rb < r1; rb += OB_DROWS) {
        int rbe = ob_min(r1, rb + OB_DROWS);
        for (int t0 = 0; t0 < j->T; t0 += OB_TB) {
            int nt = ob_min(OB_TB, j->T - t0);
            for (int r = rb; r < rbe; r += 4)
                prim_dense_mk((const char *)j->w + (size_t)r * j->K * wsize(j->wtype), j->wtype, (size_t)j->K,
                              ob_min(4, rbe - r), j->x + (size_t)t0 * j->K, nt, j->y + (size_t)t0 * j->N + r,
                              (size_t)j->N);
        }
    }
}

/* One token (the lm_head): rows in a contiguous part per thread (ob_parts; OB_DENSE_CHUNK-byte chunks), read as
 * four sequential streams: unit u is row u of each quarter of the part (prim_dense_4r). Each row is summed as a
 * several-token call sums it: rows of the last, partial 4-row group (N % 4 of them) as prim_dense_mk sums fewer
 * than 4 rows. Xeon VNNI VM, 2 threads, builds alternating in one process (16 rounds, the f16 bitnet-2b4t head):
 * 0.936x the time (21.08 -> 19.79 ms, 33.2 GB/s) of group u of a part's first half read with group u of its
 * second (two 4-row groups, eight rows side by side; itself 0.97-1.00x that of 64 tasks per thread from one
 * counter), bit-identical; the decode step 0.967x (12 rounds). Prefetch 1 or 4 KB / 8 or 32 KB ahead: alike. */
#ifndef OB_DENSE_CHUNK
#define OB_DENSE_CHUNK (1 << 20)
#endif
static void dense_units(const void *job, int k, int u0, int n) {
    const dense_job *j = job;
    size_t rb = (size_t)j->K * wsize(j->wtype);
    int a = j->parts->start[k], m = j->parts->start[k + 1] - a, q = (m + 3) / 4, full = j->N & ~3;
    const char *w = j->w;
    for (int u = u0; u < u0 + n; u++) {
        int rows[4], nr = 0;
        for (int i = 0; i < 4 && i * q + u < m; i++) {
            int r = a + i * q + u;
            if (r < full) rows[nr++] = r;
            else prim_dense_mk(w + r * rb, j->wtype, (size_t)j->K, 1, j->x, 1, j->y + r, 1);
        }
        if (!nr) continue;
        const char *p[4];
        float out[4];
        for (int i = 0; i < 4; i++) p[i] = w + rows[i < nr ? i : 0] * rb; /* a short unit repeats its first row */
        prim_dense_4r(p, j->wtype, (size_t)j->K, j->x, out);
        for (int i = 0; i < nr; i++) j->y[rows[i]] = out[i];
    }
}

static void dense_part_task(void *p, int task, int tid) {
    (void)tid;
    ob_parts_task(((dense_job *)p)->parts, task, dense_units, p);
}

static void OB_CAT(dense_, OB_ISA)(ob_ctx *c, const void *w, int wtype, int N, int K, const float *x, int T,
                                    float *y) {
    dense_job j;
    memset(&j, 0, sizeof j);
    j.w = w, j.wtype = wtype, j.N = N, j.K = K, j.T = T, j.x = x, j.y = y;
    if (T == 1) {
        ob_parts ps;
        size_t unit = 4 * (size_t)K * wsize(wtype); /* bytes per unit: four rows */
        ob_parts_init(&ps, N, c->nthreads, 4, (int)(OB_DENSE_CHUNK / unit), (int)(OB_GEMV_STEAL / unit));
        j.parts = &ps;
        ob_pool_run(c->pool, dense_part_task, &j, ps.n);
        return;
    }
    int ntasks = ob_max(1, ob_min((N + OB_DROWS - 1) / OB_DROWS, 64 * c->nthreads));
    j.per_task = ((N + ntasks - 1) / ntasks + 3) / 4 * 4;
    ob_pool_run(c->pool, dense_task, &j, (N + j.per_task - 1) / j.per_task);
}

static void dense_i8_task(void *p, int task, int tid) {
    dense_job *j = p;
    int32_t *acc = j->iscr + (size_t)tid * 64; /* 256 bytes apart: no false sharing between threads */
    size_t K32 = (size_t)j->K;
    int r0 = task * j->per_task, r1 = ob_min(j->N, r0 + j->per_task);
    for (int rb = r0; rb < r1; rb += OB_DROWS) {
        int rbe = ob_min(r1, rb + OB_DROWS);
        for (int t0 = 0; t0 < j->T; t0 += OB_TB) {
            int nt = ob_min(OB_TB, j->T - t0);
            for (int r = rb; r < rbe; r += 4) {
                int nr = ob_min(4, rbe - r);
                prim_i8_mk(j->w8 + (size_t)r * K32, K32, j->xq + (size_t)t0 * K32, nt, acc, 4);
                for (int t = 0; t < nt; t++)
                    for (int i = 0; i < nr; i++)
                        j->y[(size_t)(t0 + t) * j->N + r + i] = ((float)acc[t * 4 + i] / j->sx[t0 + t]) * j->rscale[r + i];
            }
        }
    }
}

/* One token: 4-row tiles in a contiguous part per thread (ob_parts), tile u of the part's first half read with
 * tile u of its second (prim_i8_2t: two weight streams). Xeon VNNI VM, 2 threads, builds alternating in one
 * process (12 rounds, the int8 bitnet-2b4t head): 0.81x the time (12.15 -> 9.83 ms, 33.4 GB/s) of ~64 tasks per
 * thread from one counter, one tile at a time (-DOB_NO_I8_PARTS=1); the same outputs. A far prefetch of 32 KB and
 * a near one of 2 KB: alike. */
#ifndef OB_NO_I8_PARTS
#define OB_NO_I8_PARTS 0
#endif
static void dense_i8_store(const dense_job *j, int tile, const int32_t *acc) {
    for (int i = 0; i < 4 && 4 * tile + i < j->N; i++)
        j->y[4 * tile + i] = ((float)acc[i] / j->sx[0]) * j->rscale[4 * tile + i];
}

static void dense_i8_units(const void *job, int k, int u0, int n) {
    const dense_job *j = job;
    size_t tb = 4 * (size_t)j->K; /* bytes per tile */
    int a = j->parts->start[k], b = j->parts->start[k + 1], h = (b - a + 1) / 2;
    for (int u = u0; u < u0 + n; u++) {
        int32_t acc0[4], acc1[4];
        int ta = a + u, tc = a + h + u;
        if (tc < b) {
            prim_i8_2t(j->w8 + ta * tb, j->w8 + tc * tb, (size_t)j->K, j->xq, acc0, acc1);
            dense_i8_store(j, tc, acc1);
        } else {
            prim_i8_mk(j->w8 + ta * tb, (size_t)j->K, j->xq, 1, acc0, 4);
        }
        dense_i8_store(j, ta, acc0);
    }
}

static void dense_i8_part_task(void *p, int task, int tid) {
    (void)tid;
    ob_parts_task(((dense_job *)p)->parts, task, dense_i8_units, p);
}

/* w: int8 [ceil(N/4)][K32/32][4][32] (zero padded), xq: int8 [T][K32] (zero padded) */
static void OB_CAT(dense_i8_, OB_ISA)(ob_ctx *c, const int8_t *w, const float *rscale, int N, int K32,
                                       const int8_t *xq, const float *sx, int T, float *y) {
    dense_job j;
    memset(&j, 0, sizeof j);
    j.w8 = w, j.rscale = rscale, j.N = N, j.K = K32, j.xq = xq, j.sx = sx, j.T = T, j.y = y;
    if (T == 1 && !OB_NO_I8_PARTS) {
        ob_parts ps;
        size_t unit = 8 * (size_t)K32; /* bytes per unit: two tiles */
        ob_parts_init(&ps, (N + 3) / 4, c->nthreads, 2, (int)(OB_DENSE_CHUNK / unit), (int)(OB_GEMV_STEAL / unit));
        j.parts = &ps;
        ob_pool_run(c->pool, dense_i8_part_task, &j, ps.n);
        return;
    }
    j.iscr = ob_scratch(c, 1, sizeof(int32_t) * 64 * (size_t)c->nthreads);
    int ntasks = ob_max(1, ob_min((N + OB_DROWS - 1) / OB_DROWS, 64 * c->nthreads));
    j.per_task = ((N + ntasks - 1) / ntasks + 3) / 4 * 4;
    ob_pool_run(c->pool, dense_i8_task, &j, (N + j.per_task - 1) / j.per_task);
}

/* ============================ RMSNorm, RoPE, GLU ================================================ */

/* numpy's float32 pairwise summation (8 accumulators, blocks of 128), so the mean matches np.mean. */
static float pairwise_sq(const float *a, int n) {
    if (n < 8) {
        float r = 0.0f; /* numpy starts from -0.0 for n == 0 and adds in order; same value for n >= 1 */
        for (int i = 0; i < n; i++) r += a[i] * a[i];
        return r;
    }
    if (n <= 128) {
        float r[8];
        int i = n - (n % 8);
#ifdef OB_HAVE_SQ8
        prim_sq8(a, i, r); /* the eight lane sums below, one vector */
#else
        for (int k = 0; k < 8; k++) r[k] = a[k] * a[k];
        for (int b = 8; b < i; b += 8)
            for (int k = 0; k < 8; k++) r[k] += a[b + k] * a[b + k];
#endif
        float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) res += a[i] * a[i];
        return res;
    }
    int n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sq(a, n2) + pairwise_sq(a + n2, n - n2);
}

typedef struct {
    const float *x, *w;
    int n;
    float eps;
    float *y;
} norm_job;

static void norm_task(void *p, int t, int tid) {
    (void)tid;
    norm_job *j = p;
    const float *restrict x = j->x + (size_t)t * j->n, *restrict w = j->w;
    float *restrict y = j->y + (size_t)t * j->n;
    const int n = j->n; /* a local bound: with j->n the stores to y could alias *j, and the loop stayed scalar */
    float var = pairwise_sq(x, n) / (float)n;
    float d = sqrtf(var + j->eps);
    for (int i = 0; i < n; i++) y[i] = (x[i] / d) * w[i];
}

static void OB_CAT(rmsnorm_, OB_ISA)(ob_ctx *c, const float *x, const float *w, int T, int n, float eps,
                                      float *y) {
    norm_job j = {x, w, n, eps, y};
    if ((size_t)T * n < 65536)
        for (int t = 0; t < T; t++) norm_task(&j, t, 0);
    else
        ob_pool_run(c->pool, norm_task, &j, T);
}

/* ============================ one token: RMSNorm + quantization + ternary GEMV, one pool job ====== */
/* Task 0 normalizes and quantizes the row (norm_task and quant_task, as rmsnorm_ and quant_ run them for one
 * token: the same bits), the other tasks meanwhile ask for the first OB_PREP_PF bytes of both weight streams of
 * their part (into L2) instead of idling in the pool, then wait for it; then each task runs its part as tern_i8
 * does. Tasks are claimed in order, so whoever runs task 0 never waits. Xeon VNNI VM, 2 threads, builds
 * alternating in one process (12 rounds of the bitnet-2b4t decode step at 64 tokens, f16 head): the three kernels
 * in turn (-DOB_NO_X1) took 1.008x the time; asking for 16 KB 1.015x, 64 KB 1.003x. Same outputs. */
#ifndef OB_PREP_PF
#define OB_PREP_PF 32768
#endif
typedef struct {
    tern_job t;
    norm_job n;
    quant_job q; /* n.w NULL: no norm */
    _Atomic int ready;
} prep_job;

/* Part k's two weight streams (tiles from its front and from its middle), line by line in turn, until task 0 is
 * done or OB_PREP_PF bytes of each are asked for. */
static void prep_prefetch(prep_job *pj, int k) {
    const tern_job *j = &pj->t;
    int a = j->parts->start[k], m = j->parts->start[k + 1] - a, h = (m + 1) / 2;
    const char *s0 = (const char *)tile_ptr(j->w, a, 0), *s1 = (const char *)tile_ptr(j->w, a + h, 0);
    size_t n0 = (size_t)h * j->w->Kp, n1 = (size_t)(m - h) * j->w->Kp;
    n0 = n0 < OB_PREP_PF ? n0 : OB_PREP_PF;
    n1 = n1 < OB_PREP_PF ? n1 : OB_PREP_PF;
    for (size_t o = 0; o < n0 || o < n1; o += 64) {
        if ((o & 255) == 0 && atomic_load_explicit(&pj->ready, memory_order_relaxed)) return;
        if (o < n0) __builtin_prefetch(s0 + o, 0, 2);
        if (o < n1) __builtin_prefetch(s1 + o, 0, 2);
    }
}

static void prep_gemv_task(void *p, int task, int tid) {
    (void)tid;
    prep_job *pj = p;
    if (task == 0) {
        if (pj->n.w) norm_task(&pj->n, 0, 0);
        quant_task(&pj->q, 0, 0);
        atomic_store_explicit(&pj->ready, 1, memory_order_release);
    } else {
        prep_prefetch(pj, task);
        for (int k = 1; !atomic_load_explicit(&pj->ready, memory_order_acquire); k++) ob_spin_pause(k);
    }
    ob_parts_task(pj->t.parts, task, tern_i8_gemv_units, &pj->t);
}

/* One token: y = tern_i8(quant(rmsnorm(x, nw, eps))) (nw NULL: no norm; xn f32 [K]: the normalized row),
 * xq / sums / sx as quant_ writes them; the same results as the three kernels in turn. */
static void OB_CAT(tern_i8_x1_, OB_ISA)(ob_ctx *c, const ob_tern *w, const float *x, const float *nw, float eps,
                                         float *xn, int8_t *xq, int32_t *sums, float *sx, float *y, const float *res,
                                         int glu) {
    prep_job pj;
    memset(&pj, 0, sizeof pj);
    tern_job *j = &pj.t;
    j->w = w, j->xq = xq, j->sums = sums, j->sx = sx, j->T = 1, j->y = y, j->res = res, j->glu = glu;
    j->ntiles = (w->N + 3) / 4;
    pj.n = (norm_job){x, nw, w->K, eps, xn};
    pj.q = (quant_job){nw ? xn : x, w->K, w->C, w->cg, w->gpad, xq, sums, sx};
    atomic_init(&pj.ready, 0);
    tern_i8_gemv_run(c, j, prep_gemv_task, &pj);
}

typedef struct {
    const float *x, *cos, *sin;
    const int64_t *pos;
    int H, D;
    float *y;
} rope_job;

static void rope_task(void *p, int t, int tid) {
    (void)tid;
    rope_job *j = p;
    int D = j->D, h2 = D / 2;
    const float *c = j->cos + (size_t)j->pos[t] * D, *s = j->sin + (size_t)j->pos[t] * D;
    for (int h = 0; h < j->H; h++) {
        const float *x = j->x + ((size_t)t * j->H + h) * D;
        float *y = j->y + ((size_t)t * j->H + h) * D;
        for (int i = 0; i < h2; i++) y[i] = x[i] * c[i] + (-x[i + h2]) * s[i];
        for (int i = h2; i < D; i++) y[i] = x[i] * c[i] + x[i - h2] * s[i];
    }
}

static void OB_CAT(rope_, OB_ISA)(ob_ctx *c, const float *x, int T, int H, int D, const float *cos,
                                   const float *sin, const int64_t *pos, float *y) {
    rope_job j = {x, cos, sin, pos, H, D, y};
    if ((size_t)T * H * D < 65536)
        for (int t = 0; t < T; t++) rope_task(&j, t, 0);
    else
        ob_pool_run(c->pool, rope_task, &j, T);
}

typedef struct {
    const float *g, *u;
    size_t n, chunk;
    int silu;
    float *y;
} glu_job;

static void glu_task(void *p, int task, int tid) {
    (void)tid;
    glu_job *j = p;
    size_t i0 = (size_t)task * j->chunk, i1 = i0 + j->chunk < j->n ? i0 + j->chunk : j->n;
    const float *restrict g = j->g, *restrict u = j->u;
    float *restrict y = j->y;
    if (!j->silu) {
        for (size_t i = i0; i < i1; i++) {
            float a = g[i] <= 0.0f ? 0.0f : g[i]; /* np.maximum(g, 0), NaN propagates */
            y[i] = (a * a) * u[i];
        }
        return;
    }
    for (size_t i = i0; i < i1; i += 256) {
        size_t m = i1 - i < 256 ? i1 - i : 256;
        float e[256];
        for (size_t k = 0; k < m; k++) e[k] = -g[i + k];
        prim_exp(e, (int)m);
        for (size_t k = 0; k < m; k++) y[i + k] = g[i + k] / (1.0f + e[k]) * u[i + k];
    }
}

static void OB_CAT(glu_, OB_ISA)(ob_ctx *c, const float *g, const float *u, size_t n, int silu, float *y) {
    glu_job j = {g, u, n, 16384, silu, y};
    ob_pool_run(c->pool, glu_task, &j, (int)((n + j.chunk - 1) / j.chunk));
}

/* ============================ attention ========================================================= */
/* Work item = (kv head, block of query tokens, key chunk). The G query heads sharing a kv head are
 * processed together so each key/value row is read once for all of them. With one chunk the item
 * writes the output; with several (decode: split-KV) it writes (max, sum, out) partials that are
 * merged with log-sum-exp weights afterwards. Online softmax over key sub-blocks of OB_KB. */

/* Decode attention (fewer than OB_ATTN_PF_NQ queries per kv head; more take prim_scores' transposed blocks)
 * runs each block's scores and values in sub-blocks of OB_ATTN_PF_SUB keys and asks for memory one phase ahead:
 * the block's value rows while its scores are computed, the next block's key rows while its values are summed.
 * The same sums in the same order (per key and per output element), so the same bits. Zen 3, 2 threads, 30
 * layers of 20 x 128 query / 5 kv heads, builds alternating in one process: float16 cache at 1024 positions
 * 7.0-9.3 -> 5.2-6.4 ms, at 4096 28.8-33.0 -> 20.7-22.0 ms; float32 at 1024 14.5 -> 11.0 ms. Sub-blocks of 4 and
 * 8 measured alike, 2 and 16 slower; asking for a whole block at once gained ~5%. */
#ifndef OB_ATTN_PF_NQ
#define OB_ATTN_PF_NQ 8
#endif
#ifndef OB_ATTN_PF_SUB
#define OB_ATTN_PF_SUB 8
#endif
static inline void prefetch_bytes(const char *p, size_t bytes) {
    for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 3);
}

typedef struct {
    const float *q;
    int T, Hq, D, Hkv, max_len, start, kvtype, G, QB, nqb, nch, chunk;
    const void *k, *v;
    float *y, *part, *scr;
    size_t scr_per_thread;
    float scale;
} attn_job;

static void attn_task(void *p, int task, int tid) {
    attn_job *j = p;
    int ch = task % j->nch, qb = (task / j->nch) % j->nqb, hk = task / (j->nch * j->nqb);
    int D = j->D, G = j->G, t0 = qb * j->QB, nt = ob_min(j->QB, j->T - t0), nq = G * nt;
    size_t esz = j->kvtype == OB_F32 ? 4 : 2;
    const char *kb = (const char *)j->k + (size_t)hk * j->max_len * D * esz;
    const char *vb = (const char *)j->v + (size_t)hk * j->max_len * D * esz;
    int kend = j->start + t0 + nt; /* keys needed by the last query of the block */
    int k0 = ch * j->chunk, k1 = ob_min(kend, k0 + j->chunk);
    float *m = j->scr + (size_t)tid * j->scr_per_thread, *l = m + nq, *o = l + nq;
    float *qs = o + (size_t)nq * D, *s = qs + (size_t)nq * D; /* queries [nq, D], scores [nq, OB_KB] */
    float *tmp = s + (size_t)nq * OB_KB;                         /* [D, OB_KB] for the prims */
    for (int i = 0; i < nq; i++) { /* query i = (token t0 + i / G, head hk * G + i % G) */
        memcpy(qs + (size_t)i * D, j->q + ((size_t)(t0 + i / G) * j->Hq + hk * G + i % G) * D, sizeof(float) * D);
        m[i] = -INFINITY, l[i] = 0.0f;
    }
    memset(o, 0, sizeof(float) * (size_t)nq * D);
    const size_t row = (size_t)D * esz;
    const int sub = nq < OB_ATTN_PF_NQ ? OB_ATTN_PF_SUB : OB_KB; /* decode: sub-blocks that prefetch, see above */
    for (int j0 = k0; j0 < k1; j0 += OB_KB) {
        int nk = ob_min(k1, j0 + OB_KB) - j0;
        for (int a = 0; a < nk; a += sub) {
            int b = ob_min(nk, a + sub);
            if (sub < OB_KB) prefetch_bytes(vb + (size_t)(j0 + a) * row, (size_t)(b - a) * row);
            prim_scores(qs, nq, kb + (size_t)(j0 + a) * row, j->kvtype, b - a, D, j->scale, s + a, tmp);
        }
        for (int i = 0; i < nq; i++) {
            float *si = s + (size_t)i * OB_KB;
            int nv = ob_min(nk, j->start + t0 + i / G + 1 - j0); /* causal: keys up to the query's position */
            if (nv <= 0) {
                memset(si, 0, sizeof(float) * nk);
                continue;
            }
            float sum, mx = prim_softmax_step(si, nv, nk, m[i], &sum);
            float corr = mx == m[i] ? 1.0f : expf(m[i] - mx);
            l[i] = l[i] * corr + sum;
            m[i] = mx;
            if (corr != 1.0f)
                for (int d = 0; d < D; d++) o[(size_t)i * D + d] *= corr;
        }
        int n2 = sub < OB_KB ? ob_min(k1, j0 + 2 * OB_KB) - j0 - OB_KB : 0; /* the next block's keys to ask for */
        for (int a = 0; a < nk; a += sub) {
            int b = ob_min(nk, a + sub);
            if (a < n2) prefetch_bytes(kb + (size_t)(j0 + OB_KB + a) * row, (size_t)(ob_min(b, n2) - a) * row);
            prim_pv(s + a, nq, vb + (size_t)(j0 + a) * row, j->kvtype, b - a, D, o, tmp);
        }
    }
    for (int i = 0; i < nq; i++) {
        int t = t0 + i / G, h = hk * G + i % G;
        if (j->nch == 1) {
            float *yi = j->y + ((size_t)t * j->Hq + h) * D;
            for (int d = 0; d < D; d++) yi[d] = o[(size_t)i * D + d] / l[i];
        } else {
            float *pp = j->part + (((size_t)t * j->Hq + h) * j->nch + ch) * (D + 2);
            pp[0] = m[i], pp[1] = l[i];
            memcpy(pp + 2, o + (size_t)i * D, sizeof(float) * D);
        }
    }
}

static void attn_merge_task(void *p, int th, int tid) { /* th = token * Hq + head */
    (void)tid;
    attn_job *j = p;
    int D = j->D;
    const float *pp = j->part + (size_t)th * j->nch * (D + 2);
    float mx = -INFINITY, l = 0.0f;
    for (int c = 0; c < j->nch; c++) mx = pp[c * (D + 2)] > mx ? pp[c * (D + 2)] : mx;
    float *y = j->y + (size_t)th * D;
    memset(y, 0, sizeof(float) * D);
    for (int c = 0; c < j->nch; c++) {
        const float *pc = pp + (size_t)c * (D + 2);
        if (pc[1] == 0.0f) continue;
        float w = expf(pc[0] - mx);
        l += pc[1] * w;
        for (int d = 0; d < D; d++) y[d] += w * pc[2 + d];
    }
    for (int d = 0; d < D; d++) y[d] /= l;
}

static void OB_CAT(attention_, OB_ISA)(ob_ctx *c, const float *q, int T, int Hq, int D, const void *k,
                                        const void *v, int kvtype, int Hkv, int max_len, int start, float *y) {
    attn_job j;
    if (T <= 0 || Hq <= 0 || D <= 0) return;
    memset(&j, 0, sizeof j);
    j.q = q, j.T = T, j.Hq = Hq, j.D = D, j.k = k, j.v = v, j.kvtype = kvtype, j.Hkv = Hkv;
    j.max_len = max_len, j.start = start, j.y = y, j.G = Hq / Hkv, j.scale = 1.0f / sqrtf((float)D);
    j.QB = T < 16 ? T : 16;
    j.nqb = (T + j.QB - 1) / j.QB;
    int n = start + T, items = Hkv * j.nqb;
    j.nch = 1;
    if (T <= 16 && items < 4 * c->nthreads && n > 2 * OB_KB)
        j.nch = ob_max(1, ob_min((4 * c->nthreads + items - 1) / items, n / OB_KB));
    j.chunk = ((n + j.nch - 1) / j.nch + OB_KB - 1) / OB_KB * OB_KB;
    j.nch = (n + j.chunk - 1) / j.chunk;
    int nq = j.G * j.QB;
    j.scr_per_thread = ((size_t)nq * (2 + 2 * D + OB_KB) + (size_t)D * OB_KB + 16) & ~(size_t)15;
    size_t part = j.nch > 1 ? (size_t)T * Hq * j.nch * (D + 2) : 0;
    float *scr = ob_scratch(c, 1, sizeof(float) * (part + j.scr_per_thread * (size_t)c->nthreads));
    j.part = scr;
    j.scr = scr + part;
    ob_pool_run(c->pool, attn_task, &j, Hkv * j.nqb * j.nch);
    if (j.nch > 1) ob_pool_run(c->pool, attn_merge_task, &j, T * Hq);
}

/* ============================ the table ========================================================= */

const ob_kernels OB_CAT(ob_kernels_, OB_ISA) = {
    OB_ISA_NAME,
    OB_CAT(quant_, OB_ISA),
    OB_CAT(tern_i8_, OB_ISA),
    OB_CAT(tern_i8_x1_, OB_ISA),
    OB_CAT(tern_f32_, OB_ISA),
    OB_CAT(dense_, OB_ISA),
    OB_CAT(dense_i8_, OB_ISA),
    OB_CAT(rmsnorm_, OB_ISA),
    OB_CAT(rope_, OB_ISA),
    OB_CAT(glu_, OB_ISA),
    OB_CAT(attention_, OB_ISA),
    prim_to_half,
};
