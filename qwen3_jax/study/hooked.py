"""HookedQwen3: TransformerLens' run_with_cache and run_with_hooks for Qwen3-Embedding and Qwen3-Reranker."""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen3_jax.checks import UsageError
from qwen3_jax.embedder import Qwen3Embedder
from qwen3_jax.engine.reranking import RerankerPrompts
from qwen3_jax.extras import require
from qwen3_jax.model import Qwen3Model, gather_tokens
from qwen3_jax.reranker import Qwen3Reranker
from qwen3_jax.study.forward import EMBED, FINAL, HOOK_SHAPES, HookFn, hook_names, run_hooked
from qwen3_jax.tokenization import TextTokenizer, format_instruction, pad_batch

DEFAULT_MAX_LENGTH = 8192


def act_name(kind: str, layer: int | None = None) -> str:
    """TransformerLens' get_act_name: ("pattern", 3) -> "blocks.3.attn.hook_pattern", ("embed",) -> "hook_embed"."""
    if kind in ("embed", EMBED):
        return EMBED
    if kind in ("normalized", "ln_final", FINAL):
        return FINAL
    points = [p for p in HOOK_SHAPES if p.split(".")[-1] in (kind, "hook_" + kind)]
    if len(points) != 1 or layer is None:
        raise KeyError(f"{kind!r}{'' if layer is not None else ' without a layer'}: no such hook point; "
                       f"kinds: embed, normalized, {', '.join(p.split('hook_')[-1] for p in HOOK_SHAPES)}")
    return f"blocks.{layer}.{points[0]}"


class Tokens(NamedTuple):
    """A batch as the model reads it: ids [B, T] int32, right-padded, and mask [B, T] (True on real tokens)."""

    ids: np.ndarray
    mask: np.ndarray


class ActivationCache(dict):
    """{hook name: activation [B, ...]} of one run, TransformerLens' names and shapes, and `mask` [B, T]
    of its real tokens; `cache["pattern", 3]` is `cache["blocks.3.attn.hook_pattern"]`."""

    def __init__(self, activations: dict, mask: np.ndarray):
        super().__init__(activations)
        self.mask = mask

    def __getitem__(self, key):
        return super().__getitem__(act_name(*key) if isinstance(key, tuple) else key)


def readout(model: Qwen3Model, final: jax.Array, mask: jax.Array, answers: tuple[int, int] | None) -> jax.Array:
    """What a run returns, from the final states [B, T, D]: the L2-normalised last-token embedding
    [B, D], or the reranker's yes-no margin [B] when `answers` holds the ids of "no" and "yes"."""
    last = gather_tokens(final, (mask.sum(axis=1) - 1)[:, None])[:, 0].astype(jnp.float32)
    if answers is None:
        return last / jnp.linalg.norm(last, axis=-1, keepdims=True)
    rows = model.output_rows(list(answers)).astype(jnp.float32)
    return last @ rows[1] - last @ rows[0]


def _program(graphdef, state, ids, mask, *, hooks, record, pattern_window, answers):
    """The jitted run: the readout and the recorded activations."""
    model = nnx.merge(graphdef, state)
    final, recorded = run_hooked(model, ids, mask, dict(hooks), record, pattern_window)
    return readout(model, final, mask, answers), recorded


