"""The engine (continuous batching, chunked prefill, n>1, sessions, cancel, overload) and the SessionStore."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

import onebit
from onebit.cache import SessionStore, common_prefix, copy_kv
from onebit.config import SamplingParams
from onebit.engine import Chunk, Engine, GenerationRequest, Overloaded, Usage
from onebit.kernels.numpy_ref import NumpyKVCache
from onebit.kernels.timing import TimedBackend, load_timed

GREEDY = SamplingParams(temperature=0)
LETTERS = {i: 100.0 for i in range(ord("a"), ord("z") + 1)}


@pytest.fixture(scope="module")
def model():
    return onebit.load("tiny-random")


@pytest.fixture()
def engine(model):
    eng = Engine(model, max_batch=16, prefill_chunk=64).start()
    assert eng.ready.wait(600)
    yield eng
    eng.stop()


async def run(engine, ids, **kw):
    """(texts per choice, usage) of one request."""
    texts, usage = {}, None
    async for item in engine.submit(GenerationRequest(list(ids), **kw)):
        if isinstance(item, Chunk):
            texts[item.index] = texts.get(item.index, "") + item.text
        else:
            usage = item
    return [texts[i] for i in sorted(texts)], usage


def until(ready, timeout: float = 10.0) -> None:
    """Wait for the engine's worker to reach a state (checked every 10 ms)."""
    end = time.monotonic() + timeout
    while not ready() and time.monotonic() < end:
        time.sleep(0.01)


def fresh(model, ids, max_tokens, **kw):
    return "".join(model.generate(list(ids), max_tokens=max_tokens, temperature=0, **kw))


def test_batched_greedy_equals_fresh_generation(engine, model):
    prompts = [model.tokenizer.encode(f"prompt number {i} " * (i + 1)) for i in range(6)]

    async def main():
        return await asyncio.gather(*[run(engine, p, params=GREEDY, max_tokens=20) for p in prompts])

    steps = engine.steps
    results = asyncio.run(main())
    assert [r[0][0] for r in results] == [fresh(model, p, 20) for p in prompts]
    assert engine.steps - steps < 6 * 20
    assert all(u.prompt_tokens == len(p) and u.completion_tokens <= 20 for (_, u), p in zip(results, prompts))


def test_greedy_steps_take_the_argmax_from_the_model_and_match_the_sampled_path(engine, model, monkeypatch):
    """Decode-only steps of greedy choices without logprobs ask the model for argmax tokens (decode_greedy, or
    greedy_decode's chain for a sequence decoding alone); a request with logprobs samples on the host from the
    logits; both give the same text."""
    calls, full, chained = [], [], []
    greedy, forward, chain = model.net.decode_greedy, model.net.forward_batch, model.net.greedy_decode

    def counted(token, cache, max_steps=None):
        for t in chain(token, cache, max_steps):
            chained.append(t)
            yield t

    monkeypatch.setattr(model.net, "decode_greedy", lambda items: calls.append(len(items)) or greedy(items))
    monkeypatch.setattr(model.net, "forward_batch", lambda items, **kw: full.append(len(items)) or forward(items, **kw))
    monkeypatch.setattr(model.net, "greedy_decode", counted)
    prompt = model.tokenizer.encode("the greedy path")
    (plain,), _ = asyncio.run(run(engine, prompt, params=GREEDY, max_tokens=12))
    # the prefill, then a chain's argmax steps (on a backend without chains, each is decode_greedy)
    assert len(chained) >= 11 and len(full) <= 2
    calls.clear(), full.clear(), chained.clear()
    (logged,), _ = asyncio.run(run(engine, prompt, params=GREEDY, max_tokens=12, logprobs=2))
    # every decode step through the logits; decode_greedy only for tails (the token that ends a request is fed
    # once more so the session caches it, and nothing is sampled from that step)
    assert len(full) >= 12 and len(calls) <= 2 and not chained
    monkeypatch.undo()
    assert plain == logged == fresh(model, prompt, 12)


