"""A memory-mapped safetensors reader (bf16 included, which safetensors' NumPy API cannot return)."""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from ..errors import FormatError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """Tensors of one ``.safetensors`` file, read lazily from a memory map.

    ``get(name)`` returns a NumPy array; BF16 tensors come back widened (exactly) to float32.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise FormatError(f"{path}: not a safetensors file (too short)")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, 100 << 20):
                    raise FormatError(f"{path}: corrupt safetensors header (length {n} for a {size}-byte file)")
                header = json.loads(f.read(n))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{path}: cannot read safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise FormatError(f"{path}: corrupt safetensors header")
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self.data_start = 8 + n
        for name, e in header.items():
            try:
                lo, hi = e["data_offsets"]
                dtype, shape = e["dtype"], e["shape"]
            except (KeyError, TypeError, ValueError):
                raise FormatError(f"{path}: corrupt entry for tensor {name!r}") from None
            if dtype not in _DTYPES:
                raise FormatError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
            need = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
            if hi - lo != need or self.data_start + hi > size:
                raise FormatError(f"{path}: tensor {name!r} is truncated or corrupt "
                                  f"(needs bytes {lo}..{hi} of {size - self.data_start})")
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if size > self.data_start else None

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        e = self.entries[name]
        lo, hi = e["data_offsets"]
        raw = self._map[self.data_start + lo:self.data_start + hi] if hi > lo else np.zeros(0, np.uint8)
        arr = raw.view(_DTYPES[e["dtype"]]).reshape(e["shape"])
        if e["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even, as torch does."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + 0x7FFF + ((u >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None,
                      bf16: set[str] = frozenset()) -> None:
    """Write tensors (names in ``bf16`` are stored as BF16 from float32) with 8-byte-aligned data."""
    rev = {np.dtype(v): k for k, v in _DTYPES.items() if k != "BF16"}
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    blobs, off = [], 0
    for name, arr in tensors.items():
        if name in bf16:
            data, dt = bf16_bits(arr), "BF16"
        else:
            data = np.ascontiguousarray(arr)
            dt = rev[data.dtype]
        b = data.tobytes()
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)
