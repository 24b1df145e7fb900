"""Whole small models on the cpu backend against the numpy reference: prompt + decode through the KV cache,
batched decode, and the int8 lm_head's effect on the logits."""

import numpy as np
import pytest

from model_parity import BOUND, CONFIGS, assert_int8_head_moves_logits_within_rounding, bf16, fresh_seed, \
    greedy_batched_and_alone, prompt_and_decode, run, sixteen_bit_weights
from onebit.kernels.numpy_ref import NumpyBackend
from onebit.models import build_model
from onebit.synth import random_weights

cpu = pytest.importorskip("onebit.kernels.cpu", reason="cpu backend package missing")
if not cpu.CpuBackend.is_available():
    pytest.skip("the cpu backend's C extension is not built (pip install -e . with a C compiler)",
                allow_module_level=True)

def models(cfg, seed, ref_options=None, **cpu_options):
    w = sixteen_bit_weights(cfg, seed)
    return (build_model(cfg, w, NumpyBackend(**(ref_options or {}))),
            build_model(cfg, w, cpu.CpuBackend(threads=2, **cpu_options)))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prompt_and_16_decode_steps_match_reference(name):
    ref, fast = models(CONFIGS[name], seed=fresh_seed())
    assert isinstance(fast.backend, cpu.CpuBackend)
    err, agree, _, _ = prompt_and_decode(ref, fast)
    assert err <= BOUND[name], f"max|diff| = {err:.2e} x max|logit|"
    assert agree.mean() >= 0.95, f"argmax agrees at {agree.mean():.0%} of positions"


def test_f16_kv_cache_matches_the_f16_reference():
    """kv_dtype="f16" on both backends (the numpy one stores the same float16-rounded K and V): the project's
    bars, on every fresh model, as for float32 caches."""
    cfg = CONFIGS["bitnet-int8"]
    ref, fast = models(cfg, seed=fresh_seed(), ref_options={"kv_dtype": "f16"}, kv_dtype="f16")
    c = fast.make_cache(64)
    assert c.k.dtype == c.v.dtype == np.float16 and ref.make_cache(64).k.dtype == np.float16
    err, agree, _, _ = prompt_and_decode(ref, fast)
    assert err <= BOUND["bitnet-int8"], f"max|diff| = {err:.2e} x max|logit|"
    assert agree.mean() >= 0.95, f"argmax agrees at {agree.mean():.0%} of positions"


def test_f16_kv_cache_against_the_fp32_reference():
    """kv_dtype="f16" (what ``onebit.load`` picks for int8-activation models) against the numpy backend's
    float32 cache. Rounding K and V to float16 (2**-11 relative) flips a few roundings of the next int8
    activation quantization, and on these tiny random models one flip alone moves the logits by ~1e-2 x
    max|logit|. Measured over 300 fresh models: max|diff| / max|logit| median 1.8e-2, above the 3e-2 bar for
    3% of single models; argmax agreement 98% on average, under 95% for 8% of single models (float32 cache:
    median 4e-7, always within both bars). So the bars are held on 10 fresh models together: the median
    model's error, and the argmax over all their positions (each fails about once in 10^4 runs)."""
    cfg = CONFIGS["bitnet-int8"]
    errs, agree = [], []
    for _ in range(10):
        ref, fast = models(cfg, seed=fresh_seed(), kv_dtype="f16")
        err, a, want, _ = prompt_and_decode(ref, fast)
        assert ref.make_cache(8).k.dtype == np.float32 and fast.make_cache(8).k.dtype == np.float16
        assert err < 0.1, f"one model's logits moved by {err:.2e} x max|logit|"  # ~3x the worst seen
        errs.append(err)
        agree.append(a)
    agree = np.concatenate(agree)
    assert np.median(errs) <= BOUND["bitnet-int8"], f"median max|diff| = {np.median(errs):.2e} x max|logit|"
    assert agree.mean() >= 0.95, f"argmax agrees at {agree.mean():.1%} of positions"


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_load_kv_dtype_auto_explicit_and_bytes(backend):
    import onebit
    from onebit.loader import resolve_kv_dtype

    def cache_of(**kw):
        return onebit.load("tiny-random", backend=backend, tokenizer=False, **kw).make_cache(16)

    auto = cache_of()  # tiny-random is a BitNet: int8 activations -> f16
    assert auto.k.dtype == auto.v.dtype == np.float16
    f32 = cache_of(kv_dtype="f32")
    assert f32.k.dtype == np.float32 and f32.nbytes() == 2 * auto.nbytes()
    assert f32.nbytes() / f32.max_len == 2 * 2 * 2 * 64 * 4  # layers x (K, V) x kv heads x head_dim x 4 bytes
    assert cache_of(act_bits=None).k.dtype == np.float32  # 16-bit activations -> f32
    assert cache_of(act_bits=None, kv_dtype="f16").k.dtype == np.float16
    assert cache_of(kv_dtype="f16").k.dtype == np.float16
    with pytest.raises(ValueError, match="kv_dtype"):
        cache_of(kv_dtype="bf16")
    assert resolve_kv_dtype("auto", CONFIGS["bitnet-int8"]) == "f16"
    assert resolve_kv_dtype("auto", CONFIGS["llama-f32act"]) == "f32"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_layer_ops_give_identical_logits(name):
    """The cpu backend fuses norm -> linear -> residual add / glu into one call per linear; the logits are
    bit-identical to the same backend running them as separate ops."""
    cfg = CONFIGS[name]
    w = random_weights(cfg, seed=fresh_seed())
    fused, plain = cpu.CpuBackend(threads=2), cpu.CpuBackend(threads=2)
    plain.fused_ternary = False
    plain.decode_batch = lambda *args: None  # every decode step as separate ops, too
    a, b = build_model(cfg, w, fused), build_model(cfg, w, plain)
    tokens = np.random.default_rng().integers(0, cfg.vocab_size, 20)
    assert np.array_equal(run(a, tokens, 9), run(b, tokens, 9))


