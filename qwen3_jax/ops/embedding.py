"""The token-embedding lookup, with a gradient that allocates the table only when it is filled."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def zero_after(gradient) -> jax.Array:
    """A zero computed from (the first leaf of) an incoming gradient: XLA cannot schedule what is made
    of it before that gradient exists."""
    return jax.tree.leaves(gradient)[0].reshape(-1)[0] * 0


@jax.custom_vjp
def embed_tokens(table: jax.Array, ids: jax.Array) -> jax.Array:
    """The rows of `table` [V, D] at the token ids [...]: [..., D].

    Its gradient adds the rows' gradients into a table of zeros made from the incoming gradient: a
    plain gather's zeros depend on nothing, so XLA allocates them as the backward pass begins and a
    table-sized buffer sits beside every layer's backward (docs/design/gradients.md).
    """
    return table[ids]


def _embed_tokens_fwd(table: jax.Array, ids: jax.Array):
    return table[ids], (table, ids)


def _embed_tokens_bwd(saved, d_out: jax.Array):
    table, ids = saved
    zeros = jnp.broadcast_to(zero_after(d_out).astype(table.dtype), table.shape)
    return zeros.at[ids].add(d_out.astype(table.dtype)), None


embed_tokens.defvjp(_embed_tokens_fwd, _embed_tokens_bwd)
