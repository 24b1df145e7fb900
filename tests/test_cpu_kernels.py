"""cpu backend kernels against numpy_ref, on fresh random inputs and odd shapes, for every ISA this CPU runs."""

import numpy as np
import pytest

from onebit.errors import UnsupportedError
from onebit.kernels import numpy_ref
from onebit.kernels.numpy_ref import NumpyBackend, act_quant, int_dot
from onebit.weights.packing import TernaryWeight

cpu = pytest.importorskip("onebit.kernels.cpu", reason="cpu backend package missing")
if not cpu.CpuBackend.is_available():
    pytest.skip("the cpu backend's C extension is not built (pip install -e . with a C compiler)",
                allow_module_level=True)

REF = NumpyBackend()
RUNNABLE = cpu.supported_isas()
NOT_RUNNABLE = [i for i in cpu.compiled_isas() if i not in RUNNABLE]


@pytest.fixture(scope="module", params=RUNNABLE)
def backend(request):
    return cpu.CpuBackend(isa=request.param, threads=2)


@pytest.mark.parametrize("isa", NOT_RUNNABLE or ["none"])
def test_isas_this_cpu_cannot_run(isa):
    if isa == "none":
        return
    pytest.skip(f"{isa} is compiled in but this CPU lacks it: its kernels are not tested here (runs {RUNNABLE})")


def rng():
    return np.random.default_rng()


def ternary(r, out, inp, grid):
    t = r.integers(-1, 2, (out, inp)).astype(np.int8)
    scales = r.uniform(0.25, 2.0, grid).astype(np.float32) * r.choice([-1, 1], grid).astype(np.float32)
    return t, TernaryWeight.from_ternary(t, scales)


# (T, out, in, scale grid): odd sizes, every grid kind; in not a multiple of 4, 32 or 256 included
TERNARY_CASES = [
    (1, 1, 1, (1, 1)), (1, 37, 1029, (1, 1)), (1, 6, 7, (2, 7)), (2, 5, 3, (5, 1)), (3, 130, 300, (1, 3)),
    (4, 64, 512, (4, 2)), (5, 9, 1000, (9, 4)), (7, 33, 768, (33, 3)), (1, 250, 2560, (1, 1)),
    (9, 71, 777, (71, 1)), (16, 128, 256, (1, 1)), (33, 19, 513, (1, 1)),
    (100, 9, 6912, (1, 1)), (61, 13, 13824, (13, 2)),  # prefill: tokens in several passes over the codes
    (20, 195, 2560, (5, 1)),  # GEMM tasks of 6 tiles (3-row blocks), a last task of one tile, a padded row
    # GEMVs whose per-thread parts (2 threads) have an odd number of tiles: tile pairs, read two at a time by the
    # VNNI kernel, and a last tile alone; a padded row; column groups
    (1, 390, 1029, (1, 1)), (1, 520, 777, (5, 3)),
]


@pytest.mark.parametrize("case", TERNARY_CASES, ids=lambda c: "x".join(map(str, c[:3])) + f"-g{c[3][0]}x{c[3][1]}")
def test_ternary_int8_accumulators_and_outputs_are_exact(backend, case):
    r = rng()
    T, out, inp, grid = case
    t, w = ternary(r, out, inp, grid)
    x = (r.standard_normal((T, inp)) * r.uniform(0.01, 100)).astype(np.float32)
    acc = np.zeros((grid[1], T, out), dtype=np.int32)
    y = backend.ternary_matmul(x, backend.prepare_ternary(w), 8, acc=acc)
    xq, _ = act_quant(x)
    cg = inp // grid[1]
    want = np.stack([int_dot(xq[:, g * cg:(g + 1) * cg], t[:, g * cg:(g + 1) * cg]) for g in range(grid[1])])
    assert np.array_equal(acc, want)
    assert np.array_equal(y, REF.ternary_matmul(x, REF.prepare_ternary(w), 8))


