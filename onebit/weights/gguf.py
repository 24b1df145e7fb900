"""GGUF files: our own v2/v3 reader (memmap) and v3 writer, and model load/save in HF tensor names.

gguf-py's reader does not know bitnet.cpp's I2_S (type 36), so the container is parsed here; gguf-py only lends
constants. Every malformed file raises FormatError with one line naming the file and the fault.

Q/K row order: our models apply HF rotate-half RoPE (pairs ``i, i + head_dim/2``). llama.cpp runs ``llama`` with
interleaved RoPE, so its converter permutes q/k rows (``LlamaModel.permute``) and we undo that on load and apply it
on save. ``bitnet`` (llama.cpp), ``bitnet-b1.58`` and ``bitnet-25`` (bitnet.cpp / ik_llama.cpp) run NEOX RoPE
(the rotate-half pairs) and their converters write HF row order: nothing to undo.

FFN math: for every bitnet arch we run BitNet b1.58 (ReLU² gate, int8 activations), though upstream llama.cpp's
``bitnet`` graph applies SiLU; GGUF has no key that says which, and the b1.58 checkpoints are what we target.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from gguf import GGUFValueType as VT

from ..config import ModelConfig
from ..errors import FormatError, NotTernaryError, UnsupportedError
from . import ggml_quants as gq
from .packing import TernaryWeight, detect_shard_scales

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

BITNET_ARCHS = ("bitnet", "bitnet-b1.58", "bitnet-25")
SUPPORTED_ARCHS = BITNET_ARCHS + ("llama",)
TTYPES = {"tq2_0": gq.TQ2_0, "tq1_0": gq.TQ1_0, "i2_s": gq.I2_S}
FILE_TYPES = {gq.TQ1_0: 36, gq.TQ2_0: 37, gq.I2_S: 40}  # llama_ftype (I2_S: bitnet.cpp's MOSTLY_I2_S)

# GGUF tensor name -> HF name (one table per format). Layer names are under blk.{i} / model.layers.{i}.
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_sub_norm": "self_attn.attn_sub_norm",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "ffn_sub_norm": "mlp.ffn_sub_norm",
}
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

_SCALAR = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
           VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d"}
_U64 = struct.Struct("<Q")
_NP = {VT.UINT8: "<u1", VT.INT8: "<i1", VT.UINT16: "<u2", VT.INT16: "<i2", VT.UINT32: "<u4", VT.INT32: "<i4",
       VT.FLOAT32: "<f4", VT.BOOL: "<u1", VT.UINT64: "<u8", VT.INT64: "<i8", VT.FLOAT64: "<f8"}


# ==================================================================================================
# Reader
# ==================================================================================================

@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: GGUF ne reversed
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFReader:
    """Parse a GGUF v2/v3 file. ``metadata`` maps keys to values (numeric arrays as numpy, strings as str),
    ``value_types`` maps keys to (type, element type or None), ``tensors`` maps names to TensorInfo."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, tuple[VT, VT | None]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._buf = _open_memmap(self.path)
        try:
            self._parse(_Cursor(self._buf))
        except FormatError as e:
            raise FormatError(f"{self.path}: {e}") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view into the file."""
        t = self.tensors[name]
        return self._buf[t.offset: t.offset + t.nbytes]

    def _parse(self, c: "_Cursor") -> None:
        if c.size < 4 or bytes(c.take(4)) != GGUF_MAGIC:
            c.pos = 0
            raise FormatError(f"not a GGUF file (magic {bytes(c.mv[:4])!r})")
        self.version = c.u32()
        if self.version not in (2, 3):
            swapped = int.from_bytes(self.version.to_bytes(4, "little"), "big")
            if swapped in (2, 3):
                raise FormatError("big-endian GGUF files are not supported")
            raise FormatError(f"unsupported GGUF version {self.version} (supported: 2, 3)")
        n_tensors, n_kv = c.u64(), c.u64()
        _check_count(c, n_kv, 13, "metadata key count")  # a key needs at least 8 + 4 + 1 bytes
        for _ in range(n_kv):
            self._read_kv(c)
        _check_count(c, n_tensors, 32, "tensor count")  # a tensor info needs at least 8 + 4 + 8 + 4 + 8 bytes
        self.alignment = self._alignment()
        infos = [self._read_tensor_info(c) for _ in range(n_tensors)]
        self.data_offset = _align(c.pos, self.alignment)
        for name, shape, ggml_type, offset in infos:
            self._place_tensor(name, shape, ggml_type, offset)

    def _read_kv(self, c: "_Cursor") -> None:
        key = c.string()
        if key in self.metadata:
            raise FormatError(f"metadata key {key!r} appears twice")
        vtype = c.value_type()
        elem = None
        if vtype == VT.ARRAY:
            elem = c.value_type()
            value = c.array(elem)
        else:
            value = c.value(vtype)
        self.metadata[key] = value
        self.value_types[key] = (vtype, elem)

    def _alignment(self) -> int:
        if "general.alignment" not in self.metadata:
            return DEFAULT_ALIGNMENT
        a = self.metadata["general.alignment"]
        if self.value_types["general.alignment"][0] != VT.UINT32 or a <= 0 or a & (a - 1):
            raise FormatError(f"general.alignment must be a power of two (uint32), got {a!r}")
        return int(a)

    def _read_tensor_info(self, c: "_Cursor") -> tuple[str, tuple[int, ...], int, int]:
        name = c.string()
        n_dims = c.u32()
        if not 1 <= n_dims <= MAX_DIMS:
            raise FormatError(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        ne = [c.u64() for _ in range(n_dims)]
        ggml_type, offset = c.u32(), c.u64()
        if gq.block_layout(ggml_type) is None:
            raise FormatError(f"tensor {name!r} has unknown ggml type {ggml_type}")
        return name, tuple(reversed(ne)), ggml_type, offset

    def _place_tensor(self, name: str, shape: tuple[int, ...], ggml_type: int, offset: int) -> None:
        if name in self.tensors:
            raise FormatError(f"tensor {name!r} appears twice")
        if offset % self.alignment:
            raise FormatError(f"tensor {name!r} offset {offset} is not a multiple of the alignment {self.alignment}")
        try:
            nbytes = gq.tensor_nbytes(ggml_type, shape)
        except FormatError as e:
            raise FormatError(f"tensor {name!r}: {e}") from None
        start = self.data_offset + offset
        if start + nbytes > self._buf.size:
            raise FormatError(f"tensor {name!r} ({nbytes} bytes at byte {start}) runs past the end of the file "
                              f"({self._buf.size} bytes; truncated?)")
        self.tensors[name] = TensorInfo(name, shape, ggml_type, start, nbytes)


class _Cursor:
    """Little-endian reads from a byte buffer; running past its end is a FormatError."""

    def __init__(self, buf: np.ndarray):
        self.buf, self.mv, self.pos, self.size = buf, memoryview(buf), 0, buf.size

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise FormatError(f"truncated: needs {n} bytes at byte {self.pos}, file has {self.size}")
        self.pos += n
        return self.mv[self.pos - n: self.pos]

    def unpack(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise FormatError(f"truncated: needs {n} bytes at byte {self.pos}, file has {self.size}")
        self.pos += n
        return struct.unpack_from(fmt, self.mv, self.pos - n)[0]

    def u32(self) -> int:
        return self.unpack("<I")

    def u64(self) -> int:
        return self.unpack("<Q")

    def string(self) -> str:
        n = self.u64()
        if n > self.size - self.pos:
            raise FormatError(f"string of {n} bytes at byte {self.pos - 8} runs past the end of the file")
        return bytes(self.take(n)).decode("utf-8", "surrogateescape")

    def strings(self, n: int) -> list[str]:
        """n strings in a tight loop (tokenizer vocabularies hold ~400k of them)."""
        mv, pos, size, unpack, out = self.mv, self.pos, self.size, _U64.unpack_from, []
        for _ in range(n):
            if pos + 8 > size:
                raise FormatError(f"truncated: string length at byte {pos} is past the end of the file")
            end = pos + 8 + unpack(mv, pos)[0]
            if end > size:
                raise FormatError(f"string at byte {pos} runs past the end of the file")
            out.append(str(mv[pos + 8: end], "utf-8", "surrogateescape"))
            pos = end
        self.pos = pos
        return out

    def value_type(self) -> VT:
        t = self.u32()
        try:
            return VT(t)
        except ValueError:
            raise FormatError(f"unknown metadata value type {t} at byte {self.pos - 4}") from None

    def value(self, vtype: VT):
        if vtype == VT.STRING:
            return self.string()
        v = self.unpack(_SCALAR[vtype])
        if vtype == VT.FLOAT32:
            return float(str(np.float32(v)))  # shortest decimal that is this float32 (1e-05, not 9.99e-06)
        return v

    def array(self, elem: VT):
        n = self.u64()
        item = {VT.STRING: 8, VT.ARRAY: 12}.get(elem) or struct.calcsize(_SCALAR[elem])
        _check_count(self, n, item, "array length")
        if elem == VT.STRING:
            return self.strings(n)
        if elem == VT.ARRAY:
            return [self.array(self.value_type()) for _ in range(n)]
        a = np.frombuffer(self.take(n * item), dtype=_NP[elem])
        return a.astype(bool) if elem == VT.BOOL else a.astype(a.dtype.newbyteorder("="))


def _open_memmap(path: str) -> np.ndarray:
    try:
        if os.path.getsize(path) == 0:
            raise FormatError(f"{path}: empty file (not a GGUF file)")
        return np.memmap(path, dtype=np.uint8, mode="r")
    except FileNotFoundError:
        raise FormatError(f"{path}: file not found") from None
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: cannot read ({e})") from None


def _check_count(c: _Cursor, n: int, min_bytes: int, what: str) -> None:
    if n * min_bytes > c.size - c.pos:
        raise FormatError(f"{what} {n} is impossible with {c.size - c.pos} bytes left (corrupt or truncated)")


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


# ==================================================================================================
# Writer
# ==================================================================================================

@dataclass(frozen=True)
class Typed:
    """A metadata value with its GGUF type spelled out (``elem`` for arrays)."""

    value: Any
    type: VT
    elem: VT | None = None


@dataclass
class TensorOut:
    """A tensor to write: numpy-order shape, GGML type, and its raw bytes (or a callable producing them)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    data: np.ndarray | bytes | Callable[[], np.ndarray | bytes] = field(repr=False)

    @property
    def nbytes(self) -> int:
        return gq.tensor_nbytes(self.ggml_type, self.shape)


