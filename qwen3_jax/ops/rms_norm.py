"""RMSNorm with its gradient written out."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qwen3_jax.numerics import einsum


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as Qwen3 computes it: normalise in float32, cast back, then scale by the weight."""
    return _rms_norm(x, weight, eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return weight.astype(x.dtype) * (x32 * _inverse_rms(x32, eps)).astype(x.dtype)


def _inverse_rms(x32: jax.Array, eps: float) -> jax.Array:
    return jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def _rms_norm_fwd(x: jax.Array, weight: jax.Array, eps: float):
    return _rms_norm(x, weight, eps), (x, weight)


def _rms_norm_bwd(eps: float, saved, d_out: jax.Array):
    """In float32. The weight's gradient sums over all tokens at once (autodiff's sum kept the batch
    axis, a strided reduction on XLA's CPU; docs/design/gradients.md)."""
    x, weight = saved
    x32 = x.astype(jnp.float32)
    inv_rms = _inverse_rms(x32, eps)
    normed = x32 * inv_rms
    d_out = d_out.astype(jnp.float32)
    d_weight = einsum("TD,TD->D", d_out.reshape(-1, x.shape[-1]), normed.reshape(-1, x.shape[-1]))
    d_normed = d_out * weight.astype(jnp.float32)
    d_x = inv_rms * (d_normed - normed * jnp.mean(d_normed * normed, axis=-1, keepdims=True))
    return d_x.astype(x.dtype), d_weight.astype(weight.dtype)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)
