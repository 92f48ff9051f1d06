"""Reading texts from .txt / .jsonl files as users mean them, and writing results atomically.

A line ends at "\\n" (or "\\r\\n") and nowhere else: U+2028, form feeds and the other characters that
`str.splitlines` also breaks at belong to the text. A UTF-8 byte-order mark is dropped. Invalid UTF-8
and malformed JSON are reported with the file, the line and the byte offset.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple, Sequence

import numpy as np

from qwen3_jax.checks import UsageError

OUTPUT_SUFFIXES = (".npy", ".jsonl")


class InputError(ValueError):
    """A line of an input file that cannot be read as a text."""


class NoSuchInput(UsageError, FileNotFoundError):
    """An input file or folder named on the command line that does not exist (exit 2: nothing was done)."""


class OutputTaken(UsageError, FileExistsError):
    """An output folder that holds something this command must not replace (exit 2: nothing was done)."""


class FolderBusy(RuntimeError):
    """A folder another job holds (see `hold_lock`)."""


class Record(NamedTuple):
    """One text of an input file: its 1-based line, its id (None where the file gives none) and text;
    or, for a malformed line kept by iter_records, why it could not be read (id and text None)."""

    line: int
    id: object
    text: str | None
    error: str | None = None


def counted(count: int, noun: str) -> str:
    """"1 shard", "2 shards": a count with its noun in the right number (regular plurals only)."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a UTF-8 file, split at "\\n" only, without its line end."""
    for number, _, text in iter_lines_at(path):
        yield number, text


def iter_lines_at(path: str | Path) -> Iterator[tuple[int, int, str]]:
    """(line number, byte offset of the line, text) of each line, as iter_lines reads them."""
    with open(path, "rb") as handle:
        yield from iter_stream_lines(handle, str(path))


def iter_stream_lines(handle: BinaryIO, name: str) -> Iterator[tuple[int, int, str]]:
    """iter_lines_at of an open binary stream (stdin too); `name` stands for it in errors."""
    offset = 0
    for number, raw in enumerate(handle, 1):        # binary streams split at b"\n" and nowhere else
        start = len(codecs.BOM_UTF8) if number == 1 and raw.startswith(codecs.BOM_UTF8) else 0
        try:
            text = raw[start:].decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{name}:{number}: invalid UTF-8 at byte {offset + start + err.start}; re-save it "
                             "as UTF-8") from None
        yield number, offset + start, text[:-2] if text.endswith("\r\n") else text.rstrip("\n")
        offset += len(raw)


