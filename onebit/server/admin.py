"""Introspection and control of the live engine: ``Admin`` (what the MCP tools call) and its ``/admin`` routes.

Every operation reads or changes the engine that serves the OpenAI API, so what it reports is the live state.
The MCP server inside ``1bit serve`` calls ``Admin`` directly; ``1bit mcp`` (stdio) reaches the same methods
through the routes below, which return the same models as JSON. Errors are ``APIError``s (OpenAI's shape).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from ..engine import OVERRIDABLE, Chunk, EngineError, GenerationRequest, NotReady, Usage, token_text
from .openai import APIError, CompletionRequest, bad_request, sampling_params
from .routes import Context, _engine_error, not_ready, with_overrides

__all__ = ["Admin", "router", "SamplerFields", "GenerateArgs"]

CALL_TIMEOUT_S = 30.0  # a worker call waits at most one step; this only guards a stopped worker
SessionId = Annotated[str, Field(min_length=1, max_length=256, description="the session id (X-1bit-Session)")]

# ---- inputs ---------------------------------------------------------------------------------------------
# The ranges are those of the OpenAI request fields (server/openai.py), so an override is always a value a
# request could have sent.

Temperature = Annotated[float | None, Field(ge=0, le=2, description="0 is greedy; OpenAI's default is 1")]
TopP = Annotated[float | None, Field(ge=0, le=1, description="nucleus sampling mass; 1 disables it")]
TopK = Annotated[int | None, Field(ge=-1, description="keep the k most likely tokens; 0 or -1 disables it")]
MinP = Annotated[float | None, Field(ge=0, le=1, description="drop tokens below min_p x the top probability")]
Presence = Annotated[float | None, Field(ge=-2, le=2, description="OpenAI presence penalty")]
Frequency = Annotated[float | None, Field(ge=-2, le=2, description="OpenAI frequency penalty")]
Repetition = Annotated[float | None, Field(gt=0, le=10, description="HF repetition penalty; 1 disables it")]
Seed = Annotated[int | None, Field(description="RNG seed: the same seed and prompt give the same tokens")]
MaxTokens = Annotated[int | None, Field(ge=1, description="tokens to generate at most")]


class SamplerFields(BaseModel):
    """Sampler values; null means "not set here"."""

    model_config = ConfigDict(extra="forbid")

    temperature: Temperature = None
    top_p: TopP = None
    top_k: TopK = None
    min_p: MinP = None
    presence_penalty: Presence = None
    frequency_penalty: Frequency = None
    repetition_penalty: Repetition = None
    seed: Seed = None
    max_tokens: MaxTokens = None

    def given(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class SetSampler(SamplerFields):
    session_id: SessionId | None = Field(None, description="set this session's overrides (unset: server-wide)")


FieldName = Literal[OVERRIDABLE]  # the sampler field names


class ResetSampler(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_id: SessionId | None = Field(None, description="reset this session's overrides (unset: server-wide)")
    fields: list[FieldName] | None = Field(None, description="only these fields (unset: all of them)")
    all_sessions: bool = Field(False, description="reset the overrides of every session (server-wide stay)")


class GenerateArgs(SamplerFields):
    prompt: str = Field(min_length=1, max_length=100_000, description="the text to continue (or the user message)")
    max_tokens: Annotated[int | None, Field(ge=1, le=1024, description="tokens to generate (unset: an override, "
                                                                         "else 64)")] = None
    chat: bool = Field(False, description="wrap the prompt as one user message in the model's chat template")
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=16, description="stop strings")
    session_id: SessionId | None = Field(None, description="run as a turn of this session (reuses its KV cache)")


class TokenizeArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(max_length=1_000_000, description="the text to tokenize")
    add_special_tokens: bool = Field(True, description="add BOS etc. as a completion request does")
    chat: bool = Field(False, description="render the text as one user message with the chat template")


class DetokenizeArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[int] = Field(max_length=1_000_000, description="token ids")


# ---- outputs --------------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str = Field(description="the name clients send as 'model'")
    architecture: str
    format: str = Field(description="how the checkpoint was stored (gguf, hf-..., synthetic)")
    path: str
    parameters: int = Field(description="all weights: ternary and float (embeddings, norms)")
    ternary_parameters: int
    bits_per_weight: float = Field(description="information per ternary weight: log2(3)")
    storage_bits_per_weight: float = Field(description="bits per ternary weight in memory as served (packed)")
    context_length: int = Field(description="tokens per sequence as served (--ctx)")
    max_context_length: int = Field(description="the model's own limit")
    vocab_size: int
    layers: int
    hidden_size: int
    backend: str


class ModelList(BaseModel):
    models: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "loading", "error"]
    ready: bool
    error: str | None = None
    model: str
    version: str
    uptime_s: float
    backend: str | None = None
    isa: str | None = None
    threads: int | None = None
    memory_rss_bytes: int | None = Field(None, description="resident memory of the server process")
    kv_cache_bytes: int = 0
    requests_running: int
    requests_waiting: int
    sequences_running: int
    max_batch: int
    max_queue: int
    steps: int


class KVCacheStats(BaseModel):
    budget_bytes: int
    used_bytes: int
    usage_ratio: float
    bytes_per_token: int
    tokens_cached: int
    sessions: int
    sessions_busy: int
    prefix_entries: int
    lookups: int = Field(description="requests that looked for a cached prefix")
    session_hits: int
    prefix_hits: int
    misses: int
    session_hit_rate: float
    prefix_hit_rate: float
    hit_rate: float
    reused_tokens: int = Field(description="prompt tokens served from the cache instead of prefilled")
    evictions: int
    max_sessions: int
    session_ttl_s: float


class SessionInfo(BaseModel):
    id: str
    tokens: int = Field(description="tokens whose K/V the session holds")
    bytes: int = Field(description="KV cache bytes allocated for it")
    capacity: int = Field(description="positions its cache can hold before it is grown")
    turns: int = Field(description="requests whose K/V it holds (1 after an eviction or a new conversation)")
    busy: bool = Field(description="a request is running on it now")
    idle_s: float
    last_used: float = Field(description="unix time of its last use")
    overrides: dict[str, float | int] = Field(default_factory=dict, description="its sampler overrides")
    tail: str | None = Field(None, description="the text of its last cached tokens (inspect_session only)")


class SessionList(BaseModel):
    sessions: list[SessionInfo]
    count: int


class Evicted(BaseModel):
    id: str
    evicted: bool
    freed_bytes: int
    tokens_dropped: int


class SamplerState(BaseModel):
    builtin: SamplerFields = Field(description="what applies when neither the request nor an override sets a "
                                               "field (max_tokens null: chat runs to the end of the context, "
                                               "completions stop at 16)")
    server: SamplerFields = Field(description="server-wide overrides")
    session_id: str | None = None
    session: SamplerFields | None = Field(None, description="this session's overrides (they win)")
    effective: SamplerFields = Field(description="what a request (of session_id) that sets nothing gets")
    sessions_with_overrides: list[str]


class KernelStat(BaseModel):
    kernel: str = Field(description="backend op (or 'sampling', timed by the engine)")
    group: str = Field(description="ternary matmul, attention, norms, rope, lm_head, sampling, kv cache, ...")
    seconds: float
    calls: int
    ms_per_call: float
    share: float = Field(description="fraction of the total time of all kernels")


class KernelGroup(BaseModel):
    group: str
    seconds: float
    calls: int
    share: float


class Throughput(BaseModel):
    window_s: float
    steps: int
    prompt_tokens: int
    generated_tokens: int
    busy_s: float = Field(description="seconds the engine spent in steps within the window")
    prompt_tokens_per_s: float = Field(description="over the whole window")
    generated_tokens_per_s: float = Field(description="over the whole window (idle time included)")
    generated_tokens_per_busy_s: float = Field(description="while the engine was stepping")


class KernelTiming(BaseModel):
    timed: bool = Field(description="whether the backend is wrapped for timing (1bit serve does this)")
    total_seconds: float
    kernels: list[KernelStat]
    groups: list[KernelGroup]
    throughput: Throughput
    note: str


class Generated(BaseModel):
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    session_id: str | None
    time_to_first_token_s: float | None
    total_s: float
    tokens_per_s: float
    sampling: SamplerFields = Field(description="the values used, after overrides")


class Tokenized(BaseModel):
    tokens: list[int]
    count: int
    pieces: list[str] = Field(description="each token's text (\\xNN for a partial UTF-8 byte)")
    max_model_len: int


class Detokenized(BaseModel):
    text: str
    count: int


# ---- the operations --------------------------------------------------------------------------------------

BUILTIN = SamplerFields(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, presence_penalty=0.0,
                        frequency_penalty=0.0, repetition_penalty=1.0)
GROUPS = {"ternary_matmul": "ternary matmul", "act_quant": "ternary matmul", "attention": "attention",
          "rmsnorm": "norms", "rope": "rope", "dense_matmul": "lm_head", "kv_append": "kv cache",
          "make_cache": "kv cache", "embed": "embedding", "glu": "elementwise", "add": "elementwise",
          "concat": "elementwise", "to_numpy": "elementwise", "prepare_ternary": "load", "prepare_dense": "load",
          "sampling": "sampling"}
GENERATE_MAX_TOKENS, GENERATE_MAX_TOKENS_CAP = 64, 1024  # a short completion


class Admin:
    """The operations over one app's engine (``Context``); every method is async and returns a model above."""

    def __init__(self, context: Context):
        self.c, self.engine = context, context.engine

    def _model(self):
        if not self.engine.ready.is_set():
            raise not_ready(self.engine)
        return self.engine.model

    async def _on_worker(self, future):
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), CALL_TIMEOUT_S)
        except NotReady as e:
            raise APIError(503, str(e), type="server_error", code="model_loading") from None
        except TimeoutError:
            raise APIError(503, f"The engine did not answer within {CALL_TIMEOUT_S:.0f} s.",
                           type="server_error") from None

    # -- models and health ---------------------------------------------------------------------------------
    async def list_models(self) -> ModelList:
        m = self._model()
        cfg = m.config
        ternary, floats = parameter_counts(cfg)
        return ModelList(models=[ModelCard(
            id=self.c.settings.model_id, architecture=cfg.arch, format=m.info.format, path=m.info.path,
            parameters=ternary + floats, ternary_parameters=ternary, bits_per_weight=round(math.log2(3), 4),
            storage_bits_per_weight=2.0, context_length=self.engine.ctx,
            max_context_length=cfg.max_position_embeddings, vocab_size=cfg.vocab_size,
            layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, backend=m.backend.name)])

    async def health(self) -> Health:
        from .. import __version__

        e = self.engine
        s = e.stats()
        backend = getattr(e.model, "backend", None) if s["ready"] else None
        status = "ok" if s["ready"] else ("error" if e.load_error else "loading")
        return Health(
            status=status, ready=s["ready"], error=str(e.load_error) if e.load_error else None,
            model=self.c.settings.model_id, version=__version__, uptime_s=round(time.time() - self.c.created, 3),
            backend=getattr(backend, "name", None), isa=getattr(backend, "isa", None),
            threads=getattr(backend, "threads", None), memory_rss_bytes=rss_bytes(),
            kv_cache_bytes=s.get("kv_bytes_used", 0), requests_running=s["requests_running"],
            requests_waiting=s["requests_waiting"], sequences_running=s["sequences_running"],
            max_batch=s["max_batch"], max_queue=s["max_queue"], steps=s["steps"])

    # -- KV cache and sessions ------------------------------------------------------------------------------
    async def kv_cache_stats(self) -> KVCacheStats:
        self._model()
        s, store = self.engine.stats(), self.engine.store
        hits, prefix, misses = s["session_hits"], s["prefix_hits"], s["cache_misses"]
        lookups = hits + prefix + misses
        budget = s["kv_budget_bytes"]
        return KVCacheStats(
            budget_bytes=budget, used_bytes=s["kv_bytes_used"], usage_ratio=s["kv_bytes_used"] / budget if budget
            else 0.0, bytes_per_token=store.bytes_per_position, tokens_cached=s["tokens_cached"],
            sessions=s["sessions"], sessions_busy=s["sessions_busy"], prefix_entries=s["prefix_entries"],
            lookups=lookups, session_hits=hits, prefix_hits=prefix, misses=misses,
            session_hit_rate=_ratio(hits, lookups), prefix_hit_rate=_ratio(prefix, lookups),
            hit_rate=_ratio(hits + prefix, lookups), reused_tokens=s["reused_tokens"], evictions=s["evictions"],
            max_sessions=store.max_sessions, session_ttl_s=store.ttl)

    async def list_sessions(self) -> SessionList:
        self._model()
        rows = await self._on_worker(self.engine.sessions())
        _, per_session = self.engine.overrides.snapshot()
        infos = [self._session_info(r, per_session.get(r["id"], {})) for r in rows]
        infos.sort(key=lambda i: i.idle_s)
        return SessionList(sessions=infos, count=len(infos))

    async def inspect_session(self, session_id: str) -> SessionInfo:
        model = self._model()
        rows = {r["id"]: r for r in await self._on_worker(self.engine.sessions(token_ids=True))}
        if session_id not in rows:
            raise _no_session(session_id)
        row = rows[session_id]
        _, per_session = self.engine.overrides.snapshot()
        info = self._session_info(row, per_session.get(session_id, {}))
        info.tail = model.tokenizer.decode(row["token_ids"][-32:])
        return info

    async def evict_session(self, session_id: str) -> Evicted:
        self._model()
        try:
            row = await self._on_worker(self.engine.evict_session(session_id))
        except KeyError:
            raise _no_session(session_id) from None
        except EngineError as e:
            raise APIError(409, str(e), code="session_busy") from None
        return Evicted(id=session_id, evicted=True, freed_bytes=row["bytes"], tokens_dropped=row["tokens"])

    @staticmethod
    def _session_info(row: dict, overrides: dict) -> SessionInfo:
        return SessionInfo(id=row["id"], tokens=row["tokens"], bytes=row["bytes"], capacity=row["capacity"],
                           turns=row["turns"], busy=row["busy"], idle_s=round(row["idle_s"], 3),
                           last_used=round(time.time() - row["idle_s"], 3), overrides=overrides)

    # -- sampler overrides ----------------------------------------------------------------------------------
    async def get_sampler_defaults(self, session_id: str | None = None) -> SamplerState:
        server, sessions = self.engine.overrides.snapshot()
        own = sessions.get(session_id, {}) if session_id else None
        effective = {**BUILTIN.given(), **server, **(own or {})}
        return SamplerState(builtin=BUILTIN, server=SamplerFields(**server), session_id=session_id,
                            session=SamplerFields(**own) if session_id else None,
                            effective=SamplerFields(**effective), sessions_with_overrides=sorted(sessions))

    async def set_sampler_overrides(self, args: SetSampler) -> SamplerState:
        values = args.given()
        values.pop("session_id", None)
        if not values:
            raise bad_request("Give at least one sampler field to set (reset_sampler_overrides clears them).")
        ctx = self.engine.ctx
        if ctx and values.get("max_tokens", 0) >= ctx:
            raise bad_request(f"max_tokens must be below the context length ({ctx}).", param="max_tokens")
        try:
            self.engine.overrides.update(values, args.session_id)
        except ValueError as e:
            raise bad_request(str(e)) from None
        return await self.get_sampler_defaults(args.session_id)

    async def reset_sampler_overrides(self, args: ResetSampler) -> SamplerState:
        if args.all_sessions and args.session_id is not None:
            raise bad_request("Give a session_id or all_sessions, not both.", param="all_sessions")
        self.engine.overrides.reset(args.session_id, args.fields, args.all_sessions)
        return await self.get_sampler_defaults(args.session_id)

    # -- kernel timing --------------------------------------------------------------------------------------
    async def kernel_timing(self, window_s: float = 10.0) -> KernelTiming:
        e = self.engine
        timings = getattr(getattr(e.model, "backend", None), "timings", None)
        ops = dict(timings()) if callable(timings) else {}
        seconds, calls = e.sampling_time
        if calls:
            ops["sampling"] = {"seconds": seconds, "calls": calls}
        total = sum(t["seconds"] for t in ops.values())
        kernels = sorted((KernelStat(kernel=op, group=GROUPS.get(op, "other"), seconds=t["seconds"],
                                     calls=t["calls"], ms_per_call=1e3 * t["seconds"] / max(t["calls"], 1),
                                     share=_ratio(t["seconds"], total)) for op, t in ops.items()),
                         key=lambda k: -k.seconds)
        groups: dict[str, list] = {}
        for k in kernels:
            g = groups.setdefault(k.group, [0.0, 0])
            g[0] += k.seconds
            g[1] += k.calls
        return KernelTiming(
            timed=callable(timings), total_seconds=total, kernels=kernels,
            groups=[KernelGroup(group=name, seconds=s, calls=n, share=_ratio(s, total))
                    for name, (s, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])],
            throughput=throughput(e.recent, window_s),
            note="wall time around each backend call, cumulative since start or the last reset; on the cuda "
                 "backend kernels run asynchronously, so there the numbers are mostly launch times")

    async def reset_kernel_timing(self) -> KernelTiming:
        reset = getattr(getattr(self.engine.model, "backend", None), "reset_timings", None)
        if callable(reset):
            reset()
        self.engine.sampling_time = [0.0, 0]
        self.engine.recent.clear()
        return await self.kernel_timing()

    # -- generation and tokens ------------------------------------------------------------------------------
    async def generate(self, args: GenerateArgs) -> Generated:
        model = self._model()
        ids = self._encode(model, args.prompt, True, args.chat)
        fields = {k: getattr(args, k) for k in OVERRIDABLE if getattr(args, k) is not None}
        req = with_overrides(self.engine, CompletionRequest(prompt=args.prompt, **fields), args.session_id)
        params = sampling_params(req, model.config.vocab_size)
        max_tokens = min(req.max_tokens or GENERATE_MAX_TOKENS, GENERATE_MAX_TOKENS_CAP)
        gen = GenerationRequest(prompt_ids=ids, params=params, max_tokens=max_tokens, stop=list(args.stop or []),
                                session_id=args.session_id)
        used = {k: getattr(req, k) for k in OVERRIDABLE if getattr(req, k) is not None}
        used = SamplerFields(**{**BUILTIN.given(), **used, "max_tokens": max_tokens})
        return await self._run(gen, used)

    async def _run(self, gen: GenerationRequest, used: SamplerFields) -> Generated:
        try:
            self.engine.check_fits(len(gen.prompt_ids), gen.max_tokens)
            stream = self.engine.submit(gen)
        except Exception as e:  # noqa: BLE001 - ContextOverflow, Overloaded, NotReady -> the API's errors
            raise _engine_error(e, "prompt") from None
        t0, first, parts, finish, usage = time.perf_counter(), None, [], None, Usage(len(gen.prompt_ids), 0, 0)
        try:
            async for item in stream:
                if isinstance(item, Chunk):
                    first = first or time.perf_counter()
                    parts.append(item.text)
                    finish = item.finish_reason or finish
                else:
                    usage = item
        except EngineError as e:
            raise APIError(500, str(e), type="server_error") from None
        finally:
            stream.close()
        total = time.perf_counter() - t0
        decode = total - ((first or t0) - t0)
        return Generated(text="".join(parts), finish_reason=finish, prompt_tokens=usage.prompt_tokens,
                         completion_tokens=usage.completion_tokens, cached_tokens=usage.cached_tokens,
                         session_id=gen.session_id, time_to_first_token_s=None if first is None else first - t0,
                         total_s=total, tokens_per_s=_ratio(max(usage.completion_tokens - 1, 0), decode),
                         sampling=used)

    async def tokenize(self, args: TokenizeArgs) -> Tokenized:
        model = self._model()
        ids = self._encode(model, args.text, args.add_special_tokens, args.chat, allow_empty=True)
        pieces = [token_text(model.tokenizer, t)[0] for t in ids]
        return Tokenized(tokens=ids, count=len(ids), pieces=pieces, max_model_len=self.engine.ctx)

    async def detokenize(self, args: DetokenizeArgs) -> Detokenized:
        model = self._model()
        vocab = model.config.vocab_size
        bad = [t for t in args.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"Token ids must be in [0, {vocab}); got {bad[0]}.", param="tokens")
        return Detokenized(text=model.tokenizer.decode(args.tokens), count=len(args.tokens))

    @staticmethod
    def _encode(model, text: str, special: bool, chat: bool, allow_empty: bool = False) -> list[int]:
        try:
            if chat:
                ids = model.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                          add_generation_prompt=True)
            else:
                ids = model.tokenizer.encode(text, add_special_tokens=special)
        except Exception as e:  # noqa: BLE001 - template errors, unencodable text
            raise bad_request(f"Could not tokenize: {e}", param="prompt") from None
        if not ids and not allow_empty:
            raise bad_request("The prompt is empty (no tokens).", param="prompt")
        return list(ids)


