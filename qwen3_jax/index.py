"""Search over a corpus folder written by `qwen3-jax embed-corpus`: exact, or through an approximate
index built beside the shards (`qwen3_jax.ann`).

Exact search memory-maps the shards and scores them in blocks of rows (a matrix product against the
queries, in float32), keeping a running top-k, so memory is bounded by one block whatever the corpus
size. Quantized shards (int8, binary) are read back as float32 block by block and scored against the
float queries. A matrix product rounds a pair's score by where the pair sits (its row in the block,
the other queries beside it), so the products only choose candidates: every row that could still be
among the best k once rounding is allowed for (ROUNDING_BOUND) is scored again alone, the same way
wherever it sits, and those scores rank them: identical vectors score alike, and ties go to the lower
position whatever k, the block size, the dtype or the other queries.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from qwen3_jax import ann
from qwen3_jax.checks import UsageError, whole_number
from qwen3_jax.corpus.sources import input_state, iter_corpus
from qwen3_jax.corpus.store import read_manifests, shard_name
from qwen3_jax.hub import resolve_model, weights_fingerprint
from qwen3_jax.quantize import dequantize
from qwen3_jax.textio import NoSuchInput

BLOCK_ROWS = 65_536
SPARE_CANDIDATES = 16            # candidates beyond k that an approximate index passes on (see Index.search)
RESCORED_QUERIES = 16
RESCORED_CANDIDATES = 1024       # candidates of a block scored again at a time (memory: 16 x this x dim floats)
ROUNDING_BOUND = 2.0 ** -23      # twice float32's unit roundoff u: a D-term float32 dot product is within
                                 # D u / (1 - D u) |q| |v| of the true one in any summation order, < D * this


def _best_first(scores: np.ndarray, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best (scores, positions), best first, equal scores lower position first."""
    order = np.lexsort((positions, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(positions, order, axis=1)


def _padded(keep: np.ndarray, first: int) -> np.ndarray:
    """The positions (first + column) of each row's True entries, in column order, padded with -1 [n, c]."""
    rows, columns = np.nonzero(keep)
    counts = keep.sum(axis=1)
    padded = np.full((len(keep), counts.max(initial=0)), -1, np.int64)
    padded[rows, np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)] = first + columns
    return padded


class Index:
    """The embeddings and ids of a complete corpus folder; `search(queries, k)` finds the top k."""

    def __init__(self, folder: Path, manifests: list[dict]):
        self.folder = folder
        self.settings = manifests[0]["settings"]
        self._weights = manifests[0].get("weights")
        self._input_state = manifests[0].get("input")
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
        """A complete corpus folder: every process finished, over the same input state and weights."""
        folder = Path(folder)
        manifests = read_manifests(folder) if folder.is_dir() else []
        if not manifests:
            raise NoSuchInput(f"{folder} holds no corpus (no manifest); make one with qwen3-jax embed-corpus")
        expected = manifests[0]["settings"]["num_processes"]
        if len(manifests) < expected or not all(m["complete"] for m in manifests):
            raise ValueError(f"{folder} is not complete ({sum(m['complete'] for m in manifests)} of {expected} "
                             "processes finished); run the same embed-corpus command again to finish it")
        made_from = {json.dumps([m.get("input"), m.get("records"), m.get("weights")]) for m in manifests}
        if len(made_from) > 1:
            raise ValueError(f"{folder} is not complete: its processes finished over different inputs or weights "
                             "(an --update finished in some of them only); run the same embed-corpus command in "
                             "every process")
        return cls(folder, manifests)

    @property
    def weights(self) -> str | None:
        """The fingerprint of the weights the corpus was embedded with (None when its model is unknown)."""
        return self._weights

    def query_model(self, given: str | None = None) -> str:
        """The model to embed queries with: `given`, else the one the corpus records; refused when its
        weights are not those the corpus was embedded with."""
        name = given or self.settings["model"]
        if not name:
            raise UsageError(f"{self.folder} records no model (it was embedded from Python without model_name); "
                             "pass --model")
        if self.weights is not None and weights_fingerprint(resolve_model(name)) != self.weights:
            raise ValueError(f"the weights at {name} are not those {self.folder} was embedded with (they changed "
                             "since, or it is another model), so its vectors and the queries' would not compare; "
                             "embed it again with embed-corpus --overwrite")
        return name

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

    def check_texts(self) -> None:
        """Refuses (UsageError) when the input the corpus was embedded from is gone or changed since, so
        its texts cannot be read back by `texts`."""
        source = self.settings["input"]
        if not Path(source).exists() or input_state(source) != self._input_state:
            raise UsageError(f"{source}, which {self.folder} was embedded from, is gone or changed since, so the "
                             "texts cannot be read back; bring the corpus up to date with embed-corpus --update, "
                             "or search without --show-text")

    def texts(self, ids) -> dict:
        """{id: text} for these ids, read back from the corpus's input (see check_texts)."""
        self.check_texts()
        wanted, found = set(ids), {}
        for item in iter_corpus(self.settings["input"], text_field=self.settings["text_field"],
                                id_field=self.settings["id_field"]):
            if item.id in wanted and item.error is None:
                if item.id in found:
                    raise ValueError(f"id {item.id!r} stands for more than one text of {self.settings['input']} "
                                     f"(again at {item.source}:{item.line}), so --show-text cannot tell which a hit "
                                     "is; make ids unique and embed the corpus again")
                found[item.id] = item.text
        return found

    def search(self, queries: np.ndarray, k: int = 10, *, block_rows: int = BLOCK_ROWS, approximate: bool = False,
               ef: int | None = None) -> tuple[np.ndarray, list]:
        """(scores [n, k'], ids: n lists of k' ids), best first, k' = min(k, len(self)) for every query;
        scores are dot products (cosines, as both sides are normalised), each pair's summed the same way
        wherever it sits. Equal scores come in index order (the lower position first), whatever k, the
        block size, the stored dtype and the other queries: duplicate documents are common.
        `approximate` takes the candidates (the best k + SPARE_CANDIDATES it finds) from the folder's
        approximate index instead (`qwen3-jax build-ann`; `ef`: how many it looks at per query, default
        its own) and scores them exactly; a query for which it finds fewer than k' is searched exactly."""
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {queries.shape[1]}; this index holds {self.dim}-dim embeddings")
        whole_number(k, "k")
        wanted = min(int(k), len(self))
        if not approximate:
            best, where = self._exact(queries, wanted, block_rows)
        else:
            self._approximate = self._approximate or ann.open_for(self)
            where = self._approximate.candidates(queries, min(wanted + SPARE_CANDIDATES, len(self)), ef=ef)
            best, where = _best_first(self._rescored(queries, where), where, wanted)
            short = np.isneginf(best).any(axis=1)            # the walk found fewer than k': searched exactly
            if short.any():
                best[short], where[short] = self._exact(queries[short], wanted, block_rows)
        ids = self.ids
        return best, [[ids[p] for p in row] for row in where]

    def _exact(self, queries: np.ndarray, k: int, block_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Each query's k best (scores, positions) over every row, block by block: a block's float32
        product keeps each row that rounding may have put below one of the best k (see the module
        docstring), and those rows are scored again alone."""
        n = len(queries)
        best, where = np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
        if not k:
            return best, where
        norms = np.linalg.norm(queries.astype(np.float64), axis=1, keepdims=True)
        for s, vectors in enumerate(self._vectors):
            for start in range(0, len(vectors), block_rows):
                block = self.rows(s, start, start + block_rows)
                rough = queries @ block.T
                slack = self.dim * ROUNDING_BOUND * norms * np.linalg.norm(block, axis=1).max()   # one product's
                kth = -np.partition(-rough, min(k, len(block)) - 1, axis=1)[:, min(k, len(block)) - 1, None]
                keep = rough >= np.maximum(best[:, -1:] - 2 * slack, kth - 4 * slack)
                kept = _padded(keep, int(self.starts[s]) + start)
                for first in range(0, kept.shape[1], RESCORED_CANDIDATES):
                    part = kept[:, first:first + RESCORED_CANDIDATES]
                    best, where = _best_first(np.concatenate([best, self._rescored(queries, part)], axis=1),
                                              np.concatenate([where, part], axis=1), k)
        return best, where

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
