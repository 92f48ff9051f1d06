"""Running the backbone on packed rows of token ids and keeping each text's last hidden state.

Shared by the embedder, the reranker and the server: `layout.py` plans the rows, one jitted program
per batch shape runs the model and gathers the last token of every text, and input order is restored
on output. A batch is dispatched (laid out, sent, started: the device runs it asynchronously) and then
collected, so the host lays out the next batch while the device computes the last one.
"""

from __future__ import annotations

import collections
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qwen3_jax.backend import kernel_named_on_failure
from qwen3_jax.checks import whole_number
from qwen3_jax.layer_by_layer import LayerByLayer
from qwen3_jax.packing import TOKENS_PER_TEXT, Batch, fixed_shapes, layout_batch, plan_batches
from qwen3_jax.model import Qwen3Model
from qwen3_jax.progress import progress_bar
from qwen3_jax.sharding import batch_sharding, fetch_global, put_global, shard_count


def _last_hidden(graphdef, state, ids, segments, ends):
    """The final states at each text's last token (`ends` [rows, slots]): float32 [rows, slots, D]."""
    return nnx.merge(graphdef, state)(ids, segments, at=ends).astype(jnp.float32)


class Dispatched(NamedTuple):
    """A batch whose forward pass has been started: its layout and the device result to collect."""

    batch: Batch
    result: jax.Array


