"""Reading texts from .txt / .jsonl files and writing results atomically (never half a file)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np


def read_texts(path: str | Path) -> tuple[list, list[str]]:
    """(ids, texts) from a .txt file (one text a line) or .jsonl ({"text", optional "id"} a line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        ids, texts = [], []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{number}: each line needs a string field \"text\"")
            ids.append(record.get("id", len(texts)))
            texts.append(record["text"])
        return ids, texts
    if path.suffix == ".txt":
        return list(range(len(lines))), lines
    raise ValueError(f"input {path} must be a .txt (one text a line) or .jsonl file")


@contextlib.contextmanager
def atomic_output(path: str | Path, mode: str = "w") -> Iterator:
    """Writes to a temporary file beside `path` and renames it into place only on success."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_embeddings(path: str | Path, ids: Sequence, embeddings: np.ndarray) -> None:
    """.npy (the float32 matrix) or .jsonl ({"id", "embedding"} a line), written atomically."""
    path = Path(path)
    if path.suffix == ".npy":
        with atomic_output(path, "wb") as handle:
            np.save(handle, embeddings)
    elif path.suffix == ".jsonl":
        with atomic_output(path) as handle:
            for record_id, row in zip(ids, embeddings):
                handle.write(json.dumps({"id": record_id, "embedding": [float(x) for x in row]}) + "\n")
    else:
        raise ValueError(f"output {path} must end in .npy or .jsonl")