def write_gguf(path: str | os.PathLike, metadata: dict[str, Any], tensors: list[TensorOut], *,
               alignment: int = DEFAULT_ALIGNMENT, progress: Callable[[int, int], None] | None = None) -> None:
    """Write a GGUF v3 file. Metadata types are inferred (see ``_infer``) unless given as `Typed`.

    Tensors are produced and written one at a time; the file appears under its name only when complete.
    """
    path = os.fspath(path)
    meta = dict(metadata)
    if alignment != DEFAULT_ALIGNMENT:
        meta["general.alignment"] = Typed(alignment, VT.UINT32)
    head = [GGUF_MAGIC, struct.pack("<IQQ", 3, len(tensors), len(meta))]
    head += [_pack_string(k) + _pack_value(k, v) for k, v in meta.items()]
    offset = 0
    for t in tensors:
        ne = tuple(reversed(t.shape))
        head.append(_pack_string(t.name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, t.ggml_type, offset))
        offset = _align(offset + t.nbytes, alignment)
    header = b"".join(head)
    tmp = path + ".part"
    try:
        with open(tmp, "wb") as f:
            f.write(header + bytes(_align(len(header), alignment) - len(header)))
            for i, t in enumerate(tensors):
                _write_tensor(f, t, alignment)
                if progress:
                    progress(i + 1, len(tensors))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_tensor(f, t: TensorOut, alignment: int) -> None:
    data = t.data() if callable(t.data) else t.data
    raw = np.asarray(np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data).reshape(-1)
    if raw.nbytes != t.nbytes:
        raise ValueError(f"tensor {t.name}: {raw.nbytes} bytes given, {t.nbytes} expected")
    f.write(memoryview(np.ascontiguousarray(raw.view(np.uint8))))
    f.write(bytes(_align(t.nbytes, alignment) - t.nbytes))