class LastTokenRunner:
    """Jit-compiled last-token pooling of a Qwen3Model over packed batches of token-id rows."""

    def __init__(self, model: Qwen3Model, *, pad_id: int, mesh: Mesh | None = None,
                 padding_side: str = "right", layer_by_layer: bool = True):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}: choose 'left' or 'right'")
        self.model = model
        self.pad_id = pad_id
        self.mesh = mesh
        self.padding_side = padding_side
        self._graphdef, self._state = nnx.split(model)
        self._inputs = batch_sharding(mesh)
        self.pack = model.backend.packs_rows
        self.row_limit = model.backend.packed_row_limit
        if not self.pack and padding_side != "right":
            raise ValueError("cuDNN attention needs right padding; use padding_side='right'")
        self._forward = jax.jit(functools.partial(_last_hidden, self._graphdef),
                                in_shardings=(None,) + (self._inputs,) * 3, out_shardings=self._inputs)
        # One device of XLA's CPU: the pass runs a layer at a time over views of the weights (see
        # layer_by_layer.py); elsewhere, or not `layer_by_layer`, the layers are scanned. (Views keep a
        # training step from donating the parameters' buffers: the trainer's evaluation scans.)
        self._layered = (LayerByLayer(model) if layer_by_layer and model.backend.layer_by_layer and mesh is None
                         else None)
        self._compiled: dict[tuple[int, int, int], Callable] = {}
        self.tokens_embedded = self.tokens_computed = 0

    def use(self, model: Qwen3Model) -> None:
        """Runs `model` from now on: the same architecture with other parameter values (e.g. after
        training steps), so the compiled programs are reused."""
        graphdef, state = nnx.split(model)
        if graphdef != self._graphdef:
            raise ValueError("the runner's compiled programs are for another model structure")
        self._state = state
        if self._layered:
            self._layered.use(model)

    @property
    def compiled_programs(self) -> int:
        """How many batch shapes (rows, length, slots) have been compiled so far."""
        on_call = self._layered.compiled_programs if self._layered else self._forward._cache_size()
        return on_call + len(self._compiled)          # compiled when first called, and ahead of time

    def plan(self, lengths: Sequence[int], *, token_budget: int, fixed: bool = False) -> list[Batch]:
        """The batches for texts of these token counts (see layout.plan_batches), for this runner's
        mesh and attention kernel; `fixed` takes every shape from `shapes` (the server's)."""
        return plan_batches(lengths, token_budget=token_budget, rows_multiple=shard_count(self.mesh),
                            row_limit=self.row_limit, pack=self.pack, fixed=fixed)

    def shapes(self, token_budget: int, max_text_tokens: int) -> list[tuple[int, int, int]]:
        """Every (rows, length, slots) that plan(..., fixed=True) gives for this budget."""
        if not self.pack:
            raise ValueError("fixed shapes need an attention kernel that packs texts into rows "
                             "(not cudnn): choose blockwise, splash or pallas")
        return fixed_shapes(token_budget, rows_multiple=shard_count(self.mesh), row_limit=self.row_limit,
                            max_text_tokens=max_text_tokens)

    def compile(self, shapes: Sequence[tuple[int, int, int]], *, threads: int | None = None) -> None:
        """Compiles the forward pass for every (rows, length, slots) in `shapes` now, several at once,
        so that no later batch waits for a compile."""
        def compile_one(shape):
            rows, length, slots = shape
            args = [jax.ShapeDtypeStruct((rows, width), jnp.int32, sharding=self._inputs)
                    for width in (length, length, slots)]
            with jax.set_mesh(self.mesh), kernel_named_on_failure(self.model.backend):
                if self._layered:
                    return shape, self._layered.compile(*args)
                program = self._forward.lower(self._state, *args).compile()
                return shape, lambda *arrays: program(self._state, *arrays)

        missing = [shape for shape in shapes if shape not in self._compiled]
        with ThreadPoolExecutor(threads or 2) as pool:
            self._compiled.update(pool.map(compile_one, missing))

    def dispatch(self, batch: Batch, texts: Sequence[Sequence[int]]) -> Dispatched:
        """Lays `batch` out, sends it to the devices and starts its forward pass (which runs on while
        this returns)."""
        arrays = [put_global(a, self._inputs) for a in layout_batch(batch, texts, self.pad_id, self.padding_side)]
        program = self._compiled.get((batch.num_rows, batch.length, batch.slots))
        # No mesh: one device; under a mesh, attention loops over each device's own rows.
        with jax.set_mesh(self.mesh), kernel_named_on_failure(self.model.backend):
            result = (program or self._run)(*arrays)
        self.tokens_computed += batch.computed_tokens
        self.tokens_embedded += int(sum(len(texts[i]) for row in batch.rows for i in row))
        return Dispatched(batch, result)

    def _run(self, ids: jax.Array, segments: jax.Array, ends: jax.Array) -> jax.Array:
        return self._layered(ids, segments, ends) if self._layered else self._forward(self._state, ids, segments, ends)

    @staticmethod
    def collect(dispatched: Dispatched) -> list[tuple[int, np.ndarray]]:
        """(text index, last hidden state [D] float32) of each text of a dispatched batch, waiting for it."""
        pooled = fetch_global(dispatched.result)
        return [(i, pooled[r, slot]) for r, row in enumerate(dispatched.batch.rows) for slot, i in enumerate(row)]

    def __call__(self, texts: Sequence[Sequence[int]], *, batch_size: int, progress: bool = False) -> np.ndarray:
        """Last token's final hidden state for each text, float32 [n, D], in input order.

        A batch holds `batch_size` x 512 tokens: batch_size texts of up to 512 tokens, more shorter
        ones, fewer longer ones. `progress` shows a bar (texts/s, tokens/s, time left) on stderr from
        the start, compiling included.
        """
        whole_number(batch_size, "batch_size")
        out = np.zeros((len(texts), self.model.config.hidden_size), np.float32)
        with progress_bar(len(texts), "text", enabled=progress) as bar:
            tokens = 0

            def finish(dispatched: Dispatched) -> None:
                nonlocal tokens
                done = self.collect(dispatched)
                for i, state in done:
                    out[i] = state
                tokens += sum(len(texts[i]) for i, _ in done)
                bar.update(len(done))
                bar.set_postfix(tok_s=f"{tokens / max(bar.format_dict['elapsed'], 1e-9):.0f}", refresh=False)

            in_flight: collections.deque[Dispatched] = collections.deque()
            for batch in self.plan([len(t) for t in texts], token_budget=batch_size * TOKENS_PER_TEXT):
                in_flight.append(self.dispatch(batch, texts))
                if len(in_flight) > 1:           # the device runs one batch while the next is laid out
                    finish(in_flight.popleft())
            while in_flight:
                finish(in_flight.popleft())
        return out
