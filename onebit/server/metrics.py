"""Prometheus metrics (prefix ``onebit_``): request counts and latencies observed here, engine state read at
scrape time from ``engine.stats()`` (queue, KV cache, sessions, cache hits, per-kernel time)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5)

# engine.stats() key -> (metric name, help, kind)
_ENGINE_VALUES = {
    "requests_running": ("onebit_requests_running", "Requests being generated", "gauge"),
    "requests_waiting": ("onebit_requests_waiting", "Requests queued for a slot", "gauge"),
    "sequences_running": ("onebit_sequences_running", "Sequences (choices) holding a slot", "gauge"),
    "kv_bytes_used": ("onebit_kv_cache_bytes", "Bytes of KV cache allocated (running and idle)", "gauge"),
    "kv_budget_bytes": ("onebit_kv_cache_budget_bytes", "KV cache byte budget", "gauge"),
    "tokens_cached": ("onebit_kv_cache_tokens", "Tokens whose K/V are kept for reuse", "gauge"),
    "sessions": ("onebit_sessions", "Named sessions kept", "gauge"),
    "prefix_entries": ("onebit_prefix_cache_entries", "Anonymous prefix-cache entries kept", "gauge"),
    "session_hits": ("onebit_session_cache_hits", "Requests that reused their session's KV cache", "counter"),
    "prefix_hits": ("onebit_prefix_cache_hits", "Requests that reused a cached prefix", "counter"),
    "cache_misses": ("onebit_cache_misses", "Requests with nothing to reuse", "counter"),
    "reused_tokens": ("onebit_cached_prompt_tokens", "Prompt tokens served from the KV cache", "counter"),
    "evictions": ("onebit_kv_cache_evictions", "Idle cache entries evicted", "counter"),
    "steps": ("onebit_engine_steps", "Batched model steps run", "counter"),
}


class EngineCollector:
    """Reads ``engine.stats()`` on every scrape."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        yield GaugeMetricFamily("onebit_ready", "1 once the model is loaded", value=float(stats["ready"]))
        for key, (name, doc, kind) in _ENGINE_VALUES.items():
            if key in stats:
                family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
                yield family(name, doc, value=float(stats[key]))
        if stats.get("kv_budget_bytes"):
            yield GaugeMetricFamily("onebit_kv_cache_usage_ratio", "KV cache bytes / budget",
                                    value=stats["kv_bytes_used"] / stats["kv_budget_bytes"])
        kernels = stats.get("kernels") or {}
        seconds = CounterMetricFamily("onebit_kernel_seconds", "Wall time in each backend op", labels=["op"])
        calls = CounterMetricFamily("onebit_kernel_calls", "Calls of each backend op", labels=["op"])
        for op, t in sorted(kernels.items()):
            seconds.add_metric([op], t["seconds"])
            calls.add_metric([op], t["calls"])
        yield seconds
        yield calls


class Metrics:
    """One registry per app (tests run several apps in one process)."""

    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        r.register(EngineCollector(engine))
        self.requests = Counter("onebit_http_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("onebit_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("onebit_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("onebit_time_to_first_token_seconds", "Request start to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("onebit_inter_token_latency_seconds", "Time between tokens of one choice",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("onebit_request_duration_seconds", "Request start to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """TTFT, inter-token latency and duration of one request, fed with each chunk as it arrives."""

    def __init__(self, metrics: Metrics):
        self.metrics, self.start = metrics, time.perf_counter()
        self.last: dict[int, float] = {}
        self.first = True

    def token(self, index: int, n: int = 1) -> None:
        now = time.perf_counter()
        if self.first:
            self.metrics.ttft.observe(now - self.start)
            self.first = False
        prev = self.last.get(index)
        if prev is not None and n:
            self.metrics.itl.observe((now - prev) / n)
        self.last[index] = now

    def done(self, usage) -> None:
        m = self.metrics
        m.e2e.observe(time.perf_counter() - self.start)
        m.prompt_tokens.inc(usage.prompt_tokens)
        m.generated_tokens.inc(usage.completion_tokens)
