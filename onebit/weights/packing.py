"""The one in-memory ternary layout every reader produces and every backend may repack.

`TernaryWeight` holds a matrix W = T * S of shape [out, in], where T has entries in {-1, 0, +1}
and S is a grid of float32 scales:

- ``packed``: uint8 ``[out, ceil(in / 4)]``. Row-major along the INPUT axis (the axis a dot product
  runs over): byte ``packed[o, j]`` holds ``T[o, 4j + k]`` in bits ``2k .. 2k+1`` (lowest first),
  stored as the code ``t + 1`` (0, 1, 2; 3 never occurs). Padding columns hold code 1 (zero).
- ``scales``: float32 ``[R, C]`` with ``out % R == 0`` and ``in % C == 0``. Element ``W[o, i]`` is
  ``T[o, i] * scales[o // (out // R), i // (in // C)]``. ``[1, 1]`` is one scale per matrix (HF BitNet,
  I2_S); ``[R, 1]`` are output-row blocks and ``[1, C]`` input-column blocks (TriLM model-parallel
  shards); ``[out, in // 256]`` per-256-block scales (GGUF TQ1_0 / TQ2_0 when they are not uniform).

A scale multiplies: the effective weight is ``T * scale`` (HF ``bitlinear`` files store the inverse,
and their reader inverts it). The scales are kept exactly as the source stores them, widened to float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FormatError, NotTernaryError


@dataclass
class TernaryWeight:
    packed: np.ndarray  # uint8 [out, ceil(in/4)]
    scales: np.ndarray  # float32 [R, C]
    out_features: int
    in_features: int

    def __post_init__(self) -> None:
        o, i = self.out_features, self.in_features
        if self.packed.dtype != np.uint8 or self.packed.shape != (o, (i + 3) // 4):
            raise ValueError(f"packed must be uint8 {(o, (i + 3) // 4)}, got {self.packed.dtype} {self.packed.shape}")
        self.scales = np.ascontiguousarray(self.scales, dtype=np.float32)
        if self.scales.ndim != 2:
            raise ValueError(f"scales must be 2-D [R, C], got shape {self.scales.shape}")
        r, c = self.scales.shape
        if r < 1 or c < 1 or o % r or i % c:
            raise ValueError(f"scale grid {self.scales.shape} does not tile a [{o}, {i}] matrix")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def row_group(self) -> int:
        return self.out_features // self.scales.shape[0]

    @property
    def col_group(self) -> int:
        return self.in_features // self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes

    def ternary(self) -> np.ndarray:
        """T as int8 [out, in]."""
        return unpack_rows(self.packed, self.in_features)

    def scale_matrix(self) -> np.ndarray:
        """The scales broadcast to float32 [out, in] (for references and tests; large)."""
        return np.repeat(np.repeat(self.scales, self.row_group, axis=0), self.col_group, axis=1)

    def dense(self) -> np.ndarray:
        """W = T * S as float32 [out, in]."""
        return self.ternary().astype(np.float32) * self.scale_matrix()

    @classmethod
    def from_ternary(cls, t: np.ndarray, scales) -> "TernaryWeight":
        """Build from an int [out, in] ternary matrix and a scale grid (a scalar means one scale)."""
        t = np.asarray(t)
        s = np.asarray(scales, dtype=np.float32)
        if s.ndim == 0:
            s = s.reshape(1, 1)
        return cls(pack_rows(t), s, t.shape[0], t.shape[1])

    def uniform_scale(self) -> float | None:
        """The single scale if every group shares it exactly, else None."""
        first = self.scales.flat[0]
        return float(first) if np.all(self.scales == first) else None


def pack_rows(t: np.ndarray) -> np.ndarray:
    """int [out, in] ternary -> uint8 [out, ceil(in/4)] in the canonical layout."""
    t = np.asarray(t)
    if t.ndim != 2:
        raise ValueError(f"expected a 2-D ternary matrix, got shape {t.shape}")
    out, n = t.shape
    codes = np.ones((out, (n + 3) // 4 * 4), dtype=np.uint8)
    codes[:, :n] = (t.astype(np.int16) + 1).astype(np.uint8)
    if codes.max(initial=0) > 2:
        raise ValueError("values outside {-1, 0, +1}")
    c = codes.reshape(out, -1, 4)
    return (c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)).astype(np.uint8)


def unpack_rows(packed: np.ndarray, n: int) -> np.ndarray:
    """uint8 [out, ceil(n/4)] -> int8 [out, n] ternary."""
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)
    codes = (packed[..., None] >> shifts) & 3  # (out, n/4, 4)
    return (codes.reshape(packed.shape[0], -1)[:, :n].astype(np.int8) - 1)


# --- absmean ternarization (BitNet b1.58 / HF "online" mode) ---------------------------------------

def absmean_ternarize(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """Per-tensor absmean: ``s = 1 / max(mean|W|, 1e-5)``, ``T = clamp(round(W s), -1, 1)``.

    Returns (T int8, effective scale = 1/s as float32), computed in float32 as transformers does.
    np.round rounds half to even, like torch.round.
    """
    w32 = np.asarray(w, dtype=np.float32)
    s = np.float32(1.0) / np.maximum(np.abs(w32).mean(dtype=np.float32), np.float32(1e-5))
    t = np.clip(np.round(w32 * s), -1, 1).astype(np.int8)
    return t, np.float32(np.float32(1.0) / s)


# --- exact ternary-times-shard-scale detection (TriLM) ---------------------------------------------

def detect_shard_scales(w: np.ndarray, max_shards: int = 64) -> TernaryWeight:
    """Find T and a scale grid with W == T * S exactly: one scale, output-row blocks or input-column blocks.

    Values are compared exactly in the source precision (fp16/bf16/fp32 widened to float32). The fewest
    equal blocks that explain the tensor win. Raises NotTernaryError when no split up to ``max_shards`` does.
    """
    w32 = np.asarray(w, dtype=np.float32)
    if w32.ndim != 2:
        raise FormatError(f"expected a 2-D weight, got shape {w32.shape}")
    a = np.abs(w32)
    for axis in (0, 1):
        line_scale = _line_scales(a, axis)
        if line_scale is None:
            continue
        grid = _block_grid(line_scale, max_shards)
        if grid is None:
            continue
        grid = grid.reshape((-1, 1) if axis == 0 else (1, -1))
        t = np.sign(w32).astype(np.int8)
        return TernaryWeight.from_ternary(t, grid)
    raise NotTernaryError("not ternary")


def _line_scales(a: np.ndarray, axis: int) -> np.ndarray | None:
    """Per row (axis 0) or column (axis 1): the single nonzero magnitude (nan if all zero), or None."""
    other = 1 - axis
    hi = a.max(axis=other)
    lo = np.where(a > 0, a, np.inf).min(axis=other)
    allzero = ~np.isfinite(lo)
    if not np.all((lo == hi) | allzero):
        return None
    return np.where(allzero, np.nan, hi).astype(np.float32)


def _block_grid(line_scale: np.ndarray, max_shards: int) -> np.ndarray | None:
    """The fewest equal blocks in which every line shares one scale (all-zero lines fit any)."""
    n = line_scale.size
    for k in range(1, min(max_shards, n) + 1):
        if n % k:
            continue
        blocks = line_scale.reshape(k, n // k)
        scales = []
        for b in blocks:
            vals = b[~np.isnan(b)]
            if vals.size and not np.all(vals == vals[0]):
                break
            scales.append(vals[0] if vals.size else np.float32(1.0))
        else:
            return np.array(scales, dtype=np.float32)
    return None


def concat_rows(ws: list[TernaryWeight]) -> TernaryWeight | None:
    """Stack matrices that share an input (q/k/v, gate/up) into one, so a step reads them in one pass and
    quantizes their input once. Each keeps its own scales (as row blocks). None when the column grids differ."""
    n, cols = ws[0].in_features, ws[0].scales.shape[1]
    if any(w.in_features != n or w.scales.shape[1] != cols for w in ws):
        return None
    blocks = [np.repeat(w.scales, w.row_group, axis=0) for w in ws]  # per-row [out_i, C]
    lengths = [w.out_features for w in ws]
    uniform = all(np.all(b == b[0]) for b in blocks)
    if uniform and len(set(lengths)) == 1:
        grid = np.concatenate([b[:1] for b in blocks])  # one row block per matrix
    else:
        grid = np.concatenate(blocks)  # one row per output row
    packed = np.concatenate([w.packed for w in ws])
    return TernaryWeight(packed, grid, sum(lengths), n)
