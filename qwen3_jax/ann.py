"""An approximate index over a corpus folder's shards, with faiss (the `ann` extra): an HNSW graph over
8-bit scalar-quantized vectors, or IVF-PQ codes, kept in the folder's `ann/` beside the shards.

Each vector is filed under a key that outlives updates: its shard number in the high 32 bits, its row
in the low ones. The index records the digest of every shard it holds, so it knows which shards an
`embed-corpus --update` changed: building again adds new shards to what is there (IVF-PQ also drops and
re-adds changed or removed shards; an HNSW graph cannot drop vectors, so a changed shard rebuilds it),
and a search over a folder that changed since is refused; so is one over vectors of other weights
(the record keeps the corpus's weights fingerprint). Search returns candidates only: the caller
(`Index.search`) scores them exactly, so an approximate index changes which vectors are found, never
their scores or order. A corpus too small for the kind (MIN_VECTORS) gets an exact-only index: a record
and no faiss file, whose candidates are every vector.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from qwen3_jax.checks import UsageError, whole_number
from qwen3_jax.claims import LOCK
from qwen3_jax.corpus.store import ANN_FOLDER
from qwen3_jax.extras import require
from qwen3_jax.textio import atomic_output, hold_lock

KINDS = ("hnsw", "ivf-pq")
METRICS = ("ip", "l2")
RECORD = "ann.json"
ROW_BITS = 32
TRAINING_ROWS = 100_000          # IVF-PQ learns its centroids and codebooks from at most this many vectors
MIN_VECTORS = {"hnsw": 1, "ivf-pq": 16}     # fewer: an exact-only index (IVF-PQ's smallest codebooks have 16 codes)
MAX_EF = 65_536                  # candidates kept while linking or searching (faiss allocates that many)
BOUNDS = {"m": (2, 512), "ef_construction": (1, MAX_EF), "ef_search": (1, MAX_EF), "lists": (0, 1 << 20),
          "code_bytes": (0, 1 << 16)}   # faiss aborts the process at m 0 and crashes at m 1; 0: the default


@dataclasses.dataclass(frozen=True)
class AnnSettings:
    """How the approximate index is built and searched (defaults measured in docs/benchmarks.md)."""

    kind: str = "hnsw"
    metric: str = "ip"
    m: int = 32                 # hnsw: links per node
    ef_construction: int = 100  # hnsw: candidates kept while linking
    ef_search: int = 64         # hnsw: candidates kept while searching; ivf-pq: lists probed
    lists: int = 0              # ivf-pq: inverted lists (0: 4 * sqrt(vectors))
    code_bytes: int = 0         # ivf-pq: bytes a vector (0: dim / 16)

    def check(self, dim: int) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"--kind {self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.metric not in METRICS:
            raise UsageError(f"--metric {self.metric!r}: choose one of {', '.join(METRICS)}")
        for name, (low, high) in BOUNDS.items():
            value = whole_number(getattr(self, name), f"--{name.replace('_', '-')}", minimum=low)
            if value > high:
                raise UsageError(f"--{name.replace('_', '-')}={value} is over {high}")
        if self.kind == "ivf-pq" and dim % self._code_bytes(dim):
            raise UsageError(f"ivf-pq: {self.code_bytes} code bytes do not divide the width {dim}")

    def _code_bytes(self, dim: int) -> int:
        return self.code_bytes or max(1, dim // 16)


def _faiss():
    require("ann", "an approximate index")
    import faiss

    return faiss


def key_of(shard: int, rows: np.ndarray) -> np.ndarray:
    return (np.int64(shard) << ROW_BITS) | rows.astype(np.int64)


def _new_index(settings: AnnSettings, dim: int, vectors: int):
    faiss = _faiss()
    metric = faiss.METRIC_INNER_PRODUCT if settings.metric == "ip" else faiss.METRIC_L2
    if settings.kind == "hnsw":
        # 8-bit vectors: a quarter of float32's memory traffic a step of the walk; the exact scoring
        # of the candidates afterwards makes up the precision (docs/benchmarks.md#search)
        graph = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_8bit, settings.m, metric)
        graph.hnsw.efConstruction = settings.ef_construction
        return faiss.IndexIDMap2(graph)
    # k-means wants ~39 training vectors a centroid: a small corpus gets fewer lists and 4-7-bit codes
    trained = min(vectors, TRAINING_ROWS)
    lists = min(settings.lists or int(4 * math.sqrt(vectors)), max(1, trained // 39))
    bits = int(np.clip(math.log2(max(trained, 1) / 39), 4, 8))
    coarse = faiss.IndexFlatIP(dim) if settings.metric == "ip" else faiss.IndexFlatL2(dim)
    return faiss.IndexIVFPQ(coarse, dim, lists, settings._code_bytes(dim), bits, metric)


def _training_sample(index, count: int) -> np.ndarray:
    """Up to TRAINING_ROWS vectors spread evenly over the whole corpus."""
    positions = np.unique(np.linspace(0, len(index) - 1, min(count, len(index))).astype(np.int64))
    shard = np.searchsorted(index.starts, positions, side="right") - 1
    return np.concatenate([index.rows(s, 0, None)[positions[shard == s] - index.starts[s]]
                           for s in np.unique(shard)]).astype(np.float32)


class ApproximateIndex:
    """The faiss index in a folder's `ann/` and the record of what it holds."""

    def __init__(self, folder: Path, record: dict, index):
        self.folder, self.record, self.index = folder, record, index
        self.settings = AnnSettings(**record["settings"])
        self.starts: np.ndarray | None = None        # set by open_for

    @classmethod
    def load(cls, folder: Path) -> "ApproximateIndex | None":
        path = folder / ANN_FOLDER / RECORD
        if not path.is_file():
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
        return cls(folder, record, record["file"] and _faiss().read_index(str(folder / ANN_FOLDER / record["file"])))

    def holds(self) -> dict:
        """{shard: {"digest", "count"}} of the shards this index holds."""
        return {int(k): v for k, v in self.record["shards"].items()}

    def candidates(self, queries: np.ndarray, k: int, *, ef: int | None = None) -> np.ndarray:
        """Positions [n, c] (c >= k; -1 where fewer were found) of each query's candidates in the corpus
        this index was matched to (`open_for`); every position for an exact-only index."""
        if ef is not None:
            whole_number(ef, "ef")
            if ef > MAX_EF:
                raise UsageError(f"ef={ef} is over {MAX_EF}")
        if self.index is None:
            return np.broadcast_to(np.arange(self.record["vectors"]), (len(queries), self.record["vectors"]))
        if self.settings.kind == "hnsw":
            _faiss().downcast_index(self.index.index).hnsw.efSearch = max(ef or self.settings.ef_search, k)
            wanted = k
        else:
            self.index.nprobe = ef or self.settings.ef_search
            wanted = 4 * k                         # PQ scores are coarse: the exact rescoring picks among more
        _, keys = self.index.search(np.ascontiguousarray(queries, np.float32), wanted)
        shard, row = keys >> ROW_BITS, keys & ((1 << ROW_BITS) - 1)
        return np.where(keys < 0, -1, self.starts[np.maximum(shard, 0)] + row)


