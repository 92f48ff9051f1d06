"""Embedding a whole corpus: streamed, in shards committed one by one, resumable after kill -9.

The input (a .txt or .jsonl file, a folder of them, or Parquet with pyarrow) is read as one stream of
records in a fixed order. Shard k holds the records at stream positions k*S .. k*S+S-1 (S the shard
size); in a job of P processes, process p embeds the shards with k % P == p. A shard is written as
`shard-K.npy` (embeddings) and `shard-K.ids.json` (their ids, in the same order), each written to a
temporary file and renamed, and only then recorded in the process's manifest (also replaced
atomically). A killed job leaves at most a shard's files that no manifest lists; the next run with the
same settings redoes that shard and goes on. `index.Index` reads what the manifests list.

Each shard records a digest of the records it was made from, and a finished manifest the input's
files (name, size, modification time). A rerun over a finished folder whose input changed is refused
with what changed, unless it is an update: then exactly the shards whose records differ are embedded
again, shards past the input's end are dropped, and new records fill new shards, so the folder equals
a fresh run over the new input. Vectors may be stored quantized (int8 with per-dimension ranges kept in
the manifest, or sign bits), as sentence-transformers' `quantize_embeddings` writes them.

A manifest also records the fingerprint of the model's weights (`hub.weights_fingerprint`): a rerun
with other weights at the model's path is refused. A job holds an advisory lock on the folder from
start to end (one process exclusively; the processes of a split job share it, each holding its own
process's lock), so a second job is refused at once and a killed job's lock goes with it.
"""

from __future__ import annotations

import dataclasses
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from qwen3_jax.checks import UsageError, check_dim, whole_number
from qwen3_jax.extras import require
from qwen3_jax.hub import model_identity, resolve_model, weights_fingerprint
from qwen3_jax.progress import progress_bar
from qwen3_jax.quantize import DEFAULT_CALIBRATION_TEXTS, calibration_ranges, quantize
from qwen3_jax.textio import (InputError, NoSuchInput, OutputTaken, atomic_output, counted, hold_lock, iter_lines_at,
                             iter_stream_lines, parse_record)

CORPUS_SUFFIXES = (".txt", ".jsonl", ".parquet")
STDIN = "-"                       # an --input of texts read from stdin, one a line (named "stdin" in ids)
MANIFEST_GLOB = "manifest-*.json"
REJECTS = "rejects.jsonl"
OUTPUT_DTYPES = ("float32", "float16", "int8", "binary")
ANN_FOLDER = "ann"                 # an approximate index over the shards (qwen3_jax.ann)
CALIBRATION_RECORDS = 1000        # int8: the input's first records (and built-in texts) set each dimension's range
LOCK, CLAIM_LOCK = ".lock", ".claim.lock"     # held by a job for its whole run; while reading and writing manifests


class Item(NamedTuple):
    """One record of the stream: where it came from, its id and text, or why it could not be read."""

    source: str
    line: int
    id: object
    text: str | None
    error: str | None = None


def corpus_files(path: str | Path) -> list[Path]:
    """The input file, or the .txt / .jsonl / .parquet files under a folder in sorted order."""
    path = Path(path)
    if not path.exists():
        raise NoSuchInput(f"input {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in CORPUS_SUFFIXES) \
        if path.is_dir() else [path]
    for file in files:
        if file.suffix not in CORPUS_SUFFIXES:
            raise UsageError(f"input {file} must be .txt (one text a line), .jsonl or .parquet")
    return files


def check_input(path: str | Path, output: str | Path | None = None, *, text_field: str = "text",
                id_field: str = "id") -> list[Path]:
    """The input's files, once what can be checked before any work is: it exists, an output folder is
    not inside it (its files would be read as input) nor a folder of other files, and each Parquet file
    has a string column `text_field` and, if any, an `id_field` column of strings or numbers."""
    if str(path) == STDIN:
        if output is not None:
            raise UsageError("--input - (stdin) cannot be read again to resume or update a corpus folder; save it "
                             "to a .txt file first")
        return []
    files = corpus_files(path)
    root = Path(path).resolve()
    if output is not None and root.is_dir() and Path(output).resolve().is_relative_to(root):
        raise UsageError(f"--output {output} is inside --input {path}, whose files would then be read as input; "
                         "write it elsewhere")
    if output is not None and Path(output).is_dir() and not read_manifests(Path(output)):
        refuse_strangers(Path(output))
    for file in files:
        if file.suffix == ".parquet":
            _check_parquet_columns(file, text_field, id_field)
    return files


def _check_parquet_columns(file: Path, text_field: str, id_field: str) -> None:
    schema = _parquet_file(file).schema_arrow             # (pyarrow, the parquet extra, is there from here on)
    import pyarrow as pa

    if text_field not in schema.names:
        raise UsageError(f"{file}: no column {text_field!r} (columns: {', '.join(schema.names)}); choose one "
                         "with --text-field")
    text = schema.field(text_field).type
    if not (pa.types.is_string(text) or pa.types.is_large_string(text)):
        raise UsageError(f"{file}: column {text_field!r} holds {text}, not strings; choose another with --text-field")
    if id_field in schema.names:
        kind = schema.field(id_field).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_string(kind)
                or pa.types.is_large_string(kind)):
            raise UsageError(f"{file}: column {id_field!r} holds {kind}; ids must be strings or numbers (choose "
                             "another column with --id-field, or cast it)")


