"""Attention to a shared prefix computed once: a text's own keys through the row's kernel, the prefix's
keys here, the two merged by their log-sum-exp.

Attention is causal, so the keys and values of a prefix (a prompt, an instruction, the reranker's
query) do not depend on the text after it: they are computed once (`Qwen3Model(...,
return_keys_values=True)`), kept in a table of prefixes [P, K, H] per layer, and every text that
begins with one attends to it beside its own tokens. Softmax over the union of two key sets is the
two softmaxes weighted by their totals: with each part's output o_i and log-sum-exp l_i,
out = sum_i o_i * exp(l_i - l), l = log(sum_i exp(l_i)). Exact, not an approximation; the kernels
are untouched (each returns its log-sum-exp beside its output).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from qwen3_jax.attention.masking import MASKED, group_queries
from qwen3_jax.numerics import einsum


class PrefixTable(NamedTuple):
    """The shared prefixes of a batch and which of their tokens each token of the batch sees.

    keys, values: [L, P, K, H] each layer's keys (normed, rotated at positions 0..) and values of the
    P table tokens; `entry` [P]: which prefix (1, 2, ...; 0 padding) each table token belongs to;
    `position` [P]: its position in that prefix; `text_entry` [B, T]: the prefix a token's text begins
    with (0: none); `offset` [B, T]: how many of that prefix's tokens come before the text's own (its
    own tokens' positions start there)."""

    keys: jax.Array
    values: jax.Array
    entry: jax.Array
    position: jax.Array
    text_entry: jax.Array
    offset: jax.Array

    def visible(self) -> jax.Array:
        """[B, T, P]: the table tokens each token of the batch attends to."""
        return ((self.entry[None, None, :] == self.text_entry[:, :, None]) & (self.text_entry[:, :, None] > 0)
                & (self.position[None, None, :] < self.offset[:, :, None]))


def prefix_attention(q: jax.Array, keys: jax.Array, values: jax.Array,
                     visible: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each query's attention to the table tokens it sees: q [B, T, N, H], keys and values [P, K, H],
    visible [B, T, P] -> float32 output [B, T, N, H] and log-sum-exp [B, T, N] (a query that sees none
    has a log-sum-exp of about MASKED, so merging gives it no weight)."""
    b, t, n, h = q.shape
    heads = keys.shape[1]
    # Key-value heads first, once: both products batch over them, and XLA's CPU products want their batch
    # axis leading (left in place, each product and the softmax between them transposed again: 17% of a
    # layer of short reranked documents, against 5% this way).
    qk = jnp.einsum("BTKGH->KBTGH", group_queries(q, heads))
    scores = einsum("KBTGH,PKH->KBTGP", qk, keys, preferred_element_type=jnp.float32) * h**-0.5
    scores = jnp.where(visible[None, :, :, None, :], scores, MASKED)
    top = scores.max(axis=-1, keepdims=True)
    probs = jnp.exp(scores - top)
    total = probs.sum(axis=-1, keepdims=True)
    out = einsum("KBTGP,PKH->KBTGH", probs.astype(values.dtype), values, preferred_element_type=jnp.float32)
    logsumexp = (top + jnp.log(total))[..., 0]
    return (jnp.einsum("KBTGH->BTKGH", out / total).reshape(b, t, n, h),
            jnp.einsum("KBTG->BTKG", logsumexp).reshape(b, t, n))


def merge_attention(parts: tuple[tuple[jax.Array, jax.Array], ...], dtype) -> jax.Array:
    """Attention over the union of disjoint key sets from each set's (output [B, T, N, H], log-sum-exp
    [B, T, N]): the outputs weighted by each set's share of the total, in `dtype`."""
    total = jax.nn.logsumexp(jnp.stack([logsumexp for _, logsumexp in parts]), axis=0)
    merged = sum(out.astype(jnp.float32) * jnp.exp(logsumexp - total)[..., None] for out, logsumexp in parts)
    return merged.astype(dtype)
