"""The embed-corpus job: a corpus embedded streamed, in shards committed one by one, resumable after kill -9.

The input (see `sources`) is read as one stream of records in a fixed order. Shard k holds the records
at stream positions k*S .. k*S+S-1 (S the shard size); in a job of P processes, process p embeds the
shards with k % P == p. A shard's files are written atomically and only then recorded in the
process's manifest (also replaced atomically; see `store`). A killed job leaves at most a shard's
files that no manifest lists; the next run with the same settings redoes that shard and goes on.
`index.Index` reads what the manifests list.

Each shard records a digest of the records it was made from, and a finished manifest the input's
files (name, size, modification time). A rerun over a finished folder whose input changed is refused
with what changed, unless it is an update: then exactly the shards whose records differ are embedded
again, shards past the input's end are dropped, and new records fill new shards, so the folder equals
a fresh run over the new input. Vectors may be stored quantized (int8 with per-dimension ranges kept in
the manifest, or sign bits), as sentence-transformers' `quantize_embeddings` writes them.

A manifest also records the fingerprint of the model's weights (`hub.weights_fingerprint`): a rerun
with other weights at the model's path is refused. A job claims the folder (`claims.Claim`) from
start to end (one process exclusively; the processes of a split job share its lock, each holding its
own process's too), so a second job is refused at once and a killed job's lock goes with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator, NamedTuple

from qwen3_jax.checks import UsageError, check_dim
from qwen3_jax.claims import LOCK, Claim
from qwen3_jax.corpus.local import LocalEngine
from qwen3_jax.corpus.sources import STDIN, Item, check_source, count_records, input_state, iter_corpus
from qwen3_jax.corpus.store import (CLAIM_LOCK, REJECTS, CorpusSettings, calibration_tag, clear_corpus,
                                    manifest_name, new_manifest, read_manifests, records_digest, repeated_ids,
                                    shard_name, shard_rejects, texts_digest, write_manifest, written_by_corpus)
from qwen3_jax.hub import model_identity, resolve_model, weights_fingerprint
from qwen3_jax.progress import progress_bar
from qwen3_jax.quantize import DEFAULT_CALIBRATION_TEXTS, calibration_ranges
from qwen3_jax.textio import InputError, atomic_output, counted, hold_lock

WEIGHTS = "weights"               # the fingerprint's field beside the settings: the model's weights_fingerprint
CALIBRATION_RECORDS = 1000        # int8: the input's first records (and built-in texts) set each dimension's range


def check_input(path: str | Path, output: str | Path | None = None, *, text_field: str = "text",
                id_field: str = "id") -> list[Path]:
    """The files of the input `path`, once what can be checked before any work is (`sources.check_source`
    with `text_field` and `id_field`), and that the folder `output`, if given, is not inside it (its
    files would be read as input) nor a folder of other files."""
    if str(path) == STDIN and output is not None:
        raise UsageError("--input - (stdin) cannot be read again to resume or update a corpus folder; save it "
                         "to a .txt file first")
    files = check_source(path, text_field=text_field, id_field=id_field)
    if output is None or str(path) == STDIN:
        return files
    if Path(path).resolve().is_dir() and Path(output).resolve().is_relative_to(Path(path).resolve()):
        raise UsageError(f"--output {output} is inside --input {path}, whose files would then be read as input; "
                         "write it elsewhere")
    if Path(output).is_dir() and not read_manifests(Path(output)):
        _refuse_strangers(Claim(output, written_by_corpus))
    return files


def _refuse_strangers(claim: Claim) -> None:
    """OutputTaken if the claimed folder holds files embed-corpus did not write (a corpus beside them would mix
    with them)."""
    claim.refuse_strangers(lambda names: f"{claim.folder} holds files embed-corpus did not write "
                                         f"({', '.join(names[:3])}); use another --output")


def claim_folder(folder: Path, process: int = 0, processes: int = 1) -> Claim:
    """A corpus job's claim on `folder`, locked (see the module docstring), or FolderBusy: exclusive for
    a one-process job, shared by a split job's processes, each of which also holds its own process's lock
    (`process` of `processes`)."""
    claim = Claim(folder, written_by_corpus)
    if processes == 1:
        claim.hold(f"embed-corpus (pid {os.getpid()})")
        return claim
    try:
        claim.hold(f"embed-corpus --num-processes {processes}", shared=True)
        claim.hold(f"embed-corpus --process-id {process} (pid {os.getpid()})", name=f"{LOCK}-{process}-of-{processes}")
    except BaseException:
        claim.release()
        raise
    return claim


def check_folder_free(folder: str | Path, process: int = 0, processes: int = 1) -> None:
    """FolderBusy now, before the model loads, if another job holds `folder` (the job of process
    `process` of `processes` takes its locks for good later)."""
    if Path(folder).is_dir():
        claim_folder(Path(folder), process, processes).release()


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
    `ray_data.RayEngine`); `update` re-embeds what changed in the input of a finished or
    interrupted folder."""

    def __init__(self, engine, settings: CorpusSettings, output: str | Path, *, process: int = 0,
                 weights: str | None = None, skip_bad: bool = False, update: bool = False, overwrite: bool = False,
                 quiet: bool = False, out=print):
        """Claims the folder `output` for this job's `settings`, embedded by `engine`: process `process`
        of `settings.num_processes`, with the model whose `weights_fingerprint` is `weights` (None:
        unknown). `skip_bad`: unreadable lines are written to REJECTS instead of stopping the job;
        `update`, `overwrite`: see embed_corpus; `quiet`: no progress bar; `out`: prints a message."""
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
        self.claim = claim_folder(self.output, process, settings.num_processes)
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
        self.claim.release()

    def _check_folder(self, overwrite: bool) -> None:
        """Refuses a folder this job cannot write: another corpus (other settings or weights, unless
        `overwrite`), or files that embed-corpus did not write (which --overwrite would leave beside a new corpus)."""
        wanted = {**self.settings.fingerprint(), WEIGHTS: self.weights}
        found = read_manifests(self.output)
        for manifest in [] if overwrite else found:
            # weights not recorded (a folder older than the record) are not known to differ
            recorded = {**manifest["settings"], WEIGHTS: manifest.get("weights", self.weights)}
            self.claim.refuse_other(recorded, wanted, self._refusal)
        if overwrite or not found:
            _refuse_strangers(self.claim)

    def _refusal(self, changed: list[str]) -> str:
        """Why the folder holds another corpus: other weights only, or the settings `changed` (and
        perhaps the weights too)."""
        if changed == [WEIGHTS]:
            return (f"{self.output} was embedded with other weights than {self.settings.model or 'this model'}'s "
                    "now (its files changed since); use --overwrite to embed it again, or another --output")
        settings = ", ".join(field for field in changed if field != WEIGHTS)
        return f"{self.output} holds embeddings made with other settings ({settings}); use another --output, or --overwrite"

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
        return calibration_ranges(self.engine.encode(self.settings, texts)).tolist(), texts_digest(texts)

    def _recalibrate(self) -> None:
        """An update whose input's first records changed takes the ranges a fresh run would; every shard
        quantized with the old ones is then embedded again (see run)."""
        texts = self._calibration_texts()
        if self.manifest.get("calibration_texts") != texts_digest(texts):
            self.manifest["calibration"], self.manifest["calibration_texts"] = self._calibration(texts)
            self._commit()

    def _commit(self) -> None:
        write_manifest(self.manifest_path, self.manifest)

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
        listed = [e["shard"] for m in manifests for e in sorted(m["shards"], key=lambda e: e["shard"])]
        rejects = [line for shard in listed if shard_rejects(self.output, shard).is_file()
                   for line in shard_rejects(self.output, shard).read_text(encoding="utf-8").splitlines()]
        if rejects:
            with atomic_output(self.output / REJECTS) as handle:
                handle.write("".join(line + "\n" for line in rejects))
            self.out(f"{counted(len(rejects), 'line')} could not be read; see {self.output / REJECTS}")
        repeated = repeated_ids(self.output / f"{shard_name(shard)}.ids.json" for shard in listed)
        if repeated:
            shown = ", ".join(json.dumps(i) for i in repeated[:5])
            self.out(f"warning: {counted(len(repeated), 'id')} {'occurs' if len(repeated) == 1 else 'occur'} more than once (e.g. {shown}); search results name "
                     "them by id, so make ids unique")


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
    the shards instead of `model` (`ray_data.RayEngine`: a Ray cluster's workers)."""
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
