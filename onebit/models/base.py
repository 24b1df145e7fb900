"""Building blocks shared by the model files: ternary linear, RMSNorm, and batched causal attention."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..errors import FormatError
from ..sampling import greedy_tokens
from ..weights.packing import TernaryWeight, concat_rows


class TernaryLinear:
    """y = x @ W.T for a ternary W, through ``backend.ternary_matmul`` (act_bits=8: int8 activations).

    ``norm`` (an RMSNorm applied to x first), ``residual`` (added to y) and ``glu`` (act(gate) * up of y's
    halves) go to ``backend.ternary_matmul`` in the same call when the backend says ``fused_ternary``;
    otherwise they are the separate backend ops."""

    def __init__(self, backend, w: TernaryWeight, act_bits: int | None):
        self.backend, self.act_bits = backend, act_bits
        self.in_features, self.out_features = w.in_features, w.out_features
        self.w = backend.prepare_ternary(w)

    def __call__(self, x, norm: RMSNorm | None = None, residual=None, glu: str | None = None):
        b = self.backend
        if (norm is not None or residual is not None or glu is not None) and getattr(b, "fused_ternary", False):
            return b.ternary_matmul(x, self.w, self.act_bits, norm=None if norm is None else (norm.weight, norm.eps),
                                    residual=residual, glu=glu)
        y = b.ternary_matmul(x if norm is None else norm(x), self.w, self.act_bits)
        if glu is not None:
            h = self.out_features // 2
            y = b.glu(*b.split(y, [h, h]), glu)
        return y if residual is None else b.add(residual, y)


class FusedTernaryLinear:
    """Several ternary linears on one input (q/k/v, gate/up) as one matmul: the input is quantized once and
    the weights are read in one pass. Each keeps its own scales, so outputs equal the separate linears'."""

    def __init__(self, backend, ws: list[TernaryWeight], act_bits: int | None):
        self.backend, self.sizes = backend, [w.out_features for w in ws]
        fused = concat_rows(ws)
        self.parts = [TernaryLinear(backend, w, act_bits) for w in ws] if fused is None else None
        self.fused = TernaryLinear(backend, fused, act_bits) if fused is not None else None

    def __call__(self, x, norm: RMSNorm | None = None) -> list:
        if self.fused is None:
            h = x if norm is None else norm(x)
            return [p(h) for p in self.parts]
        return self.backend.split(self.fused(x, norm=norm), self.sizes)

    def glu(self, x, act: str, norm: RMSNorm | None = None):
        """act(gate) * up for a gate/up pair: one backend call when the backend fuses it."""
        if self.fused is None or len(self.sizes) != 2 or self.sizes[0] != self.sizes[1]:
            return self.backend.glu(*self(x, norm=norm), act)
        return self.fused(x, norm=norm, glu=act)


class RMSNorm:
    def __init__(self, backend, weight: np.ndarray, eps: float):
        self.backend, self.eps = backend, eps
        self.weight = backend.prepare_dense(weight)

    def __call__(self, x):
        return self.backend.rmsnorm(x, self.weight, self.eps)


@dataclass
class Segment:
    """One sequence's share of a batched step: ``n`` new tokens appended to ``cache`` from ``start``."""

    cache: Any
    start: int
    n: int


def last_rows(segments: list[Segment]) -> np.ndarray:
    """Row of each segment's last token in a step's [T, ...] activations."""
    return np.cumsum([s.n for s in segments]) - 1


def causal_attention(backend, cfg: ModelConfig, layer: int, q, k, v, segments: list[Segment],
                     last_only: bool = False):
    """RoPE, KV append and causal GQA attention for every segment of a batched step.

    q [T, Hq*D], k/v [T, Hkv*D] for T = sum of segment lengths -> [T, Hq*D]; with ``last_only`` every token's
    K/V still goes into the caches but only each segment's last query attends: -> [segments, Hq*D].
    """
    t = sum(s.n for s in segments)
    q = q.reshape(t, cfg.num_attention_heads, cfg.head_dim)  # (tokens, heads, head_dim)
    k = k.reshape(t, cfg.num_key_value_heads, cfg.head_dim)
    v = v.reshape(t, cfg.num_key_value_heads, cfg.head_dim)
    positions = np.concatenate([np.arange(s.start, s.start + s.n) for s in segments])
    q, k = backend.rope(q, positions, cfg.rope_theta), backend.rope(k, positions, cfg.rope_theta)
    outs, i = [], 0
    for s in segments:
        backend.kv_append(s.cache, layer, k[i:i + s.n], v[i:i + s.n], s.start)
        if last_only:
            outs.append(backend.attention(q[i + s.n - 1:i + s.n], s.cache, layer, s.start + s.n - 1))
        else:
            outs.append(backend.attention(q[i:i + s.n], s.cache, layer, s.start))
        i += s.n
    return backend.concat(outs).reshape(len(segments) if last_only else t, cfg.q_size)


class WeightSource:
    """Hands out named weights once each, with clear errors for missing or mis-shaped tensors."""

    def __init__(self, weights: dict[str, Any], origin: str):
        self.weights, self.origin, self.used = weights, origin, set()

    def get(self, name: str, shape: tuple[int, ...]):
        if name not in self.weights:
            raise FormatError(f"{self.origin}: missing tensor {name!r}")
        w = self.weights[name]
        got = tuple(w.shape)
        if got != tuple(shape):
            raise FormatError(f"{self.origin}: tensor {name!r} has shape {got}, expected {tuple(shape)}")
        self.used.add(name)
        return w

    def ternary(self, name: str, shape: tuple[int, int]) -> TernaryWeight:
        w = self.get(name, shape)
        if not isinstance(w, TernaryWeight):
            raise FormatError(f"{self.origin}: tensor {name!r} is not ternary")
        return w

    def has(self, name: str) -> bool:
        return name in self.weights


