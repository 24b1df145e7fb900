"""MCP tools over the live engine, driven by the official MCP SDK client: in-process, over real streamable HTTP on
a loopback port, and over stdio (`1bit mcp`) against a live server; overrides and evictions seen through HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("mcp")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402
from mcp.client import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.shared._httpx_utils import create_mcp_http_client  # noqa: E402

from onebit.engine import Engine, SamplerOverrides  # noqa: E402
from onebit.kernels.timing import load_timed  # noqa: E402
from onebit.mcp import TOOLS, HttpAdmin, build_server, create_mcp_app  # noqa: E402
from onebit.server import ServerSettings  # noqa: E402
from onebit.server import admin as admin_models  # noqa: E402
from onebit.server.admin import Admin, SamplerFields  # noqa: E402
from onebit.server.openai import CompletionRequest  # noqa: E402
from subprocess_env import ROOT, checkout_env  # noqa: E402
from test_server import LETTERS, MODEL, LiveServer, chat, make_engine  # noqa: E402

READ_ONLY = {"list_models", "health", "kv_cache_stats", "list_sessions", "inspect_session", "get_sampler_defaults",
             "kernel_timing", "tokenize", "detokenize"}
DESTRUCTIVE = {"evict_session", "set_sampler_overrides", "reset_sampler_overrides", "reset_kernel_timing"}
OUTPUT = {"list_models": "ModelList", "health": "Health", "kv_cache_stats": "KVCacheStats",
          "list_sessions": "SessionList", "inspect_session": "SessionInfo", "evict_session": "Evicted",
          "get_sampler_defaults": "SamplerState", "set_sampler_overrides": "SamplerState",
          "reset_sampler_overrides": "SamplerState", "kernel_timing": "KernelTiming",
          "reset_kernel_timing": "KernelTiming", "generate": "Generated", "tokenize": "Tokenized",
          "detokenize": "Detokenized"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """Any ASGI app served by uvicorn in a thread on a free 127.0.0.1 port (the MCP listener in tests)."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "Served":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "MCP listener did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def live():
    with LiveServer(make_engine(max_batch=8)) as s:
        assert s.engine.ready.wait(600)
        yield s


@pytest.fixture(scope="module")
def mcp_url(live):
    with Served(create_mcp_app(live.app.state.onebit)) as m:
        yield m.url + "/mcp"


@pytest.fixture(scope="module")
def secured():
    """An API server with a key, and its MCP listener."""
    with LiveServer(make_engine(), ServerSettings(model_id=MODEL, api_keys=["sekret"])) as s:
        assert s.engine.ready.wait(600)
        with Served(create_mcp_app(s.app.state.onebit)) as m:
            yield s, m.url + "/mcp"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def inproc(live) -> Client:
    return Client(build_server(Admin(live.app.state.onebit)))


def over_http(url: str, key: str | None = None) -> Client:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return Client(streamable_http_client(url, http_client=create_mcp_http_client(headers=headers)))


async def calls(client: Client, *pairs) -> list:
    async with client as c:
        return [await c.call_tool(name, args) for name, args in pairs]


def model_of(tool: str, result):
    assert not result.is_error, result.content[0].text
    return getattr(admin_models, OUTPUT[tool]).model_validate(result.structured_content)


def http_chat(live, text: str, session: str | None = None, **kw) -> dict:
    headers = {"X-1bit-Session": session} if session else {}
    body = {"messages": chat(text) if isinstance(text, str) else text, "max_tokens": 8, "logit_bias": LETTERS, **kw}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


# ---- every tool, valid and invalid arguments ----------------------------------------------------------------------