def _name(file: Path, root: Path) -> str:
    return file.name if root.is_file() else str(file.relative_to(root))


def iter_corpus(path: str | Path, *, text_field: str = "text", id_field: str = "id") -> Iterator[Item]:
    """Every record of the input, in order: a .txt line (blank ones skipped), a .jsonl object, a
    Parquet row. A record without an id gets "NAME:LINE" (the file's name under the input, its 1-based
    line or row; "stdin:LINE" for STDIN, read as .txt). A malformed line is yielded with its error;
    invalid UTF-8 raises at once."""
    if str(path) == STDIN:
        yield from (Item("stdin", number, f"stdin:{number}", line)
                    for number, _, line in iter_stream_lines(sys.stdin.buffer, "stdin") if line.strip())
        return
    root = Path(path)
    for file in corpus_files(root):
        name = _name(file, root)
        if file.suffix == ".parquet":
            yield from _parquet_items(file, name, text_field, id_field)
            continue
        for number, _, line in iter_lines_at(file):
            if not line.strip():
                continue
            if file.suffix == ".txt":
                yield Item(name, number, f"{name}:{number}", line)
                continue
            try:
                record = parse_record(file, number, line, text_field=text_field, id_field=id_field)
            except InputError as err:
                yield Item(name, number, None, None, str(err))
                continue
            yield Item(name, number, f"{name}:{number}" if record.id is None else record.id, record.text)


def read_corpus(path: str | Path, *, text_field: str = "text", id_field: str = "id") -> tuple[list, list[str]]:
    """(ids, texts) of an input as embed-corpus reads it (iter_corpus: blank lines skipped, ids NAME:LINE
    where the input gives none), for the commands that take all of it at once; a malformed line or a
    repeated id is an error."""
    check_input(path, text_field=text_field, id_field=id_field)
    first: dict = {}
    for item in iter_corpus(path, text_field=text_field, id_field=id_field):
        if item.error is not None:
            raise InputError(item.error)
        if item.id in first:
            raise InputError(f"{item.source}:{item.line}: id {item.id!r} repeats {first[item.id][0]}; ids must be "
                             "unique")
        first[item.id] = (f"{item.source}:{item.line}", item.text)
    return list(first), [text for _, text in first.values()]


def given_texts(texts: list[str], flag: str) -> tuple[list, list[str]]:
    """(ids, texts) of texts given on the command line: ids FLAG:N (N from 1), as a file's are NAME:LINE;
    a blank one is refused (a file's blank lines are skipped; one typed out is a mistake)."""
    for number, text in enumerate(texts, 1):
        if not text.strip():
            raise UsageError(f"--{flag} number {number} is blank; give a text (blank lines of an --input file "
                             "are skipped)")
    return [f"{flag}:{number}" for number in range(1, len(texts) + 1)], list(texts)


def _parquet_file(file: Path):
    """A Parquet file opened with pyarrow (the `parquet` extra)."""
    require("parquet", f"reading {file}")
    import pyarrow.parquet as pq

    return pq.ParquetFile(file)


