"""What every attention kernel shares: the layout of packed rows (segments, positions) and the mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def positions_from_segments(segments: jax.Array) -> jax.Array:
    """0..n-1 within each text of a row (texts may be packed; padding may sit on either side)."""
    index = jnp.arange(segments.shape[1])
    starts = jnp.concatenate([jnp.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def group_queries(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """[B, T, N, ...] -> [B, T, K, G, ...]: query head j*G + g is served by kv head j."""
    b, t, n = q.shape[:3]
    return q.reshape(b, t, num_kv_heads, n // num_kv_heads, *q.shape[3:])


def heads_first(q: jax.Array, k: jax.Array, v: jax.Array):
    """q [B, K, G, T, H] and k, v [B, K, T, H]: each kv head's work is one batched matrix product."""
    qg = jnp.einsum("BTKGH->BKGTH", group_queries(q, k.shape[2]))
    return qg, jnp.einsum("BTKH->BKTH", k), jnp.einsum("BTKH->BKTH", v)


def segment_mask(q_segments, k_segments, q_pos, k_pos) -> jax.Array:
    """[B, Q, S]: same text, key not padding, key not after the query (positions [Q] or [B, Q])."""
    same = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] > 0)
    return same & (q_pos[..., :, None] >= k_pos[None, :])
