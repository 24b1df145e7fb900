"""The `cpu` backend: C kernels (scalar, AVX2, AVX-512, NEON) chosen at run time, on a persistent thread pool.

Arrays are C-contiguous float32 NumPy arrays, so models run unchanged. The extension (``_ext``) is built by
the package's own build (``pip install .`` / ``pip install -e .``; see setup.py). ``ONEBIT_CPU_ISA`` forces
an instruction set (scalar, avx2, avx512, avx512vnni, neon, neondot).

Exactness against ``numpy_ref``: the int8 ternary matmul (identical int32 accumulators, bit-identical
outputs), activation quantization, RMSNorm, RoPE, relu2 GLU, residual add and embedding gather are
bit-identical; the float ternary matmul, SiLU, attention and the dense lm_head agree within float rounding.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np

from ...errors import UnsupportedError
from ...sampling import greedy_tokens
from ...weights.packing import TernaryWeight
from ..numpy_ref import rope_tables

try:
    from . import _ext
except ImportError as e:  # the extension was not built (no C compiler at install time)
    _ext, _IMPORT_ERROR = None, e

F32, BF16, F16 = 0, 1, 2
_PREFERENCE = ("avx512vnni", "avx512", "avx2", "neondot", "neon", "scalar")


def compiled_isas() -> list[str]:
    """Instruction sets compiled into this build."""
    return list(_ext.isas()[0]) if _ext else []


def supported_isas() -> list[str]:
    """Instruction sets compiled in AND runnable on this CPU (tests parametrize over these)."""
    return list(_ext.isas()[1]) if _ext else []


def best_isa() -> str:
    ok = supported_isas()
    return next(i for i in _PREFERENCE if i in ok)


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _f32(x) -> np.ndarray:
    if type(x) is np.ndarray and x.dtype == np.float32 and x.flags.c_contiguous:
        return x
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass
class CpuTernary:
    """A ternary matrix repacked for the kernels (layout: src/ob.h) plus row scales [C, out]."""

    data: np.ndarray  # uint8 [ceil(out/4) * 4 * Kp / 4]
    row_scales: np.ndarray  # float32 [C, out]
    out_features: int
    in_features: int
    col_groups: int

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.row_scales.nbytes


@dataclass
class CpuDense:
    """A float matrix [out, in] kept in bf16 or fp16 when its float32 values convert exactly, else f32.
    The same handle serves ``embed`` (row gather) and ``dense_matmul``; an int8 per-row copy is built on
    the first ``dense_matmul`` when the backend's lm_head is "int8"."""

    w: np.ndarray  # uint16 (bf16/fp16 bits) or float32, [out, in]
    wtype: int
    int8: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)  # (q tiles, row_scale [out])

    @property
    def shape(self) -> tuple[int, int]:
        return self.w.shape

    @property
    def dtype_name(self) -> str:
        return ("f32", "bf16", "f16")[self.wtype]


class CpuKVCache:
    """Keys and values [layers, kv_heads, max_len, head_dim] (float32 or float16): each head's positions
    are contiguous for the attention kernel."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int, dtype=np.float32):
        self.k = np.zeros((n_layers, n_kv_heads, max_len, head_dim), dtype=dtype)
        self.v = np.zeros_like(self.k)
        self.length = 0
        self.max_len = max_len

    def trim(self, n: int) -> None:
        self.length = min(self.length, max(0, n))

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def _kv_type(cache) -> int | None:
    """F32 / F16 for a cache the C kernels read and write in place, None for another layout."""
    if all(a.dtype in (np.float32, np.float16) and a.dtype == cache.k.dtype and a.flags.c_contiguous
           for a in (cache.k, cache.v)):
        return F16 if cache.k.dtype == np.float16 else F32
    return None


_HUGE = 2 << 20


def huge_empty(shape, dtype) -> np.ndarray:
    """np.empty, with Linux asked for transparent huge pages over it before anything touches it (the GEMVs
    stream the weights once per token: 2 MB pages take the TLB misses out of that). ``ONEBIT_HUGEPAGES=0``
    turns it off; elsewhere it is plain np.empty."""
    a = np.empty(shape, dtype=dtype)
    if a.nbytes >= 4 * _HUGE and sys.platform.startswith("linux") and os.environ.get("ONEBIT_HUGEPAGES", "1") != "0":
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            lo = (a.ctypes.data + _HUGE - 1) & ~(_HUGE - 1)
            hi = (a.ctypes.data + a.nbytes) & ~(_HUGE - 1)
            if hi > lo:
                libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 14)  # MADV_HUGEPAGE; advice only
        except (OSError, AttributeError):
            pass
    return a


def to_16bit(w: np.ndarray, chunk_rows: int = 8192) -> tuple[np.ndarray, int]:
    """(bits, wtype): bf16 if every value converts exactly, else fp16 if exact, else the float32 array."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2 or w.size == 0:
        return w, F32
    u = w.view(np.uint32)
    if all(not (u[i:i + chunk_rows] & 0xFFFF).any() for i in range(0, w.shape[0], chunk_rows)):
        b = huge_empty(w.shape, np.uint16)
        np.right_shift(u, 16, out=b, casting="unsafe")
        return b, BF16
    h = huge_empty(w.shape, np.float16)
    for i in range(0, w.shape[0], chunk_rows):
        with np.errstate(over="ignore"):
            h[i:i + chunk_rows] = w[i:i + chunk_rows]
        if not np.array_equal(h[i:i + chunk_rows].astype(np.float32), w[i:i + chunk_rows]):
            return w, F32
    return h.view(np.uint16), F16


