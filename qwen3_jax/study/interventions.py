"""Interventions as forward hooks: ablating heads or neurons, steering the residual stream, and the
activation-patching sweep (a clean run's activations put into a corrupted run, one layer and position at
a time)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3_jax.checks import UsageError
from qwen3_jax.study.forward import HookFn, HookPoint, run_hooked
from qwen3_jax.study.hooked import HookedQwen3, act_name, readout

ABLATIONS = ("zero", "mean")
# Positions batched together in a patching sweep (memory: this many forward passes at once).
PATCH_BATCH = 8


@dataclass(frozen=True)
class Ablation:
    """A hook that replaces the entries `index` of an activation's axis `axis` with zero, or with their
    mean over the batch's real tokens. Equal ablations are equal hooks, so they share compiled programs."""

    axis: int
    index: tuple[int, ...]
    how: str

    def __call__(self, x: jax.Array, hook: HookPoint) -> jax.Array:
        chosen = jnp.zeros(x.shape[self.axis], bool).at[jnp.array(self.index)].set(True)
        chosen = chosen.reshape([-1 if a == self.axis % x.ndim else 1 for a in range(x.ndim)])
        if self.how == "zero":
            return jnp.where(chosen, jnp.zeros((), x.dtype), x)
        weight = hook.mask.reshape(hook.mask.shape + (1,) * (x.ndim - 2)).astype(jnp.float32)
        mean = (x.astype(jnp.float32) * weight).sum(axis=(0, 1)) / weight.sum()
        return jnp.where(chosen, mean.astype(x.dtype), x)


def _by_layer(pairs: Iterable[tuple[int, int]], how: str, num_layers: int, what: str) -> dict[int, tuple[int, ...]]:
    if how not in ABLATIONS:
        raise UsageError(f"how={how!r}: choose one of {', '.join(ABLATIONS)}")
    chosen: dict[int, set[int]] = {}
    for layer, index in pairs:
        if not 0 <= layer < num_layers:
            raise UsageError(f"layer {layer} is outside 0..{num_layers - 1}")
        chosen.setdefault(int(layer), set()).add(int(index))
    if not chosen:
        raise UsageError(f"name at least one (layer, {what}) to ablate")
    return {layer: tuple(sorted(indices)) for layer, indices in sorted(chosen.items())}


def ablate_heads(model: HookedQwen3, heads: Iterable[tuple[int, int]], how: str = "zero") -> list[tuple[str, HookFn]]:
    """fwd_hooks that ablate attention heads (layer, head): their outputs hook_z made zero or their mean."""
    layers = _by_layer(heads, how, model.cfg.num_hidden_layers, "head")
    if any(h >= model.cfg.num_attention_heads for hs in layers.values() for h in hs):
        raise UsageError(f"heads are numbered 0..{model.cfg.num_attention_heads - 1}")
    return [(act_name("z", layer), Ablation(2, index, how)) for layer, index in layers.items()]


def ablate_neurons(model: HookedQwen3, neurons: Iterable[tuple[int, int]], how: str = "zero") -> list[tuple[str, HookFn]]:
    """fwd_hooks that ablate MLP neurons (layer, index): their values in mlp.hook_post made zero or their mean."""
    layers = _by_layer(neurons, how, model.cfg.num_hidden_layers, "neuron")
    if any(i >= model.cfg.intermediate_size for index in layers.values() for i in index):
        raise UsageError(f"neurons are numbered 0..{model.cfg.intermediate_size - 1}")
    return [(act_name("post", layer), Ablation(-1, index, how)) for layer, index in layers.items()]


def steer(model: HookedQwen3, layer: int, vector, scale: float = 1.0) -> list[tuple[str, HookFn]]:
    """fwd_hooks that add `scale * vector` [D] to the residual stream entering `layer`, at every position."""
    vector = np.asarray(vector, np.float32)
    if vector.shape != (model.cfg.hidden_size,):
        raise UsageError(f"a steering vector has {model.cfg.hidden_size} values, not shape {vector.shape}")
    if not 0 <= layer < model.cfg.num_hidden_layers:
        raise UsageError(f"layer {layer} is outside 0..{model.cfg.num_hidden_layers - 1}")
    added = jnp.asarray(scale * vector)
    return [(act_name("resid_pre", layer), lambda x, hook: x + added.astype(x.dtype))]


def patching_sweep(model: HookedQwen3, clean, corrupted, *, kind: str = "resid_pre",
                   metric: Callable[[jax.Array], jax.Array] | None = None, instruction: str | None = None) -> np.ndarray:
    """metric [L, T] of the corrupted input's run with the clean input's activation `kind` (resid_pre,
    resid_mid, resid_post, attn_out, mlp_out, z, ...) put in at one layer and one position.

    clean and corrupted are one input each, of the same token count. `metric` maps a run's readout
    [1, ...] to a number; by default the embedding's cosine to the clean embedding, or the reranker's
    yes-no margin. One program is compiled for the sweep; positions run PATCH_BATCH at a time.
    """
    if kind == "pattern":
        raise UsageError("patch the pattern's effect through kind='z' (the heads' outputs)")
    clean, corrupted = model.to_tokens([clean], instruction=instruction), model.to_tokens([corrupted], instruction=instruction)
    if clean.ids.shape != corrupted.ids.shape:
        raise UsageError(f"clean and corrupted inputs have {clean.ids.shape[1]} and {corrupted.ids.shape[1]} tokens: "
                         "patching needs the same count")
    names = tuple(act_name(kind, layer) for layer in range(model.cfg.num_hidden_layers))
    clean_out, cache = model.run_with_cache(clean, names_filter=names)
    if metric is None:
        metric = (lambda out: out[0]) if model.answers else functools.partial(_cosine_to, jnp.asarray(clean_out[0]))
    sweep = jax.jit(functools.partial(_patched_runs, model._graphdef, names=names, answers=model.answers,
                                      metric=metric))
    clean_acts = jnp.stack([cache[name] for name in names])
    with model.on_devices():
        ids, mask = model.place(corrupted)
        rows = [sweep(model._state, ids, mask, clean_acts, layer) for layer in range(len(names))]
    return np.stack([np.asarray(row) for row in rows])


def _cosine_to(target: jax.Array, out: jax.Array) -> jax.Array:
    return out[0] @ target


def _patched_runs(graphdef, state, ids, mask, clean_acts, layer, *, names, answers, metric):
    """The metric of each position's patched run [T], at a (traced) layer: one program for all layers."""
    model = nnx.merge(graphdef, state)
    length = ids.shape[1]

    def run(position):
        def patch(x, hook):
            here = (names.index(hook.name) == layer) & (jnp.arange(length) == position)
            return jnp.where(here.reshape((1, length) + (1,) * (x.ndim - 2)), clean_acts[names.index(hook.name)], x)

        final, _ = run_hooked(model, ids, mask, {name: (patch,) for name in names})
        return metric(readout(model, final, mask, answers))

    return jax.lax.map(run, jnp.arange(length), batch_size=PATCH_BATCH)
