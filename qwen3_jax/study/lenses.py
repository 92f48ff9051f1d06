"""Lenses: each layer's residual stream read as if it were the last, through the final norm.

The logit lens goes on through the output projection (the tied embedding matrix of an embedding model,
which has no LM head); the reranker's lens keeps its two rows, "yes" and "no"; the embedder's lens takes
the last token's state as the embedding it would be.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qwen3_jax.checks import UsageError
from qwen3_jax.model import gather_tokens
from qwen3_jax.ops.rms_norm import rms_norm
from qwen3_jax.study.hooked import HookedQwen3, act_name


class LensTop(NamedTuple):
    """The logit lens's best tokens: ids, logits and probabilities [B, L, T, k], and the mask [B, T]."""

    ids: np.ndarray
    logits: np.ndarray
    probs: np.ndarray
    mask: np.ndarray


def layer_states(model: HookedQwen3, inputs, *, instruction: str | None = None) -> tuple[jax.Array, np.ndarray]:
    """Each layer's output through the final norm, [L, B, T, D] float32 (the last layer's is the final
    state), and the mask [B, T]."""
    names = [act_name("resid_post", layer) for layer in range(model.cfg.num_hidden_layers)]
    _, cache = model.run_with_cache(inputs, names_filter=names, instruction=instruction)
    final_norm = model.model.final_norm[...]
    states = jnp.stack([rms_norm(cache[name], final_norm, model.cfg.rms_norm_eps) for name in names])
    return states.astype(jnp.float32), cache.mask


def last_token_states(model: HookedQwen3, inputs, *, instruction: str | None = None) -> jax.Array:
    """layer_states at each input's last token, [B, L, D]."""
    states, mask = layer_states(model, inputs, instruction=instruction)
    last = jnp.asarray(mask.sum(axis=1) - 1)[:, None]
    return jnp.stack([gather_tokens(layer, last)[:, 0] for layer in states], axis=1)


def logit_lens(model: HookedQwen3, inputs, *, top_k: int = 5, instruction: str | None = None) -> LensTop:
    """The `top_k` tokens each layer would predict at every position (softmax over the whole vocabulary)."""
    if top_k < 1:
        raise UsageError(f"top_k={top_k} must be at least 1")
    states, mask = layer_states(model, inputs, instruction=instruction)
    table = model.model.output_rows(jnp.arange(model.cfg.vocab_size)).astype(jnp.float32)
    top = jax.jit(_top_tokens, static_argnums=2)
    ids, logits, probs = (np.moveaxis(np.asarray(a), 0, 1) for a in zip(*[top(layer, table, top_k) for layer in states]))
    return LensTop(ids, logits, probs, mask)


def _top_tokens(states: jax.Array, table: jax.Array, k: int):
    logits = jnp.einsum("BTD,VD->BTV", states, table, precision=jax.lax.Precision.HIGHEST)
    best, ids = jax.lax.top_k(logits, k)
    return ids, best, jnp.exp(best - jax.nn.logsumexp(logits, axis=-1, keepdims=True))


def yes_no_margins(model: HookedQwen3, pairs, *, instruction: str | None = None) -> np.ndarray:
    """A reranker's logit("yes") - logit("no") after every layer, [B, L] (the last column is its score's margin)."""
    if model.answers is None:
        raise UsageError("yes_no_margins needs a reranker (HookedQwen3.from_pretrained(..., reranker=True))")
    rows = model.model.output_rows(list(model.answers)).astype(jnp.float32)          # ("no", "yes")
    logits = jnp.einsum("BLD,AD->BLA", last_token_states(model, pairs, instruction=instruction), rows,
                        precision=jax.lax.Precision.HIGHEST)
    return np.asarray(logits[..., 1] - logits[..., 0])


def layer_embeddings(model: HookedQwen3, texts, *, instruction: str | None = None) -> np.ndarray:
    """The L2-normalised embedding each layer would give, [B, L, D] (the last is the model's)."""
    states = np.asarray(last_token_states(model, texts, instruction=instruction))
    return states / np.linalg.norm(states, axis=-1, keepdims=True)


def layer_cosines(model: HookedQwen3, texts, *, instruction: str | None = None) -> np.ndarray:
    """Each layer's embedding against the final embedding, cosine [B, L]."""
    vectors = layer_embeddings(model, texts, instruction=instruction)
    return np.einsum("BLD,BD->BL", vectors, vectors[:, -1])


def layer_scores(model: HookedQwen3, queries, documents, *, instruction: str | None = None) -> np.ndarray:
    """The query-document cosine each layer's embeddings would give, [L, queries, documents]; the
    instruction goes before the queries only."""
    q = layer_embeddings(model, queries, instruction=instruction)
    d = layer_embeddings(model, documents)
    return np.einsum("QLD,SLD->LQS", q, d)
