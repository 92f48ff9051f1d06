"""Strict, memory-mapped reading and atomic writing of the safetensors format.

A file is an 8-byte little-endian header length, a JSON header mapping each tensor name to
{dtype, shape, data_offsets}, then the raw bytes. Every field is checked before any tensor is
touched, so a truncated or hostile file fails with its name and the reason.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER_BYTES = 100 << 20


class CheckpointError(ValueError):
    """A checkpoint file that is broken, hostile or does not fit the model."""


class SafetensorsFile:
    """One .safetensors file: its header, validated, and zero-copy views of its tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{self.path}: header length {header_len} runs past the end of the file ({size} bytes)")
            try:
                header = json.loads(handle.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise CheckpointError(f"{self.path}: header is not valid JSON ({err})") from None
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self.entries = {name: self._check_entry(name, entry, size - self._data_start)
                        for name, entry in header.items()}
        spans = sorted((begin, end, name) for name, (_, _, begin, end) in self.entries.items())
        for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
            if begin < prev_end:
                raise CheckpointError(f"{self.path}: tensors {prev!r} and {name!r} overlap")

    def _check_entry(self, name: str, entry, data_size: int):
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise CheckpointError(f"{self.path}: tensor {name!r} lacks dtype, shape or data_offsets")
        if entry["dtype"] not in DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']!r} "
                                  f"(supported: {', '.join(DTYPES)})")
        dtype = DTYPES[entry["dtype"]]
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
            raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(n, int) for n in offsets) and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise CheckpointError(f"{self.path}: tensor {name!r} offsets {offsets!r} run past the data "
                                  f"({data_size} bytes); the file is truncated or corrupt")
        if offsets[1] - offsets[0] != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointError(f"{self.path}: tensor {name!r} offsets do not match shape {shape} "
                                  f"of {entry['dtype']}")
        return dtype, tuple(shape), offsets[0], offsets[1]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def array(self, name: str) -> np.ndarray:
        """A read-only view of one tensor; bytes are read from disk only when touched."""
        dtype, shape, begin, end = self.entries[name]
        start = self._data_start + begin
        return np.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize,
                             offset=start).reshape(shape)


    def release(self, name: str) -> None:
        """Drops the tensor's pages from this process's memory (they stay in the OS page cache)."""
        _, _, begin, end = self.entries[name]
        page = mmap.PAGESIZE
        start = (self._data_start + begin) // page * page
        stop = self._data_start + end
        if stop > start and hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, np.ndarray]],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Writes tensors (name, array) to one file; returns the bytes of tensor data written."""
    tensors = list(tensors)
    header, offset = {}, 0
    for name, array in tensors:
        if array.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} cannot be stored in safetensors here")
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for _, array in tensors:
            handle.write(np.ascontiguousarray(array).tobytes())
    return offset