def test_a_lone_greedy_sequence_decodes_through_one_chain(engine, model, monkeypatch):
    """A greedy request decoding alone takes its tokens from the model's greedy_decode (the cuda backend keeps
    a step queued ahead there), opened once after the prefill and closed when the request ends; requests
    arriving meanwhile close it and all decode in batched steps. The text is always fresh generation's, and the
    session's cache holds every token for the next turn."""
    prompt = model.tokenizer.encode("a lone request")
    others = [model.tokenizer.encode(f"another prompt {i}") for i in range(3)]
    want = fresh(model, prompt, 12, stop_token_ids=[])  # (generate decodes through greedy_decode too)
    want_long, want_others = fresh(model, prompt, 200, stop_token_ids=[]), [fresh(model, p, 8) for p in others]
    opened, closed = [], []  # max_steps of each chain opened; tokens each chain gave before it closed
    real = model.net.greedy_decode

    def spy(token, cache, max_steps=None):
        opened.append(max_steps)
        n = 0
        try:
            for t in real(token, cache, max_steps):
                n += 1
                yield t
        finally:
            closed.append(n)

    async def ids_of(ids, **kw):
        got, usage = [], None
        async for item in engine.submit(GenerationRequest(list(ids), params=GREEDY, **kw)):
            if isinstance(item, Chunk):
                got += item.token_ids
            else:
                usage = item
        return got, usage

    monkeypatch.setattr(model.net, "greedy_decode", spy)
    ids, usage = asyncio.run(ids_of(prompt, max_tokens=12, session_id="lone", stop_token_ids=[]))
    assert model.tokenizer.decode(ids) == want and usage.completion_tokens == len(ids) == 12
    until(lambda: closed)  # the request ended; the worker closes the chain at its next step (the tail's)
    assert opened == [11] and closed == [11]  # the prefill picked the first token, the chain the other 11
    turn = prompt + ids + model.tokenizer.encode(" and then")
    again, usage = asyncio.run(ids_of(turn, max_tokens=5, session_id="lone"))
    assert usage.cached_tokens == len(prompt) + 12  # the chain's tokens are all in the session's cache
    monkeypatch.undo()
    assert model.tokenizer.decode(again) == fresh(model, turn, 5)
    monkeypatch.setattr(model.net, "greedy_decode", spy)
    opened.clear(), closed.clear()

    async def staggered():
        text, rest = "", None
        async for item in engine.submit(GenerationRequest(list(prompt), GREEDY, max_tokens=200, stop_token_ids=[])):
            if isinstance(item, Chunk):
                text += item.text
                if rest is None and len(closed) < len(opened):  # the chain is open: others arrive
                    rest = asyncio.gather(*[run(engine, p, params=GREEDY, max_tokens=8) for p in others])
        return text, await rest

    long_text, rest = asyncio.run(staggered())
    assert long_text == want_long and [r[0][0] for r in rest] == want_others
    until(lambda: len(closed) == len(opened))
    assert len(closed) == len(opened) >= 1 and closed[0] < opened[0]  # the arrivals closed the first chain early


def test_n_choices_share_the_prompt(engine, model):
    ids = model.tokenizer.encode("fork me")

    async def main():
        greedy = await run(engine, ids, params=GREEDY, max_tokens=10, n=3)
        seeded = await run(engine, ids, params=SamplingParams(temperature=1.0, seed=5), max_tokens=10, n=3)
        again = await run(engine, ids, params=SamplingParams(temperature=1.0, seed=5), max_tokens=10, n=3)
        return greedy, seeded, again

    (g, gu), (s, su), (a, _) = asyncio.run(main())
    assert g == [fresh(model, ids, 10)] * 3 and gu.prompt_tokens == len(ids)
    assert s == a and len(set(s)) == 3
    assert s[0] == "".join(model.generate(ids, max_tokens=10, temperature=1.0, top_p=1.0, seed=5))


def test_session_reuses_every_token_and_matches_fresh(engine, model):
    tok = model.tokenizer
    msgs = [{"role": "user", "content": "hello there"}]

    async def turn(messages):
        ids = tok.apply_chat_template(messages, tokenize=True)
        params = SamplingParams(temperature=0, logit_bias=LETTERS)
        return ids, await run(engine, ids, params=params, max_tokens=7, session_id="s1")

    ids1, ([reply], u1) = asyncio.run(turn(msgs))
    msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": "more"}]
    ids2, ([reply2], u2) = asyncio.run(turn(msgs))
    assert u1.cached_tokens == 0 and u2.cached_tokens == len(ids1) + u1.completion_tokens
    assert reply2 == fresh(model, ids2, 7, logit_bias=LETTERS)
    assert engine.stats()["session_hits"] >= 1 and engine.stats()["sessions"] == 1


