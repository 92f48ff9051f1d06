"""How the matrix products of the model, attention and losses round."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def precision(*operands: jax.Array) -> jax.lax.Precision | None:
    """HIGHEST where every operand is float32: left to their default, GPUs round float32 products to
    TF32 and TPUs to one bf16 pass, so float32 would not match PyTorch's float32, which rounds neither
    (the CPU computes float32 either way). None, the backend's fast default, for bf16 and fp16."""
    return jax.lax.Precision.HIGHEST if all(x.dtype == jnp.float32 for x in operands) else None


def einsum(spec: str, *operands: jax.Array, **kwargs) -> jax.Array:
    """`jnp.einsum` at the precision its operands call for (see `precision`)."""
    return jnp.einsum(spec, *operands, precision=precision(*operands), **kwargs)