# ---- helpers ----------------------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _no_session(session_id: str) -> APIError:
    return APIError(404, f"No session {session_id!r} is kept (list_sessions shows those that are).",
                    param="session_id", code="session_not_found")


def parameter_counts(cfg) -> tuple[int, int]:
    """(ternary, float) parameter counts of a model config: the projections; embeddings, lm_head and norms."""
    h, inter, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    ternary = cfg.num_hidden_layers * (h * (q + 2 * kv) + q * h + 3 * h * inter)
    norms = 2 * h + (h + inter if cfg.arch == "bitnet" else 0)  # bitnet adds the attention and FFN sub-norms
    floats = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + cfg.num_hidden_layers * norms + h
    return ternary, floats


def rss_bytes() -> int | None:
    """Resident memory of this process (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except (ImportError, OSError):
        return None


def throughput(recent, window_s: float) -> Throughput:
    """Tokens per second over the last ``window_s`` seconds of the engine's step log."""
    cutoff = time.monotonic() - window_s
    steps = [r for r in list(recent) if r[0] >= cutoff]
    busy = sum(r[1] for r in steps)
    prompt, generated = sum(r[2] for r in steps), sum(r[3] for r in steps)
    return Throughput(window_s=window_s, steps=len(steps), prompt_tokens=prompt, generated_tokens=generated,
                      busy_s=busy, prompt_tokens_per_s=prompt / window_s, generated_tokens_per_s=generated / window_s,
                      generated_tokens_per_busy_s=_ratio(generated, busy))