def open_for(index) -> ApproximateIndex:
    """The folder's approximate index, checked to hold exactly the corpus `index` lists, and matched to
    it: `starts[shard]` is the shard's first position in the corpus."""
    found = ApproximateIndex.load(index.folder)
    if found is None:
        raise FileNotFoundError(f"{index.folder} has no approximate index; build one with "
                                f"qwen3-jax build-ann --index {index.folder}")
    if {shard: held["digest"] for shard, held in found.holds().items()} != index.digest \
            or found.record.get("weights") != index.weights:
        raise ValueError(f"{index.folder}'s approximate index was built before its corpus changed; run "
                         f"qwen3-jax build-ann --index {index.folder} again (it adds only what changed)")
    found.starts = np.full(max(index.shards, default=0) + 1, -1, np.int64)
    found.starts[index.shards] = index.starts[:-1]
    return found


def build_ann(index, settings: AnnSettings | None = None, *, quiet: bool = False) -> dict:
    """Builds `index`'s approximate index, or brings an existing one up to date with the corpus (see
    `_plan`), holding the folder's lock meanwhile. Other settings, or weights, than the existing index's
    rebuild it. Returns the new record, whose "added" counts the vectors added this time."""
    folder = index.folder
    existing = ApproximateIndex.load(folder)
    settings = settings or (existing.settings if existing else AnnSettings())
    settings.check(index.dim)
    with hold_lock(folder / LOCK, f"build-ann (pid {os.getpid()})"):
        if len(index) < MIN_VECTORS[settings.kind]:
            held = {shard: {"digest": index.digest[shard], "count": int(index.starts[s + 1] - index.starts[s])}
                    for s, shard in enumerate(index.shards)}
            return _save(folder, None, settings, held, existing, len(index), index)
        return _build(index, settings, existing, quiet)


