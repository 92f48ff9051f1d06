"""Laying texts out for the forward pass: padding-free rows of packed texts, in few shapes.

Texts lie end to end in a row (each attends only to itself, see `attention/`), so the token-wise
work (projections, MLP, norms) sees almost no padding. A batch is `num_rows` rows of `length` tokens:
one row per data shard for kernels that skip the pairs of different texts, shorter rows for kernels
whose cost grows with the row. A stream of texts fills full batches of one shape; only the last batch,
and texts longer than a full row, take other lengths: from `row_length`'s fine ladder (16 lengths per
power of two: at most 6.25% padding), so a stream compiles a handful of programs and computes within a
few percent of its real tokens. With `fixed=True` they come from the coarse ladder of `coarse_length`
(powers of two and 1.5 times them) with one slot density, so that every shape a token budget can
produce is known in advance (`fixed_shapes`): the server compiles them all before it accepts a request.
Kernels that take one text a row (cuDNN's) get rows of coarse lengths: each batch of a long-tailed
stream would otherwise meet a new length.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Sequence

import numpy as np

TOKENS_PER_TEXT = 512            # a batch holds batch_size x 512 tokens
SLOT_DENSITIES = (16, 4, 1)      # a row of R tokens has R // 16 output slots, more for tiny texts
FIXED_SLOT_TOKENS = 4            # fixed shapes: a row of R tokens has R // 4 slots; a text takes at least 4
COARSE_MINIMUM = 16             # a lone query of a few tokens: its row costs about what its tokens cost
ROW_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def row_length(num_tokens: int, minimum: int = 16) -> int:
    """The row length that holds `num_tokens`: a multiple of 1/16 of the power of two below it (at
    least `minimum`), so a row pads at most 6.25% while a stream meets few distinct lengths."""
    num_tokens = max(num_tokens, 1)
    step = max(minimum, 1 << max(0, num_tokens.bit_length() - 5))
    return -(-num_tokens // step) * step


def coarse_length(num_tokens: int, minimum: int = COARSE_MINIMUM) -> int:
    """The smallest of 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5 times them) that holds
    `num_tokens`: at most a third of a row is padding, and a budget meets a dozen lengths."""
    length = minimum
    while length < num_tokens:
        length = length * 3 // 2 if length & (length - 1) == 0 else length // 3 * 4
    return length


@dataclasses.dataclass
class Batch:
    """Texts (indices into the input) laid out in `num_rows` rows of `length` tokens."""

    rows: list[list[int]]
    length: int
    num_rows: int
    slots: int = 1               # output positions per row: the most texts a row may hold

    @property
    def computed_tokens(self) -> int:
        return self.num_rows * self.length


def _with_slots(rows: list[list[int]], length: int, num_rows: int) -> Batch:
    """A Batch whose slot count is the fewest of `length // SLOT_DENSITIES` that holds every row."""
    most = max((len(row) for row in rows), default=1)
    slots = next((length // d for d in SLOT_DENSITIES if length // d >= most), length)
    return Batch(rows, length, num_rows, slots)


def _rows(token_budget: int, rows_multiple: int, row_limit: int | None) -> tuple[int, int]:
    """(rows of a batch, tokens of a full row) for a budget, data-shard count and row limit."""
    full_row = max(1, token_budget // rows_multiple) if row_limit is None else \
        max(1, min(row_limit, token_budget // rows_multiple))
    return rows_multiple * max(1, token_budget // (rows_multiple * full_row)), full_row


def plan_batches(lengths: Sequence[int], *, token_budget: int, rows_multiple: int = 1,
                 row_limit: int | None = None, pack: bool = True, fixed: bool = False) -> list[Batch]:
    """Batches for texts of these token counts, longest first; see the module docstring.

    `token_budget` bounds the tokens of a batch (a longer text gets a batch of its own);
    `rows_multiple` is the data-shard count (rows per batch are a multiple of it); `row_limit` caps a
    packed row's length; `pack=False` puts one text in each row (for cuDNN's kernel, rows of coarse
    lengths); `fixed` takes every shape from `fixed_shapes`.
    """
    lengths = [int(n) for n in lengths]
    if any(n < 1 for n in lengths):
        raise ValueError("every text needs at least one token")
    order = [int(i) for i in np.argsort(-np.asarray(lengths, np.int64), kind="stable")]
    if not pack:
        return _one_text_per_row(order, lengths, token_budget, rows_multiple)
    num_rows, full_row = _rows(token_budget, rows_multiple, row_limit)
    ladder = coarse_length if fixed else row_length
    # With fixed shapes a text takes at least FIXED_SLOT_TOKENS of a row, so length // 4 slots hold a row.
    cost = [max(n, FIXED_SLOT_TOKENS) for n in lengths] if fixed else lengths
    batches, lo, hi = [], 0, len(order) - 1
    while lo <= hi:
        longest = cost[order[lo]]
        capacity = full_row if longest <= full_row else ladder(longest)
        rows: list[list[int]] = [[] for _ in range(num_rows)]
        used = [(0, r) for r in range(num_rows)]       # a heap of (tokens, row): the emptiest row first
        while lo <= hi and used[0][0] + cost[order[lo]] <= capacity:   # the longest texts first,
            _place(order[lo], cost[order[lo]], rows, used)
            lo += 1
        while lo <= hi and used[0][0] + cost[order[hi]] <= capacity:   # then the shortest fill the gaps
            _place(order[hi], cost[order[hi]], rows, used)
            hi -= 1
        longest_row = max(tokens for tokens, _ in used)
        length = capacity if lo <= hi else min(ladder(longest_row), capacity)
        rows = [row for row in rows if row]
        batches.append(Batch(rows, length, num_rows, max(1, length // FIXED_SLOT_TOKENS)) if fixed
                       else _with_slots(rows, length, num_rows))
    return batches


def fixed_shapes(token_budget: int, *, rows_multiple: int = 1, row_limit: int | None = None,
                 max_text_tokens: int | None = None) -> list[tuple[int, int, int]]:
    """Every (rows, length, slots) that `plan_batches(..., fixed=True)` can give for this budget and
    texts of up to `max_text_tokens` (default: the full row): a full row, the coarse lengths below
    it, and the coarse lengths a text longer than a full row takes."""
    num_rows, full_row = _rows(token_budget, rows_multiple, row_limit)
    lengths = {full_row}
    length = COARSE_MINIMUM
    while length < max(full_row, max_text_tokens or 0):
        if length < full_row or length >= coarse_length(full_row + 1):
            lengths.add(length)
        length = coarse_length(length + 1)
    if max_text_tokens and max_text_tokens > full_row:
        lengths.add(coarse_length(max_text_tokens))
    return [(num_rows, n, max(1, n // FIXED_SLOT_TOKENS)) for n in sorted(lengths)]


def _place(text: int, tokens: int, rows: list[list[int]], used: list[tuple[int, int]]) -> None:
    """Appends `text` to the emptiest row."""
    filled, r = heapq.heappop(used)
    rows[r].append(text)
    heapq.heappush(used, (filled + tokens, r))


def _one_text_per_row(order: list[int], lengths: list[int], token_budget: int, rows_multiple: int) -> list[Batch]:
    """Rows of one text each, of a bucketed length; row counts from ROW_COUNTS."""
    batches, start = [], 0
    while start < len(order):
        length = coarse_length(lengths[order[start]])
        fit = max(1, token_budget // length)
        count = next((c for c in reversed(ROW_COUNTS) if c <= fit), 1)
        taken = order[start:start + count]
        start += len(taken)
        num_rows = next((c for c in ROW_COUNTS if c >= len(taken)), len(taken))
        num_rows = -(-num_rows // rows_multiple) * rows_multiple
        batches.append(Batch([[i] for i in taken], length, num_rows, 1))
    return batches


def spans(batch: Batch, texts: Sequence[Sequence[int]], side: str = "right"):
    """(row, slot, text index, first token, end) of each text of `batch` as `layout_batch` lays it out."""
    for r, row in enumerate(batch.rows):
        used = sum(len(texts[i]) for i in row)
        position = 0 if side == "right" else batch.length - used
        for slot, i in enumerate(row):
            yield r, slot, i, position, position + len(texts[i])
            position += len(texts[i])


def layout_batch(batch: Batch, texts: Sequence[Sequence[int]], pad_id: int, side: str = "right"):
    """ids, segments [rows, length] and the index of each text's last token [rows, slots].

    `segments` numbers the texts of a row 1, 2, ... and marks padding 0; the padding of a row sits
    after its texts (`side="right"`) or before them ("left").
    """
    ids = np.full((batch.num_rows, batch.length), pad_id, np.int32)
    segments = np.zeros((batch.num_rows, batch.length), np.int32)
    ends = np.zeros((batch.num_rows, batch.slots), np.int32)
    for r, slot, i, start, end in spans(batch, texts, side):
        ids[r, start:end] = texts[i]
        segments[r, start:end] = slot + 1
        ends[r, slot] = end - 1
    return ids, segments, ends


def per_token(batch: Batch, texts: Sequence[Sequence[int]], values: Sequence[int], side: str = "right") -> np.ndarray:
    """[rows, length] int32: `values[i]` over the tokens of text i as `layout_batch` lays them out, 0 on padding."""
    out = np.zeros((batch.num_rows, batch.length), np.int32)
    for r, _, i, start, end in spans(batch, texts, side):
        out[r, start:end] = values[i]
    return out