# ---- the routes (what `1bit mcp` calls) ----------------------------------------------------------------------

router = APIRouter(prefix="/admin", tags=["admin"])


def admin(request: Request) -> Admin:
    return Admin(request.app.state.onebit)


@router.get("/models", summary="Loaded model(s)")
async def get_models(request: Request) -> ModelList:
    return await admin(request).list_models()


@router.get("/health", summary="Readiness, uptime, backend, memory, load (authenticated, unlike /health)")
async def get_health(request: Request) -> Health:
    return await admin(request).health()


@router.get("/kv-cache", summary="KV cache budget, use and hit rates")
async def get_kv_cache(request: Request) -> KVCacheStats:
    return await admin(request).kv_cache_stats()


@router.get("/sessions", summary="Named sessions kept")
async def get_sessions(request: Request) -> SessionList:
    return await admin(request).list_sessions()


@router.get("/sessions/{session_id:path}", summary="One session")
async def get_session(request: Request, session_id: str) -> SessionInfo:
    return await admin(request).inspect_session(_sid(session_id))


@router.delete("/sessions/{session_id:path}", summary="Evict a session's KV cache")
async def delete_session(request: Request, session_id: str) -> Evicted:
    return await admin(request).evict_session(_sid(session_id))


@router.get("/sampler", summary="Built-in sampler values, server-wide and per-session overrides")
async def get_sampler(request: Request, session_id: Annotated[str | None, Query(max_length=256)] = None
                      ) -> SamplerState:
    return await admin(request).get_sampler_defaults(session_id or None)