# (T, out, in, scale grid) for the fused calls: one token (GEMV) and several (GEMM); out a multiple of 8 (glu
# fused), of 4 but not 8, and odd (glu falls back to the separate ops); column groups; in not a multiple of 256
FUSED_CASES = [(1, 16, 300, (1, 1)), (1, 48, 1029, (2, 3)), (1, 12, 256, (1, 1)), (1, 10, 77, (5, 1)),
               (3, 40, 513, (1, 1)), (5, 64, 768, (4, 3)), (7, 6, 100, (1, 2)), (17, 24, 256, (1, 1))]


@pytest.mark.parametrize("act_bits", [8, None])
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "x".join(map(str, c[:3])) + f"-g{c[3][0]}x{c[3][1]}")
def test_fused_norm_residual_glu_equal_the_separate_ops(backend, case, act_bits):
    """ternary_matmul(norm=, residual=, glu=) in one call == rmsnorm, ternary_matmul, add / glu as separate
    calls, bit for bit; and with int8 activations == the numpy reference's ops, bit for bit."""
    r = rng()
    T, out, inp, grid = case
    t, w = ternary(r, out, inp, grid)
    cw, rw = backend.prepare_ternary(w), REF.prepare_ternary(w)
    x = (r.standard_normal((T, inp)) * r.uniform(0.1, 10)).astype(np.float32)
    nw = (1 + 0.1 * r.standard_normal(inp)).astype(np.float32)
    res = r.standard_normal((T, out)).astype(np.float32)
    eps = 1e-5
    h = backend.rmsnorm(x, nw, eps)
    y = backend.ternary_matmul(h, cw, act_bits)
    assert np.array_equal(backend.ternary_matmul(x, cw, act_bits, norm=(nw, eps)), y)
    assert np.array_equal(backend.ternary_matmul(x, cw, act_bits, norm=(nw, eps), residual=res), backend.add(res, y))
    assert np.array_equal(backend.ternary_matmul(h, cw, act_bits, residual=res), backend.add(res, y))
    for act in ("relu2", "silu"):
        gate, up = backend.split(y, [out // 2, out - out // 2]) if out % 2 == 0 else (None, None)
        if gate is None:
            continue
        want = backend.glu(gate, up, act)
        assert np.array_equal(backend.ternary_matmul(x, cw, act_bits, norm=(nw, eps), glu=act), want)
        assert np.array_equal(backend.ternary_matmul(h, cw, act_bits, glu=act), want)
    if act_bits:  # the int8 path is exact against the reference too, accumulators included
        ref_y = REF.ternary_matmul(numpy_ref.rmsnorm(x, nw, eps), rw, 8)
        assert np.array_equal(backend.ternary_matmul(x, cw, 8, norm=(nw, eps), residual=res), REF.add(res, ref_y))
        if out % 8 == 0:
            assert np.array_equal(backend.ternary_matmul(x, cw, 8, norm=(nw, eps), glu="relu2"),
                                  REF.glu(ref_y[:, :out // 2], ref_y[:, out // 2:], "relu2"))
        acc = np.zeros((grid[1], T, out), dtype=np.int32)
        backend.ternary_matmul(x, cw, 8, acc, norm=(nw, eps))
        xq, _ = act_quant(numpy_ref.rmsnorm(x, nw, eps))
        cg = inp // grid[1]
        assert np.array_equal(acc, np.stack([int_dot(xq[:, g * cg:(g + 1) * cg], t[:, g * cg:(g + 1) * cg])
                                             for g in range(grid[1])]))


def test_fused_ternary_rejects_bad_shapes(backend):
    cw = backend.prepare_ternary(ternary(rng(), 16, 64, (1, 1))[1])
    x = np.ones((2, 64), np.float32)
    with pytest.raises(ValueError, match="residual"):
        backend.ternary_matmul(x, cw, 8, residual=np.ones((2, 8), np.float32))
    with pytest.raises(ValueError, match="rmsnorm"):
        backend.ternary_matmul(x, cw, 8, norm=(np.ones(63, np.float32), 1e-5))
    with pytest.raises(UnsupportedError):
        backend.ternary_matmul(x, cw, 8, glu="gelu")


def test_split_one_token_returns_the_blocks(backend):
    x = rng().standard_normal((1, 10)).astype(np.float32)
    parts = backend.split(x, [3, 5, 2])
    assert [p.shape for p in parts] == [(1, 3), (1, 5), (1, 2)] and all(p.flags.c_contiguous for p in parts)
    assert np.array_equal(np.concatenate(parts, axis=1), x)


def test_ternary_int8_extreme_activations(backend):
    """All activations at +-127 after quantization: the largest int16 partial sums the kernels can see."""
    r = rng()
    t, w = ternary(r, 24, 4096, (1, 1))
    t[:] = 1
    w = TernaryWeight.from_ternary(t, 1.0)
    x = np.full((2, 4096), 3.0, dtype=np.float32)
    x[1] = -3.0
    cw = backend.prepare_ternary(w)
    assert np.array_equal(backend.ternary_matmul(x, cw, 8), REF.ternary_matmul(x, REF.prepare_ternary(w), 8))
    t2 = -np.ones_like(t)
    w2 = TernaryWeight.from_ternary(t2, 1.0)
    assert np.array_equal(backend.ternary_matmul(x, backend.prepare_ternary(w2), 8),
                          REF.ternary_matmul(x, REF.prepare_ternary(w2), 8))


@pytest.mark.parametrize("case", TERNARY_CASES[:9], ids=lambda c: "x".join(map(str, c[:3])))
def test_ternary_float_activations_match_within_rounding(backend, case):
    r = rng()
    T, out, inp, grid = case
    _, w = ternary(r, out, inp, grid)
    x = r.standard_normal((T, inp)).astype(np.float32)
    y = backend.ternary_matmul(x, backend.prepare_ternary(w), None)
    want = REF.ternary_matmul(x, REF.prepare_ternary(w), None)
    scale = np.abs(x).sum(axis=1, keepdims=True) * np.abs(w.scales).max()
    assert np.all(np.abs(y - want) <= 2e-6 * scale + 1e-30)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 257), (5, 2560), (2, 6912), (64, 100)])
def test_act_quant_is_bit_identical(backend, shape):
    r = rng()
    x = (r.standard_normal(shape) * r.uniform(1e-3, 1e3)).astype(np.float32)
    q, s = backend.act_quant(x)
    qr, sr = act_quant(x)
    assert np.array_equal(q, qr) and np.array_equal(s, sr)


def test_act_quant_ties_round_half_to_even(backend):
    x = np.array([[127.0] + [k + 0.5 for k in range(-20, 20)] + [-0.5, 0.5, 2.5, -2.5]], dtype=np.float32)
    q, s = backend.act_quant(x)
    qr, _ = act_quant(x)
    assert s[0, 0] == 1.0 and np.array_equal(q, qr)
    zero = np.zeros((1, 9), dtype=np.float32)  # max(|x|, 1e-5) keeps the scale finite
    assert np.array_equal(backend.act_quant(zero)[0], act_quant(zero)[0])


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (2, 100), (3, 2560), (4, 6912), (1, 1029), (40, 2048)])
def test_rmsnorm_is_bit_identical(backend, shape):
    r = rng()
    x = (r.standard_normal(shape) * r.uniform(0.1, 10)).astype(np.float32)
    w = (1 + 0.1 * r.standard_normal(shape[1])).astype(np.float32)
    assert np.array_equal(backend.rmsnorm(x, backend.prepare_dense(w), 1e-5), numpy_ref.rmsnorm(x, w, 1e-5))


