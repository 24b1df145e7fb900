"""The cuda backend's captured decode step as gpu_step.py and gpu_ab.py time it: one model, ``batch`` sequences
whose caches are filled to a context, the step captured at it, and its graph replayed back to back. Needs a GPU."""

from __future__ import annotations


def add_step_args(p, ctx: str, replays: int) -> None:
    """The options gpu_step.py and gpu_ab.py share: the model, its contexts, sequences, lm_head and replays."""
    p.add_argument("--model", default=None, help="model folder (default: the synthetic bitnet-2b4t, written once)")
    p.add_argument("--ctx", default=ctx, help=f"contexts to time, comma-separated (default: {ctx})")
    p.add_argument("--batch", type=int, default=1, help="sequences per step, 1-64 (default: 1)")
    p.add_argument("--lm-head", default="int8", choices=("int8", "f16"), help="lm_head precision (default: int8)")
    p.add_argument("--replays", type=int, default=replays, help=f"graph replays per timing (default: {replays})")


def gpu_missing() -> str | None:
    """Why the decode step cannot run here (torch or triton missing, no CUDA GPU), or None."""
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return 'needs torch and triton (pip install -e ".[gpu]")'
    if not torch.cuda.is_available():
        return "no CUDA GPU here"
    return None


class DecodeGraph:
    def __init__(self, model: str | None, lm_head: str, batch: int, max_ctx: int):
        import numpy as np

        import onebit
        from onebit.eval.bench import synth_models
        from onebit.kernels.triton.backend import BUCKETS

        self.path = model or synth_models("bitnet-2b4t", log=lambda s: print(s, flush=True))["hf"]
        m = onebit.load(self.path, backend="cuda", lm_head=lm_head, tokenizer=False)
        self.net, self.backend = m.net, m.backend
        self.caches = [self.net.make_cache(max_ctx + 8) for _ in range(batch)]
        self.ids = np.random.default_rng(0).integers(0, self.net.config.vocab_size, (batch, max_ctx + 1)).tolist()
        self.bucket = next(b for b in BUCKETS if b >= batch)

    def fill(self, ctx: int) -> None:
        """Every cache holds the first ctx ids of its row (prefilled 512 at a time)."""
        for row, cache in zip(self.ids, self.caches):
            cache.trim(0)
            for i in range(0, ctx, 512):
                self.net.forward_batch([(row[i:min(ctx, i + 512)], cache)], last_only=True)

    def capture(self, ctx: int):
        """Three greedy steps at ctx (eager, capture, replay; the caches trimmed back after each) -> the batch
        bucket's graph, or None if the step was not captured."""
        for _ in range(3):
            self.net.decode_greedy([([row[ctx]], cache) for row, cache in zip(self.ids, self.caches)])
            for cache in self.caches:
                cache.trim(ctx)
        return self.backend._steps[(id(self.net), self.bucket)].graph

    @staticmethod
    def time(graph, replays: int, timings: int = 5) -> list[float]:
        """us per replay, ``timings`` times over ``replays`` back-to-back replays (CUDA events)."""
        import torch

        out = []
        for _ in range(timings):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(replays):
                graph.replay()
            e.record()
            torch.cuda.synchronize()
            out.append(s.elapsed_time(e) * 1000 / replays)
        return out
