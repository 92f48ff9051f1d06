"""A training step's texts laid out as inference lays them out: padding-free packed rows.

The texts of a step (queries and documents, or reranker prompts) are cut into `mini_batches` groups
(one group without GradCache); each group becomes one batch of `packing.py`'s packed rows, and all
groups share the step's shape, so they stack into [M, rows, length] arrays that one jitted program
runs. `text_slot` says where each text's pooled state lands in the flattened [M * rows * slots] output.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from qwen3_jax.packing import Batch, layout_batch, plan_batches, row_length


@dataclasses.dataclass
class ContrastiveExample:
    """One tokenized training example: a query, its positive and any number of hard negatives."""

    query: list[int]
    positive: list[int]
    negatives: list[list[int]] = dataclasses.field(default_factory=list)


def pack_texts(texts: Sequence[Sequence[int]], *, pad_id: int, mini_batches: int = 1,
               rows_multiple: int = 1, min_length: int = 1) -> dict[str, np.ndarray]:
    """ids, segments [M, rows, length], ends [M, rows, slots] and text_slot [n] for `texts`, cut into
    `mini_batches` consecutive groups of (nearly) equal count. Rows are at least `min_length` tokens
    (rounded up as row lengths are), so steps whose texts fit share one compiled program."""
    count = len(texts)
    if count < mini_batches:
        raise ValueError(f"{count} texts cannot fill {mini_batches} mini-batches")
    bounds = np.linspace(0, count, mini_batches + 1).round().astype(int)
    groups = [list(range(lo, hi)) for lo, hi in zip(bounds, bounds[1:])]
    plans = []
    for group in groups:
        lengths = [len(texts[i]) for i in group]
        # room for every text in one batch: each row may exceed the mean by one text
        (plan,) = plan_batches(lengths, token_budget=sum(lengths) + rows_multiple * max(lengths),
                               rows_multiple=rows_multiple)
        plans.append(plan)
    length = row_length(max(min_length, *(p.length for p in plans)))
    slots = max(len(group) for group in groups)    # fixed by the text count alone: no compile per step
    arrays = {"ids": [], "segments": [], "ends": []}
    text_slot = np.zeros(count, np.int32)
    for m, (group, plan) in enumerate(zip(groups, plans)):
        shaped = Batch([[group[i] for i in row] for row in plan.rows], length, plan.num_rows, slots)
        for name, array in zip(arrays, layout_batch(shaped, texts, pad_id)):
            arrays[name].append(array)
        for r, row in enumerate(shaped.rows):
            for slot, text in enumerate(row):
                text_slot[text] = (m * plan.num_rows + r) * slots + slot
    return {**{name: np.stack(values) for name, values in arrays.items()}, "text_slot": text_slot}


def contrastive_batch(examples: Sequence[ContrastiveExample], *, negatives: int, pad_id: int,
                      mini_batches: int = 1, rows_multiple: int = 1, min_length: int = 1) -> dict[str, np.ndarray]:
    """The packed texts of a contrastive step plus query_text [Q] and document_text [Q, 1 + negatives]
    (indices into the texts, -1 where a query has fewer negatives). More negatives than `negatives`
    are cut, as ms-swift's INFONCE_HARD_NEGATIVES cuts them; fewer are masked, never repeated. A
    missing negative still takes a one-token placeholder text that nothing reads, so every step of a
    run has the same number of texts (and its program compiles for the row length alone)."""
    texts = [e.query for e in examples]
    documents = np.full((len(examples), 1 + negatives), -1, np.int32)
    for q, example in enumerate(examples):
        present = [example.positive, *example.negatives[:negatives]]
        for c, document in enumerate(present):
            documents[q, c] = len(texts)
            texts.append(document)
        texts.extend([[pad_id]] * (1 + negatives - len(present)))
    packed = pack_texts(texts, pad_id=pad_id, mini_batches=mini_batches, rows_multiple=rows_multiple,
                        min_length=min_length)
    return {**packed, "query_text": np.arange(len(examples), dtype=np.int32), "document_text": documents}


def pointwise_batch(prompts: Sequence[Sequence[int]], labels: Sequence[int], *, pad_id: int,
                    rows_multiple: int = 1, min_length: int = 1) -> dict[str, np.ndarray]:
    """The packed reranker prompts of a step and their labels (1 relevant, 0 not)."""
    labels = np.asarray(labels, np.int32)
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("reranker labels must be 0 or 1")
    return {**pack_texts(prompts, pad_id=pad_id, rows_multiple=rows_multiple, min_length=min_length),
            "labels": labels}
