/* CPython glue for the cpu backend: raw buffers in, GIL released while the kernels run.
 * The Python wrapper (onebit/kernels/cpu/__init__.py) checks dtypes, shapes and contiguity; functions
 * here take C-contiguous buffers and sizes, positionally (METH_FASTCALL keeps a call near 0.1 us). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "ob.h"

#define CAPSULE "onebit.cpu.ctx"
#define MAXBUF 12

typedef struct {
    Py_buffer b[MAXBUF];
    int n;
} bufs;

static void release(bufs *bs) {
    for (int i = 0; i < bs->n; i++) PyBuffer_Release(&bs->b[i]);
    bs->n = 0;
}

/* fmt: C ctx, R readable buffer, r readable buffer or None, W writable buffer, w writable buffer or None,
 * n Py_ssize_t, d double. */
static int parse(PyObject *const *a, Py_ssize_t na, const char *fmt, bufs *bs, ...) {
    va_list ap;
    va_start(ap, bs);
    bs->n = 0;
    Py_ssize_t want = (Py_ssize_t)strlen(fmt);
    if (na != want) {
        PyErr_Format(PyExc_TypeError, "expected %zd arguments, got %zd", want, na);
        goto fail;
    }
    for (Py_ssize_t i = 0; i < na; i++) {
        PyObject *o = a[i];
        switch (fmt[i]) {
        case 'C': {
            ob_ctx *c = PyCapsule_GetPointer(o, CAPSULE);
            if (!c) goto fail;
            *va_arg(ap, ob_ctx **) = c;
            break;
        }
        case 'w':
        case 'r':
            if (o == Py_None) {
                *va_arg(ap, void **) = NULL;
                break;
            }
            /* fallthrough */
        case 'R':
        case 'W': {
            Py_buffer *b = &bs->b[bs->n];
            int flags = fmt[i] == 'R' || fmt[i] == 'r' ? PyBUF_C_CONTIGUOUS : (PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE);
            if (PyObject_GetBuffer(o, b, flags) < 0) goto fail;
            bs->n++;
            *va_arg(ap, void **) = b->buf;
            break;
        }
        case 'n': {
            Py_ssize_t v = PyLong_AsSsize_t(o);
            if (v == -1 && PyErr_Occurred()) goto fail;
            *va_arg(ap, Py_ssize_t *) = v;
            break;
        }
        case 'd': {
            double v = PyFloat_AsDouble(o);
            if (v == -1.0 && PyErr_Occurred()) goto fail;
            *va_arg(ap, double *) = v;
            break;
        }
        }
    }
    va_end(ap);
    return 0;
fail:
    va_end(ap);
    release(bs);
    return -1;
}

#define RUN(c, stmt)                     \
    do {                                 \
        Py_BEGIN_ALLOW_THREADS           \
        pthread_mutex_lock(&(c)->mu);    \
        stmt;                            \
        pthread_mutex_unlock(&(c)->mu);  \
        Py_END_ALLOW_THREADS             \
    } while (0)

/* ---- context -------------------------------------------------------------------------------- */