class CausalLM:
    """What every architecture provides: ``forward(ids, cache) -> logits`` and ``make_cache``.

    Subclasses name their ``layer_class`` (callable (x, segments, layer_index, last_only=False) -> x; with
    ``last_only`` the layer returns only each segment's last row, having cached every token's K/V);
    ``forward_batch`` runs several sequences' new tokens through one step, so each weight is read once for all
    of them.
    """

    layer_class: type

    def __init__(self, cfg: ModelConfig, weights: WeightSource, backend):
        self.config, self.backend = cfg, backend
        v, h = cfg.vocab_size, cfg.hidden_size
        self.embed = backend.prepare_dense(weights.get("model.embed_tokens.weight", (v, h)))
        self.layers = [self.layer_class(cfg, backend, weights, i) for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(backend, weights.get("model.norm.weight", (h,)), cfg.rms_norm_eps)
        if cfg.tie_word_embeddings or not weights.has("lm_head.weight"):
            self.lm_head = self.embed
        else:
            self.lm_head = backend.prepare_dense(weights.get("lm_head.weight", (v, h)))

    def make_cache(self, max_len: int | None = None):
        cfg = self.config
        n = max_len or cfg.max_position_embeddings
        return self.backend.make_cache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, n)

    def forward(self, ids, cache):
        """ids int [T] appended to ``cache`` -> float32 logits [T, vocab] (NumPy)."""
        return self.forward_batch([(ids, cache)])[0]

    @staticmethod
    def _segments(items: list[tuple[Any, Any]]) -> tuple[list[Segment], list[np.ndarray]]:
        """[(ids, cache), ...] -> (a segment at each cache's end, the ids as int64 blocks); ids past a cache's
        size raise ValueError before anything runs."""
        segments, id_blocks = [], []
        for ids, cache in items:
            ids = np.asarray(ids, dtype=np.int64).reshape(-1)
            if cache.length + ids.size > cache.max_len:
                raise ValueError(f"context full: {cache.length} + {ids.size} tokens > {cache.max_len}")
            segments.append(Segment(cache, cache.length, ids.size))
            id_blocks.append(ids)
        return segments, id_blocks

    def _fused_step(self, id_blocks: list[np.ndarray], segments: list[Segment], greedy: bool = False):
        """The backend's own one-token step (``decode_batch``, kernels/base.py) when every segment adds one token:
        its logits (greedy: argmax tokens) with each cache advanced, or None (the per-op path runs instead)."""
        decode = getattr(self.backend, "decode_batch", None)
        if decode is None or any(s.n != 1 for s in segments):
            return None
        out = decode(self, np.concatenate(id_blocks), segments, greedy)
        if out is not None:
            for s in segments:
                s.cache.length = s.start + 1
        return out

    def decode_greedy(self, items: list[tuple[Any, Any]]) -> np.ndarray:
        """[(token, cache), ...], one new token per sequence -> int64 [B]: each sequence's next token by argmax
        (``sampling.greedy_tokens`` of the logits ``forward_batch`` gives). A backend whose one-token step can
        pick it where the logits are (``decode_batch(..., greedy=True)``) returns only the ids."""
        segments, ids = self._segments(items)
        for s in segments:
            if s.n != 1:
                raise ValueError(f"decode_greedy takes one new token per sequence, got {s.n}")
        tokens = self._fused_step(ids, segments, greedy=True)
        if tokens is not None:
            return tokens
        return greedy_tokens(np.concatenate(self.forward_batch(items, last_only=True)))

    def greedy_decode(self, token: int, cache, max_steps: int | None = None) -> Iterator[int]:
        """Greedy decoding of one sequence: feed ``token``, yield the argmax next token, feed that, ... until
        ``max_steps`` tokens, a full cache, or the caller stops (closing the iterator). When a token is yielded
        the cache holds every token fed before it. A backend with ``greedy_chain`` keeps one step in flight (the
        step consuming a token is queued before the token reaches the host); elsewhere each step is
        ``decode_greedy``. The same tokens either way."""
        chain = getattr(self.backend, "greedy_chain", None)
        steps = chain(self, token, cache, max_steps) if chain is not None else None
        if steps is not None:
            with closing(steps):
                yield from steps
            return
        left = cache.max_len - cache.length if max_steps is None else max_steps
        while left > 0 and cache.length < cache.max_len:
            token = int(self.decode_greedy([([token], cache)])[0])
            left -= 1
            yield token

    def forward_batch(self, items: list[tuple[Any, Any]], last_only: bool = False) -> list[np.ndarray]:
        """[(ids, cache), ...] -> per item float32 logits [T_i, vocab] (or [1, vocab] with last_only)."""
        b = self.backend
        segments, id_blocks = self._segments(items)
        logits = self._fused_step(id_blocks, segments)
        if logits is not None:
            return [logits[j:j + 1] for j in range(len(segments))]
        x = b.embed(self.embed, np.concatenate(id_blocks))
        for i, layer in enumerate(self.layers):
            # with last_only the last layer keeps only each segment's last row after its K/V are cached: its
            # attention output, o projection and MLP for the other tokens would feed nothing
            x = layer(x, segments, i, last_only=last_only and i == len(self.layers) - 1)
        x = self.norm(x)
        if last_only:
            spans = [(j, j + 1) for j in range(len(segments))]
        else:
            starts = np.cumsum([0] + [s.n for s in segments])
            spans = list(zip(starts[:-1], starts[1:]))
        logits = b.to_numpy(b.dense_matmul(x, self.lm_head))
        for s in segments:
            s.cache.length = s.start + s.n
        return [logits[lo:hi] for lo, hi in spans]
