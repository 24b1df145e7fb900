"""Codecs between GGML tensor bytes and `TernaryWeight` / float32 arrays: TQ1_0, TQ2_0, I2_S, F32, F16, BF16, Q8_0.

Shapes are given in numpy order ``(rows, cols)``; GGUF's ``ne`` is the reverse (``ne[0]`` = cols, the axis a
dot product runs over). All codecs are vectorised over blocks; none loops in Python.

Ternary layouts (verified byte for byte against gguf-py's quantizer in the tests):

- TQ2_0 (id 35): 256-element blocks of 66 bytes, ``qs[64]`` then fp16 ``d``. Byte ``qs[j*32 + b]`` holds element
  ``j*128 + k*32 + b`` in bits ``2k..2k+1`` as ``t + 1``.
- TQ1_0 (id 34): 256-element blocks of 54 bytes, ``qs[48]``, ``qh[4]``, fp16 ``d``. Five trits per byte in base 3
  (first element most significant), stored as ``ceil(v * 256 / 243)``: ``qs[0..31]`` hold elements ``n*32 + m``,
  ``qs[32..47]`` hold ``160 + n*16 + m``, ``qh[j]`` holds ``240 + n*4 + j`` (four trits, shifted up by one).
- I2_S (id 36, bitnet.cpp x86): the tensor flattened row-major, in blocks of 128 elements stored in 32 bytes:
  byte ``j`` = ``q[j]<<6 | q[j+32]<<4 | q[j+64]<<2 | q[j+96]``, ``q = t + 1``; then one fp32 scale at byte
  ``n/4``, padded to ``n/4 + 32`` bytes (bitnet.cpp's ``ggml_nbytes`` declares ``n/4 + 32``). bitnet.cpp's ARM
  build packs 64-element blocks instead; the file does not say which, and we read and write the x86 layout.

Code 3 never occurs in a ternary tensor; decoding one raises FormatError (ggml would read 2 or 0).
"""

from __future__ import annotations

import math

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import FormatError, UnsupportedError
from .packing import TernaryWeight

F32, F16, Q8_0, BF16 = 0, 1, 8, 30
TQ1_0, TQ2_0, I2_S = 34, 35, 36
QK_K = 256  # TQ block
QK_I2_S = 128  # I2_S block (x86 layout)

TERNARY_TYPES = (TQ1_0, TQ2_0, I2_S)
FLOAT_TYPES = (F32, F16, BF16, Q8_0)

_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.uint8)  # first trit most significant


