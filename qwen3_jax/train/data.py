"""Training data: JSON-lines files read one line at a time, shuffled and resumed with grain.

Three line formats:
- ours, for embeddings: {"query", "positive", "negatives": [...], "instruction"?}
- ms-swift's, for embeddings: {"query", "response", "rejected_response": [...]}
- the reranker's: {"query", "document", "label": 0 or 1, "instruction"?}

A file is indexed once (the byte offset of each line, 8 bytes a line, every line checked), then read by
offset, so memory does not grow with the file. grain shuffles it per epoch from the seed and its
iterator's position is a small dict that checkpoints store and restore exactly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grain
import numpy as np

from qwen3_jax.checks import UsageError
from qwen3_jax.textio import InputError, iter_json_lines, json_line


@dataclasses.dataclass(frozen=True)
class Example:
    """One parsed line: a query with its positive and negatives (embedding), or with one document and a
    label (reranker); `instruction` is the line's own task instruction, if it has one."""

    query: str
    documents: tuple[str, ...]
    label: int | None = None
    instruction: str | None = None


def parse_example(record, kind: str, where: str) -> Example:
    """A decoded JSON line -> Example, or an InputError that names `where` (file:line) and the problem."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: each line must be a JSON object")

    def text(name: str) -> str:
        if not isinstance(record.get(name), str):
            raise InputError(f"{where}: missing string field {name!r}")
        return record[name]

    instruction = record.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise InputError(f"{where}: field 'instruction' must be a string")
    if kind == "reranker":
        label = record.get("label")
        if isinstance(label, bool) or label not in (0, 1):
            raise InputError(f"{where}: field 'label' must be 0 or 1")
        return Example(text("query"), (text("document"),), int(label), instruction)
    positive, negatives = ("response", "rejected_response") if "response" in record else ("positive", "negatives")
    documents = record.get(negatives, [])
    if not isinstance(documents, list) or not all(isinstance(d, str) for d in documents):
        raise InputError(f"{where}: field {negatives!r} must be a list of strings")
    return Example(text("query"), (text(positive), *documents), None, instruction)


class JsonlSource:
    """Random access to the examples of a .jsonl file by line offsets (a grain data source)."""

    def __init__(self, path: str | Path, kind: str):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"data file {self.path} does not exist")
        if self.path.suffix != ".jsonl":
            raise UsageError(f"data file {self.path} must be .jsonl (one JSON object a line)")
        self.kind = kind
        offsets, lines = [], []
        self.max_documents = 0           # the most documents (positive + negatives) of any line
        for number, offset, record in iter_json_lines(self.path):     # checks UTF-8 and every line up front
            example = parse_example(record, kind, f"{self.path}:{number}")
            self.max_documents = max(self.max_documents, len(example.documents))
            offsets.append(offset)
            lines.append(number)
        self.offsets = np.asarray(offsets, np.int64)
        self.lines = np.asarray(lines, np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> Example:
        with open(self.path, "rb") as handle:
            handle.seek(int(self.offsets[index]))
            raw = handle.readline().decode("utf-8")
        number = int(self.lines[index])
        return parse_example(json_line(self.path, number, raw), self.kind, f"{self.path}:{number}")


class ExampleStream:
    """The examples of a run in order: grain shuffles the file afresh every epoch from the seed, and
    step s of a run reads examples s*B .. s*B+B-1 of that endless order (B the global batch size), so
    the data position is the step itself and a resumed run reads exactly what the killed one would
    have. Every process reads the same (global) batch of texts; each device gets its rows of it."""

    def __init__(self, source: JsonlSource, *, batch_size: int, seed: int):
        if len(source) < batch_size:
            raise UsageError(f"{source.path} holds {len(source)} examples, fewer than one batch of {batch_size}; "
                             "lower --batch-size or add data")
        self.source, self.batch_size = source, batch_size
        self.order = grain.MapDataset.source(source).shuffle(seed=seed).repeat()

    def batch(self, step: int) -> list[Example]:
        """The examples of step `step`."""
        start = step * self.batch_size
        return [self.order[i] for i in range(start, start + self.batch_size)]

    def steps_per_epoch(self) -> int:
        return -(-len(self.source) // self.batch_size)