VALID = {
    "list_models": {},
    "health": {},
    "kv_cache_stats": {},
    "list_sessions": {},
    "inspect_session": {"session_id": "mcp/inspect me"},
    "evict_session": {"session_id": "mcp-evict-valid"},
    "get_sampler_defaults": {"session_id": "mcp-valid"},
    "set_sampler_overrides": {"top_k": 40, "min_p": 0.05, "session_id": "mcp-valid"},
    "reset_sampler_overrides": {"session_id": "mcp-valid", "fields": ["top_k"]},
    "kernel_timing": {"window_s": 30},
    "reset_kernel_timing": {},
    "generate": {"prompt": "hello", "max_tokens": 4, "seed": 1},
    "tokenize": {"text": "hello"},
    "detokenize": {"tokens": [104, 105]},
}
INVALID = {  # tool -> (arguments, words the error must contain)
    "list_models": ({"verbose": True}, "Extra inputs are not permitted"),
    "health": ({"x": 1}, "Extra inputs are not permitted"),
    "kv_cache_stats": ({"reset": True}, "Extra inputs are not permitted"),
    "list_sessions": ({"limit": 3}, "Extra inputs are not permitted"),
    "inspect_session": ({"session_id": "no-such-session"}, "No session 'no-such-session'"),
    "evict_session": ({"session_id": ""}, "at least 1 character"),
    "get_sampler_defaults": ({"session_id": "x" * 300}, "at most 256 characters"),
    "set_sampler_overrides": ({"temperature": 2.5}, "less than or equal to 2"),
    "reset_sampler_overrides": ({"fields": ["temperature", "warmth"]}, "Input should be 'temperature'"),
    "kernel_timing": ({"window_s": 0}, "greater than 0"),
    "reset_kernel_timing": ({"now": True}, "Extra inputs are not permitted"),
    "generate": ({"prompt": "hi", "max_tokens": 5000}, "less than or equal to 1024"),
    "tokenize": ({"text": 42}, "valid string"),
    "detokenize": ({"tokens": [104, 999999]}, "Token ids must be in [0, 260)"),
}


def prepare(live, tool: str) -> None:
    """Sessions the valid calls act on."""
    if tool in ("inspect_session", "evict_session"):
        http_chat(live, "a session to look at", session=VALID[tool]["session_id"])
        live.wait_idle()  # the reply is out before its last token is cached; a busy session is not evicted


def check_valid(tool: str, out) -> None:
    if tool == "list_models":
        (card,) = out.models
        assert card.id == MODEL and card.architecture == "bitnet" and card.bits_per_weight == pytest.approx(1.585)
        assert card.parameters > card.ternary_parameters > 0 and card.context_length == 1024 and card.backend
    elif tool == "health":
        assert out.ready and out.status == "ok" and out.uptime_s >= 0
        # a CPU backend says how many threads it runs; the GPU's has no such count (as on the H200 test runs)
        assert out.threads is None if out.backend == "cuda" else out.threads >= 1, (out.backend, out.threads)
        assert out.memory_rss_bytes > 0 and out.requests_waiting >= 0
    elif tool == "kv_cache_stats":
        assert out.budget_bytes == 2 << 30 and 0 <= out.usage_ratio <= 1 and out.bytes_per_token > 0
    elif tool == "list_sessions":
        assert out.count == len(out.sessions)
    elif tool == "inspect_session":
        assert out.id == "mcp/inspect me" and out.tokens > 0 and out.bytes > 0 and out.turns >= 1 and out.tail
    elif tool == "evict_session":
        assert out.evicted and out.freed_bytes > 0 and out.tokens_dropped > 0
    elif tool in ("get_sampler_defaults", "set_sampler_overrides", "reset_sampler_overrides"):
        assert out.builtin.temperature == 1.0 and out.session_id == "mcp-valid"
        assert out.effective.top_k == (40 if tool == "set_sampler_overrides" else 0)
    elif tool in ("kernel_timing", "reset_kernel_timing"):
        assert out.timed and out.throughput.window_s > 0
    elif tool == "generate":
        assert out.completion_tokens == 4 and out.finish_reason == "length" and out.sampling.seed == 1
        assert out.total_s > 0 and out.time_to_first_token_s is not None
    elif tool == "tokenize":
        assert out.tokens[1:] == [104, 101, 108, 108, 111] and out.count == 6 and out.pieces[1:] == list("hello")
    elif tool == "detokenize":
        assert out.text == "hi" and out.count == 2


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_with_valid_arguments(live, tool):
    prepare(live, tool)
    (result,) = run(calls(inproc(live), (tool, VALID[tool])))
    check_valid(tool, model_of(tool, result))


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_with_invalid_arguments_is_refused_clearly(live, tool):
    args, words = INVALID[tool]
    (result,) = run(calls(inproc(live), (tool, args)))
    assert result.is_error and result.structured_content is None
    assert words in result.content[0].text, result.content[0].text


