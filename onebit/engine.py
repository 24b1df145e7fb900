"""The engine: one worker thread owns the model, the KV caches and the sessions; requests reach it by a queue.

Callers (HTTP handlers, MCP tools) only ``submit`` a ``GenerationRequest`` from an asyncio loop and read the
returned ``Stream``: ``Chunk``s, then one ``Usage``. The worker runs continuous batching: every step gathers the
next token of every decoding sequence and prefill chunks of newly admitted prompts (at most ``prefill_chunk``
prompt tokens per step, so a long prompt never stalls the others for long) into ONE ``forward_batch`` call,
which reads each weight once for all of them. The model step runs on the worker thread (the cpu backend's
kernels release the GIL, NumPy mostly does), and chunks reach the loop through ``call_soon_threadsafe``.
A greedy sequence decoding alone (nothing prefilling or waiting) takes its tokens from the model's
``greedy_decode`` instead: a backend with chains (cuda) queues the step that consumes a token before the token
reaches the host, so this thread's work per token overlaps the GPU's next step (``Engine.chain``).

``n > 1``: the prompt is prefilled once; the other choices get a copy of its KV and their own sampler
(seed + index). Cancelling (a client that went away) frees the request's slots at the next step; the session
keeps the K/V of what was already computed. Past ``max_queue`` waiting requests, ``submit`` raises
``Overloaded``. Requests for a session that is busy wait in the queue (see ``onebit.cache``).

Introspection (``sessions``, ``evict_session``; anything through ``call``) also runs on the worker, between
steps. ``overrides`` stores the sampler values the server fills into requests that leave them unset.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .cache import SessionStore
from .config import SamplingParams
from .errors import OneBitError

log = logging.getLogger("onebit.engine")

__all__ = ["Engine", "GenerationRequest", "Chunk", "TokenLogprob", "Usage", "Stream", "SamplerOverrides",
           "EngineError", "Overloaded", "NotReady", "ContextOverflow"]


class EngineError(OneBitError):
    """A request could not be served (the message says why)."""


class Overloaded(EngineError):
    """Too many requests are waiting; retry later."""


class NotReady(EngineError):
    """The model is still loading (or failed to load)."""


class ContextOverflow(EngineError, ValueError):
    """The prompt (plus max_tokens) does not fit the context."""


@dataclass
class GenerationRequest:
    """One prompt to complete. ``max_tokens`` None: up to the end of the context. ``logprobs``: None for
    none, k >= 0 for the sampled token's log-probability and the k most likely alternatives."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    logprobs: int | None = None
    session_id: str | None = None
    stop_token_ids: list[int] | None = None  # None: the model's and tokenizer's EOS ids
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class TokenLogprob:
    token_id: int
    text: str  # the token's text; "\\xNN" escapes for bytes that are not UTF-8 on their own
    bytes: bytes
    logprob: float
    top: list[tuple[int, str, bytes, float]]  # (id, text, bytes, logprob), most likely first


