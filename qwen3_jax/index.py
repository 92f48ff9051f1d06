"""Search over a corpus folder written by `qwen3-jax embed-corpus`: exact, or through an approximate
index built beside the shards (`qwen3_jax.ann`).

Exact search memory-maps the shards and scores them in blocks of rows (a matrix product against the
queries, in float32), keeping a running top-k, so memory is bounded by one block whatever the corpus
size. Quantized shards (int8, binary) are read back as float32 block by block and scored against the
float queries. Either way the candidates are then scored one by one, the same way wherever they sit.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from qwen3_jax import ann
from qwen3_jax.checks import whole_number
from qwen3_jax.corpus import read_manifests, shard_name
from qwen3_jax.quantize import dequantize

BLOCK_ROWS = 65_536
SPARE_CANDIDATES = 16            # candidates beyond k that the float32 blocks pass on (see Index.search)
RESCORED_QUERIES = 16


def _top_k_in_order(scores: np.ndarray, k: int) -> np.ndarray:
    """A mask [n, m] of each row's k best scores, ties at the k-th score broken towards the lower column.
    Columns run in index order (the kept best so far come first, in index order themselves), so
    the lower column is the lower position."""
    kth = np.partition(scores, scores.shape[1] - k, axis=1)[:, scores.shape[1] - k, None]
    above, at = scores > kth, scores == kth
    wanted = k - above.sum(axis=1, keepdims=True)                 # how many of the ties fill the top k
    return above | (at & (np.cumsum(at, axis=1) <= wanted))


class Index:
    """The embeddings and ids of a complete corpus folder; `search(queries, k)` finds the top k."""

    def __init__(self, folder: Path, manifests: list[dict]):
        self.folder = folder
        self.settings = manifests[0]["settings"]
        self.dim = int(manifests[0]["dim"])
        self.entries = sorted((entry for m in manifests for entry in m["shards"] if entry["count"]),
                              key=lambda entry: entry["shard"])
        self.shards = [entry["shard"] for entry in self.entries]
        self.digest = {entry["shard"]: entry["digest"] for entry in self.entries}
        ranges = {entry["shard"]: m.get("calibration") for m in manifests for entry in m["shards"]}
        self._ranges = [ranges[k] for k in self.shards]
        self._vectors = [np.load(folder / f"{shard_name(k)}.npy", mmap_mode="r") for k in self.shards]
        self.starts = np.cumsum([0] + [len(v) for v in self._vectors])
        self._ids: list | None = None
        self._approximate = None         # the folder's approximate index, read on first use

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
        return int(self.starts[-1])

    def rows(self, s: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start..stop of the s-th listed shard as float32 (quantized ones read back)."""
        return self._decoded(s, self._vectors[s][start:stop])

    def _decoded(self, s: int, stored: np.ndarray) -> np.ndarray:
        return dequantize(np.asarray(stored), self.settings["output_dtype"], self.dim, self._ranges[s])

    @property
    def ids(self) -> list:
        """Every embedding's id, in index order (read on first use)."""
        if self._ids is None:
            self._ids = [i for k in self.shards
                         for i in json.loads((self.folder / f"{shard_name(k)}.ids.json").read_text(encoding="utf-8"))]
        return self._ids

    def search(self, queries: np.ndarray, k: int = 10, *, block_rows: int = BLOCK_ROWS, approximate: bool = False,
               ef: int | None = None) -> tuple[np.ndarray, list]:
        """(scores [n, k'], ids: n lists of k' ids), best first, k' = min(k, len(self)); scores are dot
        products (cosines, as both sides are normalised). Equal scores come in index order (the lower
        position first), whatever k and the block size: duplicate documents are common.

        The blocks are scored with float32 matrix products, whose rounding depends on where a row sits in
        its block (identical vectors can differ in the last bit). So the blocks only choose candidates
        (the best k + SPARE_CANDIDATES); each candidate is then scored alone, the same way wherever it
        sits, and those scores rank them. `approximate` takes the candidates from the folder's approximate
        index instead (`qwen3-jax build-ann`; `ef`: how many it looks at per query, default its own)."""
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {queries.shape[1]}; this index holds {self.dim}-dim embeddings")
        whole_number(k, "k")
        n, wanted = len(queries), min(int(k), len(self))
        k = min(wanted + SPARE_CANDIDATES, len(self))
        if approximate:
            self._approximate = self._approximate or ann.open_for(self)
            where = self._approximate.candidates(queries, k, ef=ef)
        else:
            where = self._exact_candidates(queries, k, block_rows)
        best = self._rescored(queries, where)
        order = np.lexsort((where, -best), axis=1)[:, :wanted]     # best first; equal scores in index order
        best, where = np.take_along_axis(best, order, axis=1), np.take_along_axis(where, order, axis=1)
        ids = self.ids
        return best, [[ids[p] for p in row if p >= 0] for row in where]

    def _exact_candidates(self, queries: np.ndarray, k: int, block_rows: int) -> np.ndarray:
        """The positions [n, k] of each query's k best scores over every row, block by block."""
        n = len(queries)
        best = np.full((n, k), -np.inf, np.float32)
        where = np.zeros((n, k), np.int64)
        for s, vectors in enumerate(self._vectors):
            for start in range(0, len(vectors), block_rows):
                block = self.rows(s, start, start + block_rows)
                scores = np.concatenate([best, queries @ block.T], axis=1)
                positions = np.concatenate([where, np.broadcast_to(self.starts[s] + start + np.arange(len(block)),
                                                                   (n, len(block)))], axis=1)
                keep = _top_k_in_order(scores, k)
                best, where = scores[keep].reshape(n, k), positions[keep].reshape(n, k)
        return where

    def _rescored(self, queries: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Each query's float32 score against the vectors at `positions` [n, c] (-inf where a position is
        -1: fewer candidates than asked). Each pair's products are summed by the same loop over the
        dimensions (np.einsum), wherever the pair sits: equal vectors, equal scores. RESCORED_QUERIES
        queries at a time (their rows stay in the caches), on every core."""
        scores = np.empty(positions.shape, np.float32)
        shard = np.searchsorted(self.starts, positions, side="right") - 1

        def score(first: int) -> None:
            part, where = positions[first:first + RESCORED_QUERIES], shard[first:first + RESCORED_QUERIES]
            rows = np.empty(part.shape + (self.dim,), np.float32)
            rows[part < 0] = 0
            for s in np.unique(where[part >= 0]):
                chosen = (where == s) & (part >= 0)
                rows[chosen] = self._decoded(s, self._vectors[s][part[chosen] - self.starts[s]])
            scores[first:first + len(part)] = np.einsum("ND,NCD->NC", queries[first:first + len(part)], rows)

        with ThreadPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(score, range(0, len(queries), RESCORED_QUERIES)))
        scores[positions < 0] = -np.inf
        return scores