def test_valid_and_invalid_calls_over_streamable_http(live, mcp_url):
    for tool in TOOLS:
        prepare(live, tool)
    results = run(calls(Client(mcp_url), *[(t, VALID[t]) for t in TOOLS], *[(t, INVALID[t][0]) for t in TOOLS]))
    for tool, result in zip(TOOLS, results):
        check_valid(tool, model_of(tool, result))
    for tool, result in zip(TOOLS, results[len(TOOLS):]):
        assert result.is_error and INVALID[tool][1] in result.content[0].text, (tool, result.content)


# ---- listing ----------------------------------------------------------------------------------------------------


async def listed(client: Client) -> dict:
    async with client as c:
        return {t.name: t for t in (await c.list_tools()).tools}


@pytest.mark.parametrize("transport", ["in-process", "streamable-http"])
def test_every_tool_listed_with_its_schema(live, mcp_url, transport):
    tools = run(listed(inproc(live) if transport == "in-process" else Client(mcp_url)))
    assert sorted(tools) == sorted(TOOLS)
    for name, t in tools.items():
        assert t.title and len(t.description) > 60 and "\n    " not in t.description
        assert t.input_schema["type"] == "object" and t.input_schema["additionalProperties"] is False
        assert t.output_schema == getattr(admin_models, OUTPUT[name]).model_json_schema()  # structured output
    props = tools["set_sampler_overrides"].input_schema["properties"]
    assert set(props) == {*SamplerFields.model_fields, "session_id"}
    assert props["temperature"]["anyOf"][0] == {"type": "number", "minimum": 0, "maximum": 2}
    assert tools["inspect_session"].input_schema["required"] == ["session_id"]
    assert tools["generate"].input_schema["required"] == ["prompt"]


def test_annotations_mark_mutating_tools(live):
    tools = run(listed(inproc(live)))
    for name, t in tools.items():
        a = t.annotations
        assert a.open_world_hint is False
        if name in READ_ONLY:
            assert a.read_only_hint is True, name
        else:
            assert a.read_only_hint is False, name
            assert a.destructive_hint is (name in DESTRUCTIVE), name
    assert tools["evict_session"].annotations.idempotent_hint is True
    assert tools["generate"].annotations.idempotent_hint is False


# ---- what the tools change is what the API does ----------------------------------------------------------------


def test_override_set_through_mcp_changes_the_next_http_request(live, mcp_url):
    ask = dict(text="pick letters", max_tokens=12, seed=7)
    sampled = http_chat(live, ask["text"], max_tokens=12, seed=7)["choices"][0]["message"]["content"]
    greedy = http_chat(live, ask["text"], max_tokens=12, temperature=0)["choices"][0]["message"]["content"]
    assert sampled != greedy
    try:
        (r,) = run(calls(Client(mcp_url), ("set_sampler_overrides", {"temperature": 0})))
        assert model_of("set_sampler_overrides", r).effective.temperature == 0
        assert http_chat(live, ask["text"], max_tokens=12, seed=7)["choices"][0]["message"]["content"] == greedy
        explicit = http_chat(live, ask["text"], max_tokens=12, seed=7, temperature=1)
        assert explicit["choices"][0]["message"]["content"] == sampled  # a request's own value wins

        run(calls(Client(mcp_url), ("reset_sampler_overrides", {}),
                  ("set_sampler_overrides", {"seed": 7, "max_tokens": 5, "session_id": "pinned"})))
        pinned = http_chat(live, ask["text"], session="pinned", max_tokens=None)
        assert pinned["usage"]["completion_tokens"] == 5
        assert pinned["choices"][0]["message"]["content"] == sampled[:5]  # the session's seed and max_tokens
        other = http_chat(live, ask["text"], session="not-pinned", max_tokens=5, seed=8)
        assert other["choices"][0]["message"]["content"] != sampled[:5]
    finally:
        run(calls(Client(mcp_url), ("reset_sampler_overrides", {}),
                  ("reset_sampler_overrides", {"all_sessions": True})))
    assert live.engine.overrides.snapshot() == ({}, {})


