/* onebit cpu backend: shared types, the per-ISA kernel table, and the thread pool API. */
#ifndef OB_H
#define OB_H

#include <stddef.h>
#include <stdint.h>
#include <pthread.h>
#include <sched.h>

/* ---- thread pool: one persistent set of workers; the caller is thread 0 ---------------------- */
typedef void (*ob_task_fn)(void *ctx, int task, int thread);

/* Step k (from 1) of a spin-wait for another thread: the CPU's pause hint, and a sched_yield every 64th, so an
 * oversubscribed machine (more runnable threads than cores) lets the awaited thread run. */
static inline void ob_spin_pause(int k) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
    if ((k & 63) == 0) sched_yield();
}
typedef struct ob_pool ob_pool;
ob_pool *ob_pool_new(int nthreads);
void ob_pool_free(ob_pool *p);
int ob_pool_threads(const ob_pool *p);
/* Runs fn(ctx, i, thread) for i in [0, ntasks) across all threads; returns when all are done. */
void ob_pool_run(ob_pool *p, ob_task_fn fn, void *ctx, int ntasks);

/* ---- per-backend context: pool + growable scratch arena ----------------------------------------- */
typedef struct {
    ob_pool *pool;
    int nthreads;
    pthread_mutex_t mu;  /* one op at a time per context (the scratch is shared) */
    void *scratch[2];
    size_t scratch_size[2];
    const struct ob_kernels *k;
} ob_ctx;

/* Returns 64-byte aligned scratch of at least n bytes (contents undefined; NULL on OOM). Slot 0 belongs to
 * the Python glue (activation buffers), slot 1 to the kernel running; one call per slot per op. */
void *ob_scratch(ob_ctx *c, int slot, size_t n);

/* ---- repacked ternary weight ------------------------------------------------------------------
 * Rows are padded to a multiple of 4 (tiles of 4 rows). The input axis is split into C column groups
 * of cg elements, each padded with zeros to gpad = roundup(cg, 256); Kp = C * gpad.
 * A 256-element block of one row is 64 bytes: byte j, bits 2k..2k+1 hold element 64k + j as q = t + 1.
 * Layout: [tile][block (Kp/256)][row in tile (4)][64 bytes]. Activations use the same padded axis. */
#define OB_BLK 256
#define OB_BLKB 64
#define OB_KB 64 /* attention: keys per sub-block (score rows are OB_KB floats apart) */
typedef struct {
    const uint8_t *data;
    const float *rs; /* row scales [C][N] */
    int N, K, C, cg, gpad, Kp;
} ob_tern;

enum { OB_F32 = 0, OB_BF16 = 1, OB_F16 = 2 };
enum { OB_GLU_NONE = 0, OB_GLU_RELU2 = 1, OB_GLU_SILU = 2 };

typedef struct ob_kernels {
    const char *name;
    /* x f32 [T, K] -> xq int8 [T, Kp] in the padded group layout, sums int32 [T, C], sx f32 [T] */
    void (*quant)(ob_ctx *, const float *x, int T, int K, int C, int cg, int gpad, int8_t *xq, int32_t *sums,
                  float *sx);
    /* y f32 [T, N]; acc (optional) int32 [C, T, N]: exact per-group ternary dot products. Epilogues: res
     * (optional) f32 [T, N]: y = res + x W^T; glu (OB_GLU_*; N a multiple of 8, no acc): y f32 [T, N/2] =
     * act(gate) * up of the output's two halves, exactly as the glu kernel. */
    void (*tern_i8)(ob_ctx *, const ob_tern *w, const int8_t *xq, const int32_t *sums, const float *sx, int T,
                    float *y, int32_t *acc, const float *res, int glu);
    /* One token: rmsnorm (nw; NULL: none) into xn f32 [K], quant into xq / sums / sx, then tern_i8 (no acc), in
     * one pool job (the other threads prefetch their weights while one thread normalizes): the same results. */
    void (*tern_i8_x1)(ob_ctx *, const ob_tern *w, const float *x, const float *nw, float eps, float *xn,
                       int8_t *xq, int32_t *sums, float *sx, float *y, const float *res, int glu);
    void (*tern_f32)(ob_ctx *, const ob_tern *w, const float *x, int T, float *y, const float *res, int glu);
    void (*dense)(ob_ctx *, const void *w, int wtype, int N, int K, const float *x, int T, float *y);
    void (*dense_i8)(ob_ctx *, const int8_t *w, const float *rscale, int N, int K, const int8_t *xq,
                     const float *sx, int T, float *y);
    void (*rmsnorm)(ob_ctx *, const float *x, const float *w, int T, int n, float eps, float *y);
    void (*rope)(ob_ctx *, const float *x, int T, int H, int D, const float *cos, const float *sin,
                 const int64_t *pos, float *y);
    void (*glu)(ob_ctx *, const float *g, const float *u, size_t n, int silu, float *y);
    /* q [T, Hq, D]; k/v cache of one layer [Hkv, max_len, D] (f32 or f16); -> y [T, Hq, D] */
    void (*attention)(ob_ctx *, const float *q, int T, int Hq, int D, const void *k, const void *v, int kvtype,
                      int Hkv, int max_len, int start, float *y);
    /* x f32 [n] -> IEEE half, round to nearest even (ob_float_to_half's results) */
    void (*to_half)(const float *x, size_t n, uint16_t *y);
} ob_kernels;

/* dispatch.c */
const ob_kernels *ob_find_kernels(const char *name); /* compiled in and supported by this CPU, else NULL */
int ob_isa_compiled(const char *name);
int ob_isa_supported(const char *name);
const char *const *ob_isa_all(void); /* NULL-terminated, best last */

/* common.c: ISA-independent helpers */
void ob_repack_ternary(ob_ctx *c, const uint8_t *packed, int N, int K, int C, uint8_t *dst);
float ob_half_to_float(uint16_t h);
uint16_t ob_float_to_half(float f); /* round to nearest even, as NumPy */
/* src f32 [T, H, D] -> one layer's cache [H, max_len, D] (OB_F32 or OB_F16) at positions start.. */
void ob_kv_store(ob_ctx *c, const float *src, int T, int H, int D, void *dst, int kvtype, int max_len, int start);

#endif