def test_same_session_twice_at_once_is_queued_not_corrupted(engine, model):
    ids = model.tokenizer.encode("shared session")

    async def main():
        return await asyncio.gather(*[run(engine, ids, params=GREEDY, max_tokens=15, session_id="dup")
                                      for _ in range(3)])

    results = asyncio.run(main())
    want = fresh(model, ids, 15)
    assert all(r[0] == [want] for r in results)
    assert sorted(u.cached_tokens for _, u in results)[1:] == [len(ids) - 1] * 2  # turns ran one after another


def test_chunked_prefill_does_not_stall_running_streams(engine, model):
    short = model.tokenizer.encode("short")
    long = model.tokenizer.encode("a long prompt " * 40)  # ~560 tokens = 9 chunks of 64
    order = []

    async def consume(name, stream):
        async for item in stream:
            if isinstance(item, Chunk):
                order.append(name)

    async def main():
        s = engine.submit(GenerationRequest(short, GREEDY, max_tokens=40, stop_token_ids=[]))
        first = await s.__anext__()
        order.append("short")
        assert isinstance(first, Chunk)
        lng = engine.submit(GenerationRequest(long, GREEDY, max_tokens=3))
        await asyncio.gather(consume("short", s), consume("long", lng))

    asyncio.run(main())
    assert order.index("long") >= 8  # the short stream kept getting tokens while the long prompt prefilled


def test_cancel_frees_slots_and_overload(model):
    eng = Engine(model, max_batch=1, max_queue=1).start()
    eng.ready.wait(600)
    ids = model.tokenizer.encode("hog")

    async def main():
        hog = eng.submit(GenerationRequest(ids, SamplingParams(temperature=0, logit_bias=LETTERS), max_tokens=900))
        await hog.__anext__()
        queued = eng.submit(GenerationRequest(ids, GREEDY, max_tokens=2))
        with pytest.raises(Overloaded):
            eng.submit(GenerationRequest(ids, GREEDY, max_tokens=2))
        await hog.aclose()
        items = [x async for x in queued]
        return items

    try:
        items = asyncio.run(main())
        assert isinstance(items[-1], Usage)
        assert eng.steps < 300 and eng.stats()["sequences_running"] <= 1
    finally:
        eng.stop()


def test_tiny_kv_budget_evicts_but_never_breaks(model):
    eng = Engine(model, kv_budget_bytes=1, max_batch=4).start()  # nothing idle survives
    eng.ready.wait(600)
    ids = model.tokenizer.encode("evict me")

    async def main():
        a = await run(eng, ids, params=GREEDY, max_tokens=8, session_id="x")
        b = await run(eng, ids, params=GREEDY, max_tokens=8, session_id="x")
        c = await asyncio.gather(*[run(eng, ids, params=GREEDY, max_tokens=8) for _ in range(3)])
        return a, b, c

    try:
        a, b, c = asyncio.run(main())
        assert a[0] == b[0] == [fresh(model, ids, 8)] and all(r[0] == a[0] for r in c)
        assert b[1].cached_tokens == 0 and eng.stats()["evictions"] >= 1
    finally:
        eng.stop()


def test_a_jit_backend_warms_up_before_the_engine_is_ready():
    """A backend with ``warmup`` (cuda: Triton JIT + graph capture) gets it once, with max_batch, before ready."""
    m = onebit.load("tiny-random")
    calls = []
    eng = Engine(m, max_batch=8)
    m.net.backend.warmup = lambda net, max_batch: calls.append((net is m.net, max_batch, eng.ready.is_set()))
    eng.start()
    try:
        assert eng.ready.wait(600)
        assert calls == [(True, 8, False)]
        texts, usage = asyncio.run(run(eng, [5, 6, 7], params=GREEDY, max_tokens=3))
        assert usage.completion_tokens == 3 and texts == [fresh(m, [5, 6, 7], 3)]
    finally:
        eng.stop()


def test_loader_error_is_reported():
    def broken():
        raise onebit.FormatError("no such model")

    eng = Engine(loader=broken).start()
    eng._thread.join(5)
    assert not eng.ready.is_set() and "no such model" in str(eng.load_error)