def _parquet_items(file: Path, name: str, text_field: str, id_field: str) -> Iterator[Item]:
    table = _parquet_file(file)
    columns = table.schema_arrow.names
    if text_field not in columns:
        raise InputError(f"{file}: no column {text_field!r} (columns: {', '.join(columns)})")
    wanted = [text_field] + ([id_field] if id_field in columns else [])
    row = 0
    for batch in table.iter_batches(columns=wanted, batch_size=4096):
        texts = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if len(wanted) == 2 else [None] * len(texts)
        for text, record_id in zip(texts, ids):
            row += 1
            if not isinstance(text, str):
                yield Item(name, row, None, None, f"{file}:row {row}: {text_field!r} is not a string")
            else:
                yield Item(name, row, f"{name}:{row}" if record_id is None else record_id, text)


def input_state(path: str | Path) -> list:
    """What identifies the input's contents cheaply: each file's name, size and modification time."""
    root = Path(path)
    return [[_name(file, root), file.stat().st_size, file.stat().st_mtime_ns] for file in corpus_files(root)]


def count_records(path: str | Path) -> int:
    """Records in the input, counted quickly (lines that are not blank, Parquet rows) for progress."""
    total = 0
    for file in corpus_files(path):
        if file.suffix == ".parquet":
            total += _parquet_file(file).metadata.num_rows
        else:
            with open(file, "rb") as handle:
                total += sum(1 for line in handle if line.strip())
    return total


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


def manifest_name(process: int, processes: int) -> str:
    return f"manifest-{process:05d}-of-{processes:05d}.json"


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}"


def read_manifests(folder: Path) -> list[dict]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob(MANIFEST_GLOB))]


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


def refuse_strangers(folder: Path) -> None:
    """OutputTaken if `folder` holds files embed-corpus did not write (a corpus beside them would mix with them)."""
    strangers = sorted(p.name for p in folder.iterdir() if not written_by_corpus(p))
    if strangers:
        raise OutputTaken(f"{folder} holds files embed-corpus did not write ({', '.join(strangers[:3])}); "
                          "use another --output")


def new_manifest(settings: CorpusSettings, process: int, weights: str | None = None) -> dict:
    """A process's manifest before its first shard (`weights`: the model's `weights_fingerprint`)."""
    return {"format": "qwen3-jax corpus", "settings": json.loads(json.dumps(dataclasses.asdict(settings))),
            "weights": weights, "process": process, "dim": settings.dim, "shards": [], "complete": False}


def calibration_tag(calibration) -> str:
    """What names an int8 calibration in the shard entries quantized with it."""
    return hashlib.blake2b(json.dumps(calibration).encode(), digest_size=8).hexdigest()


def write_shard(folder: Path, shard: int, vectors: np.ndarray, ids: list, *, start: int, records: int) -> dict:
    """Shard `shard`'s embeddings and ids, each written atomically; returns its manifest entry (the
    stream positions start .. start + records, of which len(ids) were embedded)."""
    name = shard_name(shard)
    with atomic_output(folder / f"{name}.npy", "wb") as handle:
        np.save(handle, vectors)
    with atomic_output(folder / f"{name}.ids.json") as handle:
        json.dump(ids, handle)
    return {"shard": shard, "start": start, "end": start + records, "count": len(ids)}


def embed_shard(embedder, settings: CorpusSettings, calibration, output: Path, shard: int, items: list[Item], *,
                batch_size: int = 32) -> dict:
    """Embeds one shard's readable records with a Qwen3Embedder and writes its files (vectors as the
    folder stores them, ids, and its unreadable lines), each atomically; returns its manifest entry.
    Whichever engine runs it, the same shard gives the same files."""
    good = [item for item in items if item.error is None]
    bad = [item for item in items if item.error is not None]
    vectors = encode_texts(embedder, settings, [item.text for item in good], batch_size) if good \
        else np.zeros((0, settings.dim), np.float32)
    if settings.output_dtype in ("int8", "binary"):
        stored = quantize(vectors, settings.output_dtype,
                          np.asarray(calibration, np.float32) if settings.output_dtype == "int8" else None)
    else:
        stored = vectors.astype(settings.output_dtype)
    entry = write_shard(output, shard, stored, [item.id for item in good], start=shard * settings.shard_size,
                        records=len(items))
    entry["digest"] = records_digest(items)
    if settings.output_dtype == "int8":
        entry["calibration"] = calibration_tag(calibration)
    rejects = output / f"{shard_name(shard)}.rejects.jsonl"
    if bad:
        with atomic_output(rejects) as handle:
            for item in bad:
                handle.write(json.dumps({"source": item.source, "line": item.line, "error": item.error}) + "\n")
        entry["rejected"] = len(bad)
    else:
        rejects.unlink(missing_ok=True)               # an earlier version of this shard's
    return entry