class HookedQwen3:
    """A loaded Qwen3 embedder or reranker with TransformerLens' hook points (see forward.HOOK_SHAPES).

    Inputs are texts (embedder), (query, document) pairs (reranker: the official prompt is built
    around them), lists of token ids, or `to_tokens`' Tokens. The readout is the embedding (L2-normalised
    last token) or the reranker's yes-no margin (sigmoid of it is P("yes")).
    """

    def __init__(self, model: Qwen3Model, tokenizer: TextTokenizer, *, reranker: RerankerPrompts | None = None,
                 max_length: int = DEFAULT_MAX_LENGTH, mesh: Mesh | None = None):
        self.model = model
        self.cfg = model.config
        self.tokenizer = tokenizer
        self.reranker = reranker
        self.max_length = max_length
        self.mesh = mesh
        self.hook_names = hook_names(self.cfg.num_hidden_layers)
        self._graphdef, self._state = nnx.split(model)
        # One compiled program per (hooks, recorded points, pattern window): hooks are part of the trace.
        self._run = jax.jit(functools.partial(_program, self._graphdef),
                            static_argnames=("hooks", "record", "pattern_window", "answers"))

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, reranker: bool = False, dtype: str = "float32",
                        mesh: Mesh | None = None, **kwargs) -> "HookedQwen3":
        """Loads a checkpoint folder or hub id as Qwen3Embedder (or Qwen3Reranker) does."""
        loader = Qwen3Reranker if reranker else Qwen3Embedder
        return cls.from_loaded(loader.from_pretrained(name_or_path, dtype=dtype, mesh=mesh, **kwargs))

    @classmethod
    def from_loaded(cls, loaded: Qwen3Embedder | Qwen3Reranker) -> "HookedQwen3":
        """The same model and parameters as a loaded Qwen3Embedder or Qwen3Reranker (nothing is copied)."""
        if isinstance(loaded, Qwen3Reranker):
            return cls(loaded.model, loaded.tokenizer, reranker=loaded.prompts, max_length=loaded.max_length,
                       mesh=loaded.runner.mesh)
        return cls(loaded.model, loaded.tokenizer, max_length=loaded.max_length, mesh=loaded.runner.mesh)

    def display(self, cache: ActivationCache | None = None) -> str:
        """The model's modules and parameters (or a cache of `run_with_cache`) rendered by treescope (the
        `study` extra): shown in a notebook, and returned as HTML anywhere."""
        require("study", "HookedQwen3.display")
        import treescope

        target = self.model if cache is None else dict(cache)
        shell = sys.modules.get("IPython")
        if shell is not None and shell.get_ipython() is not None:
            treescope.show(target)
        return treescope.render_to_html(target)

    def to_tokens(self, inputs, *, instruction: str | None = None) -> Tokens:
        """Tokens of texts (an embedder's; `instruction` formats them as queries) or (query, document)
        pairs (a reranker's; `instruction` None: the default), or of lists of token ids, right-padded."""
        if isinstance(inputs, Tokens):
            return inputs
        inputs = [inputs] if isinstance(inputs, (str, tuple)) else list(inputs)
        if not inputs:
            raise UsageError("give at least one text")
        if all(isinstance(x, (list, np.ndarray)) for x in inputs):
            rows = [list(map(int, x)) for x in inputs]
        elif self.reranker is not None:
            if not all(isinstance(x, tuple) and len(x) == 2 for x in inputs):
                raise UsageError("a reranker reads (query, document) pairs")
            rows = self.reranker.ids(inputs, instruction)
        else:
            if not all(isinstance(x, str) for x in inputs):
                raise UsageError("an embedder reads texts (strings)")
            prefix = "" if instruction is None else format_instruction(instruction)
            rows = self.tokenizer.encode([prefix + text for text in inputs], self.max_length)
        if min(map(len, rows)) == 0:
            raise UsageError("a list of token ids is empty")
        return Tokens(*pad_batch(rows, max(map(len, rows)), len(rows), self.tokenizer.end_of_text_id))

    def to_str_tokens(self, inputs, *, instruction: str | None = None) -> list[str] | list[list[str]]:
        """Each token as text (one list per input; a single input gives one list)."""
        tokens = self.to_tokens(inputs, instruction=instruction)
        decode = self.tokenizer.tokenizer.decode
        out = [[decode([int(i)], skip_special_tokens=False) for i in ids[mask]] for ids, mask in zip(*tokens)]
        return out[0] if isinstance(inputs, (str, tuple)) else out

    def _hook_table(self, fwd_hooks: Sequence[tuple[str, HookFn]]) -> tuple:
        table: dict[str, list[HookFn]] = {}
        for name, fn in fwd_hooks:
            if name not in self.hook_names:
                raise UsageError(f"{name!r} is not a hook point of this model (e.g. blocks.0.hook_resid_pre; "
                                 "HookedQwen3.hook_names lists them)")
            table.setdefault(name, []).append(fn)
        return tuple((name, tuple(fns)) for name, fns in table.items())

    def _names(self, names_filter) -> frozenset[str]:
        if names_filter is None:
            return frozenset(self.hook_names)
        if callable(names_filter):
            return frozenset(filter(names_filter, self.hook_names))
        names = [names_filter] if isinstance(names_filter, str) else list(names_filter)
        unknown = [n for n in names if n not in self.hook_names]
        if unknown:
            raise UsageError(f"{unknown[0]!r} is not a hook point of this model (HookedQwen3.hook_names lists them)")
        return frozenset(names)

    def _call(self, inputs, *, fwd_hooks=(), record=frozenset(), pattern_window=None, instruction=None):
        tokens = self.to_tokens(inputs, instruction=instruction)
        if pattern_window is not None:
            start, stop = pattern_window
            if not 0 <= start < stop <= tokens.ids.shape[1]:
                raise UsageError(f"pattern_window={pattern_window} must be (start, stop) with 0 <= start < stop <= "
                                 f"{tokens.ids.shape[1]} (the batch's length)")
            pattern_window = (int(start), int(stop))
        with self.on_devices():
            out, recorded = self._run(self._state, *self.place(tokens), hooks=self._hook_table(fwd_hooks),
                                      record=record, pattern_window=pattern_window, answers=self.answers)
        return out, ActivationCache({n: recorded[n] for n in self.hook_names if n in recorded}, tokens.mask)

    @property
    def answers(self) -> tuple[int, int] | None:
        """The ids of "no" and "yes" for a reranker's readout; None for an embedder."""
        return None if self.reranker is None else (self.reranker.no_id, self.reranker.yes_id)

    def on_devices(self):
        """The context runs happen in: this model's mesh, if it has one."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def place(self, tokens: Tokens) -> tuple[jax.Array, jax.Array]:
        """ids and mask on the devices (replicated over the mesh, if any)."""
        sharding = None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())
        return jax.device_put((tokens.ids, tokens.mask), sharding)

    def run_with_cache(self, inputs, *, names_filter: str | Sequence[str] | Callable[[str], bool] | None = None,
                       fwd_hooks: Sequence[tuple[str, HookFn]] = (), pattern_window: tuple[int, int] | None = None,
                       instruction: str | None = None) -> tuple[jax.Array, ActivationCache]:
        """(readout, cache of every hook point that `names_filter` keeps), after any `fwd_hooks`.

        A long text's whole pattern is T x T per head: `pattern_window=(start, stop)` keeps only those
        query rows (and computes nothing larger), or leave the patterns out with names_filter.
        """
        return self._call(inputs, fwd_hooks=fwd_hooks, record=self._names(names_filter),
                          pattern_window=pattern_window, instruction=instruction)

    def run_with_hooks(self, inputs, *, fwd_hooks: Sequence[tuple[str, HookFn]],
                       instruction: str | None = None) -> jax.Array:
        """The readout with each hook `fn(activation, hook) -> activation` applied at its point.

        Hooks are traced into the compiled program, which is kept per set of hook functions: pass the
        same function objects to run again without compiling again.
        """
        return self._call(inputs, fwd_hooks=fwd_hooks, instruction=instruction)[0]

    def __call__(self, inputs, *, instruction: str | None = None) -> jax.Array:
        """The readout with no hooks."""
        return self._call(inputs, instruction=instruction)[0]