def test_evicting_a_session_through_mcp_makes_the_next_turn_reprefill():
    with LiveServer(make_engine(max_prefix_entries=0)) as s:  # no anonymous entries to borrow a prefix from
        assert s.engine.ready.wait(600)
        history = chat("remember this")
        r1 = http_chat(s, history, session="conv")
        history += [r1["choices"][0]["message"], {"role": "user", "content": "and then?"}]
        r2 = http_chat(s, history, session="conv")
        assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        s.wait_idle()
        before, evicted, after = run(calls(inproc(s), ("inspect_session", {"session_id": "conv"}),
                                           ("evict_session", {"session_id": "conv"}), ("list_sessions", {})))
        assert model_of("inspect_session", before).turns == 2
        assert model_of("evict_session", evicted).tokens_dropped == model_of("inspect_session", before).tokens
        assert model_of("list_sessions", after).count == 0
        r3 = http_chat(s, history, session="conv")
        assert r3["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert r3["usage"]["prompt_tokens"] == r2["usage"]["prompt_tokens"]
        (stats,) = run(calls(inproc(s), ("kv_cache_stats", {})))
        assert model_of("kv_cache_stats", stats).evictions == 1


def slow_model():
    """tiny-random with 10 ms more per step, so a request is still running when the test looks."""
    model = load_timed(MODEL)
    forward = model.net.forward_batch

    def slowed(*args, **kwargs):
        time.sleep(0.01)
        return forward(*args, **kwargs)

    model.net.forward_batch = slowed
    return model


def test_evicting_a_busy_session_is_refused():
    body = {"messages": chat("keep going"), "max_tokens": 100, "stream": True, "logit_bias": LETTERS}
    with LiveServer(Engine(loader=slow_model)) as s:
        assert s.engine.ready.wait(600)
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=30,
                          headers={"X-1bit-Session": "busy"}) as r:
            lines = r.iter_lines()  # kept: closing it would close the stream, and cancel the request
            next(line for line in lines if '"content":"' in line and '"role"' not in line)
            found, refused = run(calls(inproc(s), ("list_sessions", {}), ("evict_session", {"session_id": "busy"})))
        assert [(x.id, x.busy) for x in model_of("list_sessions", found).sessions] == [("busy", True)]
        assert refused.is_error and "in use by a running request" in refused.content[0].text
        s.wait_idle()  # closing the stream cancelled the request
        (evicted,) = run(calls(inproc(s), ("evict_session", {"session_id": "busy"})))
        assert model_of("evict_session", evicted).evicted


def test_kernel_timing_grows_after_a_request(live):
    live.wait_idle()

    async def measure():
        async with inproc(live) as c:
            reset = model_of("reset_kernel_timing", await c.call_tool("reset_kernel_timing", {}))
            r = await asyncio.to_thread(httpx.post, live.url + "/v1/completions", timeout=30,
                                        json={"prompt": "timing", "max_tokens": 10, "logit_bias": LETTERS})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 10
            return reset, model_of("kernel_timing", await c.call_tool("kernel_timing", {"window_s": 60}))

    reset, after = run(measure())
    assert reset.total_seconds == 0 and reset.kernels == []
    by_op = {k.kernel: k for k in after.kernels}
    assert by_op["ternary_matmul"].calls > 0 and by_op["ternary_matmul"].seconds > 0
    assert by_op["sampling"].calls >= 10
    assert {"ternary matmul", "attention", "norms", "rope", "lm_head", "sampling"} <= {g.group for g in after.groups}
    assert after.total_seconds > 0 and sum(k.share for k in after.kernels) == pytest.approx(1)
    assert after.throughput.generated_tokens >= 10 and after.throughput.generated_tokens_per_busy_s > 0


