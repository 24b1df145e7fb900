"""The Backend seam: the only operations a model's forward pass may call.

A backend owns its array type (NumPy arrays for `numpy` and `cpu`, torch tensors for `cuda`) and its
weight layout: ``prepare_*`` turns loader output (`TernaryWeight`, float32 NumPy arrays) into whatever the
kernels want, once, at load time. Shapes below use T = tokens in the step, H = heads, D = head_dim.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from ..weights.packing import TernaryWeight


class KVCache(Protocol):
    """Per-sequence keys and values for every layer, preallocated for ``max_len`` positions.

    ``length`` counts the positions whose K/V are stored. ``trim(n)`` forgets everything from position n on
    (cheap: the storage stays). Backends create caches with ``Backend.make_cache``.
    """

    length: int
    max_len: int

    def trim(self, n: int) -> None: ...

    def nbytes(self) -> int: ...


class Backend(Protocol):
    name: str

    # -- load time ---------------------------------------------------------------------------------
    def prepare_ternary(self, w: TernaryWeight) -> Any: ...
    def prepare_dense(self, w: np.ndarray) -> Any:
        """A float matrix [out, in] (embedding, lm_head) or vector (norm weight)."""
    def make_cache(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int) -> KVCache: ...

    # -- per step ------------------------------------------------------------------------------------
    def embed(self, table: Any, ids: np.ndarray) -> Any:
        """ids int [T] -> rows of the table [T, hidden]."""
    def rmsnorm(self, x: Any, weight: Any, eps: float) -> Any:
        """[T, n] -> [T, n]: x * rsqrt(mean(x^2) + eps) * weight, in float32."""
    def ternary_matmul(self, x: Any, w: Any, act_bits: int | None) -> Any:
        """[T, in] -> [T, out] = x @ W.T. With act_bits=8, x is first quantized per token
        (``act_quant``), the dot products are integer-exact, and one float rescale follows.

        Optional: a backend with ``fused_ternary = True`` also takes keywords ``norm=(weight, eps)`` (x is
        RMSNormed first), ``residual`` ([T, out], added to the result) and ``glu`` ("relu2" / "silu": the
        result's halves gate, up -> act(gate) * up, [T, out/2]), each exactly equal to the separate ops."""
    def dense_matmul(self, x: Any, w: Any) -> Any:
        """[T, in] @ W.T for a float matrix (lm_head) -> float32 [T, out]."""
    def rope(self, x: Any, positions: np.ndarray, theta: float) -> Any:
        """[T, H, D] rotated by rotate-half RoPE at the given absolute positions."""
    def kv_append(self, cache: KVCache, layer: int, k: Any, v: Any, start: int) -> None:
        """Store k, v [T, Hkv, D] at positions start .. start+T-1 of the layer."""
    def attention(self, q: Any, cache: KVCache, layer: int, start: int) -> Any:
        """Causal GQA attention of q [T, Hq, D] (positions start..start+T-1) over the cache's first
        start+T positions; scale 1/sqrt(D); -> [T, Hq, D]."""
    def glu(self, gate: Any, up: Any, act: str) -> Any:
        """act(gate) * up with act 'relu2' (relu(x)^2) or 'silu'."""
    def add(self, a: Any, b: Any) -> Any: ...
    def concat(self, xs: list[Any]) -> Any:
        """Stack [T_i, n] blocks into [sum T_i, n] (batched steps)."""
    def split(self, x: Any, sizes: list[int]) -> list[Any]:
        """[T, sum(sizes)] -> [T, size_i] blocks (the outputs of a fused q/k/v or gate/up matmul)."""
    def to_numpy(self, x: Any) -> np.ndarray:
        """float32 NumPy copy (logits leave the backend through here)."""

    # -- optional ------------------------------------------------------------------------------------
    # decode_batch(net, ids, segments, greedy=False) -> float32 logits [B, vocab] | None: a whole
    #   one-token-per-sequence step owned by the backend (cuda: a captured CUDA graph; cpu: one sequence through
    #   every layer in one C call); None hands the step back to the per-op path (CausalLM.forward_batch).
    #   greedy: int64 [B] argmax tokens instead of the logits (sampling.greedy_tokens; cuda picks them on the
    #   device); CausalLM.decode_greedy asks for them.
    # warmup(net, max_batch): compile / capture what serving will use; the engine calls it before it is ready.