def encode_texts(embedder, settings: CorpusSettings, texts: list[str], batch_size: int) -> np.ndarray:
    """`texts` embedded as the corpus's settings say (prompt, dim, max length)."""
    return embedder.encode(texts, prompt=settings.prefix, dim=settings.dim, batch_size=batch_size,
                           max_length=settings.max_length)


class LocalEngine:
    """Embeds a job's shards in this process, one after the other, with a Qwen3Embedder (see
    `qwen3_jax.ray.RayEngine` for a cluster's workers)."""

    def __init__(self, embedder, batch_size: int = 32):
        self.embedder, self.batch_size = embedder, batch_size
        self.dimension, self.max_length = embedder.dimension, embedder.max_length

    @property
    def tokens_embedded(self) -> int:
        return self.embedder.tokens_embedded

    def resolve_prefix(self, prompt_name: str | None, instruction: str | None) -> str:
        return self.embedder.resolve_prefix(prompt_name, None, instruction)

    def encode(self, settings: CorpusSettings, texts: list[str]) -> np.ndarray:
        return encode_texts(self.embedder, settings, texts, self.batch_size)

    def submit(self, settings: CorpusSettings, calibration, output: Path, shard: int, items: list[Item]) -> list[dict]:
        """Embeds and writes the shard; returns the manifest entries of the shards now finished."""
        return [embed_shard(self.embedder, settings, calibration, output, shard, items, batch_size=self.batch_size)]

    def drain(self) -> list[dict]:
        """The entries of shards still being embedded, once they are finished (none here)."""
        return []


def lock_folder(folder: Path, process: int = 0, processes: int = 1) -> list:
    """A corpus job's locks on `folder` (see the module docstring), or FolderBusy: exclusive for a
    one-process job, shared by a split job's processes, each of which also holds its own process's."""
    if processes == 1:
        return [hold_lock(folder / LOCK, f"embed-corpus (pid {os.getpid()})")]
    held = [hold_lock(folder / LOCK, f"embed-corpus --num-processes {processes}", shared=True)]
    try:
        held.append(hold_lock(folder / f"{LOCK}-{process}-of-{processes}",
                              f"embed-corpus --process-id {process} (pid {os.getpid()})"))
    except BaseException:
        held[0].close()
        raise
    return held


def check_folder_free(folder: str | Path, process: int = 0, processes: int = 1) -> None:
    """FolderBusy now, before the model loads, if another job holds the folder (the job takes its
    locks for good later)."""
    if Path(folder).is_dir():
        for handle in lock_folder(Path(folder), process, processes):
            handle.close()


class Changes(NamedTuple):
    """How the input differs from what a folder's shards were made from (this process's shards)."""

    changed: list          # shards whose records differ
    added: list            # shards the input now has beyond the recorded ones
    removed: list          # recorded shards past the input's end
    records: int           # records in the input now

    def __bool__(self) -> bool:
        return bool(self.changed or self.added or self.removed)

    def __str__(self) -> str:
        said = [f"{counted(len(shards), 'shard')} {what} ({', '.join(map(str, shards[:5]))}"
                f"{f' and {len(shards) - 5} more' if len(shards) > 5 else ''})"
                for what, shards in (("changed", self.changed), ("added", self.added), ("removed", self.removed))
                if shards]
        return "; ".join(said) + f"; {counted(self.records, 'record')} now"