def test_generate_runs_on_the_same_engine_as_the_api(live):
    body = {"prompt": "same path", "max_tokens": 8, "seed": 3, "temperature": 0.9}
    api = httpx.post(live.url + "/v1/completions", json=body, timeout=30).json()
    first, second = run(calls(inproc(live), ("generate", {**body, "session_id": "gen"}),
                              ("generate", {**body, "session_id": "gen"})))
    assert model_of("generate", first).text == api["choices"][0]["text"]
    assert model_of("generate", second).cached_tokens > 0  # the session kept its KV


# ---- auth and transports ------------------------------------------------------------------------------------------


def test_auth_enforced_on_streamable_http(secured):
    api, url = secured
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "t", "version": "1"}}}
    headers = {"Accept": "application/json, text/event-stream"}
    for auth in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(url, json=init, headers={**headers, **auth}, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(api.url + "/admin/health", timeout=10).status_code == 401
    keyed = {**headers, "Authorization": "Bearer sekret"}
    assert httpx.post(url, json=init, headers={**keyed, "Host": "evil.example"}, timeout=10).status_code == 421
    assert httpx.post(url, json=init, headers={**keyed, "Origin": "http://evil.example"}, timeout=10).status_code == 403
    with pytest.raises(Exception):
        run(listed(over_http(url)))
    tools = run(listed(over_http(url, "sekret")))
    assert sorted(tools) == sorted(TOOLS)
    (h,) = run(calls(over_http(url, "sekret"), ("health", {})))
    assert model_of("health", h).ready


def test_stdio_bridge_against_a_live_server(secured):
    api, _ = secured
    env = checkout_env()
    env.pop("ONEBIT_API_KEY", None)
    params = StdioServerParameters(command=sys.executable, env=env, cwd=ROOT,
                                   args=["-m", "onebit.cli", "mcp", "--url", api.url, "--api-key", "sekret"])

    async def session():
        async with Client(params) as c:
            names = sorted(t.name for t in (await c.list_tools()).tools)
            pairs = [("health", {}), ("set_sampler_overrides", {"temperature": 0.5, "session_id": "a/b c"}),
                     ("get_sampler_defaults", {"session_id": "a/b c"}), ("inspect_session", {"session_id": "x/y"}),
                     ("generate", {"prompt": "stdio", "max_tokens": 3}), ("set_sampler_overrides", {}),
                     ("reset_sampler_overrides", {"all_sessions": True})]
            return names, [await c.call_tool(n, a) for n, a in pairs]

    names, (health, set_, got, missing, gen, empty, _) = run(session())
    assert names == sorted(TOOLS)
    assert model_of("health", health).ready
    assert model_of("set_sampler_overrides", set_).session.temperature == 0.5
    assert model_of("get_sampler_defaults", got).effective.temperature == 0.5
    assert missing.is_error and "No session 'x/y'" in missing.content[0].text
    assert model_of("generate", gen).completion_tokens == 3 and model_of("generate", gen).sampling.temperature == 1
    assert empty.is_error and "at least one sampler field" in empty.content[0].text
    assert api.engine.overrides.snapshot() == ({}, {})


def test_http_bridge_answers_like_the_engine_and_reports_an_unreachable_server(live):
    async def both():
        async with HttpAdmin(live.url) as remote:
            pairs = [("list_models", {}), ("tokenize", {"text": "héllo"}), ("detokenize", {"tokens": [104, 105]})]
            far = await calls(Client(build_server(remote)), *pairs)
        near = await calls(inproc(live), *pairs)
        async with HttpAdmin(f"http://127.0.0.1:{free_port()}") as gone:
            (down,) = await calls(Client(build_server(gone)), ("health", {}))
        return far, near, down

    far, near, down = run(both())
    assert [r.structured_content for r in far] == [r.structured_content for r in near]
    assert down.is_error and "Cannot reach 1bit serve" in down.content[0].text


def test_serve_command_serves_mcp_with_the_api_key(tmp_path):
    port, mcp_port = free_port(), free_port()
    env = checkout_env()
    p = subprocess.Popen([sys.executable, "-m", "onebit.cli", "serve", MODEL, "--port", str(port), "--mcp-port",
                          str(mcp_port), "--api-key", "k1", "--ctx", "256"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() is not None else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        url = f"http://127.0.0.1:{mcp_port}/mcp"
        assert httpx.post(url, json={}, timeout=10).status_code == 401
        (models,) = run(calls(over_http(url, "k1"), ("list_models", {})))
        assert model_of("list_models", models).models[0].context_length == 256
    finally:
        p.terminate()
        p.wait(10)


def test_commands_document_the_mcp_options(capsys):
    from onebit.cli import main

    for argv, words in ((["serve", "--help"], ("--mcp-port", "8181", "--no-mcp")),
                        (["mcp", "--help"], ("--url", "http://127.0.0.1:8180", "--api-key"))):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        for w in words:
            assert w in out, (argv, w)


# ---- the pieces ----------------------------------------------------------------------------------------------------


def test_override_ranges_are_the_openai_request_ranges():
    ours = SamplerFields.model_json_schema()["properties"]
    theirs = CompletionRequest.model_json_schema()["properties"]
    for name in SamplerFields.model_fields:
        bounds = [{k: v for k, v in s.items() if k in ("minimum", "maximum", "exclusiveMinimum", "type")}
                  for s in (ours[name]["anyOf"][0], theirs[name]["anyOf"][0])]
        assert bounds[0] == bounds[1], name


def test_sampler_overrides_storage():
    o = SamplerOverrides()
    o.update({"temperature": 0.2, "seed": 1})
    o.update({"temperature": 0.7}, session_id="s")
    assert o.resolve() == {"temperature": 0.2, "seed": 1}
    assert o.resolve("s") == {"temperature": 0.7, "seed": 1} and o.resolve("t") == o.resolve()
    with pytest.raises(ValueError, match="not a sampler field: warmth"):
        o.update({"warmth": 1})
    o.reset(fields=["seed"])
    assert o.resolve("s") == {"temperature": 0.7}
    o.reset(all_sessions=True)
    assert o.snapshot() == ({"temperature": 0.2}, {})


def test_tools_say_loading_while_the_model_loads():
    gate = threading.Event()

    def slow():
        gate.wait(20)
        return load_timed(MODEL)

    with LiveServer(Engine(loader=slow)) as s:
        health, models, sessions = run(calls(inproc(s), ("health", {}), ("list_models", {}), ("list_sessions", {})))
        gate.set()
        out = model_of("health", health)
        assert out.status == "loading" and not out.ready and out.backend is None
        for r in (models, sessions):
            assert r.is_error and "still loading" in r.content[0].text
        assert s.engine.ready.wait(600)
        (health,) = run(calls(inproc(s), ("health", {})))
        assert model_of("health", health).ready


def test_admin_routes_return_openai_shaped_errors(live):
    r = httpx.post(live.url + "/admin/sampler", json={"top_p": 3}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"
    r = httpx.delete(live.url + "/admin/sessions/missing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
    r = httpx.get(live.url + "/admin/kernels", params={"window_s": -1}, timeout=10)
    assert r.status_code == 400
    assert json.loads(httpx.get(live.url + "/openapi.json", timeout=10).text)["paths"]["/admin/sampler"]["post"]