@pytest.mark.parametrize("isa", cpu.supported_isas())
@pytest.mark.parametrize("kv_dtype", ["f32", "f16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_whole_decode_step_in_one_call_is_bit_identical(name, kv_dtype, isa):
    """decode_batch runs one sequence's decode step through every layer in one C call; its logits and caches
    equal the per-op path's bit for bit, and it is the path taken."""
    cfg = CONFIGS[name]
    w = random_weights(cfg, seed=fresh_seed())
    one, ops = (cpu.CpuBackend(threads=2, kv_dtype=kv_dtype, isa=isa) for _ in range(2))
    ops.decode_batch = lambda *args: None
    a, b = build_model(cfg, w, one), build_model(cfg, w, ops)
    tokens = np.random.default_rng().integers(0, cfg.vocab_size, 20)
    ca, cb = a.make_cache(64), b.make_cache(64)
    la = [a.forward(tokens[:5], ca)] + [a.forward(tokens[i:i + 1], ca) for i in range(5, 20)]
    lb = [b.forward(tokens[:5], cb)] + [b.forward(tokens[i:i + 1], cb) for i in range(5, 20)]
    assert np.array_equal(np.concatenate(la), np.concatenate(lb))
    assert np.array_equal(ca.k, cb.k) and np.array_equal(ca.v, cb.v) and ca.length == cb.length == 20
    assert one._decode_plan(a) is not None  # the one-call step ran, not a silent fallback


def test_kv_store_rounds_to_half_exactly_as_numpy():
    """The C KV store's float32 -> float16 (cache appends, the decode step) equals NumPy's astype, edge cases
    included: ties to even, subnormals, overflow to inf, NaN."""
    r = np.random.default_rng()
    bits = r.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    special = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e9, -1e9, np.inf, -np.inf, 2.0**-24, 2.0**-25,
                        1.5 * 2.0**-25, 2.0**-14, 2.0**-14 - 2.0**-25, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11],
                       dtype=np.float32)
    vals = np.concatenate([bits.view(np.float32), special, r.standard_normal(40_000).astype(np.float32) * 1e-5])
    vals = vals[: vals.size // 64 * 64].reshape(-1, 1, 64)
    be = cpu.CpuBackend(threads=1, kv_dtype="f16")
    cache = be.make_cache(1, 1, 64, vals.shape[0])
    be.kv_append(cache, 0, vals, vals, 0)
    with np.errstate(over="ignore", invalid="ignore"):
        want = vals[:, 0].astype(np.float16)
    got = cache.k[0, 0]
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))
    with pytest.raises(ValueError, match="KV cache full"):
        be.kv_append(cache, 0, vals[:1], vals[:1], vals.shape[0])
    wide = cpu.CpuKVCache(1, 1, 64, 8, dtype=np.float64)  # a layout the C store does not write: NumPy does
    finite = vals[-3:]  # the normal samples
    be.kv_append(wide, 0, finite, finite, 2)
    assert np.array_equal(wide.v[0, 0, 2:5], finite[:, 0].astype(np.float64))


def test_batched_decode_equals_decoding_alone():
    cfg = CONFIGS["bitnet-int8"]
    _, model = models(cfg, seed=3)
    r = np.random.default_rng()
    prompts = [r.integers(0, cfg.vocab_size, n) for n in (3, 9, 5, 1)]  # ragged batched prefill
    batched, alone, caches = greedy_batched_and_alone(model, prompts, steps=8)
    assert batched == alone
    assert [c.length for c in caches] == [len(p) + 7 for p in prompts]


