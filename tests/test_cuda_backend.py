"""The `cuda` backend (Triton kernels, fused CUDA-graph decode) against the NumPy reference.

Runs on a GPU. Without one the module is skipped, unless ONEBIT_TRITON_INTERPRET=1 asks for Triton's CPU
interpreter (slow: minutes; for developing kernels on a machine without a GPU; no CUDA graphs there).
Every input is fresh and random; shapes are odd on purpose (rows and columns not multiples of the tiles).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from benchmark_script import benchmark_script
from model_parity import BOUND, CONFIGS, assert_int8_head_moves_logits_within_rounding, bf16, fresh_seed, \
    greedy_batched_and_alone, prompt_and_decode, sixteen_bit_weights
from onebit.kernels.numpy_ref import NumpyBackend, act_quant, int_dot, rmsnorm
from onebit.kernels.numpy_ref import rope as np_rope
from onebit.kernels.triton import CudaBackend
from onebit.models import build_model
from onebit.synth import random_weights
from onebit.weights.packing import TernaryWeight

if CudaBackend.is_available():
    DEVICE = "cuda"
elif os.environ.get("ONEBIT_TRITON_INTERPRET") == "1":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    DEVICE = "cpu"
else:
    pytest.skip("no GPU here (ONEBIT_TRITON_INTERPRET=1 runs these under Triton's CPU interpreter)",
                allow_module_level=True)

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from onebit.kernels.triton import kernels as K  # noqa: E402
from onebit.kernels.triton.backend import Normed, TritonCudaBackend  # noqa: E402

if DEVICE == "cpu":  # Triton's interpreter takes int() of a scalar's one-element 1-D array: an error from NumPy 2.4 on
    from triton.runtime import interpreter as _interp

    _patch_tensor = _interp._patch_lang_tensor

    def _patch_tensor_index(tensor, scope):
        _patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_tensor_index


def rng():
    return np.random.default_rng()


def backend(**kw) -> TritonCudaBackend:
    return TritonCudaBackend(device=DEVICE, **kw)


def dev(a) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(a)).to(DEVICE)


def host(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def random_ternary(n: int, k: int, scales=1.0) -> TernaryWeight:
    return TernaryWeight.from_ternary(rng().integers(-1, 2, (n, k)), scales)


# ---------------------------------------------------------------------------------------------- kernels

@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("n,k", [(37, 333), (64, 1000), (5, 16), (40, 4500)])
@pytest.mark.parametrize("tile", [True, False])  # the gemv's whole-tile and chunked dot products
def test_ternary_matmul_is_integer_exact(m, n, k, tile, monkeypatch):
    """Scales of 1 make the output the int32 accumulator itself: identical to the reference's."""
    monkeypatch.setattr(K, "GEMV_TILE_WORDS", 1024 if tile else 0)
    w = random_ternary(n, k)
    xq = rng().integers(-128, 128, (m, k)).astype(np.int8)
    got = K.matmul(dev(xq), backend().prepare_ternary(w), sx=dev(np.ones(m, np.float32)))
    np.testing.assert_array_equal(host(got), int_dot(xq, w.ternary()).astype(np.float32))



@pytest.mark.parametrize("m", [3, 5, 16, 17, 32])
@pytest.mark.parametrize("n,k", [(37, 333), (70, 2560), (40, 4500)])  # 4500: two input segments, masked inputs
@pytest.mark.parametrize("splits", ["one", "most"])
def test_few_token_gemm_is_integer_exact_and_fuses_its_epilogues(m, n, k, splits, monkeypatch):
    """_tgemm_few_kernel (FEW_MIN..FEW_MAX tokens): with scales of 1 its output is the reference's int32 dot,
    unsplit and split over K as far as it goes (the splits' sums added by each tile's last program), twice in a
    row (the tiles' counters are reset for the next launch); its residual add and gated activation equal the
    plain product followed by torch's."""
    monkeypatch.setattr(K, "FEW_PROGRAMS_PER_SM", 0 if splits == "one" else 1 << 20)
    monkeypatch.setattr(K, "FEW_MIN", 3)  # every token count here takes it (the default starts higher)
    calls = []
    few = K._ternary_few
    monkeypatch.setattr(K, "_ternary_few", lambda *a, **kw: calls.append(a[3]) or few(*a, **kw))
    w = random_ternary(n, k)
    be = backend()
    mat = be.prepare_ternary(w)
    xq = rng().integers(-128, 128, (m, k)).astype(np.int8)
    want = int_dot(xq, w.ternary()).astype(np.float32)
    for _ in range(2):
        got = K.matmul(dev(xq), mat, sx=dev(np.ones(m, np.float32)))
        np.testing.assert_array_equal(host(got), want)
    assert calls == [m, m]
    sx = dev(rng().uniform(0.5, 50, m).astype(np.float32))
    mat = be.prepare_ternary(random_ternary(2 * n, k, 0.9))  # (gate n, up n) pairs
    y = K.matmul(dev(xq), mat, sx=sx)
    base = dev(rng().standard_normal((m, 2 * n)).astype(np.float32))
    res = base.clone()
    K.matmul(dev(xq), mat, sx=sx, out=res, residual=True)
    torch.testing.assert_close(res, base + y, rtol=0, atol=0)
    for act in (K.ACT_RELU2, K.ACT_SILU):
        g, u = y[:, :n], y[:, n:]
        glu = (torch.square(torch.clamp_min(g, 0)) if act == K.ACT_RELU2 else g / (1 + torch.exp(-g))) * u
        torch.testing.assert_close(K.matmul(dev(xq), mat, sx=sx, glu=act), glu, rtol=1e-6, atol=1e-6)
    assert len(calls) == 6