def _pack_string(s: str | bytes) -> bytes:
    b = s if isinstance(s, bytes) else s.encode("utf-8", "surrogateescape")
    return struct.pack("<Q", len(b)) + b


def _pack_value(key: str, v: Any) -> bytes:
    vtype, elem = _infer(key, v)
    v = v.value if isinstance(v, Typed) else v
    if vtype == VT.ARRAY:
        return struct.pack("<IIQ", VT.ARRAY, elem, len(v)) + _pack_items(v, elem)
    return struct.pack("<I", vtype) + (_pack_string(v) if vtype == VT.STRING else struct.pack(_SCALAR[vtype], v))


def _pack_items(items, elem: VT) -> bytes:
    if elem == VT.STRING:
        return b"".join(_pack_string(s) for s in items)
    if elem == VT.ARRAY:
        return b"".join(_pack_value("", x)[4:] for x in items)  # nested: drop the outer ARRAY type tag
    return np.asarray(items).astype(_NP[elem]).tobytes()


_KEY_TYPES = {
    "general.alignment": (VT.UINT32, None), "general.file_type": (VT.UINT32, None),
    "general.quantization_version": (VT.UINT32, None),
    "tokenizer.ggml.tokens": (VT.ARRAY, VT.STRING), "tokenizer.ggml.merges": (VT.ARRAY, VT.STRING),
    "tokenizer.ggml.token_type": (VT.ARRAY, VT.INT32), "tokenizer.ggml.scores": (VT.ARRAY, VT.FLOAT32),
    "tokenizer.ggml.precompiled_charsmap": (VT.ARRAY, VT.UINT8),
}
_NP_TO_VT = {np.dtype(v).newbyteorder("="): k for k, v in _NP.items() if k != VT.BOOL}