@pytest.mark.parametrize("T,H,D", [(1, 1, 2), (5, 3, 64), (17, 4, 128), (3, 20, 128), (600, 2, 32)])
def test_rope_is_bit_identical(backend, T, H, D):
    r = rng()
    x = r.standard_normal((T, H, D)).astype(np.float32)
    pos = r.integers(0, 5000, T)
    for theta in (10000.0, 500000.0):
        assert np.array_equal(backend.rope(x, pos, theta), numpy_ref.rope(x, pos, theta))


@pytest.mark.parametrize("n", [1, 13, 6912, 40000])
def test_glu(backend, n):
    r = rng()
    g, u = (r.standard_normal((1, n)) * 3).astype(np.float32), r.standard_normal((1, n)).astype(np.float32)
    assert np.array_equal(backend.glu(g, u, "relu2"), REF.glu(g, u, "relu2"))
    want = REF.glu(g, u, "silu")
    assert np.allclose(backend.glu(g, u, "silu"), want, rtol=3e-6, atol=1e-6)


def test_add_concat_to_numpy(backend):
    r = rng()
    a, b = r.standard_normal((3, 5)).astype(np.float32), r.standard_normal((3, 5)).astype(np.float32)
    assert np.array_equal(backend.add(a, b), a + b)
    assert np.array_equal(backend.concat([a, b]), np.concatenate([a, b]))
    assert backend.to_numpy(a).dtype == np.float32