def test_few_token_gemm_takes_deep_matrices_from_fewer_tokens(monkeypatch):
    """From FEW_DEEP_MIN tokens a matrix of FEW_DEEP_K inputs or more takes _tgemm_few_kernel, a shallower one
    (or fewer tokens) does not; every route gives the reference's int32 dot (scales of 1)."""
    monkeypatch.setattr(K, "FEW_DEEP_K", 4500)
    calls = []
    few = K._ternary_few
    monkeypatch.setattr(K, "_ternary_few", lambda *a, **kw: calls.append((a[3], a[2].k)) or few(*a, **kw))
    be = backend()
    for k in (4500, 4499):
        w = random_ternary(40, k)
        mat = be.prepare_ternary(w)
        for m in (K.FEW_DEEP_MIN - 1, K.FEW_DEEP_MIN):
            xq = rng().integers(-128, 128, (m, k)).astype(np.int8)
            got = K.matmul(dev(xq), mat, sx=dev(np.ones(m, np.float32)))
            np.testing.assert_array_equal(host(got), int_dot(xq, w.ternary()).astype(np.float32))
    assert calls == [(K.FEW_DEEP_MIN, 4500)]


@pytest.mark.parametrize("n,k,groups", [(37, 333, 1), (48, 512, 2), (5, 16, 1), (64, 4500, 1)])
def test_ternary_layout_round_trips_and_re_pairs(n, k, groups):
    """Packing into paired-row words loses nothing, and re-pairing rows (as the decode plan does for q/k/v)
    leaves every product unchanged."""
    codes = rng().integers(0, 3, (n, k)).astype(np.int8)
    lay = K.TernaryLayout(n, k, groups)
    np.testing.assert_array_equal(host(lay.unpack(lay.pack(dev(codes)))), codes)
    m = K.Matrix.ternary(dev(codes), dev(rng().uniform(0.5, 2.0, (groups, n)).astype(np.float32)), groups)
    xq = dev(rng().integers(-128, 128, (2, k)).astype(np.int8))
    sx = dev(np.ones(2, np.float32))
    before = K.matmul(xq, m, sx=sx)
    m.repair(8)
    assert m.layout.pair == 8
    np.testing.assert_array_equal(host(m.layout.unpack(m.data)), codes)
    torch.testing.assert_close(K.matmul(xq, m, sx=sx), before, rtol=0, atol=0)


