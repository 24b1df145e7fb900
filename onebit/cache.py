"""SessionStore: session id -> tokens + KV cache, longest-prefix reuse, LRU over a KV byte budget, idle expiry.

The store is owned by the engine worker (ARCHITECTURE.md): only that thread mutates it; ``stats()`` may be
called from any thread. Every KV cache the engine uses is allocated here, so the byte count covers the
caches of running requests as well as the idle ones kept for reuse.

Semantics
- A *named* session (``X-1bit-Session``) keeps the tokens whose K/V its cache holds. The next request with
  that id reuses the longest common prefix of those tokens and its prompt and prefills only the rest.
- A request without a session id leaves its cache behind as an anonymous *prefix entry*; a later request
  reuses the entry with the longest common prefix (taking it over when most of it is reused, else copying
  the shared prefix, so one short overlap does not destroy a long cached context).
- While a request holds a session it is *busy*: it is never evicted, and the engine queues other requests for
  the same session until it is released (queue, not 409: a conversation's turns run in order).
- Idle entries are evicted least-recently-used first when the byte budget, ``max_sessions`` or
  ``max_prefix_entries`` is exceeded, and dropped after ``ttl`` seconds idle. Eviction only ever costs a
  re-prefill: a request's cache is taken at admission and held until it finishes.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SessionStore", "Lease", "common_prefix", "copy_kv"]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def copy_kv(src, dst, n: int) -> None:
    """Copy the first ``n`` positions of every layer's K/V from ``src`` into ``dst``; ``dst.length = n``.

    Works for any cache whose ``k``/``v`` arrays (NumPy or torch) have one position axis of size ``max_len``.
    """
    if hasattr(src, "copy_to"):
        src.copy_to(dst, n)
        return
    axis = _position_axis(src, dst)
    for name in ("k", "v"):
        s, d = getattr(src, name), getattr(dst, name)
        if axis is None:
            d[...] = s
        else:
            index = (slice(None),) * axis + (slice(0, n),)
            d[index] = s[index]
    dst.length = n


def _position_axis(src, dst) -> int | None:
    """The axis of k that has size max_len (None when both caches have the same shape: copy it all)."""
    a, b = tuple(src.k.shape), tuple(dst.k.shape)
    if a == b:
        return None
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if len(a) != len(b) or len(diff) != 1 or a[diff[0]] != src.max_len or b[diff[0]] != dst.max_len:
        raise ValueError(f"cannot copy a KV cache of shape {a} into one of shape {b}")
    return diff[0]


@dataclass
class Entry:
    """A cache kept for reuse: ``tokens`` are exactly the positions whose K/V it holds."""

    key: str
    cache: Any
    tokens: list[int]
    named: bool
    last_used: float
    busy: bool = False


@dataclass
class Lease:
    """What ``acquire`` hands out: a cache holding the first ``reused`` prompt tokens, for one request."""

    key: str | None  # the session id, None for an anonymous request
    cache: Any
    reused: int
    hit: str  # "session", "prefix" or "miss"
    entry: Entry | None = field(default=None, repr=False)


class SessionStore:
    """See the module docstring. ``make_cache(max_len)`` builds an empty cache on the model's backend."""

    def __init__(self, make_cache: Callable[[int], Any], budget_bytes: int, max_sessions: int = 256,
                 ttl: float = 1800.0, max_prefix_entries: int = 16, clock: Callable[[], float] = time.monotonic):
        self._make_cache, self.budget_bytes = make_cache, int(budget_bytes)
        self.max_sessions, self.ttl, self.max_prefix_entries = max_sessions, ttl, max_prefix_entries
        self._clock = clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self.bytes_used = 0
        self.hits = {"session": 0, "prefix": 0, "miss": 0}
        self.reused_tokens = 0
        self.evictions = 0
        self.bytes_per_position = self._measure()

    def _measure(self) -> int:
        one, two = self._make_cache(1).nbytes(), self._make_cache(2).nbytes()
        return max(1, two - one)

    # -- caches ----------------------------------------------------------------------------------------
    def bytes_for(self, max_len: int) -> int:
        """Bytes a cache of ``max_len`` positions takes (to check the budget before allocating)."""
        return self.bytes_per_position * max_len

    def allocate(self, max_len: int):
        cache = self._make_cache(max_len)
        with self._lock:
            self.bytes_used += cache.nbytes()
        return cache

    def free(self, cache) -> None:
        with self._lock:
            self.bytes_used -= cache.nbytes()

    def make_room(self, nbytes: int) -> bool:
        """Evict idle entries (LRU) until ``nbytes`` more fit the budget; whether they do."""
        while self.bytes_used + nbytes > self.budget_bytes:
            if not self._evict_one(lambda e: True):
                return False
        return True

    # -- leases ----------------------------------------------------------------------------------------
    def is_busy(self, session_id: str | None) -> bool:
        entry = self._entries.get(session_id) if session_id is not None else None
        return entry is not None and entry.busy

    def acquire(self, session_id: str | None, prompt: Sequence[int], max_len: int) -> Lease:
        """A cache of at least ``max_len`` positions holding the longest cached prefix of ``prompt`` (at
        most ``len(prompt) - 1`` tokens: the last prompt token is always computed, for its logits)."""
        limit = len(prompt) - 1
        own = self._entries.get(session_id) if session_id is not None else None
        if own is not None and own.busy:
            raise RuntimeError(f"session {session_id!r} is in use")  # the engine queues instead
        if own is not None and common_prefix(own.tokens, prompt) > 0:
            lease = self._take(own, min(common_prefix(own.tokens, prompt), limit), max_len, "session")
        else:
            if own is not None:
                self._drop(own)
            lease = self._from_prefix(prompt, limit, max_len)
        lease.key = session_id
        if session_id is not None:
            entry = Entry(session_id, lease.cache, [], True, self._clock(), busy=True)
            self._entries[session_id] = entry
            self._entries.move_to_end(session_id)
            lease.entry = entry
        self.hits[lease.hit] += 1
        self.reused_tokens += lease.reused
        return lease

    def _from_prefix(self, prompt: Sequence[int], limit: int, max_len: int) -> Lease:
        best, k = None, 0
        for e in self._entries.values():
            if not e.busy:
                m = common_prefix(e.tokens, prompt)
                if m > k:
                    best, k = e, m
        k = min(k, limit)
        if best is None or k <= 0:
            return Lease(None, self.allocate(max_len), 0, "miss")
        if not best.named and 2 * k >= len(best.tokens):
            return self._take(best, k, max_len, "prefix")
        cache = self.allocate(max_len)
        copy_kv(best.cache, cache, k)
        best.last_used = self._clock()
        return Lease(None, cache, k, "prefix")

    def _take(self, entry: Entry, k: int, max_len: int, hit: str) -> Lease:
        """Take an entry's cache over (grown to ``max_len`` if it is smaller), keeping its first k tokens."""
        del self._entries[entry.key]
        cache = entry.cache
        cache.trim(k)
        if cache.max_len < max_len:
            bigger = self.allocate(max_len)
            copy_kv(cache, bigger, k)
            self.free(cache)
            cache = bigger
        return Lease(None, cache, k, hit)

    def release(self, lease: Lease, tokens: Sequence[int], keep: bool = True) -> None:
        """Return a leased cache; ``tokens`` are the ones whose K/V it now holds (cache.length of them).
        ``keep=False`` frees it (a named session then starts empty next time)."""
        tokens = list(tokens[: lease.cache.length])
        if lease.key is not None:
            entry = lease.entry
            entry.tokens, entry.busy, entry.last_used = tokens, False, self._clock()
            if not keep:
                self._drop(entry)
        elif keep and tokens:
            key = f"~{next(self._ids)}"
            self._entries[key] = Entry(key, lease.cache, tokens, False, self._clock())
        else:
            self.free(lease.cache)
        self._enforce_limits()

    def _enforce_limits(self) -> None:
        while self.bytes_used > self.budget_bytes and self._evict_one(lambda e: True):
            pass
        while self._count(named=True) > self.max_sessions and self._evict_one(lambda e: e.named):
            pass
        while self._count(named=False) > self.max_prefix_entries and self._evict_one(lambda e: not e.named):
            pass

    def _count(self, named: bool) -> int:
        return sum(1 for e in self._entries.values() if e.named == named)

    def _evict_one(self, match: Callable[[Entry], bool]) -> bool:
        for e in self._entries.values():
            if not e.busy and match(e):
                self._drop(e)
                self.evictions += 1
                return True
        return False

    def _drop(self, entry: Entry) -> None:
        del self._entries[entry.key]
        self.free(entry.cache)

    def sessions(self) -> list[Entry]:
        """The named (session-pinned) entries, in LRU order."""
        return [e for e in list(self._entries.values()) if e.named]

    def evict(self, key: str) -> None:
        """Forget an idle entry now (its next use re-prefills). KeyError if unknown."""
        self._drop(self._entries[key])
        self.evictions += 1

    def expire(self) -> int:
        """Drop entries idle for longer than ``ttl``; how many."""
        cutoff = self._clock() - self.ttl
        old = [e for e in self._entries.values() if not e.busy and e.last_used < cutoff]
        for e in old:
            self._drop(e)
        return len(old)

    def clear(self) -> None:
        for e in [e for e in self._entries.values() if not e.busy]:
            self._drop(e)

    def stats(self) -> dict:
        """Numbers for /metrics and MCP: bytes, budget, cached tokens, sessions, prefix entries, hits."""
        entries = list(self._entries.values())
        return {
            "kv_bytes_used": self.bytes_used,
            "kv_budget_bytes": self.budget_bytes,
            "tokens_cached": sum(len(e.tokens) for e in entries),
            "sessions": sum(1 for e in entries if e.named),
            "sessions_busy": sum(1 for e in entries if e.busy),
            "prefix_entries": sum(1 for e in entries if not e.named),
            "session_hits": self.hits["session"],
            "prefix_hits": self.hits["prefix"],
            "cache_misses": self.hits["miss"],
            "reused_tokens": self.reused_tokens,
            "evictions": self.evictions,
        }
