"""Limits: token buckets per session / client (requests and generated tokens per minute), request body size."""

from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .openai import APIError, error_body


class TokenBucket:
    """``rate_per_min`` tokens a minute, holding at most one minute's worth. ``take`` may run into debt
    (generated tokens are counted after the fact); ``wait`` is the seconds until the balance reaches ``need``."""

    def __init__(self, rate_per_min: float, now: float):
        self.capacity = float(rate_per_min)
        self.rate = rate_per_min / 60.0
        self.level, self.stamp = self.capacity, now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, now: float, need: float = 1.0) -> float:
        self._refill(now)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, now: float, n: float) -> None:
        self._refill(now)
        self.level -= n


class RateLimiter:
    """Per-key buckets for requests/minute (``rpm``) and generated tokens/minute (``tpm``); 0 disables one.
    Keys are ``session:<id>`` or ``client:<address>``; at most ``max_keys`` are tracked (LRU)."""

    def __init__(self, rpm: float = 0, tpm: float = 0, max_keys: int = 10000, clock=time.monotonic):
        self.rpm, self.tpm, self.max_keys, self.clock = rpm, tpm, max_keys, clock
        self._buckets: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def _bucket(self, kind: str, key: str, rate: float, now: float) -> TokenBucket:
        b = self._buckets.get((kind, key))
        if b is None:
            b = self._buckets[(kind, key)] = TokenBucket(rate, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end((kind, key))
        return b

    def check(self, key: str) -> None:
        """Count one request; raise a 429 APIError (with Retry-After) when a budget is spent."""
        with self._lock:
            now = self.clock()
            if self.tpm:
                wait = self._bucket("tokens", key, self.tpm, now).wait(now)
                if wait > 0:
                    raise _limited("generated tokens per minute", self.tpm, wait, "tokens")
            if self.rpm:
                b = self._bucket("requests", key, self.rpm, now)
                wait = b.wait(now)
                if wait > 0:
                    raise _limited("requests per minute", self.rpm, wait, "requests")
                b.take(now, 1)

    def spend_tokens(self, key: str, n: int) -> None:
        if self.tpm and n:
            with self._lock:
                now = self.clock()
                self._bucket("tokens", key, self.tpm, now).take(now, n)


def _limited(what: str, limit: float, wait: float, kind: str) -> APIError:
    seconds = max(1, math.ceil(wait))
    return APIError(429, f"Rate limit reached: {limit:g} {what}. Please try again in {seconds}s.", type=kind,
                    code="rate_limit_exceeded", headers={"Retry-After": str(seconds)})


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 in OpenAI's shape before the app runs.
    The body is read here (up to the limit) and replayed to the app; later receives (disconnects) pass on.

    Before answering 413 the rest of the body is read and dropped, up to ``drain_bytes`` in all: a server that
    answers and closes while the client is still sending makes the client's next write fail with a reset,
    and the client then reports a dropped connection instead of the 413 (about 1 in 20 times for a 9 MB body
    here). Bodies past ``drain_bytes`` are cut off at once."""

    def __init__(self, app: ASGIApp, max_bytes: int, drain_bytes: int | None = None):
        self.app, self.max_bytes = app, max_bytes
        self.drain_bytes = drain_bytes if drain_bytes is not None else max(4 * max_bytes, 32 << 20)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        declared = int(declared) if declared is not None and declared.isdigit() else None
        if declared is not None and declared > self.max_bytes:
            if declared <= self.drain_bytes:
                await self._drain(receive, 0)
            await self._reject(send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await self._drain(receive, size)
                await self._reject(send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _drain(self, receive: Receive, size: int) -> None:
        """Read and drop the rest of the body while it stays within drain_bytes (size: bytes already read)."""
        while size <= self.drain_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _reject(self, send: Send) -> None:
        body = json.dumps(error_body(f"The request body is larger than the limit of {self.max_bytes} bytes.",
                                     code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