static void ctx_free(PyObject *cap) {
    ob_ctx *c = PyCapsule_GetPointer(cap, CAPSULE);
    if (!c) return;
    ob_pool_free(c->pool);
    free(c->scratch[0]);
    free(c->scratch[1]);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

static PyObject *py_new_ctx(PyObject *self, PyObject *const *a, Py_ssize_t na) {
    (void)self;
    const char *isa;
    Py_ssize_t threads;
    if (na != 2 || !(isa = PyUnicode_AsUTF8(a[0]))) return PyErr_Occurred() ? NULL : PyErr_Format(PyExc_TypeError, "new_ctx(isa, threads)");
    threads = PyLong_AsSsize_t(a[1]);
    if (threads == -1 && PyErr_Occurred()) return NULL;
    const ob_kernels *k = ob_find_kernels(isa);
    if (!k) return PyErr_Format(PyExc_ValueError, "ISA %s is not available on this CPU or build", isa);
    ob_ctx *c = calloc(1, sizeof *c);
    if (!c) return PyErr_NoMemory();
    c->k = k;
    c->pool = ob_pool_new((int)(threads < 1 ? 1 : threads));
    c->nthreads = ob_pool_threads(c->pool);
    pthread_mutex_init(&c->mu, NULL);
    return PyCapsule_New(c, CAPSULE, ctx_free);
}

static PyObject *py_ctx_info(PyObject *self, PyObject *cap) {
    (void)self;
    ob_ctx *c = PyCapsule_GetPointer(cap, CAPSULE);
    if (!c) return NULL;
    return Py_BuildValue("(si)", c->k->name, c->nthreads);
}

static PyObject *py_isas(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
    PyObject *all = PyList_New(0), *ok = PyList_New(0);
    for (const char *const *p = ob_isa_all(); *p; p++) {
        PyObject *s = PyUnicode_FromString(*p);
        PyList_Append(all, s);
        if (ob_isa_supported(*p)) PyList_Append(ok, s);
        Py_DECREF(s);
    }
    return Py_BuildValue("(NN)", all, ok);
}

/* ---- ternary ---------------------------------------------------------------------------------- */

static void tern_init(ob_tern *w, const void *data, const float *rs, Py_ssize_t N, Py_ssize_t K, Py_ssize_t C) {
    w->data = data;
    w->rs = rs;
    w->N = (int)N, w->K = (int)K, w->C = (int)C, w->cg = (int)(K / C);
    w->gpad = (w->cg + OB_BLK - 1) / OB_BLK * OB_BLK;
    w->Kp = w->C * w->gpad;
}

/* repack(ctx, packed u8 [N, ceil(K/4)], N, K, C, dst u8 [ceil(N/4)*4 * Kp/4]) */
static PyObject *py_repack(PyObject *self, PyObject *const *a, Py_ssize_t na) {
    (void)self;
    bufs bs;
    ob_ctx *c;
    void *src, *dst;
    Py_ssize_t N, K, C;
    if (parse(a, na, "CRnnnW", &bs, &c, &src, &N, &K, &C, &dst) < 0) return NULL;
    RUN(c, ob_repack_ternary(c, src, (int)N, (int)K, (int)C, dst));
    release(&bs);
    Py_RETURN_NONE;
}

/* One linear and what surrounds it (caller holds c->mu): with nw, x is first RMSNorm'ed; int8 activations
 * (i8) or float; the epilogue adds res or applies glu. 0 when out of memory. */
static int run_ternary(ob_ctx *c, const float *x, int T, const ob_tern *w, float *y, int i8, int32_t *acc,
                       const float *nw, float eps, const float *res, int glu) {
    size_t nb = nw ? ((size_t)T * w->K * 4 + 63) & ~(size_t)63 : 0;
    size_t qb = i8 ? ((size_t)T * w->Kp + 63) & ~(size_t)63 : 0, sb = ((size_t)T * w->C * 4 + 63) & ~(size_t)63;
    char *s = ob_scratch(c, 0, nb + qb + sb + (size_t)T * 4);
    if (!s) return 0;
#ifndef OB_NO_X1
    if (i8 && T == 1 && !acc) { /* one token: the norm and quantization inside the GEMV's pool job */
        c->k->tern_i8_x1(c, w, x, nw, eps, (float *)s, (int8_t *)(s + nb), (int32_t *)(s + nb + qb),
                         (float *)(s + nb + qb + sb), y, res, glu);
        return 1;
    }
#endif
    const float *xin = x;
    if (nw) {
        c->k->rmsnorm(c, x, nw, T, w->K, eps, (float *)s);
        xin = (const float *)s;
    }
    if (i8) {
        int8_t *xq = (int8_t *)(s + nb);
        int32_t *sums = (int32_t *)(s + nb + qb);
        float *sx = (float *)(s + nb + qb + sb);
        c->k->quant(c, xin, T, w->K, w->C, w->cg, w->gpad, xq, sums, sx);
        c->k->tern_i8(c, w, xq, sums, sx, T, y, acc, res, glu);
    } else {
        c->k->tern_f32(c, w, xin, T, y, res, glu);
    }
    return 1;
}

/* ternary(ctx, x f32 [T, K], T, w, N, K, C, rs f32 [C, N], y f32 [T, N or N/2], int8_acts,
 *         acc int32 [C, T, N] | None, norm f32 [K] | None, eps, res f32 [T, N] | None, glu)
 * One call for a linear and what surrounds it: with norm, x is first RMSNorm'ed (the rmsnorm kernel); the
 * epilogue adds res (y = res + x W^T) or, with glu (OB_GLU_*), writes act(gate) * up of the two halves. */
static PyObject *py_ternary(PyObject *self, PyObject *const *a, Py_ssize_t na) {
    (void)self;
    bufs bs;
    ob_ctx *c;
    void *x, *wd, *rs, *y, *acc, *nw, *res;
    Py_ssize_t T, N, K, C, i8, glu;
    double eps;
    if (parse(a, na, "CRnRnnnRWnwrdrn", &bs, &c, &x, &T, &wd, &N, &K, &C, &rs, &y, &i8, &acc, &nw, &eps, &res,
              &glu) < 0)
        return NULL;
    ob_tern w;
    tern_init(&w, wd, rs, N, K, C);
    int ok;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&c->mu);
    ok = run_ternary(c, x, (int)T, &w, y, (int)i8, acc, nw, (float)eps, res, (int)glu);
    pthread_mutex_unlock(&c->mu);
    Py_END_ALLOW_THREADS
    release(&bs);
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* act_quant(ctx, x f32 [T, K], T, K, q int8 [T, K], s f32 [T]) */
static PyObject *py_act_quant(PyObject *self, PyObject *const *a, Py_ssize_t na) {
    (void)self;
    bufs bs;
    ob_ctx *c;
    void *x, *q, *s;
    Py_ssize_t T, K;
    if (parse(a, na, "CRnnWW", &bs, &c, &x, &T, &K, &q, &s) < 0) return NULL;
    int32_t *sums = malloc(sizeof(int32_t) * (size_t)(T ? T : 1));
    RUN(c, c->k->quant(c, x, (int)T, (int)K, 1, (int)K, (int)K, q, sums, s));
    free(sums);
    release(&bs);
    Py_RETURN_NONE;
}

/* ---- dense ------------------------------------------------------------------------------------ */

/* dense(ctx, x f32 [T, K], T, K, w [N, K], wtype, N, y f32 [T, N]) */
static PyObject *py_dense(PyObject *self, PyObject *const *a, Py_ssize_t na) {
    (void)self;
    bufs bs;
    ob_ctx *c;
    void *x, *w, *y;
    Py_ssize_t T, K, wt, N;
    if (parse(a, na, "CRnnRnnW", &bs, &c, &x, &T, &K, &w, &wt, &N, &y) < 0) return NULL;
    RUN(c, c->k->dense(c, w, (int)wt, (int)N, (int)K, x, (int)T, y));
    release(&bs);
    Py_RETURN_NONE;
}

/* dense_i8(ctx, x f32 [T, K], T, K, w int8 tiles (see quant_rows), row_scale f32 [N], N, y f32 [T, N]) */
static PyObject *py_dense_i8(PyObject *self, PyObject *const *a, Py_ssize_t na) {
    (void)self;
    bufs bs;
    ob_ctx *c;
    void *x, *w, *rsc, *y;
    Py_ssize_t T, K, N;
    if (parse(a, na, "CRnnRRnW", &bs, &c, &x, &T, &K, &w, &rsc, &N, &y) < 0) return NULL;
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&c->mu);
    int K32 = (int)((K + 31) / 32 * 32);
    size_t qb = ((size_t)T * K32 + 63) & ~(size_t)63;
    char *s = ob_scratch(c, 0, qb + (size_t)T * 8);
    if (!s) {
        ok = 0;
    } else {
        int32_t *sums = (int32_t *)(s + qb);
        float *sx = (float *)(s + qb + (size_t)T * 4);
        c->k->quant(c, x, (int)T, (int)K, 1, (int)K, K32, (int8_t *)s, sums, sx);
        c->k->dense_i8(c, w, rsc, (int)N, K32, (int8_t *)s, sx, (int)T, y);
    }
    pthread_mutex_unlock(&c->mu);
    Py_END_ALLOW_THREADS
    release(&bs);
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static float load_any(const void *w, Py_ssize_t wt, size_t i) {
    if (wt == OB_F32) return ((const float *)w)[i];
    uint16_t h = ((const uint16_t *)w)[i];
    if (wt == OB_BF16) {
        uint32_t b = (uint32_t)h << 16;
        float f;
        memcpy(&f, &b, 4);
        return f;
    }
    return ob_half_to_float(h);
}

/* quant_rows(ctx, w [N, K], wtype, N, K, q int8 [ceil(N/4) * 4 * K32], row_scale f32 [N]): per-row absmax
 * int8, s = 127 / max(|w|, 1e-5), q = clamp(round_half_even(w s)), row_scale = 1 / s. q is stored in tiles of
 * 4 rows interleaved every 32 bytes, [N/4][K32/32][4][32], zero padded, so the GEMV reads one stream. */
static PyObject *py_quant_rows(PyObject *self, PyObject *const *a, Py_ssize_t na) {
    (void)self;
    bufs bs;
    ob_ctx *c;
    void *w, *q, *rsc;
    Py_ssize_t wt, N, K;
    if (parse(a, na, "CRnnnWW", &bs, &c, &w, &wt, &N, &K, &q, &rsc) < 0) return NULL;
    size_t K32 = (size_t)(K + 31) / 32 * 32;
    float *row = malloc(sizeof(float) * (size_t)(K ? K : 1));
    int8_t *qr = malloc(K32);
    int32_t sum;
    RUN(c, {
        memset(q, 0, (size_t)(N + 3) / 4 * 4 * K32);
        for (Py_ssize_t n = 0; n < N; n++) {
            for (Py_ssize_t k = 0; k < K; k++) row[k] = load_any(w, wt, (size_t)n * K + k);
            float sx;
            c->k->quant(c, row, 1, (int)K, 1, (int)K, (int)K32, qr, &sum, &sx);
            ((float *)rsc)[n] = 1.0f / sx;
            int8_t *tile = (int8_t *)q + (size_t)(n / 4) * 4 * K32;
            for (size_t k = 0; k < K32; k += 32) memcpy(tile + (k / 32 * 4 + n % 4) * 32, qr + k, 32);
        }
    });
    free(row);
    free(qr);
    release(&bs);
    Py_RETURN_NONE;
}

/* embed(ctx, table [V, K], wtype, V, K, ids int64 [T], T, y f32 [T, K]) */
static PyObject *py_embed(PyObject *self, PyObject *const *a, Py_ssize_t na) {
    (void)self;
    bufs bs;
    ob_ctx *c;
    void *w, *ids, *y;
    Py_ssize_t wt, V, K, T;
    if (parse(a, na, "CRnnnRnW", &bs, &c, &w, &wt, &V, &K, &ids, &T, &y) < 0) return NULL;
    for (Py_ssize_t t = 0; t < T; t++) {
        int64_t id = ((const int64_t *)ids)[t];
        if (id < 0 || id >= V) {
            release(&bs);
            return PyErr_Format(PyExc_IndexError, "token id %lld out of range [0, %zd)", (long long)id, V);
        }
    }
    for (Py_ssize_t t = 0; t < T; t++) {
        size_t base = (size_t)((const int64_t *)ids)[t] * K;
        float *yt = (float *)y + (size_t)t * K;
        for (Py_ssize_t k = 0; k < K; k++) yt[k] = load_any(w, wt, base + k);
    }
    release(&bs);
    Py_RETURN_NONE;
}

/* ---- elementwise and attention ---------------------------------------------------------------- */

/* rmsnorm(ctx, x [T, n], T, n, w [n], eps, y) */
static PyObject *py_rmsnorm(PyObject *self, PyObject *const *a, Py_ssize_t na) {
    (void)self;
    bufs bs;
    ob_ctx *c;
    void *x, *w, *y;
    Py_ssize_t T, n;
    double eps;
    if (parse(a, na, "CRnnRdW", &bs, &c, &x, &T, &n, &w, &eps, &y) < 0) return NULL;
    RUN(c, c->k->rmsnorm(c, x, w, (int)T, (int)n, (float)eps, y));
    release(&bs);
    Py_RETURN_NONE;
}

/* rope(ctx, x [T, H, D], T, H, D, cos [P, D], sin [P, D], pos int64 [T], y) */
static PyObject *py_rope(PyObject *self, PyObject *const *a, Py_ssize_t na) {
    (void)self;
    bufs bs;
    ob_ctx *c;
    void *x, *cs, *sn, *pos, *y;
    Py_ssize_t T, H, D;
    if (parse(a, na, "CRnnnRRRW", &bs, &c, &x, &T, &H, &D, &cs, &sn, &pos, &y) < 0) return NULL;
    RUN(c, c->k->rope(c, x, (int)T, (int)H, (int)D, cs, sn, pos, y));
    release(&bs);
    Py_RETURN_NONE;
}

/* glu(ctx, gate, up, n, silu, y) */
static PyObject *py_glu(PyObject *self, PyObject *const *a, Py_ssize_t na) {
    (void)self;
    bufs bs;
    ob_ctx *c;
    void *g, *u, *y;
    Py_ssize_t n, silu;
    if (parse(a, na, "CRRnnW", &bs, &c, &g, &u, &n, &silu, &y) < 0) return NULL;
    RUN(c, c->k->glu(c, g, u, (size_t)n, (int)silu, y));
    release(&bs);
    Py_RETURN_NONE;
}

/* Byte offset of layer `layer` in a KV cache [L, H, max_len, D] of f32 or f16. */
static size_t kv_layer_offset(Py_ssize_t layer, Py_ssize_t H, Py_ssize_t max_len, Py_ssize_t D, Py_ssize_t kvt) {
    return (size_t)layer * H * max_len * D * (kvt == OB_F32 ? 4 : 2);
}

/* attention(ctx, q [T, Hq, D], T, Hq, D, k, v [L, Hkv, max_len, D], kvtype, Hkv, max_len, layer, start, y) */
static PyObject *py_attention(PyObject *self, PyObject *const *a, Py_ssize_t na) {
    (void)self;
    bufs bs;
    ob_ctx *c;
    void *q, *k, *v, *y;
    Py_ssize_t T, Hq, D, kvt, Hkv, ml, layer, start;
    if (parse(a, na, "CRnnnRRnnnnnW", &bs, &c, &q, &T, &Hq, &D, &k, &v, &kvt, &Hkv, &ml, &layer, &start, &y) < 0)
        return NULL;
    size_t off = kv_layer_offset(layer, Hkv, ml, D, kvt);
    RUN(c, c->k->attention(c, q, (int)T, (int)Hq, (int)D, (char *)k + off, (char *)v + off, (int)kvt, (int)Hkv,
                           (int)ml, (int)start, y));
    release(&bs);
    Py_RETURN_NONE;
}

/* kv_store(ctx, src f32 [T, H, D], T, H, D, cache [L, H, max_len, D] (f32 / f16), kvtype, layer, max_len, start) */
static PyObject *py_kv_store(PyObject *self, PyObject *const *a, Py_ssize_t na) {
    (void)self;
    bufs bs;
    ob_ctx *c;
    void *src, *dst;
    Py_ssize_t T, H, D, kvt, layer, ml, start;
    if (parse(a, na, "CRnnnWnnnn", &bs, &c, &src, &T, &H, &D, &dst, &kvt, &layer, &ml, &start) < 0) return NULL;
    size_t off = kv_layer_offset(layer, H, ml, D, kvt);
    Py_BEGIN_ALLOW_THREADS
    ob_kv_store(c, src, (int)T, (int)H, (int)D, (char *)dst + off, (int)kvt, (int)ml, (int)start);
    Py_END_ALLOW_THREADS
    release(&bs);
    Py_RETURN_NONE;
}

/* One decoder layer of the fused decode step, as int64 fields of a plan row (see CpuBackend._decode_plan). */
enum { P_IN_NORM, P_QKV, P_ATTN_NORM = P_QKV + 5, P_O, P_POST_NORM = P_O + 5, P_GU, P_FFN_NORM = P_GU + 5, P_DOWN,
       P_ACT = P_DOWN + 5, P_I8, P_FIELDS };

static void plan_tern(const int64_t *f, ob_tern *w) {
    tern_init(w, (const void *)(intptr_t)f[0], (const float *)(intptr_t)f[1], (Py_ssize_t)f[2], (Py_ssize_t)f[3],
              (Py_ssize_t)f[4]);
}

/* decode_step(ctx, plan int64 [L, P_FIELDS], L, x f32 [hidden] (in/out), hidden, Hq, Hkv, D, eps, pos,
 *             k, v caches [L, Hkv, max_len, D], kvtype, max_len, cos, sin f32 [P, D], P)
 * One token through every layer in one call, with the same kernels in the same order as the per-op path
 * (fused q/k/v linear, RoPE of q and k, KV store, attention, o / gate-up / down linears with their norms,
 * residuals and gated activation), so the result is bit-identical to it. */
static PyObject *py_decode_step(PyObject *self, PyObject *const *a, Py_ssize_t na) {
    (void)self;
    bufs bs;
    ob_ctx *c;
    void *plan, *x, *kc, *vc, *cs, *sn;
    Py_ssize_t L, Hd, Hq, Hkv, D, pos, kvt, ml, P;
    double eps;
    if (parse(a, na, "CRnWnnnndnWWnnRRn", &bs, &c, &plan, &L, &x, &Hd, &Hq, &Hkv, &D, &eps, &pos, &kc, &vc, &kvt,
              &ml, &cs, &sn, &P) < 0)
        return NULL;
    if (pos < 0 || pos >= ml || pos >= P) {
        release(&bs);
        return PyErr_Format(PyExc_ValueError, "decode_step: position %zd outside the cache or RoPE tables", pos);
    }
    const int64_t *pl = plan;
    size_t nmax = (size_t)Hd;
    for (Py_ssize_t l = 0; l < L; l++) {
        const int64_t *f = pl + l * P_FIELDS;
        size_t n[4] = {(size_t)f[P_QKV + 2], (size_t)f[P_O + 2], (size_t)f[P_GU + 2], (size_t)f[P_DOWN + 2]};
        for (int i = 0; i < 4; i++) nmax = n[i] > nmax ? n[i] : nmax;
    }
    size_t qd = (size_t)Hq * D, kd = (size_t)Hkv * D;
    float *buf = malloc(sizeof(float) * (nmax + 2 * qd + kd + nmax + (size_t)Hd));
    if (!buf) {
        release(&bs);
        return PyErr_NoMemory();
    }
    float *qkv = buf, *qr = qkv + nmax, *kr = qr + qd, *att = kr + kd, *m = att + qd, *x2 = m + nmax;
    int64_t p64 = pos;
    int ok = 1;
    float *h = x;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&c->mu);
    for (Py_ssize_t l = 0; l < L && ok; l++) {
        const int64_t *f = pl + l * P_FIELDS;
        ob_tern wqkv, wo, wgu, wd;
        plan_tern(f + P_QKV, &wqkv), plan_tern(f + P_O, &wo), plan_tern(f + P_GU, &wgu), plan_tern(f + P_DOWN, &wd);
        int i8 = (int)f[P_I8], act = (int)f[P_ACT];
        const float *n_in = (const float *)(intptr_t)f[P_IN_NORM], *n_attn = (const float *)(intptr_t)f[P_ATTN_NORM];
        const float *n_post = (const float *)(intptr_t)f[P_POST_NORM], *n_ffn = (const float *)(intptr_t)f[P_FFN_NORM];
        ok = run_ternary(c, h, 1, &wqkv, qkv, i8, NULL, n_in, (float)eps, NULL, OB_GLU_NONE);
        if (!ok) break;
        c->k->rope(c, qkv, 1, (int)Hq, (int)D, cs, sn, &p64, qr);
        c->k->rope(c, qkv + qd, 1, (int)Hkv, (int)D, cs, sn, &p64, kr);
        size_t loff = kv_layer_offset(l, Hkv, ml, D, kvt);
        ob_kv_store(c, kr, 1, (int)Hkv, (int)D, (char *)kc + loff, (int)kvt, (int)ml, (int)pos);
        ob_kv_store(c, qkv + qd + kd, 1, (int)Hkv, (int)D, (char *)vc + loff, (int)kvt, (int)ml, (int)pos);
        c->k->attention(c, qr, 1, (int)Hq, (int)D, (char *)kc + loff, (char *)vc + loff, (int)kvt, (int)Hkv, (int)ml,
                        (int)pos, att);
        ok = run_ternary(c, att, 1, &wo, x2, i8, NULL, n_attn, (float)eps, h, OB_GLU_NONE);
        if (!ok) break;
        if (wgu.N % 8 == 0) { /* the linear applies the glu (float activations: in its paired-tile epilogue) */
            ok = run_ternary(c, x2, 1, &wgu, m, i8, NULL, n_post, (float)eps, NULL, act);
        } else {              /* as the per-op path: the product, then the glu kernel */
            ok = run_ternary(c, x2, 1, &wgu, qkv, i8, NULL, n_post, (float)eps, NULL, OB_GLU_NONE);
            if (ok) c->k->glu(c, qkv, qkv + wgu.N / 2, (size_t)(wgu.N / 2), act == OB_GLU_SILU, m);
        }
        if (!ok) break;
        ok = run_ternary(c, m, 1, &wd, h, i8, NULL, n_ffn, (float)eps, x2, OB_GLU_NONE);
    }
    pthread_mutex_unlock(&c->mu);
    Py_END_ALLOW_THREADS
    free(buf);
    release(&bs);
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"new_ctx", (PyCFunction)(void (*)(void))py_new_ctx, METH_FASTCALL, "new_ctx(isa, threads) -> context"},
    {"ctx_info", py_ctx_info, METH_O, "ctx_info(ctx) -> (isa, threads)"},
    {"isas", py_isas, METH_NOARGS, "isas() -> (compiled, supported by this CPU)"},
    {"repack", (PyCFunction)(void (*)(void))py_repack, METH_FASTCALL, NULL},
    {"ternary", (PyCFunction)(void (*)(void))py_ternary, METH_FASTCALL, NULL},
    {"act_quant", (PyCFunction)(void (*)(void))py_act_quant, METH_FASTCALL, NULL},
    {"dense", (PyCFunction)(void (*)(void))py_dense, METH_FASTCALL, NULL},
    {"dense_i8", (PyCFunction)(void (*)(void))py_dense_i8, METH_FASTCALL, NULL},
    {"quant_rows", (PyCFunction)(void (*)(void))py_quant_rows, METH_FASTCALL, NULL},
    {"embed", (PyCFunction)(void (*)(void))py_embed, METH_FASTCALL, NULL},
    {"rmsnorm", (PyCFunction)(void (*)(void))py_rmsnorm, METH_FASTCALL, NULL},
    {"rope", (PyCFunction)(void (*)(void))py_rope, METH_FASTCALL, NULL},
    {"glu", (PyCFunction)(void (*)(void))py_glu, METH_FASTCALL, NULL},
    {"attention", (PyCFunction)(void (*)(void))py_attention, METH_FASTCALL, NULL},
    {"kv_store", (PyCFunction)(void (*)(void))py_kv_store, METH_FASTCALL, NULL},
    {"decode_step", (PyCFunction)(void (*)(void))py_decode_step, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_ext", "onebit cpu kernels", -1, methods};

PyMODINIT_FUNC PyInit__ext(void) { return PyModule_Create(&moddef); }