@router.post("/sampler", summary="Set sampler overrides (server-wide or for one session)")
async def post_sampler(request: Request, body: SetSampler) -> SamplerState:
    return await admin(request).set_sampler_overrides(body)


@router.post("/sampler/reset", summary="Reset sampler overrides")
async def post_sampler_reset(request: Request, body: ResetSampler) -> SamplerState:
    return await admin(request).reset_sampler_overrides(body)


@router.get("/kernels", summary="Time per kernel and tokens/s over a recent window")
async def get_kernels(request: Request, window_s: Annotated[float, Query(gt=0, le=3600)] = 10.0) -> KernelTiming:
    return await admin(request).kernel_timing(window_s)


@router.post("/kernels/reset", summary="Reset the kernel timings")
async def post_kernels_reset(request: Request) -> KernelTiming:
    return await admin(request).reset_kernel_timing()


@router.post("/generate", summary="A short completion with timing")
async def post_generate(request: Request, body: GenerateArgs) -> Generated:
    return await admin(request).generate(body)


@router.post("/tokenize", summary="Text to token ids and pieces")
async def post_tokenize(request: Request, body: TokenizeArgs) -> Tokenized:
    return await admin(request).tokenize(body)


@router.post("/detokenize", summary="Token ids to text")
async def post_detokenize(request: Request, body: DetokenizeArgs) -> Detokenized:
    return await admin(request).detokenize(body)


def _sid(session_id: str) -> str:
    if not 0 < len(session_id) <= 256:
        raise bad_request("The session id must be 1 to 256 characters.", param="session_id")
    return session_id