def _infer(key: str, v: Any) -> tuple[VT, VT | None]:
    """GGUF type of a metadata value: explicit `Typed`, then llama.cpp's known keys, then the Python type."""
    if isinstance(v, Typed):
        return v.type, v.elem
    if key in _KEY_TYPES:
        return _KEY_TYPES[key]
    if key.endswith("_token_id"):
        return VT.UINT32, None
    if key.startswith("tokenizer.ggml.add_"):
        return VT.BOOL, None
    if isinstance(v, (list, tuple, np.ndarray)):
        return VT.ARRAY, _infer_elem(v)
    return _infer_scalar(v), None


def _infer_scalar(v: Any) -> VT:
    if isinstance(v, (bool, np.bool_)):
        return VT.BOOL
    if isinstance(v, np.generic) and v.dtype in _NP_TO_VT:
        return _NP_TO_VT[v.dtype]
    if isinstance(v, (int, np.integer)):
        return VT.INT32 if -2**31 <= v < 2**31 else VT.INT64
    if isinstance(v, (float, np.floating)):
        return VT.FLOAT32
    if isinstance(v, (str, bytes)):
        return VT.STRING
    raise TypeError(f"cannot store {type(v).__name__} in GGUF metadata")


def _infer_elem(v) -> VT:
    if isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
        return VT.BOOL if v.dtype == bool else _NP_TO_VT[v.dtype.newbyteorder("=")]
    items = list(v)
    if not items:
        return VT.INT32
    if all(isinstance(x, (list, tuple, np.ndarray)) for x in items):
        return VT.ARRAY
    kinds = {_infer_scalar(x) for x in items}
    if kinds <= {VT.INT32, VT.INT64}:
        return VT.INT64 if VT.INT64 in kinds else VT.INT32
    if kinds <= {VT.INT32, VT.INT64, VT.FLOAT32}:
        return VT.FLOAT32
    if len(kinds) == 1:
        return kinds.pop()
    raise TypeError(f"mixed element types in a GGUF array: {sorted(k.name for k in kinds)}")


# ==================================================================================================
# Models
# ==================================================================================================

