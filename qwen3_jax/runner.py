"""Running the backbone on packed rows of token ids and keeping each text's last hidden state.

Shared by every entry point (the engines, the server's scheduler, training's evaluation): the texts'
shared prefixes are found and computed once (`share`, prefixes.py), `packing.py` plans the rows of
their own tokens, one jitted program per batch shape runs the model and gathers the last token of every
text, and input order is restored on output. A batch is dispatched (laid out, sent, started: the device
runs it asynchronously) and then collected, so the host lays out the next batch while the device
computes the last one.
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
from qwen3_jax.attention.prefix import PrefixTable
from qwen3_jax.packing import TOKENS_PER_TEXT, Batch, fixed_shapes, layout_batch, per_token, plan_batches
from qwen3_jax.prefixes import TABLE_LIMIT, Prefix, PrefixCache, Sharing, table_length, unshared
from qwen3_jax.model import Qwen3Model
from qwen3_jax.progress import progress_bar
from qwen3_jax.sharding import batch_sharding, fetch_global, put_global, replicated, shard_count

TABLES_KEPT = 4            # prefix tables kept on the devices (see LastTokenRunner.table)
LONE_TEXT_TOKENS = 64       # the own ids of a lone query whose programs a server compiles ahead (compile_lone_texts)


def _last_hidden(graphdef, state, ids, segments, ends, prefix=None):
    """The final states at each text's last token (`ends` [rows, slots]): float32 [rows, slots, D];
    `prefix`: the table of shared prefixes the texts continue (prefixes.py)."""
    return nnx.merge(graphdef, state)(ids, segments, at=ends, prefix=prefix).astype(jnp.float32)


def _keys_values(graphdef, state, ids, segments):
    """Every layer's keys and values [L, rows, length, K, H] (what a prefix table holds)."""
    return nnx.merge(graphdef, state)(ids, segments, return_keys_values=True)


class Dispatched(NamedTuple):
    """A batch whose forward pass has been started: its layout and the device result to collect."""

    batch: Batch
    result: jax.Array