class CpuBackend:
    """The Backend protocol (kernels/base.py) on C kernels. ``threads``: worker count (default: all cores
    this process may use). ``lm_head``: "auto" (16-bit when exact, else f32) or "int8" (per-row absmax).
    ``kv_dtype``: "f32" (default) or "f16": halves KV memory and attention reads, but rounds K and V to
    ~5e-4 relative (``onebit.load``'s "auto" picks f16 for int8-activation models only: see
    ``loader.resolve_kv_dtype`` for the measured logit changes). Against the numpy backend with the same
    ``kv_dtype`` the results agree as closely as with f32.
    ``isa``: force an instruction set (else ``ONEBIT_CPU_ISA``, else the best available)."""

    name = "cpu"
    fused_ternary = True  # ternary_matmul takes norm= / residual= / glu= (kernels/base.py)

    @classmethod
    def is_available(cls) -> bool:
        return _ext is not None

    def __init__(self, threads: int | None = None, lm_head: str | None = "auto", kv_dtype: str = "f32",
                 isa: str | None = None):
        if _ext is None:
            raise UnsupportedError(f"the cpu backend's C extension is not built ({_IMPORT_ERROR}); "
                                   "reinstall onebit with a C compiler available")
        isa = isa or os.environ.get("ONEBIT_CPU_ISA") or best_isa()
        if isa not in supported_isas():
            why = "this CPU lacks it" if isa in compiled_isas() else f"not compiled in (have {compiled_isas()})"
            raise UnsupportedError(f"CPU instruction set {isa!r} is not available: {why}; "
                                   f"this machine can run {supported_isas()}")
        lm_head = lm_head or "auto"
        if lm_head not in ("auto", "int8"):
            raise ValueError(f"lm_head must be 'auto' (16-bit when exact, else f32) or 'int8', got {lm_head!r}")
        if kv_dtype not in ("f32", "f16"):
            raise ValueError(f"kv_dtype must be 'f32' or 'f16', got {kv_dtype!r}")
        self.lm_head, self.kv_dtype = lm_head, kv_dtype
        self._ctx = _ext.new_ctx(isa, int(threads or _default_threads()))
        self.isa, self.threads = _ext.ctx_info(self._ctx)
        self._rope: dict[tuple[int, float], tuple[np.ndarray, np.ndarray]] = {}
        self._plans: dict[int, tuple] = {}  # id(net) -> (net, decode_step plan or None, arrays it points into)

    def __repr__(self) -> str:
        return (f"CpuBackend(isa={self.isa!r}, threads={self.threads}, lm_head={self.lm_head!r}, "
                f"kv_dtype={self.kv_dtype!r})")

    # -- load time ---------------------------------------------------------------------------------
    def prepare_ternary(self, w: TernaryWeight) -> CpuTernary:
        n, k = w.out_features, w.in_features
        c = w.scales.shape[1]
        gpad = -(-(k // c) // 256) * 256
        data = huge_empty(-(-n // 4) * 4 * c * gpad // 4, np.uint8)
        _ext.repack(self._ctx, np.ascontiguousarray(w.packed), n, k, c, data)
        rs = np.ascontiguousarray(np.repeat(w.scales, w.row_group, axis=0).T, dtype=np.float32)  # [C, out]
        return CpuTernary(data, rs, n, k, c)

    def prepare_dense(self, w: np.ndarray):
        """A vector (norm weight) stays float32; a matrix (embedding, lm_head) becomes a CpuDense."""
        w = np.asarray(w)
        if w.ndim != 2:
            return _f32(w)
        bits, wtype = to_16bit(w)
        return CpuDense(bits, wtype)

    def make_cache(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int) -> CpuKVCache:
        dtype = np.float16 if self.kv_dtype == "f16" else np.float32
        return CpuKVCache(n_layers, n_kv_heads, head_dim, max_len, dtype)

    # -- per step ------------------------------------------------------------------------------------
    def embed(self, table: CpuDense, ids) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if table.wtype == F32:
            return table.w[ids]
        v, k = table.w.shape
        y = np.empty((ids.size, k), dtype=np.float32)
        _ext.embed(self._ctx, table.w, table.wtype, v, k, ids, ids.size, y)
        return y

    def rmsnorm(self, x, weight, eps):
        x, weight = _f32(x), _f32(weight)
        n = x.shape[-1]
        if weight.shape != (n,):
            raise ValueError(f"rmsnorm: weight {weight.shape} for rows of {n}")
        y = np.empty_like(x)
        _ext.rmsnorm(self._ctx, x, x.size // n if n else 0, n, weight, float(eps), y)
        return y

    def act_quant(self, x) -> tuple[np.ndarray, np.ndarray]:
        """numpy_ref.act_quant: x [T, n] -> (q int8 [T, n], s float32 [T, 1]), bit-identical."""
        x = _f32(x)
        t, n = x.shape
        q, s = np.empty((t, n), dtype=np.int8), np.empty((t, 1), dtype=np.float32)
        _ext.act_quant(self._ctx, x, t, n, q, s)
        return q, s

    def ternary_matmul(self, x, w: CpuTernary, act_bits: int | None, acc: np.ndarray | None = None, *,
                       norm=None, residual=None, glu: str | None = None):
        """x [T, in] -> [T, out]. ``acc`` (tests): int32 [C, T, out] receives the exact per-group sums.

        Fused in the same C call (``fused_ternary``: one hand-off to the thread pool instead of up to four):
        ``norm=(weight, eps)`` RMSNorms x first; ``residual`` [T, out] is added to the product; ``glu``
        ("relu2" or "silu") turns the product's halves (gate, up) into glu(gate, up) [T, out/2]. The outputs
        equal the separate ``rmsnorm`` / ``ternary_matmul`` / ``add`` / ``glu`` calls' exactly."""
        x = _f32(x)
        t = x.shape[0]
        if x.ndim != 2 or x.shape[1] != w.in_features:
            raise ValueError(f"ternary_matmul: x has shape {x.shape}, weight is {w.out_features}x{w.in_features}")
        if act_bits not in (None, 8):
            raise UnsupportedError(f"act_bits={act_bits} (supported: 8 or None)")
        nw, eps = (None, 0.0) if norm is None else (_f32(norm[0]), float(norm[1]))
        if nw is not None and nw.shape != (w.in_features,):
            raise ValueError(f"rmsnorm: weight {nw.shape} for rows of {w.in_features}")
        n, mode = w.out_features, 0
        if glu is not None:
            if glu not in ("relu2", "silu"):
                raise UnsupportedError(f"unsupported activation {glu!r}")
            if n % 8 or residual is not None or acc is not None:  # gate/up tiles must pair up: not fusable
                y = self.ternary_matmul(x, w, act_bits, acc, norm=norm, residual=residual)
                return self.glu(y[:, :n // 2], y[:, n // 2:], glu)
            n, mode = n // 2, 1 if glu == "relu2" else 2
        if residual is not None:
            residual = _f32(residual)
            if residual.shape != (t, n):
                raise ValueError(f"residual {residual.shape} for an output of {(t, n)}")
        y = np.empty((t, n), dtype=np.float32)
        _ext.ternary(self._ctx, x, t, w.data, w.out_features, w.in_features, w.col_groups, w.row_scales, y,
                     1 if act_bits else 0, acc, nw, eps, residual, mode)
        return y

    def dense_matmul(self, x, w: CpuDense) -> np.ndarray:
        x = _f32(x)
        t = x.shape[0]
        n, k = w.w.shape
        if x.ndim != 2 or x.shape[1] != k:
            raise ValueError(f"dense_matmul: x has shape {x.shape}, weight is {n}x{k}")
        y = np.empty((t, n), dtype=np.float32)
        if self.lm_head == "int8":
            q, rs = self.int8_rows(w)
            _ext.dense_i8(self._ctx, x, t, k, q, rs, n, y)
        else:
            _ext.dense(self._ctx, x, t, k, w.w, w.wtype, n, y)
        return y

    def int8_rows(self, w: CpuDense) -> tuple[np.ndarray, np.ndarray]:
        """The per-row int8 copy of a dense matrix (built once): q = round(w * 127 / max|row|) in 4-row tiles,
        row_scale = max|row| / 127."""
        if w.int8 is None:
            n, k = w.w.shape
            q = huge_empty(-(-n // 4) * 4 * -(-k // 32) * 32, np.int8)  # 4-row tiles (src/module.c)
            rs = np.empty(n, dtype=np.float32)
            _ext.quant_rows(self._ctx, w.w, w.wtype, n, k, q, rs)
            w.int8 = (q, rs)
        return w.int8

    def _rope_tables(self, d: int, theta: float, need: int) -> tuple[np.ndarray, np.ndarray]:
        cos, sin = self._rope.get((d, theta), (None, None))
        if cos is None or cos.shape[0] < need:
            n = max(1024, 1 << (need - 1).bit_length())
            cos, sin = rope_tables(np.arange(n), d, theta)  # elementwise, so row p == rope_tables([p])
            cos, sin = np.ascontiguousarray(cos), np.ascontiguousarray(sin)
            self._rope[(d, theta)] = (cos, sin)
        return cos, sin

    def rope(self, x, positions, theta):
        x = _f32(x)
        t, h, d = x.shape
        pos = np.ascontiguousarray(positions, dtype=np.int64).reshape(-1)
        if pos.size != t:
            raise ValueError(f"rope: {pos.size} positions for {t} tokens")
        if t and pos.min() < 0:
            raise ValueError("rope: negative position")
        cos, sin = self._rope_tables(d, float(theta), int(pos.max()) + 1 if t else 1)
        y = np.empty_like(x)
        _ext.rope(self._ctx, x, t, h, d, cos, sin, pos, y)
        return y

    def kv_append(self, cache: CpuKVCache, layer: int, k, v, start: int) -> None:
        k, v = _f32(k), _f32(v)
        t, h, d = k.shape
        if start + t > cache.max_len:
            raise ValueError(f"KV cache full: {start + t} positions > {cache.max_len}")
        if cache.k.shape[1:] != (h, cache.max_len, d) or v.shape != k.shape or not 0 <= layer < cache.k.shape[0]:
            raise ValueError(f"kv_append: k {k.shape} / v {v.shape} do not fit the cache {cache.k.shape}")
        kvt = _kv_type(cache)  # f16: rounded to nearest even, as NumPy's astype
        if kvt is None:  # someone else's cache layout: let NumPy convert
            cache.k[layer, :, start:start + t] = k.transpose(1, 0, 2)
            cache.v[layer, :, start:start + t] = v.transpose(1, 0, 2)
            return
        _ext.kv_store(self._ctx, k, t, h, d, cache.k, kvt, layer, cache.max_len, start)
        _ext.kv_store(self._ctx, v, t, h, d, cache.v, kvt, layer, cache.max_len, start)

    def attention(self, q, cache: CpuKVCache, layer: int, start: int) -> np.ndarray:
        q = _f32(q)
        t, hq, d = q.shape
        _, hkv, max_len, dk = cache.k.shape
        if dk != d or hq % hkv or start + t > max_len:
            raise ValueError(f"attention: q {q.shape} does not fit the cache {cache.k.shape} at start {start}")
        y = np.empty_like(q)
        kvt = F16 if cache.k.dtype == np.float16 else F32
        _ext.attention(self._ctx, q, t, hq, d, cache.k, cache.v, kvt, hkv, max_len, layer, start, y)
        return y

    # -- fused decode ------------------------------------------------------------------------------
    def decode_batch(self, net, ids: np.ndarray, segments, greedy: bool = False) -> np.ndarray | None:
        """A one-token step of ONE sequence through every layer in one C call (``decode_step``: the per-op
        path's kernels in its order, so bit-identical logits without the Python between them); None (the
        caller runs the per-op path) for batches and for models it does not describe. ``greedy``: the argmax
        token (int64 [1]) instead of the logits."""
        if len(segments) != 1:
            return None
        plan = self._decode_plan(net)
        if plan is None:
            return None
        seg, cfg = segments[0], net.config
        cache = seg.cache
        kvt = _kv_type(cache) if isinstance(cache, CpuKVCache) else None
        if kvt is None:
            return None
        if seg.start + 1 > cache.max_len:
            raise ValueError(f"KV cache full: {seg.start + 1} positions > {cache.max_len}")
        cos, sin = self._rope_tables(cfg.head_dim, float(cfg.rope_theta), seg.start + 1)
        x = _f32(self.embed(net.embed, ids))  # a fresh array: the step updates it in place
        _ext.decode_step(self._ctx, plan, len(net.layers), x, cfg.hidden_size, cfg.num_attention_heads,
                         cfg.num_key_value_heads, cfg.head_dim, float(cfg.rms_norm_eps), seg.start, cache.k, cache.v,
                         kvt, cache.max_len, cos, sin, cos.shape[0])
        logits = self.dense_matmul(self.rmsnorm(x, net.norm.weight, net.norm.eps), net.lm_head)
        if greedy:
            return greedy_tokens(logits)
        return logits

    def _decode_plan(self, net) -> np.ndarray | None:
        """int64 [layers, 26] of weight addresses and sizes for decode_step, built once per model (the arrays it
        points into are kept with it); None when a layer is not the fused BitNet / LLaMA shape."""
        have = self._plans.get(id(net))
        if have is None or have[0] is not net:  # (a new model may reuse a freed one's id)
            have = self._plans[id(net)] = (net, *_build_plan(net))
        return have[1]

    def glu(self, gate, up, act):
        gate, up = _f32(gate), _f32(up)
        if act not in ("relu2", "silu"):
            raise UnsupportedError(f"unsupported activation {act!r}")
        if gate.shape != up.shape:
            raise ValueError(f"glu: gate {gate.shape} and up {up.shape} differ")
        y = np.empty_like(gate)
        _ext.glu(self._ctx, gate, up, gate.size, 1 if act == "silu" else 0, y)
        return y

    def add(self, a, b):
        return np.add(a, b, dtype=np.float32)

    def concat(self, xs):
        return xs[0] if len(xs) == 1 else np.concatenate(xs, axis=0)

    def split(self, x, sizes):
        x = _f32(x)
        if x.shape[0] == 1:  # one token: column blocks of a row are contiguous already, no copies
            edges = np.cumsum([0, *sizes]).tolist()
            return [x[:, a:b] for a, b in zip(edges[:-1], edges[1:])]
        from ..numpy_ref import split_columns

        return split_columns(x, sizes)

    def to_numpy(self, x):
        return np.asarray(x, dtype=np.float32)


def _build_plan(net) -> tuple[np.ndarray | None, list]:
    """(decode_step's plan, the arrays it points into), or (None, []) for a model it does not describe."""
    from ...models.bitnet import BitNetLayer
    from ...models.llama import LlamaLayer

    rows, keep = [], []

    def norm(layer, name):
        n = getattr(layer, name, None)
        if n is None:
            return 0
        keep.append(n.weight)
        return n.weight.ctypes.data

    def tern(lin):
        w = lin.w
        keep.extend((w.data, w.row_scales))
        return [w.data.ctypes.data, w.row_scales.ctypes.data, w.out_features, w.in_features, w.col_groups]

    for layer in net.layers:
        if not isinstance(layer, (BitNetLayer, LlamaLayer)):
            return None, []
        qkv, gu = layer.qkv_proj.fused, layer.gate_up_proj.fused
        if qkv is None or gu is None or gu.w.out_features % 2:
            return None, []
        bits = {qkv.act_bits, gu.act_bits, layer.o_proj.act_bits, layer.down_proj.act_bits}
        if len(bits) != 1:
            return None, []
        act = 2 if isinstance(layer, LlamaLayer) else 1  # OB_GLU_SILU / OB_GLU_RELU2
        rows.append([norm(layer, "input_layernorm"), *tern(qkv), norm(layer, "attn_sub_norm"), *tern(layer.o_proj),
                     norm(layer, "post_attention_layernorm"), *tern(gu), norm(layer, "ffn_sub_norm"),
                     *tern(layer.down_proj), act, 1 if bits.pop() else 0])
    return np.array(rows, dtype=np.int64), keep
