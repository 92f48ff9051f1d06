"""A corpus's input read as one stream of records in a fixed order: a .txt or .jsonl file (read by
`textio.iter_records`, the one reader of those), a Parquet file (with pyarrow, the `parquet` extra), a
folder of them, or stdin's lines. A record without an id is named NAME:LINE (the file's name under the
input, its 1-based line or row), so every command that reads an input names its texts alike.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator, NamedTuple

from qwen3_jax.checks import UsageError
from qwen3_jax.extras import require
from qwen3_jax.textio import InputError, NoSuchInput, iter_records, iter_stream_lines

CORPUS_SUFFIXES = (".txt", ".jsonl", ".parquet")
STDIN = "-"                       # an --input of texts read from stdin, one a line (named "stdin" in ids)


class Item(NamedTuple):
    """One record of the stream: where it came from, its id and text, or why it could not be read."""

    source: str
    line: int
    id: object
    text: str | None
    error: str | None = None


def corpus_files(path: str | Path) -> list[Path]:
    """The input file `path`, or the .txt / .jsonl / .parquet files under the folder `path` in sorted order."""
    path = Path(path)
    if not path.exists():
        raise NoSuchInput(f"input {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in CORPUS_SUFFIXES) \
        if path.is_dir() else [path]
    for file in files:
        if file.suffix not in CORPUS_SUFFIXES:
            raise UsageError(f"input {file} must be .txt (one text a line), .jsonl or .parquet")
    return files


def check_source(path: str | Path, *, text_field: str = "text", id_field: str = "id") -> list[Path]:
    """The files of the input `path` (none for STDIN), once what can be checked before any work is:
    it exists, and each Parquet file has a string column `text_field` and, if any, an `id_field`
    column of strings or numbers."""
    if str(path) == STDIN:
        return []
    files = corpus_files(path)
    for file in files:
        if file.suffix == ".parquet":
            _check_parquet_columns(file, text_field, id_field)
    return files


def _check_parquet_columns(file: Path, text_field: str, id_field: str) -> None:
    schema = parquet_file(file).schema_arrow             # (pyarrow, the parquet extra, is there from here on)
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
    """Every record of the input `path` (a file, a folder, or STDIN), in order: a .txt line (blank
    ones skipped), a .jsonl object, a Parquet row (`text_field`, `id_field`: the text's and the id's
    field or column). A record without an id gets "NAME:LINE" ("stdin:LINE" for STDIN, read as .txt).
    A malformed line is yielded with its error; invalid UTF-8 raises at once."""
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
        for record in iter_records(file, text_field=text_field, id_field=id_field, skip_blank=True,
                                   keep_malformed=True):
            if record.error is not None:
                yield Item(name, record.line, None, None, record.error)
            else:
                yield Item(name, record.line, f"{name}:{record.line}" if record.id is None else record.id, record.text)


def read_corpus(path: str | Path, *, text_field: str = "text", id_field: str = "id") -> tuple[list, list[str]]:
    """(ids, texts) of the input `path` as embed-corpus reads it (iter_corpus: blank lines skipped, ids
    NAME:LINE where the input gives none), for the commands that take all of it at once; a malformed
    line or a repeated id is an error."""
    check_source(path, text_field=text_field, id_field=id_field)
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
    """(ids, texts) of `texts` given on the command line with --`flag`: ids FLAG:N (N from 1), as a
    file's are NAME:LINE; a blank one is refused (a file's blank lines are skipped; one typed out is a
    mistake)."""
    for number, text in enumerate(texts, 1):
        if not text.strip():
            raise UsageError(f"--{flag} number {number} is blank; give a text (blank lines of an --input file "
                             "are skipped)")
    return [f"{flag}:{number}" for number in range(1, len(texts) + 1)], list(texts)


def parquet_file(file: Path):
    """The Parquet `file` opened with pyarrow (the `parquet` extra)."""
    require("parquet", f"reading {file}")
    import pyarrow.parquet as pq

    return pq.ParquetFile(file)


def _parquet_items(file: Path, name: str, text_field: str, id_field: str) -> Iterator[Item]:
    table = parquet_file(file)
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
    """What identifies the contents of the input `path` cheaply: each file's name, size and modification time."""
    root = Path(path)
    return [[_name(file, root), file.stat().st_size, file.stat().st_mtime_ns] for file in corpus_files(root)]


def count_records(path: str | Path) -> int:
    """Records in the input `path`, counted quickly (lines that are not blank, Parquet rows) for progress."""
    total = 0
    for file in corpus_files(path):
        if file.suffix == ".parquet":
            total += parquet_file(file).metadata.num_rows
        else:
            with open(file, "rb") as handle:
                total += sum(1 for line in handle if line.strip())
    return total
