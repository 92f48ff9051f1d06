"""cuDNN's fused flash attention through `jax.nn.dot_product_attention`: one right-padded text a row."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *,
                    implementation: str | None = "cudnn") -> jax.Array:
    """`jax.nn.dot_product_attention`: cuDNN flash attention on GPU (None lets XLA choose).

    Uses cuDNN's causal-with-padding mask, so each row must hold one right-padded text: the
    runner does not pack rows for this implementation (see `packs_rows`).
    """
    lengths = (segments > 0).sum(axis=1).astype(jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                        key_value_seq_lengths=lengths, implementation=implementation)
