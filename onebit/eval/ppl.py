"""Perplexity and bits per byte of a text under a model, with HF's strided sliding-window convention.

Windows start every ``stride`` tokens and hold up to ``ctx`` tokens. Each window scores only the tokens
the previous window did not score (the last ``end - prev_end``), and never its own first token, which has
no context: the first window scores all but its first token. With ``stride < ctx`` every token but the
first is scored exactly once; with ``stride == ctx`` each window's first token goes unscored, as in HF's
recipe. The NLL is summed in float64 over exactly counted tokens; bits per byte is that sum in bits over
the UTF-8 bytes of the text, comparable across tokenizers.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

# (all ids, a batch of windows) -> the summed NLL in nats (float64) of each window's scored targets
Scorer = Callable[[np.ndarray, list["Window"]], Sequence[float]]


@dataclass(frozen=True)
class Window:
    begin: int  # first token fed
    end: int  # one past the last token fed
    first: int  # first target position scored (begin + 1 <= first <= end)

    @property
    def scored(self) -> int:
        return self.end - self.first


def windows(n_tokens: int, ctx: int, stride: int) -> list[Window]:
    """HF's loop: ``for begin in range(0, n, stride)``, ``end = min(begin + ctx, n)``, stop once end == n."""
    if ctx < 2:
        raise ValueError(f"the context must hold at least 2 tokens, got {ctx}")
    if not 1 <= stride <= ctx:
        raise ValueError(f"the stride must be in [1, ctx={ctx}], got {stride}")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + ctx, n_tokens)
        out.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def window_nll(logits: np.ndarray, ids: np.ndarray, w: Window) -> float:
    """Summed NLL (nats, float64) of targets ``ids[w.first:w.end]``; logits [w.end - w.begin, vocab]."""
    if w.scored <= 0:
        return 0.0
    rows = np.asarray(logits[w.first - 1 - w.begin: w.end - 1 - w.begin], dtype=np.float64)  # (scored, vocab)
    top = rows.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))
    target = rows[np.arange(rows.shape[0]), ids[w.first: w.end]]
    return float((lse - target).sum())


@dataclass
class PplResult:
    ppl: float
    bits_per_byte: float
    tokens: int  # tokens scored
    nll_per_token: float  # mean NLL in nats
    total_nll: float  # nats
    bytes: int  # UTF-8 bytes of the text
    text_tokens: int  # tokens in the text, BOS included
    ctx: int
    stride: int
    windows: int
    forward_tokens: int  # tokens fed through the model (windows overlap)
    seconds: float
    tokens_per_s: float  # scored tokens per second

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity(score: Scorer, ids: Sequence[int], n_bytes: int, ctx: int, stride: int | None = None,
               batch: int = 1, progress: Callable[[int, int], None] | None = None) -> PplResult:
    """Score ``ids`` window by window (``batch`` windows per call of ``score``).

    ``progress(n, total)`` is called after each batch with the tokens it scored and the total to score.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    stride = stride or max(1, ctx // 2)
    ws = windows(ids.size, ctx, stride)
    n = sum(w.scored for w in ws)
    total, t0 = 0.0, time.perf_counter()
    for i in range(0, len(ws), max(1, batch)):
        group = ws[i:i + max(1, batch)]
        total += float(np.sum(np.asarray(score(ids, group), dtype=np.float64)))
        if progress:
            progress(sum(w.scored for w in group), n)
    seconds = time.perf_counter() - t0
    mean = total / n if n else float("nan")
    return PplResult(
        ppl=math.exp(mean) if n else float("nan"), bits_per_byte=bits_per_byte(total, n_bytes), tokens=n,
        nll_per_token=mean, total_nll=total, bytes=n_bytes, text_tokens=int(ids.size), ctx=ctx, stride=stride,
        windows=len(ws), forward_tokens=sum(w.end - w.begin for w in ws), seconds=seconds,
        tokens_per_s=n / seconds if seconds > 0 else float("inf"),
    )


def bits_per_byte(total_nll_nats: float, n_bytes: int) -> float:
    """Total NLL in bits over the UTF-8 bytes of the text."""
    return total_nll_nats / math.log(2) / n_bytes if n_bytes else float("nan")


def logits_scorer(forward: Callable[[list[np.ndarray]], Sequence[np.ndarray]]) -> Scorer:
    """A scorer from ``forward(blocks) -> logits [len(block), vocab] per block``; NLL in NumPy float64."""
    def score(ids: np.ndarray, group: list[Window]) -> list[float]:
        logits = forward([ids[w.begin:w.end] for w in group])
        return [window_nll(lg, ids, w) for lg, w in zip(logits, group)]

    return score


def engine_scorer(net) -> Scorer:
    """Scores windows with an engine network (``Model.net``): one batched step, a fresh cache per window."""
    return logits_scorer(lambda blocks: net.forward_batch([(b, net.make_cache(len(b))) for b in blocks]))


def text_perplexity(model, text: str, ctx: int | None = None, stride: int | None = None, batch: int = 1,
                    progress: Callable[[int, int], None] | None = None) -> PplResult:
    """Perplexity of ``text`` under a loaded ``onebit.Model`` (its own tokenizer, BOS as it encodes)."""
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer: perplexity needs one to encode the text")
    ids = model.tokenizer.encode(text)
    ctx = ctx or default_ctx(model.config.max_position_embeddings)
    if ctx > model.config.max_position_embeddings:
        raise ValueError(f"--ctx {ctx} exceeds the model's {model.config.max_position_embeddings} positions")
    return perplexity(engine_scorer(model.net), ids, len(text.encode("utf-8")), ctx, stride, batch, progress)


def default_ctx(max_positions: int) -> int:
    """The model's context, capped at 2048 tokens."""
    return min(int(max_positions), 2048)


__all__ = ["Window", "windows", "window_nll", "PplResult", "perplexity", "bits_per_byte", "logits_scorer",
           "engine_scorer", "text_perplexity", "default_ctx"]
