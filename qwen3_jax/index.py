"""Exact search over a corpus folder written by `qwen3-jax embed-corpus`.

The shards are memory-mapped and scored in blocks of rows (a matrix product against the queries, in
float32), keeping a running top-k, so memory is bounded by one block whatever the corpus size. This is
the correct baseline that any approximate index is measured against.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qwen3_jax.corpus import read_manifests, shard_name

BLOCK_ROWS = 65_536


class Index:
    """The embeddings and ids of a complete corpus folder; `search(queries, k)` finds the top k."""

    def __init__(self, folder: Path, manifests: list[dict]):
        self.folder = folder
        self.settings = manifests[0]["settings"]
        self.dim = int(manifests[0]["dim"])
        self.shards = sorted(entry["shard"] for m in manifests for entry in m["shards"] if entry["count"])
        self._vectors = [np.load(folder / f"{shard_name(k)}.npy", mmap_mode="r") for k in self.shards]
        self._ids: list | None = None

    @classmethod
    def open(cls, folder: str | Path) -> "Index":
        folder = Path(folder)
        manifests = read_manifests(folder) if folder.is_dir() else []
        if not manifests:
            raise FileNotFoundError(f"{folder} holds no corpus (no manifest); make one with qwen3-jax embed-corpus")
        expected = manifests[0]["settings"]["num_processes"]
        if len(manifests) < expected or not all(m["complete"] for m in manifests):
            raise ValueError(f"{folder} is not complete ({sum(m['complete'] for m in manifests)} of {expected} "
                             "processes finished); run the same embed-corpus command again to finish it")
        return cls(folder, manifests)

    def __len__(self) -> int:
        return sum(len(v) for v in self._vectors)

    @property
    def ids(self) -> list:
        """Every embedding's id, in index order (read on first use)."""
        if self._ids is None:
            self._ids = [i for k in self.shards
                         for i in json.loads((self.folder / f"{shard_name(k)}.ids.json").read_text(encoding="utf-8"))]
        return self._ids

    def search(self, queries: np.ndarray, k: int = 10, *, block_rows: int = BLOCK_ROWS) -> tuple[np.ndarray, list]:
        """(scores [n, k'], ids: n lists of k' ids), best first, k' = min(k, len(self)); scores are dot
        products (cosines, as both sides are normalised)."""
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {queries.shape[1]}; this index holds {self.dim}-dim embeddings")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k={k!r} must be a whole number of at least 1")
        n, k = len(queries), min(int(k), len(self))
        best = np.full((n, k), -np.inf, np.float32)
        where = np.zeros((n, k), np.int64)
        offset = 0
        for vectors in self._vectors:
            for start in range(0, len(vectors), block_rows):
                block = np.asarray(vectors[start:start + block_rows], np.float32)
                scores = np.concatenate([best, queries @ block.T], axis=1)
                positions = np.concatenate([where, np.broadcast_to(offset + start + np.arange(len(block)),
                                                                   (n, len(block)))], axis=1)
                keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
                best = np.take_along_axis(scores, keep, axis=1)
                where = np.take_along_axis(positions, keep, axis=1)
            offset += len(vectors)
        order = np.lexsort((where, -best), axis=1)          # best first; equal scores in index order
        best, where = np.take_along_axis(best, order, axis=1), np.take_along_axis(where, order, axis=1)
        ids = self.ids
        return best, [[ids[p] for p in row] for row in where]