@pytest.mark.parametrize("kind", ["cpu", "numpy"])
def test_decode_greedy_is_the_argmax_of_the_same_steps_logits(kind):
    """CausalLM.decode_greedy (one sequence: the cpu backend's one-call step; several: the per-op path; numpy:
    the per-op path) picks the argmax of the logits forward_batch gives for the same step, and moves the caches
    the same way; more than one new token per sequence is refused before anything runs."""
    cfg = CONFIGS["bitnet-int8"]
    ref, model = models(cfg, seed=fresh_seed())
    net = model if kind == "cpu" else ref
    r = np.random.default_rng()
    prompts = [r.integers(0, cfg.vocab_size, n) for n in (6, 2, 4)]
    caches = [net.make_cache(32) for _ in prompts]
    toks = [int(l[-1].argmax()) for l in net.forward_batch(list(zip(prompts, caches)), last_only=True)]
    for live in ([0], [0, 1, 2], [2], [1, 0]):
        items = [([toks[i]], caches[i]) for i in live]
        want = [int(l[-1].argmax()) for l in net.forward_batch(items, last_only=True)]
        for i in live:
            caches[i].trim(caches[i].length - 1)
        got = net.decode_greedy(items)
        assert got.tolist() == want
        for i, t in zip(live, want):
            toks[i] = t
    assert [c.length for c in caches] == [6 + 3, 2 + 2, 4 + 2]
    with pytest.raises(ValueError, match="one new token"):
        net.decode_greedy([([1, 2], caches[0])])
    assert caches[0].length == 9


def test_int8_lm_head_changes_logits_little():
    """Per-row int8 lm_head vs the 16-bit one on the same model: every logit moves by at most what rounding to
    int8 can move it (fresh tokens each run)."""
    cfg = CONFIGS["bitnet-int8"]
    w = random_weights(cfg, seed=5)
    w["model.embed_tokens.weight"] = bf16(w["model.embed_tokens.weight"])
    m16 = build_model(cfg, w, cpu.CpuBackend(threads=2))
    be8 = cpu.CpuBackend(threads=2, lm_head="int8")
    m8 = build_model(cfg, w, be8)
    heads = []  # the head's input rows, as the int8 model's head matmul gets them
    dense = be8.dense_matmul
    be8.dense_matmul = lambda x, wd: heads.append(np.array(x, np.float32)) or dense(x, wd)
    ids = np.random.default_rng().integers(0, cfg.vocab_size, 24)
    a, b = m16.forward(ids, m16.make_cache(32)), m8.forward(ids, m8.make_cache(32))
    assert_int8_head_moves_logits_within_rounding(a, b, heads[-1], w["model.embed_tokens.weight"])  # tied


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("kind", ["numpy", "cpu"])
def test_last_only_prefill_caches_every_token_and_matches_the_full_prefill(name, kind):
    """``forward_batch(last_only=True)`` (the engine's prefill) runs the last layer's attention output, o
    projection and MLP for each segment's last token only: the logits of those tokens are the full prefill's
    (within the project's bars), every token's K/V is still cached, bit for bit, and decoding goes on alike."""
    cfg = CONFIGS[name]
    w = sixteen_bit_weights(cfg, fresh_seed())
    model = build_model(cfg, w, NumpyBackend() if kind == "numpy" else cpu.CpuBackend(threads=2))
    r = np.random.default_rng(fresh_seed())
    prompts = [r.integers(0, cfg.vocab_size, n) for n in (9, 1, 23)]
    full_caches, last_caches = [model.make_cache(40) for _ in prompts], [model.make_cache(40) for _ in prompts]
    full = model.forward_batch(list(zip(prompts, full_caches)))
    last = model.forward_batch(list(zip(prompts, last_caches)), last_only=True)
    for f, l, p, fc, lc in zip(full, last, prompts, full_caches, last_caches):
        assert f.shape == (len(p), cfg.vocab_size) and l.shape == (1, cfg.vocab_size)
        assert np.abs(l[0] - f[-1]).max() <= BOUND[name] * np.abs(f[-1]).max()
        assert np.argmax(l[0]) == np.argmax(f[-1])
        assert fc.length == lc.length == len(p)
        assert np.array_equal(np.asarray(fc.k), np.asarray(lc.k)) and np.array_equal(np.asarray(fc.v), np.asarray(lc.v))
    nxt = [np.array([t]) for t in r.integers(0, cfg.vocab_size, len(prompts))]
    a = model.forward_batch(list(zip(nxt, full_caches)))
    b = model.forward_batch(list(zip(nxt, last_caches)))
    for x, y in zip(a, b):
        assert np.array_equal(x, y)  # the same caches and the same step: the same logits
