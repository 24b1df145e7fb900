"""The generation endpoints: validate, render the prompt, submit to the engine, shape the stream or response."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..engine import ContextOverflow, EngineError, GenerationRequest, NotReady, Overloaded, Usage
from ..errors import TokenizerError
from .limits import RateLimiter
from .metrics import Metrics, RequestTimer
from .openai import (APIError, ChatCompletionRequest, ChatShaper, CompletionRequest, CompletionShaper, Shaper,
                     bad_request, check_stream_options, error_body, flat_messages, parse, sampling_params,
                     stop_strings, sum_usage)
from .sse import DONE_FRAME, KEEPALIVE, KEEPALIVE_FRAME, EventStream, frame, merge

SESSION_HEADER = "x-1bit-session"


@dataclass
class ServerSettings:
    """What ``create_app`` needs besides the engine. ``cors_origins`` None: localhost origins only."""

    model_id: str = "tiny-random"
    api_keys: list[str] = field(default_factory=list)
    cors_origins: list[str] | None = None
    max_body_bytes: int = 8 << 20
    rate_limit_rpm: float = 0
    rate_limit_tpm: float = 0
    keepalive_s: float = 15.0
    retry_after_s: int = 1


@dataclass
class Context:
    """Per-app state every handler reads (``app.state.onebit``)."""

    engine: object
    settings: ServerSettings
    metrics: Metrics
    limiter: RateLimiter
    created: int = field(default_factory=lambda: int(time.time()))

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.model_id:
            raise APIError(404, f"The model '{name}' does not exist or you do not have access to it.",
                           param="model", code="model_not_found")

    def ready_model(self):
        if not self.engine.ready.is_set():
            raise not_ready(self.engine)
        return self.engine.model


def not_ready(engine) -> APIError:
    msg = (f"The model failed to load: {engine.load_error}" if engine.load_error
           else "The model is still loading; retry shortly.")
    return APIError(503, msg, type="server_error", code="model_loading", headers={"Retry-After": "5"})


def session_of(request: Request, req) -> str | None:
    sid = request.headers.get(SESSION_HEADER) or req.prompt_cache_key or req.session_id
    if sid is not None and not 0 < len(sid) <= 256:
        raise bad_request("The session id must be 1 to 256 characters.", param="session_id")
    return sid


def with_overrides(engine, req, session: str | None):
    """``req`` with the engine's sampler overrides (server-wide, then the session's) in the fields it leaves
    unset; a request's own values always win."""
    overrides = getattr(engine, "overrides", None)
    values = overrides.resolve(session) if overrides is not None else {}
    fill = {k: v for k, v in values.items() if k in type(req).model_fields and getattr(req, k) is None}
    if getattr(req, "max_completion_tokens", None) is not None:
        fill.pop("max_tokens", None)
    return req.model_copy(update=fill) if fill else req


def limit_key(request: Request, session: str | None) -> str:
    if session is not None:
        return f"session:{session}"
    return f"client:{request.client.host if request.client else 'unknown'}"


# ---- endpoints -------------------------------------------------------------------------------------------


