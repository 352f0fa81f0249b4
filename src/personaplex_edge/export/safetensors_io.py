"""Lazy, memory-mapped safetensors reading and streaming writing (no torch).

The released LM is 16.7 GB of bfloat16: the reader maps the file and converts
one tensor at a time, so peak memory is one tensor, not the checkpoint. The
format is simple (8-byte little-endian header length, a JSON header, raw
bytes), which lets us check it thoroughly and name the exact problem.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from personaplex_edge.runtime.errors import PpxError

_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; widened to float32 on read
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_MAX_HEADER = 100 * 1024 * 1024


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (as PyTorch does)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + 0x7FFF
    return ((u + rounding) >> 16).astype(np.uint16)


class SafetensorsFile(Mapping[str, np.ndarray]):
    """Read-only mapping name -> float32 (or integer) array, loaded on access."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) < 8:
                    raise PpxError(f"{self.path}: not a safetensors file (shorter than its header)")
                (header_len,) = struct.unpack("<Q", raw_len)
                if header_len > _MAX_HEADER or 8 + header_len > size:
                    raise PpxError(f"{self.path}: corrupt or truncated safetensors header")
                header = json.loads(f.read(header_len))
        except FileNotFoundError:
            raise PpxError(f"{self.path}: file not found") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise PpxError(f"{self.path}: corrupt safetensors header (not JSON)") from None
        except OSError as exc:
            raise PpxError(f"{self.path}: cannot read: {exc.strerror}") from None
        if not isinstance(header, dict):
            raise PpxError(f"{self.path}: corrupt safetensors header")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        data_len = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            self._entries[name] = self._check_entry(name, info, data_len)
        self._map: np.memmap | None = None

    def _check_entry(self, name: str, info: Any, data_len: int) -> tuple[np.dtype, str, tuple[int, ...], int, int]:
        try:
            dtype_name = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise PpxError(f"{self.path}: {name}: malformed header entry") from None
        if dtype_name not in _DTYPES:
            raise PpxError(f"{self.path}: {name}: unsupported dtype {dtype_name}")
        dtype = _DTYPES[dtype_name]
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected or begin < 0:
            raise PpxError(f"{self.path}: {name}: byte range does not match shape {list(shape)}")
        if end > data_len:
            raise PpxError(f"{self.path}: {name}: data past the end of the file (truncated download?)")
        return dtype, dtype_name, shape, begin, end

    def _mapped(self) -> np.memmap:
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._map

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][2]

    def dtype_name(self, name: str) -> str:
        return self._entries[name][1]

    def raw(self, name: str) -> np.ndarray:
        """The stored array without conversion (a read-only view into the map)."""
        dtype, _, shape, begin, end = self._entries[name]
        buf = self._mapped()[self._data_start + begin:self._data_start + end]
        return buf.view(dtype).reshape(shape)

    def __getitem__(self, name: str) -> np.ndarray:
        """One tensor, widened to float32. Read with pread rather than through the map, so
        a whole-checkpoint pass leaves no file pages mapped: resident memory stays at about
        one tensor, not the checkpoint."""
        if name not in self._entries:
            raise KeyError(name)
        dtype, dtype_name, shape, begin, end = self._entries[name]
        buf = np.empty(end - begin, np.uint8)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            if f.readinto(memoryview(buf)) != end - begin:
                raise PpxError(f"{self.path}: {name}: file shrank while reading")
        arr = buf.view(dtype).reshape(shape)
        if dtype_name == "BF16":
            return bf16_bits_to_f32(arr)
        if arr.dtype.kind == "f":
            return arr.astype(np.float32, copy=False)
        return arr

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


TensorSource = Callable[[], np.ndarray]


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray | tuple[tuple[int, ...], TensorSource]],
                      bf16: bool = True, metadata: dict[str, str] | None = None) -> None:
    """Write tensors, streaming one at a time; atomic (temporary name, then rename).

    A value is an array or `(shape, make)`, where `make()` produces the float
    array on demand, so a full-size random checkpoint never sits in memory.
    Floats are stored as bfloat16 (as released) unless `bf16` is False.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, value in tensors.items():
        shape, kind = (value.shape, value.dtype.kind) if isinstance(value, np.ndarray) else (value[0], "f")
        dtype_name = ("BF16" if bf16 else "F32") if kind == "f" else "I64"
        nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype_name].itemsize
        header[name] = {"dtype": dtype_name, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, value in tensors.items():
                arr = value if isinstance(value, np.ndarray) else value[1]()
                if tuple(arr.shape) != tuple(header[name]["shape"]):
                    raise ValueError(f"{name}: produced shape {arr.shape}, declared {header[name]['shape']}")
                kind = header[name]["dtype"]
                stored = f32_to_bf16_bits(arr) if kind == "BF16" else arr.astype("<f4" if kind == "F32" else "<i8")
                f.write(np.ascontiguousarray(stored).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