@pytest.mark.parametrize("kind", ["f32", "bf16", "f16"])
def test_embed_gathers_rows_exactly(backend, kind):
    r = rng()
    table = table_of(r, kind, (301, 67))
    h = backend.prepare_dense(table)
    assert h.dtype_name == kind
    ids = r.integers(0, 301, 9)
    assert np.array_equal(backend.embed(h, ids), table[ids])


def table_of(r, kind, shape):
    t = r.standard_normal(shape).astype(np.float32)
    if kind == "bf16":
        return (t.view(np.uint32) & 0xFFFF0000).view(np.float32)
    if kind == "f16":
        return t.astype(np.float16).astype(np.float32)
    return t


@pytest.mark.parametrize("kind", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("T,N,K", [(1, 1, 1), (1, 261, 67), (2, 5, 9), (3, 100, 2560), (7, 1001, 130)])
def test_dense_matmul_16bit_and_f32(backend, kind, T, N, K):
    r = rng()
    w = table_of(r, kind, (N, K))
    x = r.standard_normal((T, K)).astype(np.float32)
    y = backend.dense_matmul(x, backend.prepare_dense(w))
    want = x @ w.T
    assert np.all(np.abs(y - want) <= 1e-5 * (np.abs(x) @ np.abs(w).T) + 1e-30)


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("kind", ["f32", "f16"])
@pytest.mark.parametrize("N", [1030, 7])
def test_dense_one_token_equals_its_row_of_several(isa, threads, kind, N):
    """One token (the lm_head's decode path: a part per thread read as four row streams, row u of each quarter,
    chunks stolen by early threads) sums each row exactly as the several-token path does: the same floats, at any
    thread count, the last partial group of 4 rows included."""
    r = rng()
    b = cpu.CpuBackend(threads=threads, isa=isa)
    w = b.prepare_dense(table_of(r, kind, (N, 300)))  # 1030: 257 full groups of 4 and 2 rows; 300 % 8 != 0
    for _ in range(10):
        x = r.standard_normal((3, 300)).astype(np.float32)
        assert np.array_equal(b.dense_matmul(x[:1], w), b.dense_matmul(x, w)[:1])


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("N", [1030, 7])
def test_dense_int8_one_token_equals_its_row_of_several(isa, threads, N):
    """The int8 lm_head at one token (a part per thread, two tiles of 4 rows read at once, chunks stolen by early
    threads) gives each row exactly what the several-token path gives it, the last partial tile included."""
    r = rng()
    b = cpu.CpuBackend(threads=threads, isa=isa, lm_head="int8")
    w = b.prepare_dense(r.standard_normal((N, 300)).astype(np.float32))
    for _ in range(10):
        x = r.standard_normal((3, 300)).astype(np.float32)
        assert np.array_equal(b.dense_matmul(x[:1], w), b.dense_matmul(x, w)[:1])


def int8_head_twin(x, w):
    """The int8 lm_head's math in NumPy: rows and tokens quantized like act_quant, integer dot, rescale."""
    wq, ws = act_quant(w)  # per row: s = 127 / max|row|
    xq, xs = act_quant(x)
    acc = int_dot(xq, wq)
    return (acc.astype(np.float32) / xs) * (np.float32(1.0) / ws.reshape(1, -1))


@pytest.mark.parametrize("T,N,K", [(1, 1, 1), (1, 261, 67), (3, 100, 2560), (5, 77, 33)])
def test_dense_matmul_int8_head_matches_its_twin(T, N, K):
    isa = cpu.best_isa()
    b = cpu.CpuBackend(isa=isa, threads=2, lm_head="int8")
    r = rng()
    w = table_of(r, "bf16", (N, K))
    x = r.standard_normal((T, K)).astype(np.float32)
    h = b.prepare_dense(w)
    y = b.dense_matmul(x, h)
    assert h.int8 is not None  # built lazily, once
    want = int8_head_twin(x, w)
    assert np.allclose(y, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    assert np.array_equal(b.embed(h, np.array([0, N - 1])), w[[0, N - 1]])  # gather still uses the 16-bit table


def fill_cache(b, r, L, hkv, d, max_len, n):
    nc, cc = REF.make_cache(L, hkv, d, max_len), b.make_cache(L, hkv, d, max_len)
    for layer in range(L):
        k, v = r.standard_normal((n, hkv, d)).astype(np.float32), r.standard_normal((n, hkv, d)).astype(np.float32)
        REF.kv_append(nc, layer, k, v, 0)
        b.kv_append(cc, layer, k, v, 0)
    return nc, cc


@pytest.mark.parametrize("T,start,hq,hkv,d", [
    (1, 0, 1, 1, 8), (1, 1000, 20, 5, 128), (1, 77, 4, 4, 64), (3, 500, 8, 2, 32),
    (37, 0, 4, 2, 64), (40, 23, 6, 3, 16), (130, 5, 2, 1, 128), (5, 3000, 4, 1, 100), (33, 0, 6, 2, 24),
    (70, 9, 20, 5, 128), (20, 70, 4, 2, 320)])
def test_attention_matches_reference(backend, T, start, hq, hkv, d):
    r = rng()
    nc, cc = fill_cache(backend, r, 2, hkv, d, start + T + 3, start + T)
    q = (r.standard_normal((T, hq, d)) * 2).astype(np.float32)
    for layer in (0, 1):
        y = backend.attention(q, cc, layer, start)
        want = REF.attention(q, nc, layer, start)
        assert np.allclose(y, want, rtol=1e-5, atol=1e-5)


def test_attention_f16_cache_is_close():
    b = cpu.CpuBackend(threads=2, kv_dtype="f16")
    r = rng()
    nc, cc = fill_cache(b, r, 1, 2, 64, 400, 300)
    assert cc.k.dtype == np.float16 and cc.nbytes() == nc.nbytes() // 2
    q = r.standard_normal((2, 4, 64)).astype(np.float32)
    assert np.allclose(b.attention(q, cc, 0, 298), REF.attention(q, nc, 0, 298), rtol=0, atol=5e-3)


def test_f16_cache_store_rounds_like_numpy(backend):
    """The KV store's float -> half conversion (F16C where the ISA has it) gives NumPy's halves bit for bit:
    ties to even, subnormals, overflow to inf, signed zeros, inf and NaN, at every position of a SIMD step."""
    b = cpu.CpuBackend(isa=backend.isa, threads=2, kv_dtype="f16")
    r = rng()
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65519.99, 65520.0, -1e6, 6.1e-5, 5.96e-8,
                        2.98e-8, 2.99e-8, -3e-6, 1e-40, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 2049.0, 2051.0],
                       dtype=np.float32)
    ties = (r.integers(-2 ** 14, 2 ** 14, 400) * 2.0 ** -10 + 2.0 ** -11).astype(np.float32)  # exact half ties
    vals = np.concatenate([special, ties, r.standard_normal(600).astype(np.float32) * 10.0 ** r.integers(-9, 6, 600)])
    d = 37  # not a multiple of the SIMD width: the tail takes the scalar conversion
    n = len(vals) // d
    k = vals[:n * d].reshape(n, 1, d).astype(np.float32)
    cc = b.make_cache(1, 1, d, n)
    b.kv_append(cc, 0, k, k, 0)
    want = k[:, 0].astype(np.float16)
    assert np.array_equal(cc.k[0, 0, :n].view(np.uint16), want.view(np.uint16))
    assert np.array_equal(cc.v[0, 0, :n].view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("T,start,hq,hkv,d", [(1, 0, 1, 1, 8), (1, 1000, 20, 5, 128), (3, 500, 8, 2, 32),
                                              (37, 0, 4, 2, 64), (5, 3000, 4, 1, 100), (70, 9, 20, 5, 128),
                                              (33, 100, 6, 2, 24)])
def test_attention_f16_cache_matches_the_f16_reference(backend, T, start, hq, hkv, d):
    """Both backends hold the same float16 K/V (round to nearest even): they agree as closely as with f32."""
    fb, ref16 = cpu.CpuBackend(isa=backend.isa, threads=2, kv_dtype="f16"), NumpyBackend(kv_dtype="f16")
    r = rng()
    n, max_len = start + T, start + T + 3
    nc, cc = ref16.make_cache(1, hkv, d, max_len), fb.make_cache(1, hkv, d, max_len)
    k, v = r.standard_normal((n, hkv, d)).astype(np.float32), r.standard_normal((n, hkv, d)).astype(np.float32)
    ref16.kv_append(nc, 0, k, v, 0)
    fb.kv_append(cc, 0, k, v, 0)
    assert nc.k.dtype == cc.k.dtype == np.float16 and nc.nbytes() == cc.nbytes()
    assert np.array_equal(nc.k[0, :n], k.astype(np.float16))
    assert np.array_equal(cc.k[0].transpose(1, 0, 2)[:n], nc.k[0, :n])
    q = (r.standard_normal((T, hq, d)) * 2).astype(np.float32)
    assert np.allclose(fb.attention(q, cc, 0, start), ref16.attention(q, nc, 0, start), rtol=1e-5, atol=1e-5)


def test_cache_protocol(backend):
    c = backend.make_cache(2, 1, 8, 16)
    assert (c.length, c.max_len) == (0, 16) and c.nbytes() == 2 * 2 * 16 * 8 * 4
    c.length = 10
    c.trim(4)
    assert c.length == 4
    with pytest.raises(ValueError):
        backend.kv_append(c, 0, np.zeros((3, 1, 8), np.float32), np.zeros((3, 1, 8), np.float32), 15)


def test_empty_inputs(backend):
    z = np.zeros((0, 7), np.float32)
    w = backend.prepare_ternary(TernaryWeight.from_ternary(np.ones((5, 7)), 1.0))
    table = backend.prepare_dense(np.ones((3, 7), np.float32))
    assert backend.ternary_matmul(z, w, 8).shape == backend.ternary_matmul(z, w, None).shape == (0, 5)
    assert backend.rmsnorm(z, np.ones(7, np.float32), 1e-5).shape == backend.glu(z, z, "silu").shape == (0, 7)
    assert backend.dense_matmul(z, table).shape == (0, 3) and backend.embed(table, []).shape == (0, 7)
    q = np.zeros((0, 2, 8), np.float32)
    assert backend.rope(q, np.zeros(0, np.int64), 1e4).shape == (0, 2, 8)
    assert backend.attention(q, backend.make_cache(1, 1, 8, 4), 0, 0).shape == (0, 2, 8)


def test_thread_counts_agree():
    r = rng()
    t, w = ternary(r, 301, 1000, (1, 1))
    x = r.standard_normal((5, 1000)).astype(np.float32)
    outs = []
    for n in (1, 2, 3):
        b = cpu.CpuBackend(threads=n)
        assert b.threads == n
        outs.append(b.ternary_matmul(x, b.prepare_ternary(w), 8))
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


@pytest.mark.parametrize("threads", [2, 3, 5, 8])
def test_gemv_parts_and_stolen_chunks_are_exact(threads):
    """One-token GEMVs split in a part per thread, where threads done early take chunks from the back of the
    others' parts. More threads than cores (this runs on 2) makes them late at random, so chunks are stolen in
    varying places, and the tasks that prefetch while task 0 normalizes and quantizes (tern_i8_x1) wait for it
    at varying points: every call must still equal the reference, with and without the fused norm and glu."""
    r = rng()
    b = cpu.CpuBackend(threads=threads)
    t, w = ternary(r, 1352, 777, (1, 1))  # 338 tiles, 84-85 per part at 4 threads; odd parts at 3 and 5
    cw, rw = b.prepare_ternary(w), REF.prepare_ternary(w)
    nw = (1 + 0.1 * r.standard_normal(777)).astype(np.float32)
    for _ in range(25):
        x = (r.standard_normal((1, 777)) * r.uniform(0.1, 10)).astype(np.float32)
        ref = REF.ternary_matmul(x, rw, 8)
        assert np.array_equal(b.ternary_matmul(x, cw, 8), ref)
        assert np.array_equal(b.ternary_matmul(x, cw, 8, glu="relu2"), REF.glu(ref[:, :676], ref[:, 676:], "relu2"))
        ref = REF.ternary_matmul(numpy_ref.rmsnorm(x, nw, 1e-5), rw, 8)
        assert np.array_equal(b.ternary_matmul(x, cw, 8, norm=(nw, 1e-5)), ref)


def test_isa_choice(monkeypatch):
    assert "scalar" in cpu.supported_isas() and set(cpu.supported_isas()) <= set(cpu.compiled_isas())
    assert cpu.CpuBackend().isa == cpu.best_isa()
    monkeypatch.setenv("ONEBIT_CPU_ISA", "scalar")
    assert cpu.CpuBackend().isa == "scalar"
    monkeypatch.setenv("ONEBIT_CPU_ISA", "sse9")
    with pytest.raises(UnsupportedError, match="sse9"):
        cpu.CpuBackend()
    missing = [i for i in cpu.compiled_isas() if i not in cpu.supported_isas()]
    for isa in missing:  # compiled in, but this CPU lacks it: a clear error, never a crash
        monkeypatch.setenv("ONEBIT_CPU_ISA", isa)
        with pytest.raises(UnsupportedError, match="lacks"):
            cpu.CpuBackend()


def test_registry_passes_options():
    from onebit.kernels import get_backend

    b = get_backend("cpu", threads=1, lm_head="int8")
    assert (b.name, b.threads, b.lm_head) == ("cpu", 1, "int8")


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork() on this platform")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")  # the point of the test
def test_backend_keeps_working_in_a_forked_child():
    import os

    b = cpu.CpuBackend(threads=2)
    _, w = ternary(rng(), 300, 700, (1, 1))
    cw = b.prepare_ternary(w)
    x = rng().standard_normal((3, 700)).astype(np.float32)
    y = b.ternary_matmul(x, cw, 8)
    pid = os.fork()
    if pid == 0:  # the pool's workers do not exist here: kernels must run inline, not hang
        os._exit(0 if np.array_equal(b.ternary_matmul(x, cw, 8), y) else 1)
    assert os.waitpid(pid, 0)[1] == 0
