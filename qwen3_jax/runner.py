"""Running the backbone on packed rows of token ids and keeping each text's last hidden state.

Shared by the embedder and the reranker: `layout.py` plans the rows, one jitted program per batch
shape runs the model and gathers the last token of every text, and input order is restored on output.
"""

from __future__ import annotations

import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qwen3_jax.attention import packed_row_limit, packs_rows
from qwen3_jax.layout import TOKENS_PER_TEXT, layout_batch, plan_batches
from qwen3_jax.model import Qwen3Model
from qwen3_jax.sharding import batch_sharding, fetch_global, put_global, shard_count


def enable_compilation_cache(path: str) -> None:
    """Keeps compiled programs on disk across processes (JAX's persistent cache; the environment
    variable JAX_COMPILATION_CACHE_DIR does the same). Every program is cached, however quick."""
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _last_hidden(graphdef, state, ids, segments, ends):
    """The final states at each text's last token (`ends` [rows, slots]): float32 [rows, slots, D]."""
    return nnx.merge(graphdef, state)(ids, segments, at=ends).astype(jnp.float32)


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
        self._graphdef, self._state = nnx.split(model)
        self._inputs = batch_sharding(mesh)
        self.pack = packs_rows(model.attention_impl, model.dtype)
        self.row_limit = packed_row_limit(model.attention_impl, model.dtype)
        if not self.pack and padding_side != "right":
            raise ValueError("cuDNN attention needs right padding; use padding_side='right'")
        self._forward = jax.jit(functools.partial(_last_hidden, self._graphdef),
                                in_shardings=(None,) + (self._inputs,) * 3, out_shardings=self._inputs)
        self.tokens_embedded = self.tokens_computed = 0

    def use(self, model: Qwen3Model) -> None:
        """Runs `model` from now on: the same architecture with other parameter values (e.g. after
        training steps), so the compiled programs are reused."""
        graphdef, state = nnx.split(model)
        if graphdef != self._graphdef:
            raise ValueError("the runner's compiled programs are for another model structure")
        self._state = state

    @property
    def compiled_programs(self) -> int:
        """How many batch shapes (rows, length, slots) have been compiled so far."""
        return self._forward._cache_size()

    def __call__(self, texts: Sequence[Sequence[int]], *, batch_size: int, progress: bool = False) -> np.ndarray:
        """Last token's final hidden state for each text, float32 [n, D], in input order.

        A batch holds `batch_size` x 512 tokens: batch_size texts of up to 512 tokens, more shorter
        ones, fewer longer ones. `progress` shows a bar (texts/s, tokens/s, time left) on stderr.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a whole number of at least 1")
        out = np.zeros((len(texts), self.model.config.hidden_size), np.float32)
        batches = plan_batches([len(t) for t in texts], token_budget=batch_size * TOKENS_PER_TEXT,
                               rows_multiple=shard_count(self.mesh), row_limit=self.row_limit, pack=self.pack)
        pending = []
        with jax.set_mesh(self.mesh):   # None: no mesh, one device
            for batch in batches:       # under the mesh, attention loops over each device's own rows
                arrays = layout_batch(batch, texts, self.pad_id, self.padding_side)
                inputs = (put_global(a, self._inputs) for a in arrays)
                pending.append((batch, self._forward(self._state, *inputs)))
                self.tokens_computed += batch.computed_tokens
        bar = _progress_bar(len(texts), enabled=progress)
        done_tokens, started = 0, time.perf_counter()
        for batch, result in pending:              # in dispatch order, so the bar follows the device
            pooled = fetch_global(result)
            for r, row in enumerate(batch.rows):
                out[row] = pooled[r, : len(row)]
            done_tokens += sum(len(texts[i]) for row in batch.rows for i in row)
            bar.update(sum(len(row) for row in batch.rows))
            bar.set_postfix(tok_s=f"{done_tokens / max(time.perf_counter() - started, 1e-9):.0f}", refresh=False)
        bar.close()
        self.tokens_embedded += sum(len(t) for t in texts)
        return out


def _progress_bar(total: int, *, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="text", dynamic_ncols=True,
                disable=not enabled or jax.process_index() != 0)