def load_gguf_model(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, np.ndarray | TernaryWeight], dict]:
    """Read a GGUF model (archs ``bitnet``, ``bitnet-b1.58``, ``bitnet-25``, ``llama``) into HF tensor names.

    Linears become TernaryWeight [out, in] (a projection stored as floats must be exactly ternary x scales, else
    NotTernaryError); embedding / lm_head float32 [vocab, hidden]; norms float32 1-D. No ``lm_head.weight``
    means tied embeddings. Bitnet archs run BitNet b1.58 math (ReLU², int8 activations); see the module doc.
    Returns (config, weights, metadata).
    """
    r = GGUFReader(path)
    arch = r.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise FormatError(f"{r.path}: no general.architecture key (not a model file?)")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedError(f"{r.path}: architecture {arch!r} is not supported "
                               f"(supported: {', '.join(SUPPORTED_ARCHS)})")
    cfg = _config_from_metadata(r, arch)
    weights = _read_weights(r, cfg)
    if arch == "llama":
        _undo_llama_qk_permutation(cfg, weights)
    return cfg, weights, r.metadata


def _undo_llama_qk_permutation(cfg: ModelConfig, weights: dict) -> None:
    for name, heads in (("q_proj", cfg.num_attention_heads), ("k_proj", cfg.num_key_value_heads)):
        inverse = np.argsort(_qk_permutation(cfg.head_dim * heads, heads))
        for i in range(cfg.num_hidden_layers):
            key = f"model.layers.{i}.self_attn.{name}.weight"
            weights[key] = permute_rows(weights[key], inverse)


def _config_from_metadata(r: GGUFReader, arch: str) -> ModelConfig:
    def get(key: str, default: Any = ...) -> Any:
        full = key.format(arch=arch)
        if full not in r.metadata:
            if default is ...:
                raise FormatError(f"{r.path}: missing metadata key {full}")
            return default
        v = r.metadata[full]
        if isinstance(v, np.ndarray):  # per-layer values: we need them uniform
            if v.size == 0 or not np.all(v == v.flat[0]):
                raise UnsupportedError(f"{r.path}: per-layer {full} values are not supported")
            v = v.flat[0].item()
        return v

    _check_rope_scaling(r, get)
    if "token_embd.weight" not in r.tensors:
        raise FormatError(f"{r.path}: missing tensor token_embd.weight")
    try:
        kw = _config_fields(r, arch, get)
    except (TypeError, ValueError) as e:
        raise FormatError(f"{r.path}: malformed model metadata ({e})") from None
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim")
    bad = [k for k in sizes if kw[k] <= 0]
    if bad:
        raise FormatError(f"{r.path}: metadata gives non-positive {', '.join(f'{k}={kw[k]}' for k in bad)}")
    try:
        return ModelConfig(**kw)
    except UnsupportedError as e:
        raise UnsupportedError(f"{r.path}: {e}") from None


