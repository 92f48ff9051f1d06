"""Training losses on embeddings and reranker logits: pure functions of arrays, testable without a model.

Dimension letters: Q queries, C documents per query (the positive first, then hard negatives), D width.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from qwen3_jax.numerics import einsum

_EXCLUDED = -jnp.inf


def normalize(x: jax.Array) -> jax.Array:
    """Rows scaled to unit length (cosine similarity is then a dot product), computed in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def infonce(queries: jax.Array, documents: jax.Array, document_mask: jax.Array, *, temperature: float,
            use_batch: bool = True, include_qq: bool = False, include_dd: bool = False,
            false_negative_margin: float | None = None) -> tuple[jax.Array, dict]:
    """The InfoNCE of the Qwen3-Embedding report as ms-swift computes it (`--loss_type infonce`).

    queries [Q, D]; documents [Q, C, D], each query's positive at index 0 and its hard negatives after
    it; document_mask [Q, C] marks the documents that exist (any number of negatives, none too).
    Similarities are cosines divided by `temperature`. Each query scores its positive against:
    - every document of the batch (`use_batch`, ms-swift's INFONCE_USE_BATCH), else its own only;
    - `include_qq`: the other queries (INFONCE_INCLUDE_QQ);
    - `include_dd`: its positive against every other document (INFONCE_INCLUDE_DD);
    - `false_negative_margin`: a query-document or query-query similarity above the positive's plus
      the margin is left out as a likely false negative (INFONCE_MASK_FAKE_NEGATIVE, margin 0.1).
    Returns the mean cross-entropy over queries and metrics (mean positive / negative cosine, accuracy).
    """
    num_queries, per_query, _ = documents.shape
    if queries.shape[0] != num_queries or document_mask.shape != (num_queries, per_query):
        raise ValueError(f"queries {queries.shape}, documents {documents.shape} and mask {document_mask.shape} "
                         "do not fit together: documents must be [Q, C, D] and the mask [Q, C]")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be positive")
    if not use_batch and (include_qq or include_dd):
        raise ValueError("include_qq and include_dd compare across the batch; they need use_batch=True")
    q = normalize(queries)
    docs = normalize(documents).reshape(num_queries * per_query, -1)
    valid = document_mask.reshape(-1)
    row = jnp.arange(num_queries)
    target = row * per_query
    own = (jnp.arange(num_queries * per_query) // per_query)[None, :] == row[:, None]
    qd = einsum("QD,ND->QN", q, docs)
    candidates = valid[None, :] & (own | use_batch)
    positive = qd[row, target]
    threshold = jax.lax.stop_gradient(positive)[:, None] + (false_negative_margin or 0.0)
    blocks = [jnp.where(candidates & ~_above(qd, threshold, false_negative_margin, target), qd, _EXCLUDED)]
    if include_qq:
        qq = einsum("QD,PD->QP", q, q)
        others = ~jnp.eye(num_queries, dtype=bool)
        blocks.append(jnp.where(others & ~_above(qq, threshold, false_negative_margin), qq, _EXCLUDED))
    if include_dd:
        dd = einsum("QD,ND->QN", docs[target], docs)
        not_itself = jnp.arange(num_queries * per_query)[None, :] != target[:, None]
        blocks.append(jnp.where(valid[None, :] & not_itself, dd, _EXCLUDED))
    logits = jnp.concatenate(blocks, axis=1) / temperature
    loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[row, target])
    negatives = candidates & (jnp.arange(num_queries * per_query)[None, :] != target[:, None])
    metrics = {
        "loss": loss,
        "mean_positive": jnp.mean(positive),
        "mean_negative": jnp.sum(jnp.where(negatives, qd, 0.0)) / jnp.maximum(negatives.sum(), 1),
        "accuracy": jnp.mean(jnp.argmax(jnp.where(candidates, qd, _EXCLUDED), axis=1) == target),
    }
    return loss, metrics


def _above(similarity: jax.Array, threshold: jax.Array, margin: float | None, keep=None) -> jax.Array:
    """Where a similarity exceeds the positive's plus the margin (never the positive itself)."""
    if margin is None:
        return jnp.zeros(similarity.shape, bool)
    above = similarity > threshold
    if keep is not None:
        above = above.at[jnp.arange(similarity.shape[0]), keep].set(False)
    return above


def matryoshka(loss: Callable[..., tuple[jax.Array, dict]], queries: jax.Array, documents: jax.Array,
               *args, dims: Sequence[int], weights: Sequence[float] | None = None,
               **kwargs) -> tuple[jax.Array, dict]:
    """`loss` summed over truncations of the embeddings to each of `dims` (weighted, default 1 each), as
    sentence-transformers' MatryoshkaLoss: the first d values of each vector, renormalised by the loss."""
    weights = [1.0] * len(dims) if weights is None else list(weights)
    if len(weights) != len(dims):
        raise ValueError(f"{len(dims)} matryoshka dims but {len(weights)} weights")
    width = queries.shape[-1]
    for dim in dims:
        if not 0 < dim <= width:
            raise ValueError(f"matryoshka dim {dim} is outside 1..{width}")
    total, metrics = 0.0, {}
    for dim, weight in zip(dims, weights):
        value, parts = loss(queries[..., :dim], documents[..., :dim], *args, **kwargs)
        total = total + weight * value
        metrics.update({f"{name}@{dim}": v for name, v in parts.items()})
    metrics["loss"] = total
    return total, metrics


def reranker_loss(answer_logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
    """The pointwise yes/no loss of Qwen3-Reranker: cross-entropy of softmax([logit("no"), logit("yes")])
    against the label (1 relevant, 0 not). answer_logits [n, 2] in that order; labels [n]."""
    log_probs = jax.nn.log_softmax(answer_logits.astype(jnp.float32), axis=-1)
    labels = labels.astype(jnp.int32)
    loss = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))
    accuracy = jnp.mean(jnp.argmax(log_probs, axis=-1) == labels)
    return loss, {"loss": loss, "accuracy": accuracy, "mean_p_yes": jnp.mean(jnp.exp(log_probs[:, 1]))}