@dataclass
class Chunk:
    """New text for choice ``index``; ``finish_reason`` ("stop" or "length") on its last chunk."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


_END = object()

OVERRIDABLE = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
               "repetition_penalty", "seed", "max_tokens")


class SamplerOverrides:
    """Sampler values for requests that leave a field unset: server-wide, then per session (these win).

    Only storage: callers validate values (the admin layer, with the OpenAI request's constraints) and the
    HTTP routes apply them before building SamplingParams. Safe to use from any thread."""

    def __init__(self, max_sessions: int = 4096):
        self.max_sessions = max_sessions
        self._lock = threading.Lock()
        self._server: dict[str, object] = {}
        self._sessions: dict[str, dict[str, object]] = {}

    def update(self, values: dict, session_id: str | None = None) -> None:
        unknown = sorted(set(values) - set(OVERRIDABLE))
        if unknown:
            raise ValueError(f"not a sampler field: {', '.join(unknown)} (fields: {', '.join(OVERRIDABLE)})")
        with self._lock:
            if session_id is None:
                self._server.update(values)
            elif session_id in self._sessions or len(self._sessions) < self.max_sessions:
                self._sessions.setdefault(session_id, {}).update(values)
            else:
                raise ValueError(f"{self.max_sessions} sessions already have overrides; reset some first")

    def reset(self, session_id: str | None = None, fields=None, all_sessions: bool = False) -> None:
        """Forget the server-wide values (or one session's, or every session's); only ``fields`` if given."""
        with self._lock:
            targets = (list(self._sessions.values()) if all_sessions else
                       [self._server] if session_id is None else [self._sessions.get(session_id, {})])
            for t in targets:
                for name in list(t) if fields is None else fields:
                    t.pop(name, None)
            self._sessions = {k: v for k, v in self._sessions.items() if v}

    def resolve(self, session_id: str | None = None) -> dict:
        """The values a request of ``session_id`` gets for the fields it leaves unset."""
        with self._lock:
            return {**self._server, **self._sessions.get(session_id, {})} if session_id else dict(self._server)

    def snapshot(self) -> tuple[dict, dict[str, dict]]:
        """(server-wide values, {session id: values})."""
        with self._lock:
            return dict(self._server), {k: dict(v) for k, v in self._sessions.items()}


def _run_call(fn, future: concurrent.futures.Future) -> None:
    try:
        future.set_result(fn())
    except Exception as e:  # noqa: BLE001 - handed to the caller
        future.set_exception(e)


def _deliver_all(pairs) -> None:
    for stream, items in pairs:
        stream._deliver(items)


class Stream:
    """Async iterator over one request's ``Chunk``s and final ``Usage``; raises EngineError on failure.
    ``close()`` / ``aclose()`` before the end cancels the request."""

    def __init__(self, engine: "Engine", request: GenerationRequest):
        self.engine, self.request, self.id = engine, request, request.id
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self.done = False

    def _deliver(self, items: list) -> None:
        """On the loop: hand over the items the worker produced for this stream in one step."""
        for item in items:
            self._queue.put_nowait(item)

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            self.done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.done = True
            raise item
        return item

    def close(self) -> None:
        """Cancel the request unless it already ended (safe to call more than once)."""
        if not self.done:
            self.done = True
            self.engine.cancel(self.id)

    async def aclose(self) -> None:
        self.close()


def token_text(tokenizer, token_id: int) -> tuple[str, bytes]:
    """(text, bytes) of one token. A token that is only part of a UTF-8 character (byte-level BPE, or
    SentencePiece ``<0xNN>`` byte fallback) gets its raw bytes and a ``\\xNN`` text."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return text, text.encode("utf-8")
    data = tokenizer.token_bytes(token_id)
    if data is None:
        return text, text.encode("utf-8")
    try:
        return data.decode("utf-8"), data
    except UnicodeDecodeError:
        return "".join(f"\\x{b:02x}" for b in data), data


# ---- the worker's bookkeeping --------------------------------------------------------------------------


class _Seq:
    """One choice of a request: its cache, sampler, detokenizer and stop matcher."""

    def __init__(self, job: "_Job", index: int, cache, tokenizer):
        from .sampling import make_sampler
        from .stops import StopMatcher

        self.job, self.index, self.cache = job, index, cache
        params = job.req.params
        if params.seed is not None and index:
            params = dataclasses.replace(params, seed=params.seed + index)
        self.sampler = make_sampler(params)
        self.detok = tokenizer.detokenizer(skip_special_tokens=True)
        self.matcher = StopMatcher(job.req.stop) if job.req.stop else None
        self.generated: list[int] = []
        self.feed: list[int] | None = None  # the token to run next step
        self.tail = False  # finished; the last token is fed once more so the cache holds all of it

    @property
    def argmax_only(self) -> bool:
        """Its next token is the argmax and nothing else of the logits is used (greedy, no logprobs): the model
        may pick it where the logits are (``decode_greedy`` / ``greedy_decode``)."""
        return self.sampler.greedy and self.job.req.logprobs is None

    def sample(self, logits: np.ndarray, tokenizer) -> tuple[int, TokenLogprob | None]:
        p = self.sampler.params
        history = self.job.req.prompt_ids + self.generated if p.repetition_penalty != 1 else ()
        token = int(self.sampler(logits, history, self.generated))
        k = self.job.req.logprobs
        if k is None:
            return token, None
        from .sampling import log_softmax

        lp = log_softmax(self.sampler.process_logits(logits, history, self.generated))
        top = np.argpartition(-lp, k - 1)[:k] if k else np.zeros(0, dtype=np.int64)
        top = top[np.argsort(-lp[top], kind="stable")]  # (k,) most likely first
        alts = [(int(i), *token_text(tokenizer, int(i)), float(lp[i])) for i in top]
        return token, TokenLogprob(token, *token_text(tokenizer, token), float(lp[token]), alts)

    def push_text(self, token: int) -> tuple[str, bool]:
        piece = self.detok.add(token)
        if self.matcher is None:
            return piece, False
        return self.matcher.push(piece)

    def flush_text(self) -> str:
        tail = self.detok.flush()
        if self.matcher is None:
            return tail
        tail, stopped = self.matcher.push(tail)
        return tail if stopped else tail + self.matcher.flush()


@dataclass(eq=False)
class _Job:
    req: GenerationRequest
    stream: Stream
    max_tokens: int
    stop_ids: set[int]
    capacity: int
    seqs: list[_Seq] = field(default_factory=list)
    todo: list[int] = field(default_factory=list)  # prompt tokens still to prefill
    lease: object = None
    finished: int = 0
    completion_tokens: int = 0
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.finished == len(self.seqs) and bool(self.seqs)


class Engine:
    """See the module docstring. Give a loaded ``model`` or a ``loader`` (called on the worker thread by
    ``start()``, so a server can listen while the model loads). Sizes: ``ctx`` tokens per sequence (default:
    the model's), ``max_batch`` sequences decoding together, ``max_queue`` requests waiting,
    ``kv_budget_bytes`` for all KV caches, ``max_sessions`` named sessions kept, ``session_ttl`` seconds."""

    def __init__(self, model=None, *, loader: Callable[[], object] | None = None, ctx: int | None = None,
                 max_batch: int = 16, max_queue: int = 64, prefill_chunk: int = 256,
                 kv_budget_bytes: int = 2 << 30, max_sessions: int = 256, session_ttl: float = 1800.0,
                 max_prefix_entries: int = 16):
        if model is None and loader is None:
            raise ValueError("Engine needs a model or a loader")
        self._loader = loader
        self.model = model
        self._ctx_wanted = ctx
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self._store_args = dict(budget_bytes=kv_budget_bytes, max_sessions=max_sessions, ttl=session_ttl,
                                max_prefix_entries=max_prefix_entries)
        self.store: SessionStore | None = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.on_load_error: Callable[[BaseException], None] | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0  # submitted, not yet admitted
        self._waiting: collections.deque[_Job] = collections.deque()
        self._jobs: dict[str, _Job] = {}
        self._active: list[_Seq] = []  # sequences with a cache (prefilling, decoding or tail)
        self._prefilling: list[_Job] = []
        # one greedy sequence alone decodes through the model's greedy_decode (a backend that can keeps the next
        # step queued while the host handles this one's token): (sequence, token iterator)
        self.chain = True
        self._chain: tuple | None = None
        self._outbox: dict[Stream, list] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self.tokens_generated = 0
        self.ctx = 0
        self.overrides = SamplerOverrides()
        self.sampling_time = [0.0, 0]  # seconds and calls of the samplers (the kernels' timings cover the rest)
        self.recent: collections.deque = collections.deque(maxlen=4096)  # per step: (end, seconds, prompt, generated)
        self._turns: dict[str, int] = {}  # session id -> turns its cached KV holds

    # -- public ------------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        """Start the worker (it loads the model first if a loader was given)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="onebit-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; requests still running or queued end with an EngineError."""
        self._stopping = True
        if self._thread is not None:
            self._inbox.put(("stop", None))
            self._thread.join(timeout)
            self._thread = None

    def submit(self, request: GenerationRequest) -> Stream:
        """Queue a request (call from a running asyncio loop); its chunks arrive on the returned Stream."""
        if self._stopping:
            raise NotReady("the server is shutting down")
        if not self.ready.is_set():
            raise NotReady("the model failed to load" if self.load_error else "the model is still loading")
        self.check_fits(len(request.prompt_ids), request.max_tokens)
        if request.n < 1:
            raise ValueError(f"n must be at least 1, got {request.n}")
        with self._lock:
            if self._pending >= self.max_queue:
                raise Overloaded(f"{self._pending} requests are already waiting (--max-queue {self.max_queue})")
            self._pending += 1
        stream = Stream(self, request)
        self._inbox.put(("submit", stream))
        return stream

    def check_fits(self, prompt_tokens: int, max_tokens: int | None) -> None:
        """Raise ContextOverflow unless the prompt (and max_tokens, when given) fit the context."""
        if prompt_tokens < 1:
            raise ValueError("the prompt is empty")
        if prompt_tokens >= self.ctx or (max_tokens is not None and prompt_tokens + max_tokens > self.ctx):
            asked = prompt_tokens + (max_tokens or 0)
            raise ContextOverflow(
                f"This model's maximum context length is {self.ctx} tokens. However, you requested {asked} "
                f"tokens ({prompt_tokens} in the prompt, {max_tokens or 0} for the completion). Please reduce "
                "the length of the prompt or the completion.")

    def cancel(self, request_id: str) -> None:
        """Stop a request (from any thread); its slots are freed at the next step."""
        self._inbox.put(("cancel", request_id))

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run ``fn()`` on the worker between steps (it owns the sessions); the future gets its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._stopping or self._thread is None:
            future.set_exception(NotReady("the engine is not running"))
        elif not self.ready.is_set():
            why = "the model failed to load" if self.load_error else "the model is still loading"
            future.set_exception(NotReady(why))
        else:
            self._inbox.put(("call", (fn, future)))
        return future

    def sessions(self, token_ids: bool = False) -> concurrent.futures.Future:
        """Named sessions kept, as dicts: id, tokens, bytes, capacity, turns, busy, idle_s (and token_ids)."""
        return self.call(lambda: self._session_rows(token_ids))

    def evict_session(self, session_id: str) -> concurrent.futures.Future:
        """Drop an idle session's KV cache (its next turn prefills everything); the future gets its row.
        KeyError: no such session; EngineError: a request is using it."""
        return self.call(lambda: self._evict(session_id))

    def stats(self) -> dict:
        """Counters for /metrics and MCP: running and waiting requests, sequences, steps, KV cache, kernels."""
        s = {"ready": self.ready.is_set(), "requests_running": len(self._jobs) - len(self._waiting),
             "requests_waiting": self._pending, "sequences_running": len(self._active), "steps": self.steps,
             "ctx": self.ctx, "max_batch": self.max_batch, "max_queue": self.max_queue}
        if self.store is not None:
            s.update(self.store.stats())
        timings = getattr(getattr(self.model, "backend", None), "timings", None)
        if callable(timings):
            s["kernels"] = timings()
        return s

    # -- the worker --------------------------------------------------------------------------------------
    def _run(self) -> None:
        if not self._load():
            return
        last_expiry = time.monotonic()
        while True:
            if not self._drain(block=not (self._active or self._waiting)):
                break
            if time.monotonic() - last_expiry > 1.0:
                self.store.expire()
                last_expiry = time.monotonic()
            self._admit()
            if self._active:
                self._step()
            self._flush()
        self._shutdown()

    def _load(self) -> bool:
        try:
            if self.model is None:
                self.model = self._loader()
            limit = self.model.config.max_position_embeddings
            self.ctx = min(self._ctx_wanted or limit, limit)
            self.store = SessionStore(self.model.make_cache, **self._store_args)
            warmup = getattr(self.model.net.backend, "warmup", None)  # JIT backends compile before serving
            if warmup is not None:
                t0 = time.monotonic()
                log.info("compiling kernels for batches up to %d ...", self.max_batch)
                warmup(self.model.net, self.max_batch)
                log.info("kernels ready in %.1f s", time.monotonic() - t0)
        except BaseException as e:  # noqa: BLE001 - reported through /health and the serve command
            log.error("loading the model failed: %s", e)
            self.load_error = e
            if self.on_load_error:
                self.on_load_error(e)
            return False
        self.ready.set()
        return True

    def _drain(self, block: bool) -> bool:
        """Handle queued messages (waiting up to a second for one when idle); False on stop."""
        try:
            msg = self._inbox.get(timeout=1.0) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind, arg = msg
            if kind == "stop":
                return False
            if kind == "submit":
                self._enqueue(arg)
            elif kind == "call":
                _run_call(*arg)
            else:
                self._cancel(arg)
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _enqueue(self, stream: Stream) -> None:
        req = stream.request
        room = self.ctx - len(req.prompt_ids)
        max_tokens = room if req.max_tokens is None else min(req.max_tokens, room)
        stop_ids = set(req.stop_token_ids if req.stop_token_ids is not None else self._eos_ids())
        capacity = min(self.ctx, -(-(len(req.prompt_ids) + max_tokens + 1) // 256) * 256)
        job = _Job(req, stream, max_tokens, stop_ids, capacity)
        self._jobs[req.id] = job
        self._waiting.append(job)

    def _eos_ids(self) -> list[int]:
        tok = self.model.tokenizer
        return list(self.model.config.eos_token_id) + (list(tok.eos_token_ids) if tok is not None else [])

    def _cancel(self, request_id: str) -> None:
        job = self._jobs.get(request_id)
        if job is None:
            return
        job.cancelled = True
        if job in self._waiting:
            self._waiting.remove(job)
            self._pending_done()
            del self._jobs[request_id]
            return
        for seq in job.seqs:
            if seq in self._active:
                self._release(seq)

    def _pending_done(self) -> None:
        with self._lock:
            self._pending -= 1

    # -- admission ----------------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Admit waiting requests in order while slots and KV budget allow (busy sessions wait their turn)."""
        for job in list(self._waiting):
            if self.store.is_busy(job.req.session_id):
                continue
            n = job.req.n
            if self._active and len(self._active) + n > self.max_batch:
                break
            if not self.store.make_room(n * self.store.bytes_for(job.capacity)) and self._active:
                break
            self._waiting.remove(job)
            self._pending_done()
            self._start(job)

    def _start(self, job: _Job) -> None:
        req = job.req
        try:
            job.lease = self.store.acquire(req.session_id, req.prompt_ids, job.capacity)
        except Exception as e:  # noqa: BLE001 - a failed allocation fails this request only
            self._fail(job, e)
            return
        lead = _Seq(job, 0, job.lease.cache, self.model.tokenizer)
        job.seqs = [lead]
        job.todo = list(req.prompt_ids[job.lease.reused:])
        if req.session_id is not None:
            turns = self._turns.get(req.session_id, 0) if job.lease.hit == "session" else 0
            self._turns[req.session_id] = turns + 1
            if len(self._turns) > 2 * self.store.max_sessions:
                self._session_rows()  # forgets the turns of sessions no longer kept
        self._active.append(lead)
        self._prefilling.append(job)

    # -- one step ------------------------------------------------------------------------------------------
    def _step(self) -> None:
        if self._chain_step():
            return
        items, owners = [], []
        for seq in self._active:
            if seq.feed is not None:
                items.append((seq.feed, seq.cache))
                owners.append(seq)
        budget = self.prefill_chunk
        t0, generated = time.perf_counter(), self.tokens_generated
        for job in self._prefilling:
            if budget <= 0:
                break
            chunk, job.todo = job.todo[:budget], job.todo[budget:]
            budget -= len(chunk)
            items.append((chunk, job.seqs[0].cache))
            owners.append(job)
        self._prefilling = [j for j in self._prefilling if j.todo]
        if not items:
            return
        # a decode-only step of greedy choices without logprobs (or tails, whose token is not used) asks the model
        # for the argmax tokens only: a backend that picks them on the device moves no logits
        greedy = all(isinstance(o, _Seq) and (o.tail or o.argmax_only) for o in owners)
        try:
            if greedy:
                tokens = self.model.net.decode_greedy(items)
            else:
                logits = self.model.net.forward_batch(items, last_only=True)
        except Exception as e:  # noqa: BLE001 - fail the requests of this step, keep serving
            log.exception("model step failed")
            for job in {o.job if isinstance(o, _Seq) else o for o in owners}:
                self._fail(job, e)
            return
        self.steps += 1
        if greedy:
            for owner, token in zip(owners, tokens):
                self._after_feed(owner, token=int(token))
        else:
            for owner, lg in zip(owners, logits):
                if isinstance(owner, _Seq):
                    self._after_feed(owner, lg[-1])
                elif not owner.todo and not owner.cancelled:
                    self._prefilled(owner, lg[-1])
        self.recent.append((time.monotonic(), time.perf_counter() - t0, self.prefill_chunk - budget,
                            self.tokens_generated - generated))

    def _chain_step(self) -> bool:
        """One token of a greedy sequence decoding alone, from its chain (opened here, closed when anything else
        needs a step); False when the step is not for a chain."""
        seq = self._active[0] if len(self._active) == 1 and not (self._prefilling or self._waiting) else None
        alone = (self.chain and seq is not None and seq.feed is not None and not seq.tail and seq.argmax_only
                 and not seq.job.cancelled)
        # an open chain serves its sequence while that decodes alone (then each token it yields is the next fed)
        if self._chain is not None and not (alone and self._chain[0] is seq):
            self._close_chain()
        if not alone:
            return False
        t0, generated = time.perf_counter(), self.tokens_generated
        if self._chain is None:
            self._chain = (seq, self.model.net.greedy_decode(seq.feed[0], seq.cache,
                                                             seq.job.max_tokens - len(seq.generated)))
        try:
            token = next(self._chain[1])
        except StopIteration:  # the chain ran out (a full cache): the plain step says what happens next
            self._close_chain()
            return False
        except Exception as e:  # noqa: BLE001 - fail this request, keep serving
            log.exception("model step failed")
            self._close_chain()
            self._fail(seq.job, e)
            return True
        self.steps += 1
        self._after_feed(seq, token=int(token))
        self.recent.append((time.monotonic(), time.perf_counter() - t0, 0, self.tokens_generated - generated))
        return True

    def _close_chain(self) -> None:
        """Close the open chain: a step it queued past the tokens taken is dropped (the cache holds exactly what
        the taken tokens needed)."""
        chain, self._chain = self._chain, None
        if chain is not None:
            chain[1].close()

    def _prefilled(self, job: _Job, logits: np.ndarray) -> None:
        """The prompt is in the leader's cache: fork the other choices, then sample every choice."""
        from .cache import copy_kv

        lead = job.seqs[0]
        for i in range(1, job.req.n):
            cache = self.store.allocate(job.capacity)
            copy_kv(lead.cache, cache, lead.cache.length)
            seq = _Seq(job, i, cache, self.model.tokenizer)
            job.seqs.append(seq)
            self._active.append(seq)
        for seq in list(job.seqs):
            self._advance(seq, logits)

    def _after_feed(self, seq: _Seq, logits: np.ndarray | None = None, token: int | None = None) -> None:
        seq.feed = None
        if seq.tail or seq.job.cancelled:
            self._release(seq)
        else:
            self._advance(seq, logits, token)

    def _advance(self, seq: _Seq, logits: np.ndarray | None, token: int | None = None) -> None:
        """Sample one token for ``seq`` (``token``: the model already picked it, greedily), emit its text, and
        decide whether it goes on."""
        job = seq.job
        if job.cancelled:
            return
        t0 = time.perf_counter()
        try:
            token, lp = (token, None) if token is not None else seq.sample(logits, self.model.tokenizer)
        except Exception as e:  # noqa: BLE001 - e.g. a logit_bias id outside the vocabulary
            self._fail(job, e)
            return
        finally:
            timing = self.sampling_time
            timing[0] += time.perf_counter() - t0
            timing[1] += 1
        seq.generated.append(token)
        job.completion_tokens += 1
        self.tokens_generated += 1
        finish = None
        if token in job.stop_ids:
            text, finish = seq.flush_text(), "stop"
        else:
            text, stopped = seq.push_text(token)
            if stopped:
                finish = "stop"
            elif len(seq.generated) >= job.max_tokens:
                text, finish = text + seq.flush_text(), "length"
        ids = [] if token in job.stop_ids else [token]
        self._emit(job, Chunk(seq.index, text, ids, [lp] if lp else None, finish))
        if finish is None:
            seq.feed = [token]
        else:
            self._finish(seq)

    def _finish(self, seq: _Seq) -> None:
        job = seq.job
        job.finished += 1
        if job.done:
            usage = Usage(len(job.req.prompt_ids), job.completion_tokens, job.lease.reused)
            self._emit(job, usage)
            self._emit(job, _END)
            self._jobs.pop(job.req.id, None)
        if seq.index == 0 and seq.cache.length < seq.cache.max_len:
            seq.tail, seq.feed = True, seq.generated[-1:]  # one more step: the session caches every token
        else:
            self._release(seq)

    def _emit(self, job: _Job, item) -> None:
        """Queue an item for the job's stream; ``_flush`` hands a step's items to the loop in one call."""
        if not job.cancelled:
            self._outbox.setdefault(job.stream, []).append(item)

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        by_loop: dict = {}
        for stream, items in outbox.items():
            by_loop.setdefault(stream._loop, []).append((stream, items))
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, pairs)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                for stream, _ in pairs:
                    self._cancel(stream.id)

    def _release(self, seq: _Seq) -> None:
        """Give the sequence's cache back: the leader's to the session store, the others' freed."""
        if seq not in self._active:
            return
        if self._chain is not None and self._chain[0] is seq:
            self._close_chain()
        self._active.remove(seq)
        job = seq.job
        if seq.index == 0:
            tokens = job.req.prompt_ids + seq.generated
            self.store.release(job.lease, tokens)
        else:
            self.store.free(seq.cache)
        if job.cancelled and not any(s in self._active for s in job.seqs):
            self._jobs.pop(job.req.id, None)
            self._prefilling = [j for j in self._prefilling if j is not job]

    def _fail(self, job: _Job, error: BaseException) -> None:
        if not isinstance(error, EngineError):
            error = EngineError(f"generation failed: {error}")
        self._emit(job, error)
        job.cancelled = True
        self._jobs.pop(job.req.id, None)
        self._prefilling = [j for j in self._prefilling if j is not job]
        for seq in job.seqs:
            if seq in self._active:
                self._release(seq)
        if not job.seqs and job.lease is not None:
            self.store.release(job.lease, [], keep=False)

    # -- sessions, for introspection (run on the worker through call()) ------------------------------------
    def _session_rows(self, token_ids: bool = False) -> list[dict]:
        entries = self.store.sessions()
        self._turns = {e.key: self._turns.get(e.key, 0) for e in entries}
        now = time.monotonic()
        return [{"id": e.key, "tokens": len(e.tokens), "bytes": e.cache.nbytes(), "capacity": e.cache.max_len,
                 "turns": self._turns[e.key], "busy": e.busy, "idle_s": max(0.0, now - e.last_used),
                 **({"token_ids": list(e.tokens)} if token_ids else {})} for e in entries]

    def _evict(self, session_id: str) -> dict:
        rows = {r["id"]: r for r in self._session_rows()}
        if session_id not in rows:
            raise KeyError(session_id)
        if rows[session_id]["busy"]:
            raise EngineError(f"session {session_id!r} is in use by a running request; evict it when it ends")
        self.store.evict(session_id)
        self._turns.pop(session_id, None)
        return rows[session_id]

    def _shutdown(self) -> None:
        err = EngineError("the server is shutting down")
        self._close_chain()
        while True:  # requests submitted after the stop message
            try:
                kind, arg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                self._enqueue(arg)
            elif kind == "call":
                arg[1].set_exception(err)
        for job in list(self._jobs.values()):
            self._emit(job, err)
            job.cancelled = True
        self._flush()
        self._jobs.clear()
        self._waiting.clear()