class CorpusJob:
    """Embeds the shards of one process (see the module docstring) with an engine (`LocalEngine`, or
    `qwen3_jax.ray.RayEngine`); `update` re-embeds what changed in the input of a finished or
    interrupted folder."""

    def __init__(self, engine, settings: CorpusSettings, output: str | Path, *, process: int = 0,
                 weights: str | None = None, skip_bad: bool = False, update: bool = False, overwrite: bool = False,
                 quiet: bool = False, out=print):
        settings.check()
        if not 0 <= process < settings.num_processes:
            raise UsageError(f"process {process} of {settings.num_processes}: expected 0..{settings.num_processes - 1}")
        if update and overwrite:
            raise UsageError("--update keeps what still matches the input, --overwrite starts again: choose one")
        if overwrite and settings.num_processes > 1:
            raise UsageError("--overwrite clears the whole folder, which other processes of a split job are "
                             "writing: remove the folder before starting them")
        self.engine, self.settings, self.process, self.weights = engine, settings, process, weights
        self.output = Path(output)
        self.skip_bad, self.update, self.quiet, self.out = skip_bad, update, quiet, out
        self.manifest_path = self.output / manifest_name(process, settings.num_processes)
        self.output.mkdir(parents=True, exist_ok=True)
        self._locks = lock_folder(self.output, process, settings.num_processes)
        try:
            with contextlib.closing(hold_lock(self.output / CLAIM_LOCK, "embed-corpus", wait=True)):
                self._check_folder(overwrite)             # every refusal before anything is deleted
                if overwrite:
                    clear_corpus(self.output)
                self.manifest = self._claim()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Releases the folder's locks."""
        for handle in self._locks:
            handle.close()
        self._locks = []

    def _check_folder(self, overwrite: bool) -> None:
        """Refuses a folder this job cannot write: another corpus (other settings or weights, unless
        `overwrite`), or files that embed-corpus did not write (which --overwrite would leave beside a new corpus)."""
        wanted = json.loads(json.dumps(dataclasses.asdict(self.settings)))
        found = read_manifests(self.output)
        for manifest in [] if overwrite else found:
            if manifest["settings"] != wanted:
                changed = sorted(k for k in wanted if manifest["settings"].get(k) != wanted[k])
                raise OutputTaken(f"{self.output} holds embeddings made with other settings "
                                  f"({', '.join(changed)}); use another --output, or --overwrite")
            if manifest.get("weights", self.weights) != self.weights:    # a folder older than the record: unknown
                raise OutputTaken(f"{self.output} was embedded with other weights than "
                                  f"{self.settings.model or 'this model'}'s now (its files changed since); use "
                                  "--overwrite to embed it again, or another --output")
        if overwrite or not found:
            refuse_strangers(self.output)

    def _claim(self) -> dict:
        """This process's manifest: the one on disk (resume; _check_folder matched its settings), else a new one."""
        if self.manifest_path.is_file():
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        self.manifest = new_manifest(self.settings, self.process, self.weights)
        if self.settings.output_dtype == "int8":
            self.manifest["calibration"], self.manifest["calibration_texts"] = self._calibration()
        self._commit()                # the folder is claimed (and not complete) before any shard is written
        return self.manifest

    def _calibration_texts(self) -> list[str]:
        """The texts whose embeddings set int8's ranges: the built-in ones and the input's first records."""
        texts = list(DEFAULT_CALIBRATION_TEXTS)
        for item in iter_corpus(self.settings.input, text_field=self.settings.text_field, id_field=self.settings.id_field):
            if len(texts) >= CALIBRATION_RECORDS + len(DEFAULT_CALIBRATION_TEXTS):
                break
            if item.error is None:
                texts.append(item.text)
        return texts

    def _calibration(self, texts: list[str] | None = None) -> tuple[list, str]:
        """int8's per-dimension [min, max] over the calibration texts' embeddings (the same in every
        process of a split job), and the texts' digest, which tells whether the input changed them."""
        texts = self._calibration_texts() if texts is None else texts
        return calibration_ranges(self.engine.encode(self.settings, texts)).tolist(), _texts_digest(texts)

    def _recalibrate(self) -> None:
        """An update whose input's first records changed takes the ranges a fresh run would; every shard
        quantized with the old ones is then embedded again (see run)."""
        texts = self._calibration_texts()
        if self.manifest.get("calibration_texts") != _texts_digest(texts):
            self.manifest["calibration"], self.manifest["calibration_texts"] = self._calibration(texts)
            self._commit()

    def _commit(self) -> None:
        with atomic_output(self.manifest_path) as handle:
            json.dump(self.manifest, handle, indent=1)

    def run(self) -> dict:
        """Embeds every shard of this process not yet in its manifest (and, in an update, every shard
        whose records changed); returns the manifest."""
        settings = self.settings
        if self.manifest["complete"]:
            if self.manifest.get("input") == input_state(settings.input):
                self.out(f"{self.output}: this process's shards are complete ({counted(self._count(), 'record')})")
                return self.manifest
            changes = self.changes()
            if not changes:                               # the files were touched, not changed
                self.manifest["input"] = input_state(settings.input)
                self._commit()
                self.out(f"{self.output}: up to date with {settings.input} ({counted(self._count(), 'record')})")
                return self.manifest
            if not self.update:
                raise InputError(f"{settings.input} changed since {self.output} was made ({changes}); run again "
                                 "with --update to embed only what changed, or --overwrite to start again")
            self.out(f"{self.output}: updating ({changes})")
            self.manifest["complete"] = False
            self._commit()
        if self.update and settings.output_dtype == "int8":
            self._recalibrate()
        tag = calibration_tag(self.manifest["calibration"]) if settings.output_dtype == "int8" else None
        state = input_state(settings.input)               # before reading: an edit during the run shows next time
        total = count_records(settings.input)
        size, count = settings.shard_size, settings.num_processes
        mine = sum(min(size, total - k * size) for k in range(self.process, -(-total // size), count))
        progress = progress_bar(mine, "doc", enabled=not self.quiet and sys.stderr.isatty())
        meter = (time.perf_counter(), self.engine.tokens_embedded)
        done = {entry["shard"]: entry for entry in self.manifest["shards"]}
        for shard, items in self._shards():
            entry = done.get(shard)
            if entry is None or (self.update and entry.get("digest") != records_digest(items)) \
                    or entry.get("calibration", tag) != tag:
                bad = next((item for item in items if item.error is not None), None)
                if bad and not self.skip_bad:
                    raise InputError(f"{bad.error} (pass --skip-bad to write such lines to {REJECTS} and go on)")
                for finished in self.engine.submit(settings, self.manifest.get("calibration"), self.output, shard, items):
                    self._record(finished, progress, meter)
            elif entry.get("digest", records_digest(items)) != records_digest(items):
                raise InputError(f"{settings.input} changed since shard {shard} was embedded (its records "
                                 f"{entry['start']}..{entry['end'] - 1} differ), so {self.output} no longer matches "
                                 "it; run again with --update to embed only what changed, or --overwrite to start again")
            else:
                progress.update(len(items))
        for finished in self.engine.drain():
            self._record(finished, progress, meter)
        self._drop_past(self.records)
        progress.close()
        self.manifest.update(complete=True, records=self.records, input=state)
        self._commit()
        self._finish()
        return self.manifest

    def _shards(self) -> Iterator[tuple[int, list[Item]]]:
        """This process's shards of the input stream, in order, as (shard, its records); afterwards
        `self.records` is the number of records in the stream."""
        size, count = self.settings.shard_size, self.settings.num_processes
        position, items = 0, []
        for item in iter_corpus(self.settings.input, text_field=self.settings.text_field,
                                id_field=self.settings.id_field):
            shard = position // size
            position += 1
            if shard % count == self.process:
                items.append(item)
                if position % size == 0:
                    yield shard, items
                    items = []
        if items:
            yield (position - 1) // size, items
        self.records = position

    def changes(self) -> Changes:
        """How the input now differs from what this process's shards were made from (reads the input,
        embeds nothing)."""
        done = {entry["shard"]: entry for entry in self.manifest["shards"]}
        changed, added = [], []
        for shard, items in self._shards():
            if shard not in done:
                added.append(shard)
            elif done[shard].get("digest") != records_digest(items):
                changed.append(shard)
        removed = [shard for shard in sorted(done) if shard * self.settings.shard_size >= self.records]
        return Changes(changed, added, removed, self.records)

    def _drop_past(self, records: int) -> None:
        """Forgets (then deletes) the shards that start past the input's end: in an update the input
        shrank; otherwise an input cut short between a kill and the rerun is refused."""
        past = [e for e in self.manifest["shards"] if e["start"] >= records]
        if not past:
            return
        if not self.update:
            raise InputError(f"{self.settings.input} has {counted(records, 'record')}, fewer than when {self.output} was "
                             "started; run again with --update to drop the shards past its end, or --overwrite")
        self.manifest["shards"] = [e for e in self.manifest["shards"] if e["start"] < records]
        self._commit()
        for entry in past:
            for path in self.output.glob(f"{shard_name(entry['shard'])}.*"):
                path.unlink(missing_ok=True)

    def _count(self) -> int:
        return sum(entry["count"] + entry.get("rejected", 0) for entry in self.manifest["shards"])

    def _record(self, entry: dict, progress, meter: tuple[float, int]) -> None:
        """A finished shard into the manifest (replacing an earlier version of it), committed."""
        self.manifest["shards"] = sorted([e for e in self.manifest["shards"] if e["shard"] != entry["shard"]] + [entry],
                                         key=lambda e: e["shard"])
        self._commit()
        progress.update(entry["end"] - entry["start"])
        elapsed = max(time.perf_counter() - meter[0], 1e-9)
        progress.set_postfix(tok_s=f"{(self.engine.tokens_embedded - meter[1]) / elapsed:.0f}")

    def _finish(self) -> None:
        """Once every process is complete: all rejected lines in one REJECTS file (rewritten whole, so
        a rerun never repeats one) and a report of ids that occur more than once."""
        manifests = read_manifests(self.output)
        if len(manifests) < self.settings.num_processes or not all(m["complete"] for m in manifests):
            return
        listed = [shard_name(e["shard"]) for m in manifests for e in sorted(m["shards"], key=lambda e: e["shard"])]
        rejects = [line for name in listed if (self.output / f"{name}.rejects.jsonl").is_file()
                   for line in (self.output / f"{name}.rejects.jsonl").read_text(encoding="utf-8").splitlines()]
        if rejects:
            with atomic_output(self.output / REJECTS) as handle:
                handle.write("".join(line + "\n" for line in rejects))
            self.out(f"{counted(len(rejects), 'line')} could not be read; see {self.output / REJECTS}")
        repeated = repeated_ids(self.output / f"{name}.ids.json" for name in listed)
        if repeated:
            shown = ", ".join(json.dumps(i) for i in repeated[:5])
            self.out(f"warning: {counted(len(repeated), 'id')} {'occurs' if len(repeated) == 1 else 'occur'} more than once (e.g. {shown}); search results name "
                     "them by id, so make ids unique")


def _texts_digest(texts: list[str]) -> str:
    return hashlib.blake2b(json.dumps(texts).encode(), digest_size=16).hexdigest()


def records_digest(items: list[Item]) -> str:
    """A hash of what a shard was made from (each record's source, line, id and text)."""
    digest = hashlib.blake2b(digest_size=16)
    for item in items:
        digest.update(json.dumps([item.source, item.line, item.id, item.text, item.error]).encode() + b"\n")
    return digest.hexdigest()


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


def embed_corpus(model, input: str | Path, output: str | Path, *, instruction: str | None = None,
                 prompt_name: str | None = None, dim: int | None = None, output_dtype: str = "float32",
                 text_field: str = "text", id_field: str = "id", shard_size: int = 10_000, batch_size: int = 32,
                 max_length: int | None = None, process: int = 0, num_processes: int = 1, skip_bad: bool = False,
                 update: bool = False, overwrite: bool = False, quiet: bool = False, model_name: str | None = None,
                 dtype: str = "float32", engine=None, out=print) -> dict:
    """Embeds (or finishes embedding) the corpus at `input` into the folder `output` with `model`, a
    Qwen3Embedder or the hub id or folder to load one from; returns this process's manifest. The
    manifest records the model (`model_name`, or `model` when it is a name) and its weights'
    fingerprint, for `qwen3-jax search` to load and check. A finished folder whose input changed is
    refused unless `update` (embed only what changed) or `overwrite` (start again). `engine` embeds
    the shards instead of `model` (`qwen3_jax.ray.RayEngine`: a Ray cluster's workers)."""
    check_input(input, output, text_field=text_field, id_field=id_field)   # before the model loads or anything is written
    if isinstance(model, (str, os.PathLike)):
        from qwen3_jax.embedder import Qwen3Embedder

        model_name = model_name or str(model)
        model = Qwen3Embedder.from_pretrained(model, dtype=dtype, max_length=max_length)
    engine = engine or LocalEngine(model, batch_size)
    settings = CorpusSettings(model=model_identity(model_name) if model_name else "", input=str(Path(input).resolve()),
                              dim=check_dim(dim, engine.dimension),
                              prefix=engine.resolve_prefix(prompt_name, instruction), dtype=dtype,
                              output_dtype=output_dtype, text_field=text_field, id_field=id_field,
                              shard_size=shard_size, max_length=engine.max_length if max_length is None else max_length,
                              num_processes=num_processes)
    settings.check()
    weights = weights_fingerprint(resolve_model(model_name)) if model_name else None
    if not model_name:
        out(f"{output} will record no model: pass model_name= (or the model's name instead of the embedder) for "
            "search to load it and for reruns to check its weights")
    job = CorpusJob(engine, settings, output, process=process, weights=weights, skip_bad=skip_bad,
                    update=update, overwrite=overwrite, quiet=quiet, out=out)
    try:
        return job.run()
    finally:
        job.close()
