"""The inference forward pass run one compiled layer at a time over per-layer views of the weights,
for XLA's CPU compiler.

The model keeps each weight of its decoder layers in one [L, ...] stack, and its forward pass scans
the layers, each step slicing its layer out of the stacks. XLA's CPU compiler copies those slices before
the products read them: for a lone short query the copy costs about as much as the products, which
only read each weight once (docs/design/numerics.md). Here each layer's weights are views of the stacks
(their own memory on the CPU: nothing is copied, and the stacks stay the only layout that conversion,
sharding and training know), and one compiled program, a layer, is called once a layer from Python, so
compile time does not grow with depth. The results are the scanned pass's: the same layer, the same
products.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3_jax.model import Qwen3Model


def layer_views(stacked: jax.Array | np.ndarray, device: jax.Device | None = None) -> list[jax.Array]:
    """The [L, ...] array `stacked` of one CPU device (or a host array, put on `device`) as L arrays that
    share its memory."""
    host = np.asarray(stacked)                  # the array's own memory (read-only), not a copy
    device = device or next(iter(stacked.devices()))
    return [jax.device_put(host[i], device, may_alias=True) for i in range(len(host))]


def _per_layer(layer_state) -> list:
    """The stacked layer state of `nnx.split(model.layers)` as one state a layer, of views."""
    leaves, treedef = jax.tree.flatten(layer_state)
    views = [layer_views(leaf) for leaf in leaves]
    return [treedef.unflatten([v[i] for v in views]) for i in range(len(views[0]))]


def _placement(prefix):
    """A prefix table without its keys and values (each layer gets its own; the inputs need the rest)."""
    return None if prefix is None else prefix._replace(keys=None, values=None)


class Dropped(Exception):
    """A pass stopped between two layers: nobody waits for its result any more."""


class LayerByLayer:
    """`Qwen3Model(ids, segments, at=ends, prefix=...)` as float32, one layer at a time (see the module's text)."""

    def __init__(self, model: Qwen3Model):
        graphdef, _ = nnx.split(model)
        layer_graphdef, _ = nnx.split(model.layers)
        self._inputs = jax.jit(lambda state, ids, segments, prefix:
                               nnx.merge(graphdef, state).inputs(ids, segments, prefix))
        self._layer = jax.jit(lambda state, x, context, prefix:
                              model.apply_layer(layer_graphdef, state, x, context, prefix=prefix))
        self._outputs = jax.jit(lambda state, x, at: nnx.merge(graphdef, state).outputs(x, at).astype(jnp.float32))
        self._layer_keys_values = jax.jit(lambda state, x, context:
                                          model.apply_layer(layer_graphdef, state, x, context, keys_values=True))
        self.use(model)

    def use(self, model: Qwen3Model) -> None:
        """Runs `model`'s parameter values from now on (the same architecture)."""
        self._state = nnx.state(model)
        self._layers = _per_layer(nnx.state(model.layers))

    def views(self, host: np.ndarray) -> list[jax.Array]:
        """A host array [L, ...] (a prefix table's keys or values) as a view a layer on the weights' device."""
        return layer_views(host, next(iter(jax.tree.leaves(self._layers[0])[0].devices())))

    @property
    def compiled_programs(self) -> int:
        """How many batch shapes the jitted passes have compiled (the last program of each has one per shape)."""
        return self._outputs._cache_size() + self._layer_keys_values._cache_size()

    def __call__(self, ids: jax.Array, segments: jax.Array, ends: jax.Array, *, prefix=None,
                 stop: Callable[[], bool] | None = None) -> jax.Array:
        return self._run(self._inputs, self._layer, self._outputs, ids, segments, ends, prefix=prefix, stop=stop)

    def _run(self, inputs: Callable, layer: Callable, outputs: Callable, ids, segments, ends, *, prefix=None,
             stop: Callable[[], bool] | None = None) -> jax.Array:
        """The pass; with `stop`, each layer is waited for and the pass raises Dropped after the first
        layer at whose end `stop()` is true (a long text whose client has gone)."""
        x, context = inputs(self._state, ids, segments, _placement(prefix))
        per_layer = [None] * len(self._layers) if prefix is None else list(zip(prefix.keys, prefix.values))
        for number, (layer_state, layer_prefix) in enumerate(zip(self._layers, per_layer), 1):
            x = layer(layer_state, x, context, layer_prefix)
            if stop is not None:
                x.block_until_ready()
                if stop():
                    raise Dropped(f"the pass was dropped after layer {number} of {len(self._layers)}")
        return outputs(self._state, x, ends)

    def keys_values(self, ids: jax.Array, segments: jax.Array, programs: tuple | None = None) -> tuple[list, list]:
        """Each layer's keys and values [B, T, K, H] (what a prefix table holds): `Qwen3Model(...,
        return_keys_values=True)` a layer at a time; `programs` from `compile_keys_values`, or jitted."""
        inputs, layer = programs or (self._inputs, self._layer_keys_values)
        x, context = inputs(self._state, ids, segments, None)
        keys, values = [], []
        for layer_state in self._layers:
            x, (layer_keys, layer_values) = layer(layer_state, x, context)
            keys.append(layer_keys)
            values.append(layer_values)
        return keys, values

    def compile_keys_values(self, ids: jax.ShapeDtypeStruct, segments: jax.ShapeDtypeStruct) -> tuple:
        """`keys_values`' programs compiled now for arrays of these shapes."""
        x, context = jax.eval_shape(self._inputs, self._state, ids, segments, None)
        return (self._inputs.lower(self._state, ids, segments, None).compile(),
                self._layer_keys_values.lower(self._layers[0], x, context).compile())

    def compile(self, ids: jax.ShapeDtypeStruct, segments: jax.ShapeDtypeStruct,
                ends: jax.ShapeDtypeStruct, prefix=None) -> Callable:
        """The pass compiled now for arrays of these shapes (and a prefix table of these shapes, or
        none): a function of (ids, segments, ends, prefix)."""
        inputs = self._inputs.lower(self._state, ids, segments, _placement(prefix)).compile()
        x, context = jax.eval_shape(self._inputs, self._state, ids, segments, _placement(prefix))
        layer_prefix = None if prefix is None else tuple(
            jax.ShapeDtypeStruct(a.shape[1:], a.dtype) for a in (prefix.keys, prefix.values))
        layer = self._layer.lower(self._layers[0], x, context, layer_prefix).compile()
        outputs = self._outputs.lower(self._state, x, ends).compile()
        return functools.partial(self._run, inputs, layer, outputs)
