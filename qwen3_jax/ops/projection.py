"""The model's matrix products (`project`), their gradients, and the hook that lets an adapter take over.

Products accumulate in float32. Where the `Backend` says so (XLA's CPU compiler), half-precision
products leave the matrix unit in float32 and the gradients' operand order and layouts are chosen
for XLA's CPU dot (docs/design/numerics.md has the measurements).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qwen3_jax.backend import Backend
from qwen3_jax.numerics import einsum

# A projection's output is saved for remat under the name "projection/<weight name>" ("projection/wq",
# "projection/w_down", ...), so a policy chooses which to keep (`project` is a custom_vjp, opaque to
# JAX's dot policies).
PROJECTION = "projection"
# A projection `name` of a module gains a low-rank adapter when the module has an attribute
# `name + ADAPTER_SUFFIX` (see qwen3_jax/train/lora.py); the model itself knows no adapter class.
ADAPTER_SUFFIX = "_lora"


def linear(module: nnx.Module, name: str, spec: str, x: jax.Array, backend: Backend,
           rng: jax.Array | None = None) -> jax.Array:
    """The projection `module.<name>` of x; an attached adapter computes it with its own addition."""
    weight = getattr(module, name)[...]
    adapter = getattr(module, name + ADAPTER_SUFFIX, None)
    out = project(spec, x, weight, backend) if adapter is None else adapter(spec, x, weight, backend, rng)
    return checkpoint_name(out, projection_name(name))


def projection_name(name: str) -> str:
    """The remat name of the projection whose weight is `name` (see PROJECTION)."""
    return f"{PROJECTION}/{name}"


def project(spec: str, x: jax.Array, weight: jax.Array, backend: Backend) -> jax.Array:
    """`einsum(spec, x, weight)` in x's dtype, its gradient written out (see _project_bwd)."""
    return _project(spec, backend, x, weight)


def _accumulation(dtype, backend: Backend) -> jnp.dtype | None:
    """float32 for half-precision products where they should leave the matrix unit so (XLA's CPU
    backend has a fast bf16 x bf16 -> f32 kernel); accelerators accumulate in float32 either way."""
    return jnp.float32 if backend.half_products_in_float32 and dtype != jnp.float32 else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _project(spec: str, backend: Backend, x: jax.Array, weight: jax.Array) -> jax.Array:
    return einsum(spec, x, weight.astype(x.dtype), preferred_element_type=_accumulation(x.dtype, backend)).astype(x.dtype)


def _project_fwd(spec: str, backend: Backend, x: jax.Array, weight: jax.Array):
    return _project(spec, backend, x, weight), (x, weight)


def _project_bwd(spec: str, backend: Backend, saved, d_out: jax.Array):
    """The two products of a projection's gradient (XLA drops the weight's where nothing reads it)."""
    x, weight = saved
    d_out = materialised(d_out, backend)
    return (input_gradient(spec, d_out, weight, x.dtype, backend),
            weight_gradient(spec, x, d_out, weight.dtype, backend))


_project.defvjp(_project_fwd, _project_bwd)


def materialised(d_out: jax.Array, backend: Backend) -> jax.Array:
    """A projection's incoming gradient computed on its own first, where the backend asks: left to
    itself, XLA's CPU compiler fuses its producer (the SwiGLU or norm backward) into a transposing
    copy that writes with a stride."""
    return jax.lax.optimization_barrier(d_out) if backend.materialise_gradients else d_out


def input_gradient(spec: str, d_out: jax.Array, weight: jax.Array, dtype, backend: Backend) -> jax.Array:
    """d_out W^T in the input's layout and `dtype`."""
    inputs, out = spec.split("->")
    x_spec, w_spec = inputs.split(",")
    return einsum(f"{out},{w_spec}->{x_spec}", d_out, weight.astype(d_out.dtype),
                  preferred_element_type=_accumulation(d_out.dtype, backend)).astype(dtype)


def weight_gradient(spec: str, x: jax.Array, d_out: jax.Array, dtype, backend: Backend) -> jax.Array:
    """x^T d_out, summed over the tokens, in the weight's layout. Where the backend asks (XLA's CPU
    dot has no bf16 x bf16 -> f32 kernel for a product summed over its leading axes, and reads its left
    operand with the summed axes last, copying it transposed first), the operands are float32 and the
    smaller of x and d_out goes left, the product laid out as the weight afterwards."""
    inputs, out = spec.split("->")
    x_spec, w_spec = inputs.split(",")
    if not backend.weight_gradients_in_float32:
        return einsum(f"{x_spec},{out}->{w_spec}", x, d_out, preferred_element_type=jnp.float32).astype(dtype)
    x, d_out = x.astype(jnp.float32), d_out.astype(jnp.float32)
    if x.size <= d_out.size:
        return einsum(f"{x_spec},{out}->{w_spec}", x, d_out).astype(dtype)
    swapped = "".join(sorted(w_spec, key=lambda letter: letter in x_spec))     # d_out's letters first
    product = einsum(f"{out},{x_spec}->{swapped}", d_out, x, preferred_element_type=jnp.float32)
    return jnp.einsum(f"{swapped}->{w_spec}", product).astype(dtype)
