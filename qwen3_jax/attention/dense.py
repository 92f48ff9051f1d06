"""Dense attention: the full score matrix of a row (the reference every kernel is tested against), and
the attention of a few chosen queries (a pooled forward pass's last layer)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen3_jax.attention.masking import MASKED, group_queries, heads_first, segment_mask
from qwen3_jax.numerics import einsum


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array) -> jax.Array:
    """Reference attention: the full score matrix, softmax statistics in float32."""
    return dense_attention_with_logsumexp(q, k, v, segments)[0]


def dense_attention_with_logsumexp(q: jax.Array, k: jax.Array, v: jax.Array,
                                   segments: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`dense_attention` and each query's log-sum-exp of its scores, float32 [B, T, N]."""
    b, t, n, h = q.shape
    qg, kt, vt = heads_first(q, k, v)
    positions = jnp.arange(t)
    bias = jnp.where(segment_mask(segments, segments, positions, positions), 0.0, MASKED)[:, None, None]
    scores = einsum("BKGTH,BKSH->BKGTS", qg, kt, preferred_element_type=jnp.float32) * h**-0.5 + bias
    top = scores.max(axis=-1, keepdims=True)
    probs = jnp.exp(scores - top)
    total = probs.sum(axis=-1, keepdims=True)
    out = einsum("BKGTS,BKSH->BKGTH", probs.astype(v.dtype), vt, preferred_element_type=jnp.float32)
    out = out / total                                                  # normalise after the product
    logsumexp = jnp.einsum("BKGT->BTKG", (top + jnp.log(total))[..., 0]).reshape(b, t, n)
    return jnp.einsum("BKGTH->BTKGH", out).reshape(b, t, n, h).astype(q.dtype), logsumexp


def attention_at(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, at: jax.Array) -> jax.Array:
    """Causal GQA attention of the queries at positions `at` [B, S] alone: q [B, S, N, H] holds those
    positions' queries, k and v [B, T, K, H] every key -> [B, S, N, H]. A pooled forward pass needs
    nothing else from its last layer, and the scores [B, K, G, S, T] stay small (S texts a row), so
    every backend takes them dense."""
    qg = group_queries(q, k.shape[2])                                   # [B, S, K, G, H]
    q_segments = jnp.take_along_axis(segments, at, axis=1)
    mask = segment_mask(q_segments, segments, at, jnp.arange(k.shape[1]))[:, None, None]   # [B, 1, 1, S, T]
    scores = einsum("BSKGH,BTKH->BKGST", qg, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    probs = jax.nn.softmax(jnp.where(mask, scores, MASKED), axis=-1)
    out = einsum("BKGST,BTKH->BSKGH", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(q.shape).astype(q.dtype)