def _build(index, settings: AnnSettings, existing: ApproximateIndex | None, quiet: bool) -> dict:
    """build_ann's faiss index: new, or `existing` brought up to date."""
    usable = existing and existing.index is not None and existing.settings == settings \
        and existing.record.get("weights") == index.weights
    plan = _plan(existing, index) if usable else None
    if plan is None:
        ann, held, plan = _new_index(settings, index.dim, len(index)), {}, {}
        ann.train(_training_sample(index, TRAINING_ROWS))
    else:
        ann, held = existing.index, existing.holds()
    for shard, first in plan.items():
        if first == 0 and shard in held:
            ann.remove_ids(_faiss().IDSelectorRange(int(key_of(shard, np.zeros(1))[0]),
                                                    int(key_of(shard + 1, np.zeros(1))[0])))
        if shard not in index.digest:
            del held[shard]
    todo = [(s, shard, plan.get(shard, 0)) for s, shard in enumerate(index.shards)
            if shard not in held or shard in plan]
    rows, begun, added = sum(int(index.starts[s + 1] - index.starts[s]) - first for s, _, first in todo), time.perf_counter(), 0
    for s, shard, first in todo:
        vectors = index.rows(s, first)
        ann.add_with_ids(np.ascontiguousarray(vectors, np.float32), key_of(shard, np.arange(first, first + len(vectors))))
        held[shard] = {"digest": index.digest[shard], "count": first + len(vectors)}
        added += len(vectors)
        if not quiet:
            print(f"\rbuild-ann: {added:,}/{rows:,} vectors, {added / max(time.perf_counter() - begun, 1e-9):,.0f}/s",
                  end="", file=sys.stderr, flush=True)
    if todo and not quiet:
        print(file=sys.stderr)
    return _save(index.folder, ann, settings, held, existing, added, index)


def _plan(existing: ApproximateIndex, index) -> dict | None:
    """What an up-to-date index needs beyond `existing`: {shard: first row to add} for each shard held
    that changed (0: drop it and add it whole) or went; None when the index must be rebuilt. A changed
    shard whose held rows are still its first rows (records appended to it: each held vector decodes to
    within one quantization step of the re-embedded one) keeps them and adds the rest; otherwise an
    IVF-PQ index drops and re-adds the shard, while an HNSW graph, which cannot drop a vector, is rebuilt."""
    plan = {}
    step = _quantization_step(existing.index) if existing.settings.kind == "hnsw" else None
    for shard, held in existing.holds().items():
        if index.digest.get(shard) == held["digest"]:
            continue
        if shard in index.digest and existing.settings.kind == "hnsw":
            s = index.shards.index(shard)
            now = index.rows(s, 0, held["count"])
            kept = existing.index.reconstruct_batch(key_of(shard, np.arange(held["count"])))
            if len(now) < held["count"] or np.abs(now - kept).max(initial=0) > step:
                return None
            plan[shard] = held["count"]
        elif shard in index.digest or existing.settings.kind != "hnsw":
            plan[shard] = 0
        else:
            return None
    return plan


def _quantization_step(ann) -> float:
    """The widest step of an HNSW index's 8-bit vectors (a stored value decodes within half a step)."""
    faiss = _faiss()
    quantizer = faiss.downcast_index(faiss.downcast_index(ann.index).storage).sq
    trained = faiss.vector_to_array(quantizer.trained)             # per dimension: the minimum, then the range
    return float(trained[len(trained) // 2:].max() / 255)


def _save(folder: Path, ann, settings: AnnSettings, held: dict, existing: ApproximateIndex | None, added: int,
          index) -> dict:
    """Writes the index under a new name (none for an exact-only one), then the record naming it (each
    renamed into place), then deletes the old index: a kill at any moment leaves a record and the index
    it names."""
    where = folder / ANN_FOLDER
    where.mkdir(exist_ok=True)
    generation = existing.record["generation"] + 1 if existing else 0
    name = f"index-{generation:06d}.faiss" if ann is not None else None
    if ann is not None:
        with atomic_output(where / name, "wb") as handle:
            handle.write(_faiss().serialize_index(ann).tobytes())
    record = {"settings": dataclasses.asdict(settings), "file": name, "generation": generation,
              "vectors": int(ann.ntotal) if ann is not None else len(index), "added": added,
              "weights": index.weights, "shards": {str(k): v for k, v in sorted(held.items())}}
    with atomic_output(where / RECORD) as handle:
        json.dump(record, handle, indent=1)
    for old in where.glob("index-*.faiss"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return record