# ---- SessionStore -------------------------------------------------------------------------------------------


def make_store(budget=10**9, **kw):
    clock = [0.0]
    store = SessionStore(lambda n: NumpyKVCache(1, 1, 2, n), budget, clock=lambda: clock[0], **kw)
    return store, clock


def fill(cache, tokens):
    for p, t in enumerate(tokens):
        cache.k[:, p] = t
        cache.v[:, p] = -t
    cache.length = len(tokens)


def test_store_prefix_reuse_take_and_copy():
    store, _ = make_store()
    lease = store.acquire(None, [1, 2, 3, 4, 5], 16)
    assert lease.hit == "miss" and lease.reused == 0
    fill(lease.cache, [1, 2, 3, 4, 5])
    store.release(lease, [1, 2, 3, 4, 5])
    taken = store.acquire(None, [1, 2, 3, 4, 9, 9], 16)  # 4 of 5 shared: the entry is taken over
    assert taken.hit == "prefix" and taken.reused == 4 and taken.cache.length == 4
    assert store.stats()["prefix_entries"] == 0
    fill(taken.cache, [1, 2, 3, 4, 9, 9])
    store.release(taken, [1, 2, 3, 4, 9, 9])
    copied = store.acquire(None, [1, 7], 32)  # 1 of 6 shared: copied, the entry stays for others
    assert copied.reused == 1 and copied.cache is not taken.cache and store.stats()["prefix_entries"] == 1
    assert copied.cache.k[0, 0, 0, 0] == 1 and copied.cache.max_len == 32
    whole = store.acquire(None, [1, 2, 3, 4, 9, 9], 16)
    assert whole.reused == 5  # never the whole prompt: the last token is recomputed for its logits


def test_store_sessions_busy_lru_and_ttl():
    per = SessionStore(lambda n: NumpyKVCache(1, 1, 2, n), 1).bytes_per_position
    store, clock = make_store(budget=per * 40, max_sessions=2, ttl=10)
    leases = {}
    for sid in ("a", "b"):
        leases[sid] = store.acquire(sid, [1, 2], 16)
        assert store.is_busy(sid)
        fill(leases[sid].cache, [1, 2])
        store.release(leases[sid], [1, 2])
        assert not store.is_busy(sid)
    again = store.acquire("a", [1, 2, 3], 16)
    assert again.hit == "session" and again.reused == 2
    with pytest.raises(RuntimeError):
        store.acquire("a", [1], 16)
    assert store.make_room(per * 16)  # evicts idle "b" only; "a" is busy
    assert store.stats()["sessions"] == 1 and store.is_busy("a")
    store.release(again, [1, 2, 3])
    clock[0] = 11
    assert store.expire() == 1 and store.stats()["sessions"] == 0 and store.bytes_used == 0


def test_store_grows_a_small_cache_and_copy_kv_across_layouts():
    store, _ = make_store()
    lease = store.acquire("g", [5, 6, 7], 4)
    fill(lease.cache, [5, 6, 7])
    store.release(lease, [5, 6, 7])
    big = store.acquire("g", [5, 6, 7, 8, 9], 64)
    assert big.cache.max_len == 64 and big.reused == 3 and list(big.cache.k[0, :3, 0, 0]) == [5, 6, 7]
    src, dst = NumpyKVCache(2, 2, 4, 8), NumpyKVCache(2, 2, 4, 20)
    src.k[:] = np.random.default_rng(0).standard_normal(src.k.shape)
    copy_kv(src, dst, 5)
    assert dst.length == 5 and np.array_equal(dst.k[:, :5], src.k[:, :5]) and not dst.k[:, 5:].any()
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2


def test_timed_backend_counts_every_op():
    model = load_timed("tiny-random", "numpy")
    assert isinstance(model.backend, TimedBackend) and model.backend.name == "numpy"
    model.backend.reset_timings()
    "".join(model.generate("hi", max_tokens=3, temperature=0))
    t = model.backend.timings()
    assert t["ternary_matmul"]["calls"] == 3 * 2 * 4 and t["attention"]["seconds"] > 0  # qkv, o, gate+up, down
    assert "".join(model.generate("hi", max_tokens=5, temperature=0)) == \
        "".join(onebit.load("tiny-random", "numpy").generate("hi", max_tokens=5, temperature=0))
