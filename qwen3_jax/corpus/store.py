"""A corpus folder on disk: what embed-corpus writes, `index` reads and `ann` builds beside.

Shard k holds the records at stream positions k*S .. k*S+S-1 (S the shard size) as `shard-K.npy`
(embeddings, as the folder stores them: float32, float16, int8 or sign bits) and `shard-K.ids.json`
(their ids, in the same order), and `shard-K.rejects.jsonl` for its unreadable lines; each file is
written to a temporary file and renamed. Each process P of a job of N keeps `manifest-P-of-N.json`
(replaced atomically): the job's settings, the weights' fingerprint, int8's per-dimension ranges, and
an entry for each finished shard (its stream positions, count and a digest of its records); `complete`
and the input's files (name, size, modification time) once it is done. `rejects.jsonl` gathers every
shard's unreadable lines, and `ann/` holds an approximate index (qwen3_jax.ann).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from qwen3_jax.checks import UsageError, whole_number
from qwen3_jax.corpus.sources import Item
from qwen3_jax.textio import atomic_output

MANIFEST_GLOB = "manifest-*.json"
REJECTS = "rejects.jsonl"
OUTPUT_DTYPES = ("float32", "float16", "int8", "binary")
ANN_FOLDER = "ann"                 # an approximate index over the shards (qwen3_jax.ann)
CLAIM_LOCK = ".claim.lock"        # held by a job while reading and writing manifests (claims.LOCK: its whole run)
FORMAT = "qwen3-jax corpus"


@dataclasses.dataclass(frozen=True)
class CorpusSettings:
    """What a corpus job computes; a folder made with other settings is refused."""

    model: str
    input: str
    dim: int
    prefix: str                   # the prompt or instruction put before every text ("" for documents)
    dtype: str = "float32"        # compute dtype
    output_dtype: str = "float32"
    text_field: str = "text"
    id_field: str = "id"
    shard_size: int = 10_000
    max_length: int = 8192
    num_processes: int = 1

    def check(self) -> None:
        if self.output_dtype not in OUTPUT_DTYPES:
            raise UsageError(f"--output-dtype {self.output_dtype!r}: choose one of {', '.join(OUTPUT_DTYPES)}")
        whole_number(self.shard_size, "--shard-size")

    def fingerprint(self) -> dict:
        """The settings as a manifest records them (JSON's values)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def manifest_name(process: int, processes: int) -> str:
    """The manifest of process `process` of a job of `processes`."""
    return f"manifest-{process:05d}-of-{processes:05d}.json"


def shard_name(shard: int) -> str:
    """The stem of shard `shard`'s files."""
    return f"shard-{shard:06d}"


def shard_rejects(folder: Path, shard: int) -> Path:
    """Where the unreadable lines of shard `shard` of the corpus folder `folder` are kept."""
    return folder / f"{shard_name(shard)}.rejects.jsonl"


def read_manifests(folder: Path) -> list[dict]:
    """The manifests in `folder`, in process order."""
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob(MANIFEST_GLOB))]


def write_manifest(path: Path, manifest: dict) -> None:
    """Replaces the manifest at `path` atomically."""
    with atomic_output(path) as handle:
        json.dump(manifest, handle, indent=1)


def clear_corpus(folder: Path) -> None:
    """Deletes what embed-corpus and build-ann wrote in `folder` (manifests first, so a kill midway
    leaves no manifest naming a deleted shard); a folder holding anything else is left alone."""
    if not folder.is_dir() or not any(folder.glob(MANIFEST_GLOB)):
        return
    for path in sorted(folder.glob(MANIFEST_GLOB)) + sorted(folder.glob("shard-*")) + [folder / REJECTS]:
        path.unlink(missing_ok=True)
    if (folder / ANN_FOLDER).is_dir():
        shutil.rmtree(folder / ANN_FOLDER)


def written_by_corpus(path: Path) -> bool:
    """Whether embed-corpus or build-ann writes a file of this name (hidden ones: locks, files being written)."""
    return (path.name.startswith((".", "shard-")) or path.match(MANIFEST_GLOB)
            or path.name in (REJECTS, ANN_FOLDER))


def new_manifest(settings: CorpusSettings, process: int, weights: str | None = None) -> dict:
    """Process `process`'s manifest before its first shard (`weights`: the model's `weights_fingerprint`)."""
    return {"format": FORMAT, "settings": settings.fingerprint(), "weights": weights, "process": process,
            "dim": settings.dim, "shards": [], "complete": False}


def calibration_tag(calibration) -> str:
    """What names an int8 calibration (per-dimension ranges) in the shard entries quantized with it."""
    return hashlib.blake2b(json.dumps(calibration).encode(), digest_size=8).hexdigest()


def texts_digest(texts: list[str]) -> str:
    """A hash of `texts` (int8's calibration texts: whether an update changed them)."""
    return hashlib.blake2b(json.dumps(texts).encode(), digest_size=16).hexdigest()


def records_digest(items: list[Item]) -> str:
    """A hash of what a shard was made from (each record's source, line, id and text)."""
    digest = hashlib.blake2b(digest_size=16)
    for item in items:
        digest.update(json.dumps([item.source, item.line, item.id, item.text, item.error]).encode() + b"\n")
    return digest.hexdigest()


def write_shard(folder: Path, shard: int, vectors: np.ndarray, ids: list, *, start: int, records: int) -> dict:
    """Shard `shard`'s stored `vectors` and their `ids` into `folder`, each written atomically; returns
    its manifest entry (the stream positions start .. start + records, of which len(ids) were embedded)."""
    name = shard_name(shard)
    with atomic_output(folder / f"{name}.npy", "wb") as handle:
        np.save(handle, vectors)
    with atomic_output(folder / f"{name}.ids.json") as handle:
        json.dump(ids, handle)
    return {"shard": shard, "start": start, "end": start + records, "count": len(ids)}


def write_rejects(folder: Path, shard: int, bad: list[Item]) -> None:
    """The unreadable records `bad` of shard `shard` as its rejects file (written atomically), or,
    when there are none, no such file (an earlier version of the shard's removed)."""
    rejects = shard_rejects(folder, shard)
    if not bad:
        rejects.unlink(missing_ok=True)
        return
    with atomic_output(rejects) as handle:
        for item in bad:
            handle.write(json.dumps({"source": item.source, "line": item.line, "error": item.error}) + "\n")


def repeated_ids(files) -> list:
    """The ids that occur more than once in these ids files, found through 8-byte hashes (memory: 8
    bytes an id, not the ids themselves)."""
    def digest(value) -> int:
        return int.from_bytes(hashlib.blake2b(json.dumps(value).encode(), digest_size=8).digest(), "little")

    files = list(files)
    hashes = np.asarray([digest(i) for f in files for i in json.loads(f.read_text(encoding="utf-8"))], np.uint64)
    unique, counts = np.unique(hashes, return_counts=True)
    suspects = set(unique[counts > 1].tolist())
    if not suspects:
        return []
    seen: dict = {}
    for f in files:
        for value in json.loads(f.read_text(encoding="utf-8")):
            if digest(value) in suspects:
                key = json.dumps(value)
                seen[key] = seen.get(key, 0) + 1
    return [json.loads(key) for key, n in seen.items() if n > 1]