def _config_fields(r: GGUFReader, arch: str, get) -> dict[str, Any]:
    bitnet = arch in BITNET_ARCHS
    heads = int(get("{arch}.attention.head_count"))
    hidden = int(get("{arch}.embedding_length"))
    return dict(
        arch="bitnet" if bitnet else "llama",
        vocab_size=r.tensors["token_embd.weight"].shape[0],
        hidden_size=hidden,
        intermediate_size=int(get("{arch}.feed_forward_length")),
        num_hidden_layers=int(get("{arch}.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("{arch}.attention.head_count_kv", heads)),
        head_dim=int(get("{arch}.attention.key_length", get("{arch}.rope.dimension_count", hidden // max(heads, 1)))),
        rms_norm_eps=float(get("{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in r.tensors,
        hidden_act="relu2" if bitnet else "silu",
        act_bits=8 if bitnet else None,
        bos_token_id=None if (bos := get("tokenizer.ggml.bos_token_id", None)) is None else int(bos),
        eos_token_id=list(dict.fromkeys(int(get(f"tokenizer.ggml.{k}_token_id")) for k in ("eos", "eot", "eom")
                                        if f"tokenizer.ggml.{k}_token_id" in r.metadata)),
    )


def _check_rope_scaling(r: GGUFReader, get) -> None:
    kind = get("{arch}.rope.scaling.type", "none")
    factor = get("{arch}.rope.scaling.factor", 1.0)
    if not (kind == "none" or (kind == "linear" and factor == 1.0)):
        raise UnsupportedError(f"{r.path}: rope scaling {kind!r} (factor {factor}) is not supported")
    if "rope_freqs.weight" in r.tensors:
        f = gq.decode_float(r.raw("rope_freqs.weight"), r.tensors["rope_freqs.weight"].ggml_type,
                            r.tensors["rope_freqs.weight"].shape)
        if not np.all(f == 1.0):
            raise UnsupportedError(f"{r.path}: rope_freqs (llama3-style rope scaling) is not supported")


def _read_weights(r: GGUFReader, cfg: ModelConfig) -> dict[str, np.ndarray | TernaryWeight]:
    weights: dict[str, np.ndarray | TernaryWeight] = {}
    scales: dict[str, float] = {}
    unknown = []
    for name, info in r.tensors.items():
        if name == "rope_freqs.weight":
            continue
        base, _, suffix = name.rpartition(".")
        hf = _hf_name(base, cfg.num_hidden_layers)
        if hf is None or suffix not in ("weight", "scale"):
            unknown.append(name)
        elif suffix == "scale":  # llama.cpp bitnet: optional per-tensor multiplier of a linear
            scales[hf] = float(_decode(r, info, float_only=True).reshape(-1)[0])
        else:
            weights[hf + ".weight"] = _decode(r, info, float_only=base.split(".")[-1] not in LINEARS)
    if unknown:
        raise UnsupportedError(f"{r.path}: unexpected tensors {', '.join(unknown[:5])}"
                               f"{' ...' if len(unknown) > 5 else ''}")
    for hf, s in scales.items():
        w = weights.get(hf + ".weight")
        if not isinstance(w, TernaryWeight):
            raise FormatError(f"{r.path}: scale tensor for {hf} has no ternary weight")
        weights[hf + ".weight"] = TernaryWeight(w.packed, w.scales * np.float32(s), w.out_features, w.in_features)
    _check_shapes(r.path, cfg, weights)
    return weights


def _hf_name(base: str, n_layers: int) -> str | None:
    if base in GLOBAL_NAMES:
        return GLOBAL_NAMES[base]
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        if int(parts[1]) < n_layers:
            return f"model.layers.{int(parts[1])}.{LAYER_NAMES[parts[2]]}"
    return None


def _decode(r: GGUFReader, info: TensorInfo, float_only: bool) -> np.ndarray | TernaryWeight:
    """One tensor: float32 array, or TernaryWeight for a linear (floats checked for exact ternary x scales)."""
    try:
        if float_only:
            return gq.decode_float(r.raw(info.name), info.ggml_type, info.shape)
        if len(info.shape) != 2:
            raise FormatError(f"expected a 2-D weight, got shape {info.shape}")
        if info.ggml_type in gq.TERNARY_TYPES:
            return gq.decode_ternary(r.raw(info.name), info.ggml_type, info.shape)
        return detect_shard_scales(gq.decode_float(r.raw(info.name), info.ggml_type, info.shape))
    except NotTernaryError:
        raise NotTernaryError(f"{r.path}: tensor {info.name} ({gq.type_name(info.ggml_type)}) is not exactly "
                              f"ternary x scales") from None
    except (FormatError, UnsupportedError) as e:
        raise type(e)(f"{r.path}: tensor {info.name}: {e}") from None


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    layer = {"input_layernorm": (h,), "self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h),
             "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, q), "post_attention_layernorm": (h,),
             "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    if cfg.arch == "bitnet":
        layer |= {"self_attn.attn_sub_norm": (q,), "mlp.ffn_sub_norm": (f,)}
    for i in range(cfg.num_hidden_layers):
        shapes |= {f"model.layers.{i}.{k}.weight": s for k, s in layer.items()}
    return shapes


def _check_shapes(path: str, cfg: ModelConfig, weights: dict) -> None:
    expected = _expected_shapes(cfg)
    for name, shape in expected.items():
        if name not in weights:
            raise FormatError(f"{path}: missing tensor for {name}")
        if tuple(weights[name].shape) != shape:
            raise FormatError(f"{path}: {name} has shape {tuple(weights[name].shape)}, the metadata implies {shape}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise UnsupportedError(f"{path}: tensors the {cfg.arch} model does not use: {', '.join(extra[:5])}")


# --- q/k row order ----------------------------------------------------------------------------------

def _qk_permutation(n_rows: int, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` as row indices: GGUF rows = HF rows[perm]."""
    return np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def permute_rows(w: TernaryWeight, perm: np.ndarray) -> TernaryWeight:
    """Rows ``w[perm]``; the scale grid follows its rows (kept as is when each row stays in its row group)."""
    g = w.row_group
    if np.array_equal(perm // g, np.arange(w.out_features) // g):
        return TernaryWeight(w.packed[perm], w.scales, w.out_features, w.in_features)
    rows = np.repeat(w.scales, g, axis=0)[perm]  # (out, C)
    if np.all(rows == rows[:1]):
        rows = rows[:1]
    return TernaryWeight(w.packed[perm], rows, w.out_features, w.in_features)


# --- saving -----------------------------------------------------------------------------------------

def save_gguf_model(path: str | os.PathLike, config: ModelConfig, weights: dict, tokenizer_metadata: dict | None,
                    ttype: str = "tq2_0", progress: Callable[[int, int], None] | None = None) -> None:
    """Write a model as GGUF v3 that llama.cpp (tq1_0 / tq2_0) or bitnet.cpp (i2_s) loads.

    Arch names: ``llama`` for llama models; ``bitnet`` for bitnet models, or ``bitnet-b1.58`` with i2_s (what
    bitnet.cpp reads). Linears in ``ttype`` (llama q/k rows permuted as llama.cpp's converter does), embedding
    and lm_head F16, norms F32. ``tokenizer_metadata`` (``tokenizer.ggml.*``, ``tokenizer.chat_template``) is
    written as given. TQ types need in_features % 256 == 0 (i2_s: % 128 and one scale per tensor).
    """
    if ttype not in TTYPES:
        raise UnsupportedError(f"unknown ttype {ttype!r} (choose from {', '.join(TTYPES)})")
    qtype = TTYPES[ttype]
    arch = _save_arch(config, weights, qtype)
    linears = {name: _as_ternary(name, weights[name]) for name in _expected_shapes(config)
               if name.endswith("_proj.weight")}
    _check_encodable(linears, qtype)
    meta = _model_metadata(config, arch, qtype) | _tokenizer_metadata(config, tokenizer_metadata or {})
    tensors = _tensors_out(config, weights, linears, qtype)
    write_gguf(path, meta, tensors, progress=progress)


def _save_arch(config: ModelConfig, weights: dict, qtype: int) -> str:
    _check_shapes("save_gguf_model", config, weights)
    if config.arch == "llama":
        if config.hidden_act != "silu":
            raise UnsupportedError(f"GGUF llama models use SiLU; this one uses {config.hidden_act}")
        return "llama"
    if config.hidden_act != "relu2":
        raise UnsupportedError(f"GGUF bitnet files are read back as ReLU² BitNet b1.58; this one uses "
                               f"{config.hidden_act}")
    if qtype == gq.I2_S:
        return "bitnet-b1.58"
    if not config.tie_word_embeddings:
        raise UnsupportedError("llama.cpp's bitnet architecture has no separate lm_head; save this model "
                               "with ttype i2_s (bitnet-b1.58) instead")
    return "bitnet"


def _as_ternary(name: str, w) -> TernaryWeight:
    if isinstance(w, TernaryWeight):
        return w
    try:
        return detect_shard_scales(np.asarray(w))
    except NotTernaryError:
        raise NotTernaryError(f"{name} is not exactly ternary x scales (use --ternarize)") from None


def _check_encodable(linears: dict[str, TernaryWeight], qtype: int) -> None:
    block = gq.QK_I2_S if qtype == gq.I2_S else gq.QK_K
    for name, w in linears.items():
        if w.in_features % block:
            raise UnsupportedError(f"{gq.type_name(qtype)} needs in_features % {block} == 0; {name} has "
                                   f"{w.in_features} (try another ttype)")
        if qtype == gq.I2_S and w.uniform_scale() is None:
            raise UnsupportedError(f"I2_S holds one scale per tensor; {name} has a {w.scales.shape} scale grid "
                                   f"(use tq1_0 or tq2_0)")


def _model_metadata(cfg: ModelConfig, arch: str, qtype: int) -> dict[str, Any]:
    u32 = lambda v: Typed(int(v), VT.UINT32)  # noqa: E731
    f32 = lambda v: Typed(float(v), VT.FLOAT32)  # noqa: E731
    return {
        "general.architecture": arch,
        "general.file_type": u32(FILE_TYPES[qtype]),
        "general.quantization_version": u32(2),
        f"{arch}.vocab_size": u32(cfg.vocab_size),
        f"{arch}.context_length": u32(cfg.max_position_embeddings),
        f"{arch}.embedding_length": u32(cfg.hidden_size),
        f"{arch}.block_count": u32(cfg.num_hidden_layers),
        f"{arch}.feed_forward_length": u32(cfg.intermediate_size),
        f"{arch}.attention.head_count": u32(cfg.num_attention_heads),
        f"{arch}.attention.head_count_kv": u32(cfg.num_key_value_heads),
        f"{arch}.attention.key_length": u32(cfg.head_dim),
        f"{arch}.attention.value_length": u32(cfg.head_dim),
        f"{arch}.attention.layer_norm_rms_epsilon": f32(cfg.rms_norm_eps),
        f"{arch}.rope.freq_base": f32(cfg.rope_theta),
        f"{arch}.rope.dimension_count": u32(cfg.head_dim),
    }


def _tokenizer_metadata(cfg: ModelConfig, tok: dict) -> dict[str, Any]:
    """The tokenizer's keys, plus bos/eos/eot ids from the config where the tokenizer gave none."""
    meta = {k: v for k, v in tok.items() if v is not None and not k.startswith("general.")}
    ids = {"bos": cfg.bos_token_id, "eos": (cfg.eos_token_id or [None])[0],
           "eot": cfg.eos_token_id[1] if len(cfg.eos_token_id) > 1 else None}
    for k, v in ids.items():
        if v is not None:
            meta.setdefault(f"tokenizer.ggml.{k}_token_id", v)
    return meta


def _tensors_out(cfg: ModelConfig, weights: dict, linears: dict, qtype: int) -> list[TensorOut]:
    gguf_name = {hf: g for g, hf in GLOBAL_NAMES.items()}
    out = []
    for name in _expected_shapes(cfg):
        base = name.removesuffix(".weight")
        if name in linears:
            out.append(_linear_out(cfg, name, linears[name], qtype))
            continue
        if base in gguf_name:
            gname = gguf_name[base]
        else:
            i, rest = base.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{i}." + {v: k for k, v in LAYER_NAMES.items()}[rest]
        x = weights[name]
        qt = gq.F16 if x.ndim == 2 else gq.F32
        out.append(TensorOut(gname + ".weight", tuple(x.shape), qt, lambda x=x, qt=qt: gq.encode_float(x, qt)))
    return out


def _linear_out(cfg: ModelConfig, name: str, w: TernaryWeight, qtype: int) -> TensorOut:
    i, rest = name.removeprefix("model.layers.").removesuffix(".weight").split(".", 1)
    gname = f"blk.{i}." + {v: k for k, v in LAYER_NAMES.items()}[rest] + ".weight"
    if cfg.arch == "llama" and rest in ("self_attn.q_proj", "self_attn.k_proj"):
        heads = cfg.num_attention_heads if rest == "self_attn.q_proj" else cfg.num_key_value_heads
        perm = _qk_permutation(w.out_features, heads)
        return TensorOut(gname, w.shape, qtype, lambda: gq.encode_ternary(permute_rows(w, perm), qtype))
    return TensorOut(gname, w.shape, qtype, lambda: gq.encode_ternary(w, qtype))


__all__ = ["GGUFReader", "TensorInfo", "TensorOut", "Typed", "write_gguf", "load_gguf_model", "save_gguf_model",
           "permute_rows", "SUPPORTED_ARCHS"]