async def chat_completions(request: Request) -> Response:
    c: Context = request.app.state.onebit
    req = parse(ChatCompletionRequest, await request.body())
    c.check_model(req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
    include_usage = check_stream_options(req)
    model = c.ready_model()
    session = session_of(request, req)
    req = with_overrides(c.engine, req, session)
    key = limit_key(request, session)
    c.limiter.check(key)
    try:
        ids = model.tokenizer.apply_chat_template(flat_messages(req.messages), add_generation_prompt=True,
                                                  tokenize=True)
    except (TokenizerError, TypeError, ValueError) as e:
        raise bad_request(f"The messages could not be rendered: {e}", param="messages") from None
    max_tokens = req.max_completion_tokens or req.max_tokens
    gen = _generation(req, model, ids, max_tokens, req.top_logprobs or 0 if req.logprobs else None, session)
    shaper = ChatShaper(c.settings.model_id, req.n, req.logprobs, include_usage)
    return await _serve(request, c, [gen], shaper, req.stream, key, "messages")


async def completions(request: Request) -> Response:
    c: Context = request.app.state.onebit
    req = parse(CompletionRequest, await request.body())
    c.check_model(req.model)
    include_usage = check_stream_options(req)
    model = c.ready_model()
    session = session_of(request, req)
    req = with_overrides(c.engine, req, session)
    key = limit_key(request, session)
    c.limiter.check(key)
    prompts = _prompt_ids(req.prompt, model)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default for completions
    gens = [_generation(req, model, ids, max_tokens, req.logprobs, session) for ids in prompts]
    echo = None
    if req.echo:
        texts = [req.prompt] if isinstance(req.prompt, str) else [
            p if isinstance(p, str) else model.tokenizer.decode(ids) for p, ids in zip(_as_list(req.prompt), prompts)]
        echo = [t for t in texts for _ in range(req.n)]
    shaper = CompletionShaper(c.settings.model_id, len(gens) * req.n, req.logprobs is not None, include_usage,
                              echo=echo)
    return await _serve(request, c, gens, shaper, req.stream, key, "prompt")


def _as_list(prompt) -> list:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


def _prompt_ids(prompt, model) -> list[list[int]]:
    """Token ids of each prompt (text is tokenized with the model's special tokens, e.g. BOS)."""
    items = _as_list(prompt)
    if not items:
        raise bad_request("'prompt' must not be an empty list.", param="prompt")
    vocab = model.config.vocab_size
    out = []
    for p in items:
        if isinstance(p, str):
            try:
                ids = model.tokenizer.encode(p, add_special_tokens=True)
            except (TypeError, ValueError) as e:
                raise bad_request(f"The prompt could not be tokenized: {e}", param="prompt") from None
        else:
            ids = list(p)
            if any(not 0 <= t < vocab for t in ids):
                raise bad_request(f"Token ids in 'prompt' must be in [0, {vocab}).", param="prompt")
        if not ids:
            raise bad_request("The prompt is empty.", param="prompt")
        out.append(ids)
    return out


def _generation(req, model, ids: list[int], max_tokens: int | None, logprobs: int | None,
                session: str | None) -> GenerationRequest:
    return GenerationRequest(prompt_ids=list(ids), params=sampling_params(req, model.config.vocab_size),
                             max_tokens=max_tokens, stop=stop_strings(req), n=req.n, logprobs=logprobs,
                             session_id=session)


# ---- running a request ---------------------------------------------------------------------------------------


def _submit(engine, gens: list[GenerationRequest], param: str) -> list:
    streams = []
    try:
        for g in gens:
            streams.append(engine.submit(g))
    except BaseException as e:
        for s in streams:
            s.close()
        raise _engine_error(e, param) from None
    return streams


def _engine_error(e: BaseException, param: str) -> BaseException:
    if isinstance(e, ContextOverflow):
        return bad_request(str(e), param=param, code="context_length_exceeded")
    if isinstance(e, Overloaded):
        return APIError(503, f"The server is overloaded: {e}. Please retry.", type="server_error",
                        code="overloaded", headers={"Retry-After": "1"})
    if isinstance(e, NotReady):
        return APIError(503, str(e), type="server_error", code="model_loading", headers={"Retry-After": "5"})
    if isinstance(e, ValueError):
        return bad_request(str(e), param=param)
    return e


async def _serve(request: Request, c: Context, gens, shaper: Shaper, stream: bool, key: str, param: str):
    for g in gens:
        try:
            c.engine.check_fits(len(g.prompt_ids), g.max_tokens)
        except ValueError as e:
            raise _engine_error(e, param) from None
    streams = _submit(c.engine, gens, param)
    events = merge(streams, keepalive=c.settings.keepalive_s)
    run = _Run(c, shaper, gens[0].n, key)
    sid = gens[0].session_id
    headers = {"X-1bit-Session": sid} if sid and sid.isascii() and sid.isprintable() else {}
    def close() -> None:  # also when the generators never started (an early disconnect)
        for s in streams:
            s.close()

    if stream:
        return EventStream(run.frames(events), headers=headers, on_close=close)
    body = await _unless_disconnected(request, run.collect(events))
    if body is None:
        close()
        return Response(status_code=499)
    return JSONResponse(body, headers=headers)


async def _unless_disconnected(request: Request, work):
    """Await ``work``; if the client disconnects first, cancel it (which cancels the engine requests)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
    return None


class _Run:
    """Turns the merged engine events of one HTTP request into SSE frames or one response body."""

    def __init__(self, c: Context, shaper: Shaper, n: int, key: str):
        self.c, self.shaper, self.n, self.key = c, shaper, n, key
        self.timer = RequestTimer(c.metrics)

    def _done(self, usages: list[Usage]) -> Usage:
        usage = sum_usage(usages)
        self.timer.done(usage)
        self.c.limiter.spend_tokens(self.key, usage.completion_tokens)
        return usage

    async def _choice_events(self, events, usages: list):
        """KEEPALIVE or (choice index, chunk) per engine event; usages are collected, tokens timed."""
        async for ev in events:
            if ev is KEEPALIVE:
                yield ev
                continue
            i, item = ev
            if isinstance(item, Usage):
                usages.append(item)
                continue
            index = i * self.n + item.index
            self.timer.token(index, len(item.token_ids))
            yield index, item

    async def frames(self, events):
        sh = self.shaper
        try:
            for chunk in sh.start_chunks():
                yield frame(chunk)
            usages = []
            async for ev in self._choice_events(events, usages):
                if ev is KEEPALIVE:
                    yield KEEPALIVE_FRAME
                    continue
                index, item = ev
                delta = sh.delta(index, item)
                if delta is not None:
                    yield frame(delta)
                if item.finish_reason:
                    yield frame(sh.finish_chunk(index, item.finish_reason))
            usage = self._done(usages)
            if sh.include_usage:
                yield frame(sh.usage_chunk(usage))
            yield DONE_FRAME
        except EngineError as e:
            yield frame(error_body(str(e), "server_error"))
        finally:
            await events.aclose()

    async def collect(self, events) -> dict:
        total = self.shaper.n_choices
        texts, lps, finish = [[] for _ in range(total)], [[] for _ in range(total)], [None] * total
        usages = []
        try:
            async for ev in self._choice_events(events, usages):
                if ev is KEEPALIVE:
                    continue
                index, item = ev
                texts[index].append(item.text)
                lps[index] += item.logprobs or []
                finish[index] = item.finish_reason or finish[index]
        except EngineError as e:
            raise APIError(500, str(e), type="server_error") from None
        finally:
            await events.aclose()
        return self.shaper.response(["".join(t) for t in texts], lps, finish, self._done(usages))
