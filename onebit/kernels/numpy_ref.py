"""The NumPy reference backend: obvious, slow, and the specification every fast backend is tested against."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..weights.packing import TernaryWeight

# float32 accumulates int8 x ternary dot products exactly while every partial sum stays below 2**24.
_EXACT_F32_IN = (1 << 24) // 128


def act_quant(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token int8 absmax: s = 127 / max(|x|, 1e-5); q = clamp(round_half_even(x s), -128, 127).

    x float32 [T, n] -> (q int8 [T, n], s float32 [T, 1]).
    """
    x = np.asarray(x, dtype=np.float32)
    s = np.float32(127.0) / np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(1e-5))
    q = np.clip(np.round(x * s), -128, 127).astype(np.int8)
    return q, s.astype(np.float32)


def int_dot(xq: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Exact int32 accumulators of int8 [T, n] x int8 ternary [out, n]^T -> int32 [T, out]."""
    dt = np.float32 if t.shape[1] <= _EXACT_F32_IN else np.float64
    return (xq.astype(dt) @ t.astype(dt).T).astype(np.int32)


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    var = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(var + np.float32(eps))) * weight


def rope_tables(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [T, D] for rotate-half RoPE (frequencies computed in float32 as transformers does)."""
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))))
    freqs = positions.astype(np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """x [T, H, D]: x * cos + rotate_half(x) * sin, rotate_half pairing i with i + D/2."""
    d = x.shape[-1]
    cos, sin = rope_tables(positions, d, theta)
    rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


@dataclass
class NumpyTernary:
    """Unpacked ternary values (int8 [out, in]) and the scale grid, expanded once at load."""

    t: np.ndarray
    scales: np.ndarray  # float32 [R, C]
    row_group: int
    col_group: int


class NumpyKVCache:
    """Keys/values [layers, max_len, Hkv, D], float32 or float16 (``dtype``)."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int, dtype=np.float32):
        self.k = np.zeros((n_layers, max_len, n_kv_heads, head_dim), dtype=dtype)
        self.v = np.zeros_like(self.k)
        self.length = 0
        self.max_len = max_len

    def trim(self, n: int) -> None:
        self.length = min(self.length, max(0, n))

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def quantize_rows_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row int8 absmax for an lm_head: w [out, in] -> (q int8 [out, in], scale float32 [out]), w ~ q * scale."""
    scale = np.maximum(np.abs(w).max(axis=1), np.float32(1e-30)).astype(np.float32) / np.float32(127.0)
    q = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def split_columns(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """[T, sum(sizes)] -> contiguous [T, size] blocks (the outputs of a fused matmul)."""
    edges = np.cumsum(sizes)[:-1]
    return [np.ascontiguousarray(p) for p in np.split(x, edges, axis=1)]


class NumpyBackend:
    """Reference implementations of the Backend protocol (kernels/base.py).

    ``lm_head="int8"`` multiplies the output matrix as per-row int8 (absmax) against per-token int8
    activations: half the bytes of a 16-bit head, at a small cost in logit accuracy. ``kv_dtype="f16"``
    stores keys and values as float16 (round to nearest even, as the cpu backend does) and attends in float32
    over those values: the specification of a 16-bit KV cache.
    """

    name = "numpy"

    def __init__(self, lm_head: str = "f16", threads: int | None = None, kv_dtype: str = "f32"):
        if lm_head not in ("f16", "int8"):
            raise ValueError(f"lm_head must be 'f16' or 'int8', got {lm_head!r}")
        if kv_dtype not in ("f32", "f16"):
            raise ValueError(f"kv_dtype must be 'f32' or 'f16', got {kv_dtype!r}")
        self.lm_head, self.kv_dtype = lm_head, kv_dtype
        self._int8_heads: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def prepare_ternary(self, w: TernaryWeight) -> NumpyTernary:
        return NumpyTernary(w.ternary(), w.scales, w.row_group, w.col_group)

    def prepare_dense(self, w: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(w, dtype=np.float32)

    def make_cache(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int) -> NumpyKVCache:
        return NumpyKVCache(n_layers, n_kv_heads, head_dim, max_len,
                            np.float16 if self.kv_dtype == "f16" else np.float32)

    def embed(self, table: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return table[np.asarray(ids, dtype=np.int64)]

    def rmsnorm(self, x, weight, eps):
        return rmsnorm(x, weight, eps)

    def ternary_matmul(self, x: np.ndarray, w: NumpyTernary, act_bits: int | None) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        out = np.zeros((x.shape[0], w.t.shape[0]), dtype=np.float32)
        if act_bits:
            xq, sx = act_quant(x)
        for g in range(w.scales.shape[1]):
            cols = slice(g * w.col_group, (g + 1) * w.col_group)
            row_scale = np.repeat(w.scales[:, g], w.row_group)  # [out]
            if act_bits:
                acc = int_dot(xq[:, cols], w.t[:, cols])  # int32 [T, out]
                out += (acc.astype(np.float32) / sx) * row_scale
            else:
                out += (x[:, cols] @ w.t[:, cols].astype(np.float32).T) * row_scale
        return out

    def dense_matmul(self, x, w):
        if self.lm_head == "int8":
            if id(w) not in self._int8_heads:
                self._int8_heads[id(w)] = quantize_rows_int8(w)
            wq, ws = self._int8_heads[id(w)]
            xq, sx = act_quant(x)
            return (int_dot(xq, wq).astype(np.float32) / sx) * ws
        return np.asarray(x, dtype=np.float32) @ w.T

    def rope(self, x, positions, theta):
        return rope(x, positions, theta)

    def kv_append(self, cache: NumpyKVCache, layer: int, k, v, start: int) -> None:
        t = k.shape[0]
        if start + t > cache.max_len:
            raise ValueError(f"KV cache full: {start + t} positions > {cache.max_len}")
        cache.k[layer, start:start + t] = k
        cache.v[layer, start:start + t] = v

    def attention(self, q: np.ndarray, cache: NumpyKVCache, layer: int, start: int) -> np.ndarray:
        t, hq, d = q.shape
        n = start + t
        k = cache.k[layer, :n].astype(np.float32, copy=False)  # (n, Hkv, D); exact from float16
        v = cache.v[layer, :n].astype(np.float32, copy=False)
        group = hq // k.shape[1]
        k = np.repeat(k, group, axis=1).transpose(1, 2, 0)  # (Hq, D, n)
        v = np.repeat(v, group, axis=1).transpose(1, 0, 2)  # (Hq, n, D)
        scores = (q.transpose(1, 0, 2) @ k) * np.float32(d ** -0.5)  # (Hq, T, n)
        future = np.arange(n)[None, :] > (start + np.arange(t))[:, None]  # (T, n)
        scores = np.where(future[None], np.float32(-np.inf), scores)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        p = scores / scores.sum(axis=-1, keepdims=True)
        return (p @ v).transpose(1, 0, 2).astype(np.float32)  # (T, Hq, D)

    def glu(self, gate, up, act):
        if act == "relu2":
            return np.square(np.maximum(gate, 0)) * up
        return gate / (1.0 + np.exp(-gate)) * up

    def add(self, a, b):
        return a + b

    def concat(self, xs):
        return xs[0] if len(xs) == 1 else np.concatenate(xs, axis=0)

    def split(self, x, sizes):
        return split_columns(x, sizes)

    def to_numpy(self, x):
        return np.asarray(x, dtype=np.float32)
