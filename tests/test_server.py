"""The real server (uvicorn on a free loopback port, tiny-random) driven by the official openai client and httpx."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402

import onebit  # noqa: E402
from onebit.engine import Engine  # noqa: E402
from onebit.kernels.timing import load_timed  # noqa: E402
from onebit.server import ServerSettings, create_app  # noqa: E402
from subprocess_env import checkout_env  # noqa: E402

MODEL = "tiny-random"
LETTERS = {str(i): 100 for i in range(ord("a"), ord("z") + 1)}  # forces ASCII text that re-tokenizes exactly
READY_S = 600  # instant on the cpu backends; on a GPU the engine first compiles its kernels (engine warm-up)


class LiveServer:
    """create_app(engine, settings) served by uvicorn in a thread, on a socket bound to 127.0.0.1:0."""

    def __init__(self, engine: Engine, settings: ServerSettings | None = None):
        self.engine = engine
        self.app = create_app(engine, settings or ServerSettings(model_id=MODEL))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0,
                             timeout=30, **kw)

    def wait_idle(self, timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            s = self.engine.stats()
            idle = s["sequences_running"] == 0 and s["requests_waiting"] == 0 and s["requests_running"] == 0
            if idle or time.monotonic() > deadline:  # a request's slot is freed just after its last sequence
                return s
            time.sleep(0.01)


def make_engine(**kw) -> Engine:
    return Engine(loader=lambda: load_timed(MODEL), **kw)


@pytest.fixture(scope="module")
def live():
    with LiveServer(make_engine(max_batch=16)) as s:
        assert s.engine.ready.wait(READY_S)
        yield s


@pytest.fixture(scope="module")
def client(live):
    return live.client()


@pytest.fixture(scope="module")
def reference():
    """The same model in-process: what a fresh, unbatched prefill + greedy decode gives."""
    return onebit.load(MODEL)


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---- OpenAI client: shapes -------------------------------------------------------------------------------


def test_chat_non_streaming(client, live):
    r = client.chat.completions.create(model=MODEL, messages=chat("hello"), max_tokens=7, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    (c,) = r.choices
    assert c.index == 0 and c.message.role == "assistant" and c.finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 7 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_streaming_role_first_usage_last(client):
    stream = client.chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=6, temperature=0,
                                            logit_bias=LETTERS, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    plain = client.chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=6, temperature=0,
                                           logit_bias=LETTERS)
    assert text == plain.choices[0].message.content and len(text) == 6


def test_raw_sse_frames(live):
    body = {"messages": chat("x"), "max_tokens": 3, "stream": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") or ln.startswith(":") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
    assert "usage" not in first  # only with stream_options.include_usage


def test_completions_stream_and_list_prompt(client):
    r = client.completions.create(model=MODEL, prompt=["ab", "cd"], max_tokens=5, temperature=0, logit_bias=LETTERS)
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1]
    assert all(len(c.text) == 5 for c in r.choices)
    parts = {}
    for ch in client.completions.create(model=MODEL, prompt="ab", max_tokens=5, temperature=0, stream=True,
                                        logit_bias=LETTERS):
        for c in ch.choices:
            parts[c.index] = parts.get(c.index, "") + c.text
    assert parts == {0: r.choices[0].text}
    echo = client.completions.create(model=MODEL, prompt="ab", max_tokens=2, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("ab")


def test_n2_and_seeds(client):
    kw = dict(model=MODEL, messages=chat("seed"), max_tokens=12, temperature=1.0)
    a = client.chat.completions.create(n=2, seed=42, **kw)
    b = client.chat.completions.create(n=2, seed=42, **kw)
    c = client.chat.completions.create(n=2, seed=7, **kw)
    texts = lambda r: [ch.message.content for ch in r.choices]  # noqa: E731
    assert [ch.index for ch in a.choices] == [0, 1]
    assert texts(a) == texts(b) and texts(a) != texts(c) and texts(a)[0] != texts(a)[1]
    assert a.usage.completion_tokens <= 24
    greedy = client.chat.completions.create(model=MODEL, messages=chat("seed"), max_tokens=8, temperature=0, n=3)
    one = client.chat.completions.create(model=MODEL, messages=chat("seed"), max_tokens=8, temperature=0)
    assert texts(greedy) == [one.choices[0].message.content] * 3


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=chat("lp"), max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        tops = [x.logprob for x in t.top_logprobs]
        assert tops == sorted(tops, reverse=True) and abs(t.logprob - tops[0]) < 1e-9  # greedy = most likely
    c = client.completions.create(model=MODEL, prompt="lp", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4


def test_stop_strings(client):
    kw = dict(model=MODEL, messages=chat("stop"), temperature=0, logit_bias=LETTERS)
    full = client.chat.completions.create(max_tokens=12, **kw).choices[0].message.content
    stop = full[5:7]
    r = client.chat.completions.create(max_tokens=12, stop=[stop, "never"], **kw)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == full[:full.index(stop)]


def test_session_second_turn_reuses_whole_conversation(client, reference):
    kw = dict(model=MODEL, temperature=0, logit_bias=LETTERS, max_tokens=9)
    hdr = {"X-1bit-Session": "conv-1"}
    msgs = chat("first turn")
    r1 = client.chat.completions.create(messages=msgs, extra_headers=hdr, **kw)
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content}, {"role": "user", "content": "again"}]
    r2 = client.chat.completions.create(messages=msgs, extra_headers=hdr, **kw)
    assert r2.usage.prompt_tokens_details.cached_tokens == r1.usage.prompt_tokens + r1.usage.completion_tokens
    ids = reference.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    fresh = "".join(reference.generate(ids, max_tokens=9, temperature=0, logit_bias={int(k): v for k, v in
                                                                                     LETTERS.items()}))
    assert r2.choices[0].message.content == fresh
    # the body aliases pin the same session
    r3 = client.chat.completions.create(messages=msgs, extra_body={"prompt_cache_key": "conv-1"}, **kw)
    assert r3.usage.prompt_tokens_details.cached_tokens == r2.usage.prompt_tokens - 1  # the last is recomputed


def test_sixteen_concurrent_streams_equal_sequential(live):
    prompts = [f"client {i} says {'x' * i}" for i in range(16)]

    async def one(c, p):
        text = ""
        async for ch in await c.chat.completions.create(model=MODEL, messages=chat(p), max_tokens=24,
                                                        temperature=0, stream=True):
            if ch.choices:
                text += ch.choices[0].delta.content or ""
        return text

    async def main():
        c = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=60)
        sequential = [await one(c, p) for p in prompts]
        steps = live.engine.steps
        together = await asyncio.gather(*[one(c, p) for p in prompts])
        return sequential, together, live.engine.steps - steps

    sequential, together, steps = asyncio.run(main())
    assert together == sequential
    assert steps < 16 * 24  # decoded together, not one after another
    assert live.wait_idle()["sequences_running"] == 0


# ---- bad input --------------------------------------------------------------------------------------------


def post(live, path, body=None, content=None, headers=None):
    return httpx.post(live.url + path, json=body, content=content, headers=headers, timeout=30)


def assert_error(r, status, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    return err


@pytest.mark.parametrize("body, param", [
    ({"messages": chat("x"), "max_tokens": -1}, "max_tokens"),
    ({"messages": chat("x"), "max_tokens": "5"}, "max_tokens"),
    ({"messages": chat("x"), "temperature": "hot"}, "temperature"),
    ({"messages": chat("x"), "temperature": 3}, "temperature"),
    ({"messages": chat("x"), "n": 0}, "n"),
    ({"messages": chat("x"), "stream": "yes"}, "stream"),
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
    ({"messages": chat("x"), "logit_bias": {"99999": 1}}, "logit_bias"),
    ({"messages": chat("x"), "logit_bias": {"5": 500}}, "logit_bias"),
    ({"messages": chat("x"), "stop": [""]}, "stop"),
    ({"messages": chat("x"), "top_logprobs": 2}, "top_logprobs"),
    ({"messages": chat("x"), "stream_options": {"include_usage": True}}, "stream_options"),
])
def test_bad_fields_are_400_never_422(live, body, param):
    err = assert_error(post(live, "/v1/chat/completions", body), 400)
    if param:
        assert err["param"] == param


def test_invalid_json_and_non_object(live):
    assert_error(post(live, "/v1/chat/completions", content=b'{"messages": [', headers={
        "content-type": "application/json"}), 400)
    assert_error(post(live, "/v1/completions", content=b"[1, 2]"), 400)
    assert_error(post(live, "/v1/completions", content=b"\xff\xfe"), 400)


def test_huge_max_tokens_is_context_length_exceeded(live):
    err = assert_error(post(live, "/v1/completions", {"prompt": "abc", "max_tokens": 10**9}), 400,
                       "context_length_exceeded")
    assert "1024" in err["message"] and str(10**9) in err["message"]
    err = assert_error(post(live, "/v1/completions", {"prompt": "y" * 1100}), 400, "context_length_exceeded")
    assert "1101" in err["message"] or "1100" in err["message"]


def test_oversized_body_is_413(live):
    big = json.dumps({"messages": chat("x" * (9 << 20))}).encode()
    for _ in range(5):  # the body is drained before the answer, so the client reads a 413, not a reset
        assert_error(post(live, "/v1/chat/completions", content=big), 413, "request_too_large")

    def chunks():  # no Content-Length: the limit is found while reading
        for i in range(0, len(big), 1 << 20):
            yield big[i:i + (1 << 20)]

    r = httpx.post(live.url + "/v1/chat/completions", content=chunks(), timeout=30)
    assert_error(r, 413, "request_too_large")
    assert post(live, "/v1/completions", {"prompt": "ok", "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("declared", [True, False])
def test_body_limit_drains_up_to_its_cap_then_answers(declared):
    """BodyLimit reads the rest of an oversized body (dropped) before its 413 while the total stays within
    drain_bytes, and stops reading past it; the app never runs."""
    from onebit.server.limits import BodyLimit

    async def app(scope, receive, send):
        raise AssertionError("the app must not run for an oversized body")

    async def run(parts: int) -> tuple[int, list]:
        mw = BodyLimit(app, max_bytes=10, drain_bytes=100)
        msgs = [{"type": "http.request", "body": b"x" * 8, "more_body": i < parts - 1} for i in range(parts)]
        taken, sent = [], []

        async def receive():
            taken.append(msgs[len(taken)])
            return taken[-1]

        async def send(m):
            sent.append(m)

        headers = [(b"content-length", str(8 * parts).encode())] if declared else []
        await mw({"type": "http", "method": "POST", "headers": headers}, receive, send)
        return len(taken), sent

    n, sent = asyncio.run(run(5))  # 40 bytes: over the limit, within the drain cap
    assert n == 5 and sent[0]["status"] == 413 and b"request_too_large" in sent[1]["body"]
    n, sent = asyncio.run(run(50))  # 400 bytes: past the cap
    assert sent[0]["status"] == 413
    assert n == (0 if declared else 13)  # declared: cut off at once; else read until past 100 (13 x 8 bytes)


@pytest.mark.parametrize("text", ["😀👍🏽 e\u0301 \u202eRTL\u202c", "\u0000nul", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢" * 20, ""])
def test_unicode_edge_cases(live, text):
    r = post(live, "/v1/chat/completions", {"messages": chat(text), "max_tokens": 3, "stop": ["💥"]})
    assert r.status_code == 200, r.text
    r = post(live, "/tokenize", {"prompt": text})
    assert r.status_code == 200
    assert post(live, "/detokenize", {"tokens": r.json()["tokens"]}).json()["prompt"].endswith(text)


def test_lone_surrogate_is_400(live):
    raw = b'{"messages": [{"role": "user", "content": "bad \\ud800 x"}]}'
    assert_error(post(live, "/v1/chat/completions", content=raw), 400)


def test_unknown_model_and_route(client, live):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=chat("x"))
    assert e.value.body["code"] == "model_not_found"
    assert_error(httpx.get(live.url + "/v1/models/nope"), 404, "model_not_found")
    assert_error(httpx.get(live.url + "/v2/whatever"), 404)
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_disconnect_mid_stream_frees_the_slot(live):
    body = {"messages": chat("long"), "max_tokens": 900, "stream": True, "logit_bias": LETTERS}
    steps = live.engine.steps
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 5:
                break
    stats = live.wait_idle()
    assert stats["sequences_running"] == 0 and stats["requests_running"] == 0
    assert live.engine.steps - steps < 600  # cancelled, not run to the end
    assert post(live, "/v1/completions", {"prompt": "still here", "max_tokens": 2}).status_code == 200


def test_disconnect_while_waiting_for_a_whole_response(live):
    """The client goes away once decoding has started (not after a fixed time: a fast engine finishes 1000
    tokens of the tiny model in a fraction of a second); the request is cancelled, not run to the end."""
    body = json.dumps({"prompt": "slow", "max_tokens": 1000, "logit_bias": LETTERS}).encode()
    url = urllib.parse.urlsplit(live.url)
    steps = live.engine.steps
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (url.hostname.encode(), len(body), body))
        deadline = time.monotonic() + 30
        while live.engine.steps - steps < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert live.engine.steps - steps >= 3, "the request never started decoding"
    assert live.wait_idle()["sequences_running"] == 0
    assert live.engine.steps - steps < 900


def test_tokenize_metrics_health_cors(live):
    toks = post(live, "/tokenize", {"messages": chat("hi")}).json()
    assert toks["count"] == len(toks["tokens"]) and toks["max_model_len"] == 1024
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    text = httpx.get(live.url + "/metrics").text
    for name in ("onebit_requests_running", "onebit_requests_waiting", "onebit_prompt_tokens_total",
                 "onebit_generation_tokens_total", "onebit_time_to_first_token_seconds_bucket",
                 "onebit_inter_token_latency_seconds_bucket", "onebit_kv_cache_bytes", "onebit_sessions",
                 "onebit_prefix_cache_hits_total", "onebit_session_cache_hits_total",
                 'onebit_kernel_seconds_total{op="ternary_matmul"}'):
        assert name in text, name
    pre = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
    r = httpx.options(live.url + "/v1/chat/completions", headers=pre)
    assert r.headers.get("access-control-allow-origin") == "http://localhost:3000"
    r = httpx.options(live.url + "/v1/chat/completions", headers={**pre, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_openapi_has_no_422(live):
    spec = httpx.get(live.url + "/openapi.json").json()
    text = json.dumps(spec)
    assert '"422"' not in text and "ChatCompletionRequest" in text


# ---- auth, rate limits, overload, loading ----------------------------------------------------------------


def test_auth():
    with LiveServer(make_engine(), ServerSettings(model_id=MODEL, api_keys=["sekret"])) as s:
        assert s.engine.ready.wait(READY_S)
        with pytest.raises(openai.AuthenticationError) as e:
            s.client(api_key="wrong").chat.completions.create(model=MODEL, messages=chat("x"), max_tokens=1)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        assert_error(httpx.get(s.url + "/v1/models"), 401)
        assert httpx.get(s.url + "/health").status_code == 200
        r = s.client(api_key="sekret").chat.completions.create(model=MODEL, messages=chat("x"), max_tokens=1)
        assert r.choices


def test_rate_limits():
    with LiveServer(make_engine(), ServerSettings(model_id=MODEL, rate_limit_rpm=2, rate_limit_tpm=30)) as s:
        assert s.engine.ready.wait(READY_S)
        body = {"prompt": "x", "max_tokens": 1}
        a = {"X-1bit-Session": "a"}
        assert post(s, "/v1/completions", body, headers=a).status_code == 200
        assert post(s, "/v1/completions", body, headers=a).status_code == 200
        r = post(s, "/v1/completions", body, headers=a)
        assert_error(r, 429, "rate_limit_exceeded")
        assert int(r.headers["retry-after"]) >= 1
        b = {"X-1bit-Session": "b"}
        assert post(s, "/v1/completions", {"prompt": "x", "max_tokens": 40, "logit_bias": LETTERS},
                    headers=b).status_code == 200
        r = post(s, "/v1/completions", body, headers=b)
        assert_error(r, 429)["type"] == "tokens"
        assert int(r.headers["retry-after"]) >= 1


def test_overload_is_503_with_retry_after():
    with LiveServer(make_engine(max_batch=1, max_queue=1)) as s:
        assert s.engine.ready.wait(READY_S)
        body = {"messages": chat("hog"), "max_tokens": 1000, "stream": True, "logit_bias": LETTERS}
        results = []
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            t = threading.Thread(target=lambda: results.append(post(s, "/v1/completions", {"prompt": "q"})))
            t.start()
            deadline = time.monotonic() + 10
            while s.engine.stats()["requests_waiting"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            r503 = post(s, "/v1/completions", {"prompt": "z"})
            assert_error(r503, 503, "overloaded")
            assert r503.headers["retry-after"] == "1"
        t.join(20)  # the hog's disconnect freed the slot, so the queued request ran
        assert results and results[0].status_code == 200


def test_health_503_while_loading_then_200():
    gate = threading.Event()

    def slow_loader():
        gate.wait(20)
        return load_timed(MODEL)

    with LiveServer(Engine(loader=slow_loader)) as s:
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading" and "error" in r.json()
        assert_error(post(s, "/v1/completions", {"prompt": "x"}), 503, "model_loading")
        gate.set()
        assert s.engine.ready.wait(READY_S)
        assert httpx.get(s.url + "/health").status_code == 200


# ---- the command ------------------------------------------------------------------------------------------


def test_serve_help_documents_every_option(capsys):
    from onebit.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for opt in ("--host", "--port", "--backend", "--threads", "--ctx", "--api-key", "--api-key-file", "--kv-budget",
                "--max-sessions", "--session-ttl", "--max-queue", "--rate-limit-rpm", "--rate-limit-tpm",
                "--cors-origin", "--max-body-bytes", "--lm-head", "--kv-dtype", "127.0.0.1", "8180"):
        assert opt in out, opt


def test_serve_command_starts_and_serves(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    keyfile = tmp_path / "keys"
    keyfile.write_text("k1\n")
    env = checkout_env()
    p = subprocess.Popen([sys.executable, "-m", "onebit.cli", "serve", MODEL, "--port", str(port), "--api-key-file",
                          str(keyfile), "--ctx", "256"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120  # a fresh GPU machine JIT-compiles the kernels first
        while True:
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() is not None else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k1", max_retries=0)
        assert c.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices
    finally:
        p.terminate()
        p.wait(10)