@pytest.mark.parametrize("m", [1, 33])
@pytest.mark.parametrize("grid", ["one", "rows", "columns", "blocks"])
@pytest.mark.parametrize("act_bits", [8, None])
def test_ternary_matmul_scale_grids_match_reference(m, grid, act_bits):
    n, k = 48, 512
    shape = {"one": (1, 1), "rows": (4, 1), "columns": (1, 2), "blocks": (n, k // 256)}[grid]
    w = random_ternary(n, k, rng().uniform(0.5, 2.0, shape).astype(np.float32))
    x = rng().standard_normal((m, k)).astype(np.float32)
    ref = NumpyBackend()
    want = ref.ternary_matmul(x, ref.prepare_ternary(w), act_bits)
    got = host(backend().ternary_matmul(dev(x), backend().prepare_ternary(w), act_bits))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("m,k", [(1, 192), (5, 333), (3, 2560)])
def test_norm_quant_matches_reference(m, k):
    x = (rng().standard_normal((m, k)) * 3).astype(np.float32)
    wt = rng().uniform(0.5, 1.5, k).astype(np.float32)
    q, s = K.norm_quant(dev(x), dev(wt), 1e-6)
    want_q, want_s = act_quant(rmsnorm(x, wt, 1e-6))
    np.testing.assert_allclose(host(s), want_s[:, 0], rtol=1e-6)
    diff = np.abs(host(q).astype(int) - want_q.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # a float-rounding tie may land one step away
    y = K.norm_quant(dev(x), dev(wt), 1e-6, quant=False)
    np.testing.assert_allclose(host(y), rmsnorm(x, wt, 1e-6), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m", [1, 20, 40])  # the gemv, the few-token GEMM and the gemm paths
def test_matmul_rejects_epilogues_that_do_not_combine(m):
    """Checked before any kernel runs: a residual add needs its output, and glu does not take one."""
    be = backend()
    w = be.prepare_ternary(random_ternary(16, 64, 1.0))
    x = dev(rng().standard_normal((m, 64)).astype(np.float32))
    out = dev(np.zeros((m, 16), np.float32))
    with pytest.raises(ValueError, match="adds into out"):
        K.matmul(x, w, norm=dev(np.ones(64, np.float32)), eps=1e-5, quant=True, residual=True)
    with pytest.raises(ValueError, match="do not combine"):
        K.matmul(x, w, quant=True, out=out, residual=True, glu=K.ACT_RELU2)
    w.repair(4)  # rows 4 apart: not (gate n, up n) pairs, which the gemv's and the few-token GEMM's glu need
    if m <= K.GEMV_MAX_TOKENS or K.FEW_MIN <= m <= K.FEW_MAX:
        with pytest.raises(ValueError, match="row pairs"):
            K.matmul(x, w, quant=True, glu=K.ACT_RELU2)
    assert np.array_equal(host(out), np.zeros((m, 16), np.float32))


@pytest.mark.parametrize("m", [1, 8, 20, 40])  # gemvs; _tgemm_kernel / the dense GEMM; few-token; 64-token blocks
def test_matmul_writes_into_out_on_every_path(m):
    """``out`` receives the product (and is what comes back) on every route a matmul can take: ternary and dense,
    plain and with the gated activation; an out of the wrong shape or type is refused before any kernel runs."""
    be = backend()
    k, n = 64, 24
    x = dev(rng().standard_normal((m, k)).astype(np.float32))
    ter = be.prepare_ternary(random_ternary(n, k, 0.8))
    dense = be.prepare_dense((rng().standard_normal((n, k)) * 0.1).astype(np.float16).astype(np.float32)).matrix
    q, s = K.norm_quant(x, None, 0.0)
    for mat, kw in ((ter, dict(quant=True)), (ter, dict(sx=s)), (dense, {}), (ter, dict(sx=s, glu=K.ACT_RELU2))):
        xin = q if "sx" in kw else x
        want = K.matmul(xin, mat, **kw)
        out = torch.full(want.shape, float("nan"), device=DEVICE)
        got = K.matmul(xin, mat, out=out, **kw)
        assert got.data_ptr() == out.data_ptr()
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    for bad in (torch.zeros((m, n + 1), device=DEVICE), torch.zeros((m, n), dtype=torch.float16, device=DEVICE),
                torch.zeros((m, 2 * n), device=DEVICE)[:, ::2]):
        with pytest.raises(ValueError, match="out must be a contiguous float32"):
            K.matmul(x, ter, quant=True, out=bad)


@pytest.mark.parametrize("m", [1, 4, 8, 20, 40])  # the gemv; _tgemm_kernel (16-token and 64-token blocks); few
@pytest.mark.parametrize("first", [True, False])  # every gemv quantizes first / none does (PROLOGUE_*)
@pytest.mark.parametrize("tile", [True, False])
def test_fused_prologue_and_epilogues_equal_the_separate_kernels(m, first, tile, monkeypatch):
    """RMSNorm + quantization in the matmul's prologue (or, for gemvs of many programs, in norm_quant first),
    residual add and gated activation in its epilogue, and the next linear's norm + quantization of the residual
    rows (next_norm) give exactly what norm_quant + matmul + torch ops give, with the gemv's whole-tile dot
    product and the chunked one. The gated activation is each kernel's epilogue (torch's three ops only for a
    GEMM whose rows are not (gate n, up n) pairs)."""
    monkeypatch.setattr(K, "PROLOGUE_PROGRAMS_PER_SM", 0 if first else 1 << 30)
    monkeypatch.setattr(K, "PROLOGUE_MAX_TOKENS", 0 if first else K.GEMV_MAX_TOKENS)
    monkeypatch.setattr(K, "GEMV_TILE_WORDS", 1024 if tile else 0)
    torch_glu = []
    glu_torch = K._glu_torch
    monkeypatch.setattr(K, "_glu_torch", lambda y, *a: torch_glu.append(y.shape[0]) or glu_torch(y, *a))
    k, inter = 192, 333
    x = rng().standard_normal((m, k)).astype(np.float32)
    nw = dev(rng().uniform(0.5, 1.5, k).astype(np.float32))
    be = backend()
    w = be.prepare_ternary(random_ternary(k, k, 0.7))
    gu = be.prepare_ternary(random_ternary(2 * inter, k, 1.3))
    q, s = K.norm_quant(dev(x), nw, 1e-5)
    sep = K.matmul(q, w, sx=s)
    fused = K.matmul(dev(x), w, norm=nw, eps=1e-5, quant=True)
    torch.testing.assert_close(fused, sep, rtol=0, atol=0)
    res = dev(x).clone()
    K.matmul(dev(x), w, norm=nw, eps=1e-5, quant=True, out=res, residual=True)
    torch.testing.assert_close(res, dev(x) + sep, rtol=0, atol=0)
    nw2 = dev(rng().uniform(0.5, 1.5, k).astype(np.float32))
    for _ in range(2):  # the next norm by the gemv's last program; again: its counter was reset for the next launch
        res2, nq = dev(x).clone(), torch.zeros((m, k), dtype=torch.int8, device=DEVICE)
        ns = dev(np.zeros(m, np.float32))
        K.matmul(dev(x), w, norm=nw, eps=1e-5, quant=True, out=res2, residual=True, next_norm=(nw2, 1e-6, nq, ns))
        want_q, want_s = K.norm_quant(res, nw2, 1e-6)
        torch.testing.assert_close(res2, res, rtol=0, atol=0)
        torch.testing.assert_close(nq, want_q, rtol=0, atol=0)
        torch.testing.assert_close(ns, want_s, rtol=0, atol=0)
    for act in (K.ACT_RELU2, K.ACT_SILU):
        y = K.matmul(q, gu, sx=s)
        g, u = y[:, :inter], y[:, inter:]
        want = (torch.square(torch.clamp_min(g, 0)) if act == K.ACT_RELU2 else g / (1 + torch.exp(-g))) * u
        got = K.matmul(dev(x), gu, norm=nw, eps=1e-5, quant=True, glu=act)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch_glu == []
    if m > K.GEMV_MAX_TOKENS and not K.FEW_MIN <= m <= K.FEW_MAX:
        gu.repair(4)  # rows 4 apart: _tgemm_kernel's product, then torch's gated activation
        got = K.matmul(dev(x), gu, norm=nw, eps=1e-5, quant=True, glu=K.ACT_RELU2)
        y = K.matmul(q, gu, sx=s)
        g, u = y[:, :inter], y[:, inter:]
        torch.testing.assert_close(got, torch.square(torch.clamp_min(g, 0)) * u, rtol=1e-6, atol=1e-6)
        assert torch_glu == [m]


@pytest.mark.parametrize("m", [1, 2, 24])
@pytest.mark.parametrize("head", ["f16", "int8"])
def test_lm_head_matches_reference(m, head):
    v, k = 1001, 192
    table = (rng().standard_normal((v, k)) * 0.05).astype(np.float16).astype(np.float32)
    x = rng().standard_normal((m, k)).astype(np.float32)
    ref = NumpyBackend(lm_head=head)
    want = ref.dense_matmul(x, ref.prepare_dense(table))
    be = backend(lm_head=head)
    got = host(be.dense_matmul(dev(x), be.prepare_dense(table)))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("m", [1, 3, 24])  # the f16 gemv (m <= 4) and the gemm; int8 always the gemm
@pytest.mark.parametrize("head", ["f16", "int8"])
def test_lm_head_argmax_keys_equal_argmax_of_its_logits(m, head):
    """The head folds each token's argmax into a key as it stores the logits: the key gives numpy's argmax of
    those logits, ties (duplicated rows at the top) to the lowest id, and a row with no finite maximum raises."""
    v, k = 1001, 192
    # multiples of 1/16 and 1/4: every sum is exact in float32 in any order, so equal rows give equal logits
    table = rng().integers(-8, 9, (v, k)).astype(np.float32) / 16
    x = rng().integers(-8, 9, (m, k)).astype(np.float32) / 4
    top = rng().choice(v, 3, replace=False)
    table[top] = table[top[0]]  # three equal rows
    x[0] = table[top[0]] * 16  # token 0's best logit is theirs: a three-way tie
    be = backend(lm_head=head)
    mat = be.prepare_dense(table)
    mat = be._int8_head(mat) if head == "int8" else mat.matrix
    keys = K.new_argmax_keys(m, DEVICE)
    if head == "int8":
        q, s = K.norm_quant(dev(x), None, 0.0)
        logits = host(K.matmul(q, mat, sx=s, argmax=keys))
    else:
        logits = host(K.matmul(dev(x), mat, argmax=keys))
    got = K.argmax_from_keys(keys)
    np.testing.assert_array_equal(got, logits.argmax(1))
    assert got[0] == top.min()
    keys = K.new_argmax_keys(m, DEVICE)
    nan = np.full((m, k), np.nan, dtype=np.float32)
    K.matmul(dev(nan), be.prepare_dense(table).matrix, argmax=keys)
    with pytest.raises(ValueError, match="no finite maximum"):
        K.argmax_from_keys(keys)
    with pytest.raises(ValueError, match="argmax keys"):
        K.matmul(dev(x), be.prepare_dense(table).matrix, argmax=K.new_argmax_keys(m - 1, DEVICE))


def test_rope_matches_reference():
    x = rng().standard_normal((7, 5, 64)).astype(np.float32)
    pos = rng().integers(0, 3000, 7)
    got = host(backend().rope(dev(x), pos, 500000.0))
    np.testing.assert_array_equal(got, np_rope(x, pos, 500000.0))  # the reference's tables and roundings


def _attention_reference(q, k, v, n):
    """q [Hq, D] attends to k/v [n, Hkv, D] (float32)."""
    ref = NumpyBackend()
    cache = ref.make_cache(1, k.shape[1], k.shape[2], n)
    ref.kv_append(cache, 0, k[:n], v[:n], 0)
    return ref.attention(q[None], cache, 0, n - 1)[0]


# n = 100 with 3 splits: the last split (per-warp softmax states: 3 blocks of 16) holds 4 positions, so most of its
# warps see none (kernels._attn_warp_states); 1 split of 200 / 700 and 7 of 700 take that path too
@pytest.mark.parametrize("n", [1, 100, 200, 700])
@pytest.mark.parametrize("splits", [1, 3, 7, 64, None])  # 64: most splits past a short context (the merge skips them)
@pytest.mark.parametrize("early", [False, True])  # True: the tables read before the wait, as in the decode step
def test_split_kv_decode_attention_matches_reference(n, splits, early):
    b, hq, hkv, d, max_len = 3, 8, 2, 64, 720
    q = rng().standard_normal((b, hq, d)).astype(np.float32)
    k = rng().standard_normal((b, max_len, hkv, d)).astype(np.float16)
    v = rng().standard_normal((b, max_len, hkv, d)).astype(np.float16)
    lengths = np.array([n, max(1, n // 2), min(max_len, n + 5)], dtype=np.int32)
    got = host(K.decode_attention(dev(q), dev(k), dev(v), dev(lengths), num_splits=splits, early=early))
    for i in range(b):
        want = _attention_reference(q[i], k[i].astype(np.float32), v[i].astype(np.float32), int(lengths[i]))
        np.testing.assert_allclose(got[i], want, rtol=0, atol=1e-5)  # float16 storage, float32 math


# the short-context path (no splits, no merge): contexts shorter than one step of its warps (most warps see no
# position), exactly one step, several steps; one to four query heads a program (3 of a group of 3 falls back to
# 1); fewer positions a warp; each step's rows asked for during the step before (pre) or not
@pytest.mark.parametrize("n", [1, 37, 64, 150])
@pytest.mark.parametrize("heads,pb,hq,pre", [(1, 2, 8, True), (4, 2, 8, False), (2, 4, 6, True), (3, 8, 6, False)])
def test_short_context_decode_attention_matches_reference(n, heads, pb, hq, pre, monkeypatch):
    """The short-context kernel against the reference; the split kernel given the same sequences with a short_max
    between their lengths: the short ones bit for bit as the short kernel gives them (batched decoding equal to
    decoding alone), the others as the split kernel alone gives them."""
    monkeypatch.setattr(K, "ATTN_SHORT_HEADS", heads)
    monkeypatch.setattr(K, "ATTN_SHORT_PB", pb)
    monkeypatch.setattr(K, "ATTN_SHORT_PREFETCH", pre)
    b, hkv, d, max_len = 3, 2, 64, 160
    q = rng().standard_normal((b, hq, d)).astype(np.float32)
    k = rng().standard_normal((b, max_len, hkv, d)).astype(np.float16)
    v = rng().standard_normal((b, max_len, hkv, d)).astype(np.float16)
    lengths = np.array([n, max(1, n // 2), min(max_len, n + 5)], dtype=np.int32)
    early = n != 37  # early with prefetch and few rows: the short kernel reads the older rows before its wait
    args = (dev(q), dev(k), dev(v), dev(lengths))
    got = host(K.decode_attention(*args, early=early, short=True))
    for i in range(b):
        want = _attention_reference(q[i], k[i].astype(np.float32), v[i].astype(np.float32), int(lengths[i]))
        np.testing.assert_allclose(got[i], want, rtol=0, atol=1e-5)
    short_max = int(lengths[1])  # sequence 1 (and 0 when n = 1) short, the others split
    splits = 3 if heads == 1 else 1  # fewer splits than head groups: a program takes several
    mixed = host(K.decode_attention(*args, num_splits=splits, early=early, short_max=short_max))
    split = host(K.decode_attention(*args, num_splits=splits, early=early))
    for i in range(b):
        np.testing.assert_array_equal(mixed[i], (got if lengths[i] <= short_max else split)[i])


@pytest.mark.parametrize("kv_dtype", ["f32", "f16"])
def test_prefill_and_decode_attention_through_the_backend(kv_dtype):
    be, ref = backend(kv_dtype=kv_dtype), NumpyBackend()
    hq, hkv, d, n = 6, 2, 32, 90
    c, rc = be.make_cache(2, hkv, d, 128), ref.make_cache(2, hkv, d, 128)
    k = rng().standard_normal((n, hkv, d)).astype(np.float32)
    v = rng().standard_normal((n, hkv, d)).astype(np.float32)
    if kv_dtype == "f16":
        k, v = k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)
    tol = 1e-5
    for lo, hi in ((0, 40), (40, 89), (89, 90)):  # chunked prefill, then one decode position
        be.kv_append(c, 1, dev(k[lo:hi]), dev(v[lo:hi]), lo)
        ref.kv_append(rc, 1, k[lo:hi], v[lo:hi], lo)
        q = rng().standard_normal((hi - lo, hq, d)).astype(np.float32)
        got = host(be.attention(dev(q), c, 1, lo))
        np.testing.assert_allclose(got, ref.attention(q, rc, 1, lo), rtol=0, atol=tol)


# ----------------------------------------------------------------------------------------- whole model

def models(cfg, seed, **options):
    """The reference and the cuda model; a float16 KV cache on both (the reference stores the same float16-rounded
    K and V): against a float32 reference, one rounding flip of the next int8 quantization moves these tiny
    models' logits by ~1e-2 x max|logit| and the argmax of ~8% of them falls under the bar (test_cpu_model)."""
    w = sixteen_bit_weights(cfg, seed)
    ref = NumpyBackend(kv_dtype=options.get("kv_dtype", "f32"))
    return build_model(cfg, w, ref), build_model(cfg, w, backend(**options))


# short_max: contexts of 12-27 positions all short (the default), crossing it at 20, or never short (0)
@pytest.mark.parametrize("name,kv_dtype,short_max", [("bitnet-int8", "f32", None), ("bitnet-int8", "f16", None),
                                                     ("llama-f32act", "f32", None), ("bitnet-int8", "f16", 20),
                                                     ("llama-f32act", "f32", 0)])
def test_prompt_and_16_decode_steps_match_reference(name, kv_dtype, short_max, monkeypatch):
    if short_max is not None:
        monkeypatch.setattr(K, "ATTN_SHORT_MAX", short_max)
    ref, fast = models(CONFIGS[name], seed=fresh_seed(), kv_dtype=kv_dtype)
    err, agree, _, _ = prompt_and_decode(ref, fast)
    assert err <= BOUND[name], f"max|diff| = {err:.2e} x max|logit|"
    assert agree.mean() >= 0.95, f"argmax agrees at {agree.mean():.0%} of positions"


@pytest.mark.parametrize("short_max", [8, 0, 96])  # 8: the steps alternate between the two attention graphs
def test_decode_steps_take_the_fused_path_and_graphs_replay_exactly(short_max, monkeypatch):
    """Graph replays (new positions, new cache sets each step) equal the same fused step run eagerly, the
    graphs with the step's tables read before each kernel's wait (EARLY_TABLES), the eager steps after it."""
    monkeypatch.setattr(K, "ATTN_SHORT_MAX", short_max)
    cfg = CONFIGS["bitnet-int8"]
    w = random_weights(cfg, seed=11)
    eager = build_model(cfg, w, backend(graphs=False))
    graphed = build_model(cfg, w, backend())
    prompts = [rng().integers(0, cfg.vocab_size, n) for n in (4, 9, 2)]
    outs = []
    for net, early in ((eager, False), (graphed, True)):
        monkeypatch.setattr(K, "EARLY_TABLES", early)
        caches = [net.make_cache(64) for _ in prompts]
        logits = net.forward_batch(list(zip(prompts, caches)), last_only=True)
        toks, seen = [int(l[-1].argmax()) for l in logits], []
        for step in range(6):
            live = list(range(3)) if step % 2 == 0 else [2, 0]  # the batch changes between steps
            logits = net.forward_batch([(np.array([toks[i]]), caches[i]) for i in live], last_only=True)
            for i, l in zip(live, logits):
                toks[i] = int(l[-1].argmax())
            seen.append(np.concatenate(logits))
        outs.append(seen)
    assert ("fused decode steps", len(eager.backend._steps)) == ("fused decode steps", 2)  # buckets 4 and 2
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
    if DEVICE == "cuda":  # each class's first step in a bucket runs eagerly, its next ones replay its graph
        assert all(s.graphs for s in graphed.backend._steps.values())
        classes = {short for s in graphed.backend._steps.values() for short in s.graphs}
        assert classes == ({True, False} if short_max == 8 else {short_max > 0})


def test_greedy_decode_steps_pick_the_argmax_of_the_same_steps_logits():
    """decode_greedy (the graph's lm_head picks the token; 8 bytes a sequence to the host) gives, step after step
    and for a changing batch, the argmax of the logits the same step gives, and leaves the caches alike."""
    cfg = CONFIGS["bitnet-int8"]
    w = random_weights(cfg, seed=13)
    net = build_model(cfg, w, backend())
    prompts = [rng().integers(0, cfg.vocab_size, n) for n in (5, 3, 8)]
    caches = [net.make_cache(64) for _ in prompts]
    logits = net.forward_batch(list(zip(prompts, caches)), last_only=True)
    toks = [int(l[-1].argmax()) for l in logits]
    for step in range(3):
        live = [0, 1, 2] if step % 2 == 0 else [2, 0]
        items = [(np.array([toks[i]]), caches[i]) for i in live]
        want = [int(l[-1].argmax()) for l in net.forward_batch(items, last_only=True)]
        for i in live:
            caches[i].trim(caches[i].length - 1)  # the same step again, greedily
        got = net.decode_greedy(items)
        assert got.dtype == np.int64 and got.tolist() == want
        for i, t in zip(live, want):
            toks[i] = t
    assert [c.length for c in caches] == [5 + 3, 3 + 2, 8 + 3]
    if DEVICE == "cuda":
        assert all(s.graph is not None for s in net.backend._steps.values())


def test_greedy_chain_runs_a_step_ahead_and_gives_the_step_by_step_tokens():
    """greedy_decode on the cuda backend keeps one step in flight (its input the last step's argmax, never on the
    host): the same tokens as decode_greedy step by step; stopping early, max_steps and a full cache leave the
    cache as step-by-step decoding would; a second chain while one is open decodes step by step; a cache changed
    under an open chain is an error."""
    cfg = CONFIGS["bitnet-int8"]
    net = build_model(cfg, random_weights(cfg, seed=14), backend())
    prompt = rng().integers(0, cfg.vocab_size, 6)
    ref, cache = net.make_cache(16), net.make_cache(16)
    first = int(net.forward_batch([(prompt, ref)], last_only=True)[0][-1].argmax())
    net.forward_batch([(prompt, cache)], last_only=True)
    want, t = [], first
    while ref.length < ref.max_len:
        t = int(net.decode_greedy([([t], ref)])[0])
        want.append(t)
    assert list(net.greedy_decode(first, cache)) == want and cache.length == 16  # to the full cache
    assert net.backend._steps[(id(net), "chain")].runs == 10  # through the chain's own step
    cache.trim(6)
    steps = net.greedy_decode(first, cache)
    got = [next(steps) for _ in range(3)]
    steps.close()  # a step was in flight: dropped, the cache holds what the three tokens needed
    assert got == want[:3] and cache.length == 6 + 3
    cache.trim(6)
    assert list(net.greedy_decode(first, cache, max_steps=4)) == want[:4] and cache.length == 6 + 4
    cache.trim(6)
    other = net.make_cache(16)
    net.forward_batch([(prompt, other)], last_only=True)
    a = net.greedy_decode(first, cache)
    assert next(a) == want[0]
    assert list(net.greedy_decode(first, other, max_steps=5)) == want[:5]  # step by step: the chain is taken
    assert [next(a) for _ in range(2)] == want[1:3]
    cache.trim(2)
    with pytest.raises(RuntimeError, match="cache changed"):
        next(a)


def test_warmup_captures_each_bucket_and_leaves_results_unchanged():
    """The server's warm-up (compile + capture before the first request) runs throwaway sequences only."""
    cfg = CONFIGS["bitnet-int8"]
    w = random_weights(cfg, seed=12)
    cold, warm = build_model(cfg, w, backend()), build_model(cfg, w, backend())
    warm.backend.warmup(warm, max_batch=3)
    assert sorted(k[1] for k in warm.backend._steps) == [1, 2, 4]  # buckets up to the first >= 3
    if DEVICE == "cuda":  # both attention graphs of each bucket (the tiny model's contexts reach past the short)
        assert all(sorted(s.graphs) == [False, True] for s in warm.backend._steps.values())
    ids = rng().integers(0, cfg.vocab_size, 7)
    outs = []
    for net in (cold, warm):
        cache = net.make_cache(32)
        seq = [net.forward(ids, cache)[-1]] + [net.forward(np.array([t]), cache)[-1] for t in (3, 1, 4)]
        outs.append(np.stack(seq))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_decode_graph_benchmark_helper_fills_captures_and_times(monkeypatch):
    """benchmarks/decode_graph.py (gpu_step.py's and gpu_ab.py's step): caches filled to a context, three greedy
    steps that leave them there, the bucket's graph (captured on a GPU, none in the interpreter) timed."""
    import types

    cfg = CONFIGS["bitnet-int8"]
    net = build_model(cfg, random_weights(cfg, seed=15), backend())
    monkeypatch.setattr("onebit.load", lambda *a, **kw: types.SimpleNamespace(net=net, backend=net.backend))
    mod = benchmark_script("decode_graph")
    dg = mod.DecodeGraph("tiny", "int8", 3, 40)
    assert dg.bucket == 4 and len(dg.caches) == 3 and len(dg.ids[0]) == 41
    dg.fill(30)
    assert [c.length for c in dg.caches] == [30, 30, 30]
    graph = dg.capture(30)
    assert [c.length for c in dg.caches] == [30, 30, 30]
    if DEVICE == "cuda":
        times = dg.time(graph, 3, timings=2)
        assert len(times) == 2 and all(t > 0 for t in times)
    else:
        assert graph is None


def test_decode_past_the_rope_tables_grows_them():
    """A decode step whose RoPE tables end before the position grows them (and captures its graph again)
    instead of reading past them."""
    cfg = CONFIGS["bitnet-int8"]
    ref, fast = models(cfg, seed=fresh_seed())
    ids = rng().integers(0, cfg.vocab_size, 13)
    rc, fc = ref.make_cache(32), fast.make_cache(32)
    ref.forward(ids[:8], rc)
    fast.forward(ids[:8], fc)
    for net, c in ((ref, rc), (fast, fc)):
        net.forward(ids[8:9], c)  # the first fused step (bucket 1)
    step = next(iter(fast.backend._steps.values()))
    step.cos, step.sin = step.cos[:10], step.sin[:10]  # as if the tables ended at position 9
    for t in ids[9:]:
        a, b = ref.forward(np.array([t]), rc)[-1], fast.forward(np.array([t]), fc)[-1]
        assert np.abs(a - b).max() <= BOUND["bitnet-int8"] * np.abs(a).max()
    assert step.cos.shape[0] > 12 and step.runs >= 1


@pytest.mark.parametrize("n_seq,short_max", [(4, None), (5, None), (18, None), (5, 8)])  # 8: short and long mixed
def test_batched_decode_equals_decoding_alone(n_seq, short_max, monkeypatch):
    if short_max is not None:
        monkeypatch.setattr(K, "ATTN_SHORT_MAX", short_max)
    cfg = CONFIGS["bitnet-int8"]
    _, model = models(cfg, seed=3)
    prompts = [rng().integers(0, cfg.vocab_size, n) for n in rng().integers(1, 12, n_seq)]
    batched, alone, caches = greedy_batched_and_alone(model, prompts, steps=6)
    assert batched == alone
    assert [c.length for c in caches] == [len(p) + 5 for p in prompts]


def test_int8_lm_head_changes_logits_little():
    """Per-row int8 lm_head vs the 16-bit one on the same model: every logit moves by at most what rounding to
    int8 can move it (fresh tokens each run)."""
    cfg = CONFIGS["bitnet-int8"]
    w = random_weights(cfg, seed=5)
    w["model.embed_tokens.weight"] = bf16(w["model.embed_tokens.weight"])
    be8 = backend(lm_head="int8")
    m16, m8 = build_model(cfg, w, backend()), build_model(cfg, w, be8)
    heads = []  # the head's input rows, as the int8 model's head matmul gets them (normalized)
    dense = be8.dense_matmul
    be8.dense_matmul = lambda x, wd: heads.append(
        host(K.norm_quant(x.x, x.weight, x.eps, quant=False) if isinstance(x, Normed) else be8._t(x))) or dense(x, wd)
    ids = rng().integers(0, cfg.vocab_size, 24)
    a, b = m16.forward(ids, m16.make_cache(32)), m8.forward(ids, m8.make_cache(32))
    assert_int8_head_moves_logits_within_rounding(a, b, heads[-1], w["model.embed_tokens.weight"])  # tied


def test_full_cache_and_foreign_cache_are_clear_errors():
    cfg = CONFIGS["bitnet-int8"]
    _, model = models(cfg, seed=2)
    cache = model.make_cache(4)
    model.forward(np.arange(4), cache)
    with pytest.raises(ValueError, match="context full"):
        model.forward(np.array([1]), cache)
    assert cache.length == 4  # nothing was written
    with pytest.raises(ValueError, match="make_cache"):
        model.forward(np.array([1]), NumpyBackend().make_cache(2, 1, 64, 8))


@pytest.mark.skipif(DEVICE != "cuda", reason="onebit.load picks the cuda backend only on a GPU")
def test_load_auto_picks_cuda_and_generates():
    import onebit

    m = onebit.load("tiny-random")
    assert m.backend.name == "cuda"
    text = "".join(m.generate("Once upon a time", max_tokens=12, temperature=0.0))
    assert len(m.tokenizer.encode(text)) >= 6
    ref = onebit.load("tiny-random", backend="numpy", kv_dtype="f32")
    ids = m.tokenizer.encode("Once upon a time there was")
    a, b = ref.logits(ids), m.logits(ids)
    assert np.abs(a - b).max() <= 3e-2 * np.abs(a).max()
