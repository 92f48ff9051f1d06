"""Running the backbone on token-id rows and keeping each row's last real hidden state.

Shared by the embedder and the reranker: length buckets, token-budget batching, one jit program
per (rows, length) shape, inputs split over the mesh's "data" axis.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qwen3_jax.model import Qwen3Model
from qwen3_jax.sharding import batch_sharding, fetch_global, put_global, shard_count
from qwen3_jax.tokenize import bucket_length, pad_batch

DEFAULT_TOKEN_BUDGET = 16384


def last_token_index(valid: jax.Array) -> jax.Array:
    """Index of the last real token of each row [B], whatever side the padding is on."""
    return valid.shape[1] - 1 - jnp.argmax(valid[:, ::-1], axis=1)


def _last_hidden(graphdef, state, ids, valid):
    """Final hidden state of each row's last real token, float32 [B, D]."""
    hidden = nnx.merge(graphdef, state)(ids, valid)
    return hidden[jnp.arange(ids.shape[0]), last_token_index(valid)].astype(jnp.float32)


def plan_batches(lengths: Sequence[int], *, batch_size: int, token_budget: int, max_length: int,
                 multiple: int = 1) -> list[tuple[np.ndarray, int, int]]:
    """Groups rows longest first into (indices, padded length, padded rows) batches.

    A batch takes as many of the next rows as its longest one's bucket allows within the token
    budget, so only few (rows, length) shapes occur and shorter rows pad little.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, start = [], 0
    while start < len(order):
        length = bucket_length(lengths[order[start]], max_length)
        rows = max(1, min(batch_size, token_budget // length))
        chosen = order[start:start + rows]
        padded_rows = rows if len(chosen) == rows else min(rows, 1 << (len(chosen) - 1).bit_length())
        padded_rows = -(-padded_rows // multiple) * multiple
        batches.append((chosen, length, padded_rows))
        start += len(chosen)
    return batches


class LastTokenRunner:
    """Jit-compiled last-token pooling of a Qwen3Model over batches of token-id rows."""

    def __init__(self, model: Qwen3Model, *, pad_id: int, mesh: Mesh | None = None,
                 padding_side: str = "right", token_budget: int = DEFAULT_TOKEN_BUDGET):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}: choose 'left' or 'right'")
        self.model = model
        self.pad_id = pad_id
        self.mesh = mesh
        self.padding_side = padding_side
        self.token_budget = token_budget
        graphdef, self._state = nnx.split(model)
        self._inputs = batch_sharding(mesh)
        self._forward = jax.jit(functools.partial(_last_hidden, graphdef),
                                in_shardings=(None, self._inputs, self._inputs), out_shardings=self._inputs)

    @property
    def compiled_programs(self) -> int:
        """How many (rows, length) programs have been compiled so far."""
        return self._forward._cache_size()

    def __call__(self, rows: Sequence[Sequence[int]], *, batch_size: int, max_length: int) -> np.ndarray:
        """Last real token's final hidden state for each row, float32 [n, D], in input order."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        out = np.zeros((len(rows), self.model.config.hidden_size), np.float32)
        batches = plan_batches([len(r) for r in rows], batch_size=batch_size, token_budget=self.token_budget,
                               max_length=max_length, multiple=shard_count(self.mesh))
        pending = []
        for indices, length, padded_rows in batches:
            ids, valid = pad_batch([rows[i] for i in indices], length, padded_rows, self.pad_id,
                                   self.padding_side)
            ids, valid = put_global(ids, self._inputs), put_global(valid, self._inputs)
            pending.append((indices, self._forward(self._state, ids, valid)))
        for indices, result in pending:
            out[indices] = fetch_global(result)[: len(indices)]
        return out
