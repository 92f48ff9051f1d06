"""Training data: JSON-lines files read one line at a time, in a seeded order that the step number fixes.

Three line formats:
- ours, for embeddings: {"query", "positive", "negatives": [...], "instruction"?}
- ms-swift's, for embeddings: {"query", "response", "rejected_response": [...]}
- the reranker's: {"query", "document", "label": 0 or 1, "instruction"?}

A file is indexed once (the byte offset of each line, 8 bytes a line, every line checked), then read by
offset, so memory does not grow with the file. Each epoch is a permutation drawn from the seed and the
epoch number, and step s reads fixed positions of the epochs laid end to end: the data position is the
step, which the Orbax checkpoint already holds, so no loader state is saved beside it (a data-loader
library such as grain would add an iterator state that only repeats the step).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

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
    """Random access to the examples of a .jsonl file by line offsets."""

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
    """The examples of a run in order: epoch after epoch, each a fresh shuffle of the file (numpy's
    generator, from the seed and the epoch), and step s reads stream positions s*B .. s*B+B-1 (B the
    global batch size), so the data position is the step itself and a resumed run reads exactly what
    the killed one would have.

    A batch never holds one example twice. Only a batch that straddles two epochs could (the end of one
    shuffle, the start of the next): its share of the next epoch is taken from that epoch's order
    skipping the examples already in it, which come right after instead. Every epoch is still one true
    pass, each example once. Every process reads the same (global) batch of texts; each device gets its
    rows of it."""

    def __init__(self, source: JsonlSource, *, batch_size: int, seed: int):
        if len(source) < batch_size:
            raise UsageError(f"{source.path} holds {len(source)} examples, fewer than one batch of {batch_size}; "
                             "lower --batch-size or add data")
        self.source, self.batch_size = source, batch_size
        # Any seed (negative ones too) hashed to the generator's entropy, apart from the seed's other uses.
        self._seed = int.from_bytes(hashlib.blake2b(f"qwen3-jax data order {seed}".encode(), digest_size=8).digest(),
                                    "big")
        self._epochs: dict[int, np.ndarray] = {}

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The example indices of `epoch` as the stream takes them (see the class docstring). Each
        epoch's order depends on the one before, so they are made in turn (the last two kept)."""
        count, size = len(self.source), self.batch_size
        known = [e for e in self._epochs if e <= epoch]
        for e in range(max(known) + 1 if known else 0, epoch + 1):
            order = np.random.default_rng([self._seed, e]).permutation(count).tolist()
            straddled = (e * count) % size           # stream positions of the previous epoch in that batch
            if e and straddled:
                taken = set(self._epochs[e - 1][count - straddled:].tolist())
                fresh = [i for i in order if i not in taken][:size - straddled]
                chosen = set(fresh)
                order = fresh + [i for i in order if i not in chosen]
            self._epochs = {k: v for k, v in self._epochs.items() if k >= e - 1}
            self._epochs[e] = np.asarray(order, np.int64)
        return self._epochs[epoch]

    def indices(self, step: int) -> list[int]:
        """The example indices of step `step`."""
        count = len(self.source)
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return [int(self.epoch_order(p // count)[p % count]) for p in positions]

    def batch(self, step: int) -> list[Example]:
        """The examples of step `step`."""
        return [self.source[i] for i in self.indices(step)]

    def steps_per_epoch(self) -> float:
        """Steps of one pass over the data (a fraction: an epoch may end inside a batch)."""
        return len(self.source) / self.batch_size