def json_line(path: Path, number: int, line: str):
    """The JSON value of line `number` of `path`, or an InputError naming the file, line and column."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, int, object]]:
    """(line number, byte offset, JSON value) of each line of a .jsonl file that is not blank."""
    for number, offset, line in iter_lines_at(path):
        if line.strip():
            yield number, offset, json_line(Path(path), number, line)


def parse_record(path: Path, number: int, line: str, *, text_field: str = "text", id_field: str = "id") -> Record:
    """One JSON line -> Record, or an InputError naming the file and line."""
    record = json_line(path, number, line)
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise InputError(f"{path}:{number}: each line needs a string field {text_field!r}")
    record_id = record.get(id_field)
    if isinstance(record_id, (dict, list, bool)):
        raise InputError(f"{path}:{number}: field {id_field!r} must be a string or a number")
    return Record(number, record_id, record[text_field])


def iter_records(path: str | Path, *, text_field: str = "text", id_field: str = "id", skip_blank: bool = False,
                 keep_malformed: bool = False) -> Iterator[Record]:
    """The texts of a .txt file (one a line; id None) or a .jsonl file (one JSON object a line, blank
    lines skipped; `text_field` and `id_field` name a record's fields). `skip_blank` also skips blank
    .txt lines. A malformed .jsonl line raises InputError, or with `keep_malformed` is yielded with
    its error; invalid UTF-8 always raises."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise UsageError(f"input {path} must be a .txt (one text a line) or .jsonl file")
    if not path.is_file():
        raise NoSuchInput(f"input file {path} does not exist")
    for number, line in iter_lines(path):
        if path.suffix == ".txt":
            if not (skip_blank and not line.strip()):
                yield Record(number, None, line)
        elif line.strip():
            try:
                record = parse_record(path, number, line, text_field=text_field, id_field=id_field)
            except InputError as err:
                if not keep_malformed:
                    raise
                record = Record(number, None, None, str(err))
            yield record


def read_texts(path: str | Path, *, skip_blank: bool = False) -> tuple[list, list[str]]:
    """(ids, texts) of a .txt or .jsonl file (see iter_records).

    A .txt text's id is its 0-based line index. A .jsonl file gives every line an "id" or none (then
    each record's 0-based index is its id); ids must be unique.
    """
    records = list(iter_records(path, skip_blank=skip_blank))
    if Path(path).suffix == ".txt":
        return [r.line - 1 for r in records], [r.text for r in records]
    return assign_ids(path, records), [r.text for r in records]


def assign_ids(path, records: Sequence[Record]) -> list:
    """The records' own ids, or their indices where none has one; mixed or repeated ids are errors."""
    missing = [r.line for r in records if r.id is None]
    if len(missing) == len(records):
        return list(range(len(records)))
    if missing:
        raise InputError(f"{path}:{missing[0]}: no \"id\" while other lines have one; give every line an id "
                         "or none")
    first_line: dict = {}
    for r in records:
        if r.id in first_line:
            raise InputError(f"{path}:{r.line}: id {r.id!r} repeats line {first_line[r.id]}; ids must be unique")
        first_line[r.id] = r.line
    return [r.id for r in records]


def file_identity(path: str | Path) -> dict:
    """What a file is, whatever the spelling of its path: its resolved path, size and SHA-256. A run
    records it, so a respelled path resumes and an edited file is noticed."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def check_output_path(path: str | Path) -> Path:
    """An output file that can be written: .npy or .jsonl, in an existing folder, not a folder itself.
    Checked before any work, so a long run is never thrown away at the end."""
    path = Path(path)
    if path.suffix not in OUTPUT_SUFFIXES:
        raise UsageError(f"output {path} must end in .npy or .jsonl")
    if path.is_dir():
        raise IsADirectoryError(f"output {path} is a folder; name a file inside it")
    if not path.parent.is_dir():
        raise NoSuchInput(f"output folder {path.parent} does not exist")
    return path


def plain_mode(path: Path, *, folder: bool = False) -> int:
    """The permissions a plain open(path, "w") (or mkdir) would leave: the existing file's, else
    0o666 (0o777 for a folder) less the umask. Temporary files and folders are made private; what
    is renamed into place gets these."""
    with contextlib.suppress(FileNotFoundError):
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


@contextlib.contextmanager
def atomic_output(path: str | Path, mode: str = "w") -> Iterator:
    """Writes to a temporary file beside `path` and renames it into place only on success."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, plain_mode(path))
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def hold_lock(path: str | Path, holder: str, *, shared: bool = False, wait: bool = False):
    """An advisory lock (fcntl.flock) on the file `path`: taken at once, or refused with FolderBusy naming
    the holder (`wait`: waited for instead); returns the open file, whose closing, or the process's end
    (kill -9 included: the kernel drops the lock), releases it. `holder` is written into the file for
    that message (the processes sharing a lock all write the same)."""
    path = Path(path)
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.seek(0)
        named = handle.read().strip()
        handle.close()
        raise FolderBusy(f"{path.parent} is in use by {named or 'another job'}; wait for it to finish, or "
                         "use another folder") from None
    handle.truncate(0)
    handle.write(holder + "\n")
    handle.flush()
    return handle


def write_embeddings(path: str | Path, ids: Sequence, embeddings: np.ndarray) -> None:
    """.npy (the float32 matrix) or .jsonl ({"id", "embedding"} a line), written atomically."""
    path = check_output_path(path)
    if path.suffix == ".npy":
        with atomic_output(path, "wb") as handle:
            np.save(handle, embeddings)
    else:
        with atomic_output(path) as handle:
            for record_id, row in zip(ids, embeddings):
                handle.write(json.dumps({"id": record_id, "embedding": [float(x) for x in row]}) + "\n")