class LastTokenRunner:
    """Jit-compiled last-token pooling of a Qwen3Model over packed batches of token-id rows."""

    def __init__(self, model: Qwen3Model, *, pad_id: int, mesh: Mesh | None = None,
                 padding_side: str = "right", layer_by_layer: bool = True, share_prefixes: bool = True):
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
        # The pass, and the pass whose texts continue a prefix table (its last argument).
        self._forward = jax.jit(functools.partial(_last_hidden, self._graphdef),
                                in_shardings=(None,) + (self._inputs,) * 3, out_shardings=self._inputs)
        self._forward_shared = jax.jit(functools.partial(_last_hidden, self._graphdef),
                                       in_shardings=(None,) + (self._inputs,) * 3 + (None,),
                                       out_shardings=self._inputs)
        self._keys_values = jax.jit(functools.partial(_keys_values, self._graphdef),
                                    out_shardings=replicated(mesh))
        # Shared prefixes need each kernel's log-sum-exp, which cuDNN's fused kernel does not give.
        self.prefixes = PrefixCache(self._prefix_states) if share_prefixes and self.pack else None
        # One device of XLA's CPU: the pass runs a layer at a time over views of the weights (see
        # layer_by_layer.py); elsewhere, or not `layer_by_layer`, the layers are scanned. (Views keep a
        # training step from donating the parameters' buffers: the trainer's evaluation scans.)
        self._layered = (LayerByLayer(model) if layer_by_layer and model.backend.layer_by_layer and mesh is None
                         else None)
        self._compiled: dict[tuple[int, int, int, int], Callable] = {}
        self._compiled_prefixes: dict[tuple[int, int], Callable] = {}
        self._tables: collections.OrderedDict[tuple, tuple[PrefixTable, PrefixTable]] = collections.OrderedDict()
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
        if self.prefixes is not None:             # prefixes computed with the old values
            self.prefixes.forget()
            self._tables.clear()

    @property
    def compiled_programs(self) -> int:
        """How many programs have been compiled so far: batch shapes (rows, length, slots, prefix table)
        and passes over prefixes."""
        on_call = self._layered.compiled_programs if self._layered else \
            self._forward._cache_size() + self._forward_shared._cache_size() + self._keys_values._cache_size()
        return on_call + len(self._compiled) + len(self._compiled_prefixes)   # on first call, and ahead of time

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

    def compile(self, shapes: Sequence[tuple[int, int, int]], *, threads: int | None = None,
                table_length: int = 0) -> None:
        """Compiles the forward pass for every (rows, length, slots) in `shapes` now, several at once,
        so that no later batch waits for a compile; `table_length` > 0: the pass whose texts continue
        a prefix table of that many tokens."""
        def compile_one(shape):
            rows, length, slots = shape
            args = [jax.ShapeDtypeStruct((rows, width), jnp.int32, sharding=self._inputs)
                    for width in (length, length, slots)]
            prefix = self._table_shapes(rows, length, table_length) if table_length else None
            with jax.set_mesh(self.mesh), kernel_named_on_failure(self.model.backend):
                if self._layered:
                    return shape + (table_length,), self._layered.compile(*args, prefix)
                if prefix is None:
                    program = self._forward.lower(self._state, *args).compile()
                    return shape + (table_length,), lambda *arrays, prefix=None: program(self._state, *arrays)
                program = self._forward_shared.lower(self._state, *args, prefix).compile()
                return shape + (table_length,), lambda *arrays, prefix: program(self._state, *arrays, prefix)

        missing = [shape for shape in shapes if tuple(shape) + (table_length,) not in self._compiled]
        with ThreadPoolExecutor(threads or 2) as pool:
            self._compiled.update(pool.map(compile_one, missing))

    def _table_shapes(self, rows: int, length: int, table_length: int):
        """The shapes of a prefix table of `table_length` tokens for a batch of rows x length."""
        cfg = self.model.config
        kv = jax.ShapeDtypeStruct((cfg.num_hidden_layers, table_length, cfg.num_key_value_heads, cfg.head_dim),
                                  self.model.dtype)
        table = jax.ShapeDtypeStruct((table_length,), jnp.int32)
        per_token = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=self._inputs)
        return PrefixTable(kv, kv, table, table, per_token, per_token)

    def share(self, texts: Sequence[Sequence[int]], *, compute: bool = True, remember: bool = False) -> Sharing:
        """Which prefix each text continues, and its own ids (PrefixCache.share: `compute=False` leaves the
        prefixes' keys and values to `prefixes.fill`, `remember` lets earlier calls count); every text its
        own when prefixes are not shared."""
        if self.prefixes is None:
            return unshared(texts)
        return self.prefixes.share(texts, compute=compute, remember=remember)

    def missing_programs(self, shapes, table_length: int, prefixes) -> tuple:
        """What is not yet compiled of what a batch continuing a prefix table needs: its (rows, length,
        slots) `shapes` with a table of `table_length`, and the pass computing each of `prefixes` (of
        prefixes.Prefix). () when all is compiled; otherwise a key for `compile_missing`."""
        forward = tuple(sorted(shape for shape in shapes if tuple(shape) + (table_length,) not in self._compiled))
        passes = tuple(sorted({self._prefix_shape(len(p.ids)) for p in prefixes} - set(self._compiled_prefixes)))
        return (forward, table_length, passes) if forward or passes else ()

    def compile_missing(self, missing: tuple) -> None:
        """Compiles what `missing_programs` listed (a server does so in the background)."""
        forward, table_length, passes = missing
        for rows, length in passes:
            args = [jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=self._inputs)] * 2
            with jax.set_mesh(self.mesh), kernel_named_on_failure(self.model.backend):
                self._compiled_prefixes[rows, length] = self._layered.compile_keys_values(*args) if self._layered \
                    else self._keys_values.lower(self._state, *args).compile()
        self.compile(forward, threads=1, table_length=table_length)

    def compile_lone_texts(self, token_budget: int, own_tokens: int = LONE_TEXT_TOKENS) -> None:
        """Compiles now, for each known prefix, what a lone text of up to `own_tokens` ids of its own after
        it takes in a server's batch of `token_budget` tokens (its prefix pass and table programs): the
        first instruction query a server gets computes only its own tokens, with no program compiled in
        the background meanwhile."""
        if self.prefixes is None:
            return
        shapes = {(b.num_rows, b.length, b.slots) for n in range(1, own_tokens + 1)
                  for b in self.plan([n], token_budget=token_budget, fixed=True)}
        for ids in self.prefixes.known:
            missing = self.missing_programs(shapes, table_length(len(ids), fixed=True), [Prefix(ids)])
            if missing:
                self.compile_missing(missing)

    def _prefix_batch(self, tokens: int) -> Batch:
        """The batch a prefix of `tokens` ids is computed in (alone: see _prefix_states)."""
        (batch,) = self.plan([tokens], token_budget=TABLE_LIMIT, fixed=True)
        return batch

    def _prefix_shape(self, tokens: int) -> tuple[int, int]:
        """The (rows, length) of `_prefix_batch`."""
        batch = self._prefix_batch(tokens)
        return batch.num_rows, batch.length

    def _prefix_states(self, prefixes: list[tuple[int, ...]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each prefix's keys and values [L, P, K, H] (host arrays), each computed alone in a row of a fixed
        shape: the same bits whenever and beside whatever it is computed."""
        out = []
        for prefix in prefixes:
            batch = self._prefix_batch(len(prefix))
            ids, segments, _ = (put_global(a, self._inputs) for a in layout_batch(batch, [prefix], self.pad_id))
            program = self._compiled_prefixes.get((batch.num_rows, batch.length))
            with jax.set_mesh(self.mesh), kernel_named_on_failure(self.model.backend):
                if self._layered:
                    keys, values = (np.stack([np.asarray(a)[0, :len(prefix)] for a in layers])
                                    for layers in self._layered.keys_values(ids, segments, program))
                else:
                    keys, values = (np.asarray(a)[:, 0, :len(prefix)] for a in
                                    (program or functools.partial(self._keys_values, self._state))(ids, segments))
            out.append((keys, values))
        return out

    def table(self, sharing: Sharing, length: int | None = None) -> PrefixTable | None:
        """The prefix table of `sharing`'s prefixes (Sharing.table) on the devices, a whole copy on each; a
        pass run a layer at a time gets each layer's keys and values as views of the host table. The last
        TABLES_KEPT tables are kept: a server's lone queries after one instruction reuse one."""
        if not sharing.prefixes:
            return None
        key = (tuple(p.ids for p in sharing.prefixes), length)
        if key not in self._tables:
            host = sharing.table(length)
            if self._layered:
                keys, values = (self._layered.views(a) for a in host[:2])
                table = PrefixTable(keys, values, *(jnp.asarray(a) for a in host[2:4]), None, None)
            else:
                put = (lambda a: put_global(a, replicated(self.mesh))) if self.mesh else jnp.asarray
                table = PrefixTable(*(put(a) for a in host[:4]), None, None)
            self._tables[key] = table, host          # the host table too: the views share its memory
            while len(self._tables) > TABLES_KEPT:
                self._tables.popitem(last=False)
        self._tables.move_to_end(key)
        return self._tables[key][0]

    def dispatch(self, batch: Batch, texts: Sequence[Sequence[int]], sharing: Sharing | None = None,
                 table: PrefixTable | None = None, *, stop: Callable[[], bool] | None = None) -> Dispatched:
        """Lays `batch` out, sends it to the devices and starts its forward pass (which runs on while
        this returns). With `sharing` (of which `texts` are the own ids) and its `table`, each text
        continues its shared prefix. With `stop`, a pass run a layer at a time (one CPU device) waits for
        each layer and raises layer_by_layer.Dropped once `stop()` is true; a scanned pass runs whole."""
        arrays = [put_global(a, self._inputs) for a in layout_batch(batch, texts, self.pad_id, self.padding_side)]
        if table is not None:
            text_entry, offset = (put_global(per_token(batch, texts, values, self.padding_side), self._inputs)
                                  for values in (sharing.entry, sharing.offset))
            table = table._replace(text_entry=text_entry, offset=offset)
        table_length = 0 if table is None else table.entry.shape[0]
        program = self._compiled.get((batch.num_rows, batch.length, batch.slots, table_length))
        # No mesh: one device; under a mesh, attention loops over each device's own rows.
        with jax.set_mesh(self.mesh), kernel_named_on_failure(self.model.backend):
            run = program or self._run
            result = run(*arrays, prefix=table, stop=stop) if self._layered else run(*arrays, prefix=table)
        self.tokens_computed += batch.computed_tokens
        texts_of = [i for row in batch.rows for i in row]
        self.tokens_embedded += int(sum(len(texts[i]) for i in texts_of))
        if sharing is not None:
            self.tokens_embedded += int(sum(sharing.offset[i] for i in texts_of))
        return Dispatched(batch, result)

    def _run(self, ids: jax.Array, segments: jax.Array, ends: jax.Array, prefix=None, *, stop=None) -> jax.Array:
        if self._layered:
            return self._layered(ids, segments, ends, prefix=prefix, stop=stop)
        if prefix is None:
            return self._forward(self._state, ids, segments, ends)
        return self._forward_shared(self._state, ids, segments, ends, prefix)

    @staticmethod
    def collect(dispatched: Dispatched) -> list[tuple[int, np.ndarray]]:
        """(text index, last hidden state [D] float32) of each text of a dispatched batch, waiting for it."""
        pooled = fetch_global(dispatched.result)
        return [(i, pooled[r, slot]) for r, row in enumerate(dispatched.batch.rows) for slot, i in enumerate(row)]

    def __call__(self, texts: Sequence[Sequence[int]], *, batch_size: int, progress: bool = False) -> np.ndarray:
        """Last token's final hidden state for each text, float32 [n, D], in input order.

        A batch holds `batch_size` x 512 computed tokens: batch_size texts of up to 512 tokens, more
        shorter ones, fewer longer ones; a prefix texts share is computed once (prefixes.py) and
        counts for none of them. `progress` shows a bar (texts/s, tokens/s, time left) on stderr from
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

            sharing = self.share(texts)
            table = self.table(sharing)
            in_flight: collections.deque[Dispatched] = collections.deque()
            for batch in self.plan([len(t) for t in sharing.own], token_budget=batch_size * TOKENS_PER_TEXT):
                in_flight.append(self.dispatch(batch, sharing.own, sharing, table))
                if len(in_flight) > 1:           # the device runs one batch while the next is laid out
                    finish(in_flight.popleft())
            while in_flight:
                finish(in_flight.popleft())
        return out
