"""TimedBackend: a proxy that forwards every Backend call and adds up seconds and calls per op name."""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["TimedBackend", "load_timed"]


class TimedBackend:
    """Wraps a backend; ``timings()`` -> {op: {"seconds": s, "calls": n}} for every method called so far.

    Timing is wall-clock around the Python call (kernels on the cuda backend run asynchronously, so there the
    numbers are launch times unless the op synchronizes). Attributes that are not methods pass through.
    """

    def __init__(self, backend):
        object.__setattr__(self, "_backend", backend)
        object.__setattr__(self, "_stats", {})
        object.__setattr__(self, "_lock", threading.Lock())

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._backend, name)
        if not callable(attr) or name.startswith("__"):
            return attr
        stats, lock = self._stats, self._lock

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                with lock:
                    s = stats.get(name)
                    if s is None:
                        stats[name] = [dt, 1]
                    else:
                        s[0] += dt
                        s[1] += 1

        timed.__name__ = name
        object.__setattr__(self, name, timed)  # found directly from now on
        return timed

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._backend, name, value)

    def __repr__(self) -> str:
        return f"TimedBackend({self._backend!r})"

    @property
    def inner(self):
        return self._backend

    def timings(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {op: {"seconds": s, "calls": n} for op, (s, n) in self._stats.items()}

    def reset_timings(self) -> None:
        with self._lock:
            self._stats.clear()


def load_timed(path: str, backend: str = "auto", *, threads: int | None = None, lm_head: str = "f16",
               ternarize: bool = False, act_bits: int | None | str = "auto", kv_dtype: str = "auto"):
    """``onebit.load`` with the backend wrapped in a TimedBackend (the server's per-kernel metrics)."""
    from ..loader import kv_dtype_option, read_checkpoint
    from ..model import Model
    from ..models import build_model
    from . import get_backend

    cfg, weights, info, tok = read_checkpoint(path, ternarize)
    if act_bits != "auto":
        if act_bits not in (None, 8):
            raise ValueError(f"act_bits must be 8 or None, got {act_bits!r}")
        cfg.act_bits = act_bits
    options: dict[str, Any] = {"threads": threads} if threads else {}
    if lm_head != "f16":
        options["lm_head"] = lm_head
    options.update(kv_dtype_option(backend, kv_dtype, cfg))
    be = TimedBackend(get_backend(backend, **options))
    net = build_model(cfg, weights, be, origin=path)
    return Model(cfg, net, tok, be, info)
