"""The model's matrix products (`project`), their gradients, and the hook that lets an adapter take over.

Products accumulate in float32; on the CPU, half-precision products leave the matrix unit in float32
and the gradients' operand order and layouts are chosen for XLA's CPU dot (see each function).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qwen3_jax.numerics import einsum

# The name a projection's output is saved under for remat's "dots" policy (`project` is a custom_vjp,
# opaque to the dot policies).
PROJECTION = "projection"
# A projection `name` of a module gains a low-rank adapter when the module has an attribute
# `name + ADAPTER_SUFFIX` (see qwen3_jax/train/lora.py); the model itself knows no adapter class.
ADAPTER_SUFFIX = "_lora"


def linear(module: nnx.Module, name: str, spec: str, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """The projection `module.<name>` of x; an attached adapter computes it with its own addition."""
    weight = getattr(module, name)[...]
    adapter = getattr(module, name + ADAPTER_SUFFIX, None)
    return checkpoint_name(project(spec, x, weight) if adapter is None else adapter(spec, x, weight, rng), PROJECTION)


def project(spec: str, x: jax.Array, weight: jax.Array) -> jax.Array:
    """`einsum(spec, x, weight)` in x's dtype. On the CPU, bf16 and fp16 products leave the matrix unit
    in float32 before the cast back: XLA's CPU backend has a fast bf16 x bf16 -> f32 kernel (AVX512-BF16,
    about 2x its bf16 -> bf16 rate); accelerators accumulate in float32 either way. The gradient is
    written out (see _project_bwd)."""
    return _project(spec, x, weight)


def _accumulation(dtype) -> jnp.dtype | None:
    return jnp.float32 if jax.default_backend() == "cpu" and dtype != jnp.float32 else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _project(spec: str, x: jax.Array, weight: jax.Array) -> jax.Array:
    return einsum(spec, x, weight.astype(x.dtype), preferred_element_type=_accumulation(x.dtype)).astype(x.dtype)


def _project_fwd(spec: str, x: jax.Array, weight: jax.Array):
    return _project(spec, x, weight), (x, weight)


def _project_bwd(spec: str, saved, d_out: jax.Array):
    """The two products of a projection's gradient (XLA drops the weight's where nothing reads it)."""
    x, weight = saved
    d_out = materialised(d_out)
    return input_gradient(spec, d_out, weight, x.dtype), weight_gradient(spec, x, d_out, weight.dtype)


_project.defvjp(_project_fwd, _project_bwd)


def materialised(d_out: jax.Array) -> jax.Array:
    """On the CPU a projection's incoming gradient is materialised first: left to itself, XLA fuses its
    producer (the SwiGLU or norm backward) into a transposing copy that writes with a stride, which took
    1.6 s of a 7 s training step of one 0.6B-width layer."""
    return jax.lax.optimization_barrier(d_out) if jax.default_backend() == "cpu" else d_out


def input_gradient(spec: str, d_out: jax.Array, weight: jax.Array, dtype) -> jax.Array:
    """d_out W^T in the input's layout and `dtype`."""
    inputs, out = spec.split("->")
    x_spec, w_spec = inputs.split(",")
    return einsum(f"{out},{w_spec}->{x_spec}", d_out, weight.astype(d_out.dtype),
                  preferred_element_type=_accumulation(d_out.dtype)).astype(dtype)


def weight_gradient(spec: str, x: jax.Array, d_out: jax.Array, dtype) -> jax.Array:
    """x^T d_out, summed over the tokens, in the weight's layout. XLA's CPU dots read their left operand
    with the summed axes last, so it is first copied transposed: there the smaller of x and d_out goes
    left and the product is laid out as the weight afterwards (a LoRA matrix's gradient, [input, R],
    transposed 40 MB of x for 160 KB of result, 77 ms for each projection at 10,240 tokens)."""
    inputs, out = spec.split("->")
    x_spec, w_spec = inputs.split(",")
    if jax.default_backend() != "cpu":
        return einsum(f"{x_spec},{out}->{w_spec}", x, d_out, preferred_element_type=jnp.float32).astype(dtype)
    # XLA's CPU dot has no bf16 x bf16 -> f32 kernel for a product summed over the tokens (its leading
    # axes); there it takes float32 operands.
    x, d_out = x.astype(jnp.float32), d_out.astype(jnp.float32)
    if x.size <= d_out.size:
        return einsum(f"{x_spec},{out}->{w_spec}", x, d_out).astype(dtype)
    swapped = "".join(sorted(w_spec, key=lambda letter: letter in x_spec))     # d_out's letters first
    product = einsum(f"{out},{x_spec}->{swapped}", d_out, x, preferred_element_type=jnp.float32)
    return jnp.einsum(f"{swapped}->{w_spec}", product).astype(dtype)
