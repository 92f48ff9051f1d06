"""Running the backbone on token-id rows and keeping each text's last hidden state.

Shared by the embedder and the reranker. Texts are sorted by length and packed: a row of R tokens
holds one long text or several short ones (each attends only to itself), R comes from a small set of
bucket lengths, and a batch holds as many rows as a token budget allows. So a stream of texts of many
lengths compiles few (rows, R) programs and pads little. Input order is restored on output.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qwen3_jax.attention import packs_rows
from qwen3_jax.model import Qwen3Model
from qwen3_jax.sharding import batch_sharding, fetch_global, put_global, shard_count
from qwen3_jax.tokenize import bucket_length

PACK_LENGTHS = (256, 512)  # texts up to 256 tokens share rows of 256, up to 512 rows of 512
TOKENS_PER_TEXT = 512      # a forward pass holds batch_size x 512 tokens
TOKENS_PER_SLOT = 16       # a row of R tokens holds at most R // 16 texts (fixes the output shape)
ROW_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def enable_compilation_cache(path: str) -> None:
    """Keeps compiled programs on disk across processes (JAX's persistent cache; the environment
    variable JAX_COMPILATION_CACHE_DIR does the same). Every program is cached, however quick."""
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@dataclasses.dataclass
class Batch:
    """Texts (indices into the input) laid out in `num_rows` rows of `length` tokens."""

    rows: list[list[int]]
    length: int
    num_rows: int

    @property
    def slots(self) -> int:
        return max(1, self.length // TOKENS_PER_SLOT)


def plan_batches(lengths: Sequence[int], *, token_budget: int, max_length: int, multiple: int = 1,
                 pack: bool = True) -> list[Batch]:
    """Packs texts, longest first, into batches of rows (see the module docstring).

    Each row takes the longest remaining text, then the shortest ones from the other end of the queue
    while they fit, then the next longest that still fit. The last batch picks the (rows, length)
    shape that holds what is left with the fewest padded tokens.
    """
    order = [int(i) for i in np.argsort(-np.asarray(lengths), kind="stable")]

    def fill(lo: int, hi: int, length: int, row_limit: int) -> tuple[list[list[int]], int, int]:
        rows, slots = [], max(1, length // TOKENS_PER_SLOT) if pack else 1
        while lo <= hi and len(rows) < row_limit:
            row, space = [order[lo]], length - lengths[order[lo]]
            lo += 1
            while lo <= hi and len(row) < slots and lengths[order[hi]] <= space:
                row.append(order[hi])
                space -= lengths[order[hi]]
                hi -= 1
            while lo <= hi and len(row) < slots and lengths[order[lo]] <= space:
                row.append(order[lo])
                space -= lengths[order[lo]]
                lo += 1
            rows.append(row)
        return rows, lo, hi

    batches, lo, hi = [], 0, len(order) - 1
    while lo <= hi:
        longest = bucket_length(lengths[order[lo]], max_length)
        length = next((n for n in PACK_LENGTHS if longest <= n <= max_length), longest) if pack else longest
        capacity = max([c for c in ROW_COUNTS if c * length <= token_budget], default=1)
        rows, next_lo, next_hi = fill(lo, hi, length, capacity)
        if next_lo > next_hi:                     # the last batch: the tightest shape that holds it all
            best = (_row_count(len(rows)) * length, length, rows)
            for size in sorted({bucket_length(n, max_length) for n in range(longest, length + 1)}):
                for count in (c for c in ROW_COUNTS if c * size < best[0] and c <= capacity):
                    candidate, end_lo, end_hi = fill(lo, hi, size, count)
                    if end_lo > end_hi:
                        best = (count * size, size, candidate)
                        break
            _, length, rows = best
        lo, hi = next_lo, next_hi
        batches.append(Batch(rows, length, -(-_row_count(len(rows)) // multiple) * multiple))
    return batches


def _row_count(rows: int) -> int:
    """The smallest allowed row count that holds `rows`."""
    return next((c for c in ROW_COUNTS if c >= rows), rows)


def layout_batch(batch: Batch, texts: Sequence[Sequence[int]], pad_id: int, side: str = "right"):
    """ids, segments [rows, length] and the index of each text's last token [rows, slots]."""
    ids = np.full((batch.num_rows, batch.length), pad_id, np.int32)
    segments = np.zeros((batch.num_rows, batch.length), np.int32)
    ends = np.zeros((batch.num_rows, batch.slots), np.int32)
    for r, row in enumerate(batch.rows):
        used = sum(len(texts[i]) for i in row)
        position = 0 if side == "right" else batch.length - used
        for slot, i in enumerate(row):
            tokens = texts[i]
            ids[r, position:position + len(tokens)] = tokens
            segments[r, position:position + len(tokens)] = slot + 1
            position += len(tokens)
            ends[r, slot] = position - 1
    return ids, segments, ends


def _last_hidden(graphdef, state, ids, segments, ends):
    """Final hidden state at each text's last token, float32 [rows, slots, D]."""
    hidden = nnx.merge(graphdef, state)(ids, segments)
    return jnp.take_along_axis(hidden, ends[..., None], axis=1).astype(jnp.float32)


class LastTokenRunner:
    """Jit-compiled last-token pooling of a Qwen3Model over packed batches of token-id rows."""

    def __init__(self, model: Qwen3Model, *, pad_id: int, mesh: Mesh | None = None,
                 padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}: choose 'left' or 'right'")
        self.model = model
        self.pad_id = pad_id
        self.mesh = mesh
        self.padding_side = padding_side
        graphdef, self._state = nnx.split(model)
        self._inputs = batch_sharding(mesh)
        self.pack = packs_rows(model.attention_impl, model.dtype)
        if not self.pack and padding_side != "right":
            raise ValueError("cuDNN attention needs right padding; use padding_side='right'")
        self._forward = jax.jit(functools.partial(_last_hidden, graphdef),
                                in_shardings=(None,) + (self._inputs,) * 3, out_shardings=self._inputs)
        self.tokens_embedded = self.tokens_computed = 0

    @property
    def compiled_programs(self) -> int:
        """How many (rows, length) programs have been compiled so far."""
        return self._forward._cache_size()

    def __call__(self, texts: Sequence[Sequence[int]], *, batch_size: int, max_length: int) -> np.ndarray:
        """Last token's final hidden state for each text, float32 [n, D], in input order.

        A batch holds `batch_size` x 512 tokens: batch_size texts of up to 512 tokens, more shorter
        ones, fewer longer ones.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        out = np.zeros((len(texts), self.model.config.hidden_size), np.float32)
        batches = plan_batches([len(t) for t in texts], token_budget=batch_size * TOKENS_PER_TEXT,
                               max_length=max_length, multiple=shard_count(self.mesh), pack=self.pack)
        pending = []
        with jax.set_mesh(self.mesh):   # None: no mesh, one device
            for batch in batches:       # under the mesh, attention loops over each device's own rows
                arrays = layout_batch(batch, texts, self.pad_id, self.padding_side)
                inputs = (put_global(a, self._inputs) for a in arrays)
                pending.append((batch, self._forward(self._state, *inputs)))
                self.tokens_computed += batch.num_rows * batch.length
        for batch, result in pending:
            pooled = fetch_global(result)
            for r, row in enumerate(batch.rows):
                out[row] = pooled[r, : len(row)]
        self.tokens_embedded += sum(len(t) for t in texts)
        return out
