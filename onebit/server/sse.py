"""Server-sent events: ``data: {json}`` frames, keep-alive comments, ``[DONE]``, and cancel on disconnect."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

KEEPALIVE = object()  # yielded by ``merge`` when nothing arrived for a while
_DONE = object()


def frame(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


DONE_FRAME = b"data: [DONE]\n\n"
KEEPALIVE_FRAME = b": keep-alive\n\n"


async def merge(streams: list, keepalive: float | None = None) -> AsyncIterator:
    """Yield (stream index, item) from several engine streams as items arrive, and KEEPALIVE every
    ``keepalive`` seconds. Closing the generator (or an error) cancels every stream still running.

    (No ``asyncio.wait_for`` here: on Python 3.11 it can swallow a cancellation that races a result.)"""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream) -> None:
        try:
            async for item in stream:
                q.put_nowait((i, item))
            q.put_nowait((i, _DONE))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            q.put_nowait((i, e))

    async def tick() -> None:
        while True:
            await asyncio.sleep(keepalive)
            q.put_nowait((None, KEEPALIVE))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    if keepalive:
        tasks.append(asyncio.create_task(tick()))
    live = len(streams)
    try:
        while live:
            i, item = await q.get()
            if item is KEEPALIVE:
                yield KEEPALIVE
            elif item is _DONE:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.close()


class EventStream(Response):
    """Streams the byte frames of ``frames``; a client disconnect cancels the iteration at once (and so the
    engine requests behind it, through the generator's cleanup)."""

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncIterator[bytes], headers: dict[str, str] | None = None,
                 on_close: Callable[[], None] | None = None):
        self.frames, self.on_close = frames, on_close
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:
            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                async for data in self.frames:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                pass  # the client went away mid-write
            finally:
                with anyio.CancelScope(shield=True):
                    await self.frames.aclose()
                if self.on_close is not None:
                    self.on_close()
                tg.cancel_scope.cancel()
