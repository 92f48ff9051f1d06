"""Safetensors files read and written through the `safetensors` package, with the checks it lacks.

The package parses and validates each file (header size, JSON, every tensor's dtype, shape and
offsets, data covering the file exactly) and memory-maps it; bfloat16 comes back as ml_dtypes'
numpy dtype. On top of it this module adds what a model checkpoint needs:
- only floating-point dtypes a model is stored in are accepted (the package also takes I64, U8, ...);
- a refused file is one CheckpointError naming the file, the tensor(s) and the reason (the package's
  own message is kept when no finer one applies);
- each tensor is read in its own short-lived mapping, so its pages leave the process once copied.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import struct
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
}
_STORABLE = set(DTYPES.values())


class CheckpointError(ValueError):
    """A checkpoint file that is broken, hostile or does not fit the model."""


class SafetensorsFile:
    """One .safetensors file: its tensors' names, dtypes and shapes, validated, and copies of its tensors."""

    def __init__(self, path: str | Path):
        """`path`: the .safetensors file. Raises CheckpointError for a broken or unsupported file."""
        self.path = Path(path)
        with self._opened() as handle:
            self.metadata: dict[str, str] = handle.metadata() or {}
            self.entries: dict[str, tuple[str, tuple[int, ...]]] = {}
            for name in handle.offset_keys():
                tensor = handle.get_slice(name)
                self.entries[name] = tensor.get_dtype(), tuple(tensor.get_shape())
        for name, (dtype, _) in self.entries.items():
            if dtype not in DTYPES:
                raise CheckpointError(f"{self.path}: {_unsupported(name, dtype)}")

    @contextlib.contextmanager
    def _opened(self) -> Iterator:
        try:
            with safe_open(self.path, framework="numpy") as handle:
                yield handle
        except SafetensorError as err:
            raise CheckpointError(f"{self.path}: {_reason(self.path, str(err))}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor `name`."""
        return self.entries[name][1]

    def array(self, name: str) -> np.ndarray:
        """A copy of tensor `name`, never a view of the file (which may be rewritten while a model
        lives); the file is mapped only while it is copied."""
        if name not in self.entries:
            raise KeyError(name)
        with self._opened() as handle:
            return handle.get_tensor(name)


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, np.ndarray]],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Writes `tensors` ((name, array) pairs, held together until written) to the file `path`, with the
    text `metadata` in its header; returns the bytes of tensor data written."""
    tensors = {name: np.ascontiguousarray(array) for name, array in tensors}
    for name, array in tensors.items():
        if array.dtype not in _STORABLE:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} cannot be stored in safetensors here")
    save_file(tensors, path, metadata=dict(metadata) if metadata else None)
    return sum(array.nbytes for array in tensors.values())


def _unsupported(name: str, dtype: str) -> str:
    return f"tensor {name!r} has unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})"


def _reason(path: Path, error: str) -> str:
    """Why the package refused `path`, in one line that names the tensors involved. The package's
    `error` says what failed; the header is read again (as plain JSON) only to name what it left out."""
    size = path.stat().st_size
    if "header too small" in error:
        return f"truncated safetensors file ({size} bytes)"
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if "invalid header length" in error:
            return f"header length {length} runs past the end of the file ({size} bytes)"
        if "header too large" in error:
            return f"header length {length} is over the safetensors package's limit"
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"header is not valid JSON ({err})"
    entries = {name: entry for name, entry in header.items() if name != "__metadata__" and isinstance(entry, dict)} \
        if isinstance(header, dict) else {}
    for name, entry in entries.items():
        if "dtype" in entry and (not isinstance(entry["dtype"], str) or entry["dtype"] not in DTYPES):
            return _unsupported(name, entry["dtype"])
    if "incomplete metadata" in error:
        return (f"tensor offsets run past the data ({size - 8 - length} bytes) or leave some unused; the file is "
                "truncated or corrupt")
    if "invalid shape, data type, or offset" in error:
        for name, entry in entries.items():
            begin, end = entry.get("data_offsets", (0, 0))
            if end - begin != math.prod(entry.get("shape", ())) * DTYPES[entry["dtype"]].itemsize:
                return f"tensor {name!r} offsets do not match shape {entry.get('shape')} of {entry['dtype']}"
    offset = re.search(r"invalid offset for tensor `(.*)`", error)
    if offset and offset.group(1) in entries:
        name = offset.group(1)
        begin = entries[name]["data_offsets"][0]
        before = [other for other, entry in entries.items()
                  if other != name and entry["data_offsets"][0] <= begin < entry["data_offsets"][1]]
        if before:
            return f"tensors {before[0]!r} and {name!r} overlap"
        return f"tensor {name!r} offsets {entries[name]['data_offsets']} leave a gap or run backwards"
    return f"not a valid safetensors file ({error})"
