"""Stop strings on a stream of text deltas: hold back what might start one, cut at the first that completes."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopMatcher"]


class StopMatcher:
    """Feed text deltas with ``push``; emit what it returns; call ``flush`` when generation ends.

    ``push(delta) -> (text, stopped)``: ``text`` is safe to emit now. Any tail of the pending text that is a
    prefix of a stop string is held back, so a stop string spanning several deltas is never partly emitted.
    When a stop string completes, ``text`` is everything before it and ``stopped`` is True; the stop string
    and anything after it are dropped, and later pushes return ("", True). If several stop strings match,
    the one that completes first wins (ties: the one starting first), exactly as if the text had arrived one
    character at a time, so the result never depends on how the text was split into deltas.
    ``flush() -> str`` returns the held-back text (empty once stopped).
    """

    def __init__(self, stop_strings: Sequence[str]) -> None:
        stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self.stop_strings = tuple(dict.fromkeys(stops))
        self._prefixes = {s[:i] for s in self.stop_strings for i in range(1, len(s))}
        self._longest = max((len(s) for s in self.stop_strings), default=0)
        self._pending = ""
        self.stopped = False

    def push(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        text = self._pending + delta
        hit = self._first_stop(text)
        if hit is not None:
            self.stopped, self._pending = True, ""
            return text[:hit], True
        hold = self._held_tail(text)
        self._pending = text[len(text) - hold:]
        return text[:len(text) - hold], False

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text

    def _first_stop(self, text: str) -> int | None:
        """Start of the stop string that ends first in ``text`` (ties: starts first), or None."""
        best: tuple[int, int] | None = None  # (end, start)
        for s in self.stop_strings:
            start = text.find(s)
            if start >= 0 and (best is None or (start + len(s), start) < best):
                best = (start + len(s), start)
        return None if best is None else best[1]

    def _held_tail(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
        for k in range(min(len(text), self._longest - 1), 0, -1):
            if text[-k:] in self._prefixes:
                return k
        return 0