def type_name(ggml_type: int) -> str:
    if ggml_type == I2_S:
        return "I2_S"
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def block_layout(ggml_type: int) -> tuple[int, int] | None:
    """(elements per block, bytes per block) for a known GGML type; None if unknown. I2_S is per tensor."""
    if ggml_type == I2_S:
        return (1, 1)  # placeholder, like bitnet.cpp's type traits; sizes come from tensor_nbytes
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        return None


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of numpy shape ``shape`` occupies. Raises FormatError if the row is not whole blocks."""
    n = math.prod(shape)  # Python ints: absurd dims must not wrap around
    if ggml_type == I2_S:
        return n // 4 + 32
    layout = block_layout(ggml_type)
    if layout is None:
        raise FormatError(f"unknown GGML type {ggml_type}")
    block, size = layout
    cols = shape[-1] if shape else 1
    if cols % block:
        raise FormatError(f"{type_name(ggml_type)} rows must be a multiple of {block} elements, got {cols}")
    return n // block * size


# --- ternary decoding -------------------------------------------------------------------------------

def decode_ternary(data: np.ndarray, ggml_type: int, shape: tuple[int, int]) -> TernaryWeight:
    """Raw bytes of a TQ1_0 / TQ2_0 / I2_S tensor of numpy shape [out, in] -> TernaryWeight.

    TQ scales become a grid ``[out, in/256]`` of the fp16 ``d`` widened to float32, collapsed to ``[1, 1]``
    when every block shares one ``d`` or to ``[out, 1]`` when each row does. Blocks whose 256 weights are all
    zero (llama.cpp writes ``d = 0`` for them) do not constrain the collapse: any scale gives them the same values.
    """
    out, n_in = shape
    data = _as_bytes(data, tensor_nbytes(ggml_type, shape))
    if ggml_type == I2_S:
        return _decode_i2_s(data, out, n_in)
    if ggml_type == TQ2_0:
        codes, d = _tq2_0_codes(data.reshape(-1, 66))
    elif ggml_type == TQ1_0:
        codes, d = _tq1_0_codes(data.reshape(-1, 54))
    else:
        raise UnsupportedError(f"{type_name(ggml_type)} is not a ternary type")
    if codes.max(initial=0) > 2:
        raise FormatError(f"{type_name(ggml_type)} data holds code 3, which is not ternary")
    free = (codes == 1).all(axis=1).reshape(out, -1)  # all-zero blocks
    grid = _collapse_grid(d.reshape(out, -1), free)
    return TernaryWeight(_pack_codes(codes.reshape(out, n_in)), grid, out, n_in)


def _tq2_0_codes(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 66) blocks -> codes uint8 (n, 256) and d float32 (n,)."""
    n = blocks.shape[0]
    qs = blocks[:, :64].reshape(n, 2, 1, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    codes = (qs >> shifts) & 3  # (n, j, k, b) -> element j*128 + k*32 + b
    return codes.reshape(n, QK_K), _fp16(blocks[:, 64:66])


def _tq1_0_codes(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 54) blocks -> codes uint8 (n, 256) and d float32 (n,)."""
    n = blocks.shape[0]
    mult = _POW3[::-1].reshape(1, 5, 1)  # trit k of a byte: (byte * 3^k mod 256) * 3 >> 8
    t0 = blocks[:, None, 0:32] * mult  # (n, 5, 32) -> element k*32 + m
    t1 = blocks[:, None, 32:48] * mult  # (n, 5, 16) -> element 160 + k*16 + m
    th = blocks[:, None, 48:52] * mult[:, :4]  # (n, 4, 4) -> element 240 + k*4 + j
    q = np.concatenate([t0.reshape(n, 160), t1.reshape(n, 80), th.reshape(n, 16)], axis=1)
    codes = ((q.astype(np.uint16) * 3) >> 8).astype(np.uint8)
    return codes, _fp16(blocks[:, 52:54])


def _decode_i2_s(data: np.ndarray, out: int, n_in: int) -> TernaryWeight:
    n = out * n_in
    if n % QK_I2_S:
        raise UnsupportedError(f"I2_S tensors need a multiple of {QK_I2_S} elements, got {n}")
    packed = data[: n // 4].reshape(-1, 1, 32)
    shifts = np.array([6, 4, 2, 0], dtype=np.uint8).reshape(1, 4, 1)
    codes = (packed >> shifts) & 3  # (blocks, g, b) -> element g*32 + b of the block
    if codes.max(initial=0) > 2:
        raise FormatError("I2_S data holds code 3, which is not ternary")
    scale = data[n // 4: n // 4 + 4].view("<f4").astype(np.float32)
    return TernaryWeight(_pack_codes(codes.reshape(out, n_in)), scale.reshape(1, 1), out, n_in)


def _collapse_grid(d: np.ndarray, free: np.ndarray) -> np.ndarray:
    """Block scales [out, nb] -> [1, 1] if one value, [out, 1] if one per row, else unchanged.

    ``free`` marks blocks whose weights are all zero; their scale can be anything.
    """
    known = ~free
    live = known.any(axis=1)
    lo = np.where(known, d, np.inf).min(axis=1)
    hi = np.where(known, d, -np.inf).max(axis=1)
    if not np.all((lo == hi) | ~live):
        return d
    if not live.any():
        return d[:1, :1].copy()
    first = lo[live][0]
    rows = np.where(live, lo, first).astype(np.float32)
    if np.all(rows == first):
        return np.array([[first]], dtype=np.float32)
    return rows.reshape(-1, 1)


# --- ternary encoding -------------------------------------------------------------------------------

def encode_ternary(w: TernaryWeight, ggml_type: int) -> np.ndarray:
    """TernaryWeight -> raw uint8 bytes of a TQ1_0 / TQ2_0 / I2_S tensor.

    TQ: each block's fp16 ``d`` is the weight's scale for that block (a coarser scale grid is broadcast). A scale
    that fp16 cannot hold exactly is rounded to the nearest fp16 (ties to even), as llama.cpp's quantizer does;
    a scale beyond the fp16 range raises UnsupportedError. All-zero blocks get ``d = 0``, as in llama.cpp.
    I2_S: one fp32 scale per tensor, so the weight's scale must be uniform.
    """
    if ggml_type == I2_S:
        return _encode_i2_s(w)
    if ggml_type not in (TQ1_0, TQ2_0):
        raise UnsupportedError(f"{type_name(ggml_type)} is not a ternary type")
    if w.in_features % QK_K:
        raise UnsupportedError(f"{type_name(ggml_type)} needs in_features % {QK_K} == 0, got {w.in_features}")
    codes = _unpack_codes(w.packed).reshape(-1, QK_K)  # (blocks, 256)
    free = (codes == 1).all(axis=1)
    d = np.where(free, np.float32(0), _block_scales(w, free.reshape(w.out_features, -1)).reshape(-1))
    d16 = _to_fp16(d).view(np.uint8).reshape(-1, 2)
    qs = _tq2_0_pack(codes) if ggml_type == TQ2_0 else _tq1_0_pack(codes)
    return np.concatenate([qs, d16], axis=1).reshape(-1)


def _tq2_0_pack(codes: np.ndarray) -> np.ndarray:
    c = codes.reshape(-1, 2, 4, 32)  # (n, j, k, b)
    return (c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)).reshape(-1, 64)


def _tq1_0_pack(codes: np.ndarray) -> np.ndarray:
    n = codes.shape[0]
    c = codes.astype(np.uint16)
    q0 = (c[:, :160].reshape(n, 5, 32) * _POW3.reshape(1, 5, 1)).sum(axis=1)
    q1 = (c[:, 160:240].reshape(n, 5, 16) * _POW3.reshape(1, 5, 1)).sum(axis=1)
    qh = (c[:, 240:].reshape(n, 4, 4) * _POW3[:4].reshape(1, 4, 1)).sum(axis=1)
    q = np.concatenate([q0, q1, qh], axis=1).astype(np.uint16)
    return ((q * 256 + 242) // 243).astype(np.uint8)  # ceil(q * 256 / 243)


def _block_scales(w: TernaryWeight, free: np.ndarray) -> np.ndarray:
    """The weight's scale per 256-column block, float32 [out, in/256]; UnsupportedError if a block has two."""
    grid, cg = w.scales, w.col_group
    nb = w.in_features // QK_K
    if cg % QK_K == 0:
        per_block = grid[:, np.arange(nb) * QK_K // cg]  # (R, nb)
    else:  # column groups narrower than a block: every group inside a block must agree
        cols = np.repeat(grid, cg, axis=1).reshape(grid.shape[0], nb, QK_K)
        per_block = cols[..., 0]
        clash = np.repeat(cols.min(axis=2) != cols.max(axis=2), w.row_group, axis=0) & ~free
        if clash.any():
            raise UnsupportedError(f"scale grid {grid.shape} puts two scales in one {QK_K}-block; TQ holds one")
    return np.repeat(per_block, w.row_group, axis=0)


def _encode_i2_s(w: TernaryWeight) -> np.ndarray:
    n = w.out_features * w.in_features
    if w.in_features % QK_I2_S:
        raise UnsupportedError(f"I2_S needs in_features % {QK_I2_S} == 0, got {w.in_features}")
    scale = w.uniform_scale()
    if scale is None:
        raise UnsupportedError(f"I2_S holds one scale per tensor; this weight has a {w.scales.shape} scale grid")
    codes = _unpack_codes(w.packed).reshape(-1, 4, 32)  # (blocks, g, b)
    packed = (codes[:, 0] << 6) | (codes[:, 1] << 4) | (codes[:, 2] << 2) | codes[:, 3]
    tail = np.zeros(32, dtype=np.uint8)
    tail[:4] = np.array([scale], dtype="<f4").view(np.uint8)
    return np.concatenate([packed.reshape(n // 4), tail])


# --- float types ------------------------------------------------------------------------------------

def decode_float(data: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """Raw bytes of an F32 / F16 / BF16 / Q8_0 tensor (or a ternary one, densified) -> float32 of ``shape``."""
    data = _as_bytes(data, tensor_nbytes(ggml_type, shape))
    if ggml_type == F32:
        x = data.view("<f4").astype(np.float32)
    elif ggml_type == F16:
        x = data.view("<f2").astype(np.float32)
    elif ggml_type == BF16:
        x = (data.view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif ggml_type == Q8_0:
        blocks = data.reshape(-1, 34)
        x = _fp16(blocks[:, :2])[:, None] * blocks[:, 2:].view(np.int8).astype(np.float32)
    elif ggml_type in TERNARY_TYPES and len(shape) == 2:
        return decode_ternary(data, ggml_type, shape).dense()
    else:
        raise UnsupportedError(f"tensors of type {type_name(ggml_type)} are not supported")
    return x.reshape(shape)


def encode_float(x: np.ndarray, ggml_type: int) -> np.ndarray:
    """float array -> raw uint8 bytes as F32, F16, BF16 (round to nearest even) or Q8_0 (as ggml's reference)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if ggml_type == F32:
        return x.astype("<f4").reshape(-1).view(np.uint8)
    if ggml_type == F16:
        return x.astype("<f2").reshape(-1).view(np.uint8)
    if ggml_type == BF16:
        return _to_bf16(x).reshape(-1).view(np.uint8)
    if ggml_type == Q8_0:
        return _to_q8_0(x)
    raise UnsupportedError(f"cannot encode {type_name(ggml_type)} from floats")


def _to_bf16(x: np.ndarray) -> np.ndarray:
    n = x.view(np.uint32)
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    n = np.where(nan, (n & np.uint32(0xFFFF0000)) | np.uint32(64 << 16), n).astype(np.uint64)
    return ((n + (0x7FFF + ((n >> 16) & 1))) >> 16).astype("<u2")


def _to_q8_0(x: np.ndarray) -> np.ndarray:
    if x.shape[-1] % 32:
        raise UnsupportedError(f"Q8_0 rows must be a multiple of 32, got {x.shape[-1]}")
    blocks = x.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    v = blocks * inv
    q = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))  # round half away from zero, as ggml's roundf
    return np.concatenate([d.astype("<f2").view(np.uint8), q.astype(np.int8).view(np.uint8)], axis=1).reshape(-1)


# --- helpers ----------------------------------------------------------------------------------------

def _pack_codes(codes: np.ndarray) -> np.ndarray:
    """uint8 codes t+1 [out, in], in % 4 == 0 -> packing.pack_rows' layout (4 per byte, lowest bits first)."""
    c = codes.reshape(codes.shape[0], -1, 4)
    return c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)


def _unpack_codes(packed: np.ndarray) -> np.ndarray:
    """packing's uint8 [out, in/4] -> codes t+1 uint8 [out, in] (in % 4 == 0 for every GGML ternary type)."""
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)
    return ((packed[..., None] >> shifts) & 3).reshape(packed.shape[0], -1)


def _as_bytes(data, nbytes: int) -> np.ndarray:
    data = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    data = np.asarray(data).reshape(-1).view(np.uint8)
    if data.size < nbytes:
        raise FormatError(f"tensor data is {data.size} bytes, expected {nbytes}")
    return data[:nbytes]


def _fp16(two_bytes: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 little-endian fp16 -> float32 (n,)."""
    return np.ascontiguousarray(two_bytes).view("<f2").reshape(-1).astype(np.float32)


def _to_fp16(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = np.asarray(x, dtype=np.float32).astype("<f2")
    if not np.all(np.isfinite(h) | ~np.isfinite(x)):
        raise UnsupportedError(f"a scale of {np.abs(x).max():g} is beyond the fp16 range of TQ block scales")
    return h
