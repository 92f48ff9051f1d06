"""Causal self-attention behind one signature, with interchangeable implementations.

Shapes: q [B, T, N, H]; k, v [B, T, K, H] (K key/value heads, N = K * G query heads);
`valid` [B, T] marks real tokens. Padding may sit on either side: a query attends to the
valid keys at or before its own index. Rows of padding produce finite values that callers ignore.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "dense", "blockwise", "cudnn", "splash")
# Beyond this many tokens "auto" avoids materialising the T x T score matrix.
DENSE_MAX_TOKENS = 2048
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, *,
              impl: str = "auto", block_size: int = 512) -> jax.Array:
    """Causal GQA attention with a key-padding mask; `impl` picks the kernel (see IMPLEMENTATIONS)."""
    if impl == "auto":
        impl = choose_implementation(q.shape[1], q.dtype)
    if impl == "dense":
        return dense_attention(q, k, v, valid)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, valid, block_size=block_size)
    if impl == "cudnn":
        return fused_attention(q, k, v, valid, implementation="cudnn")
    if impl == "splash":
        from qwen3_jax.splash import splash_attention
        return splash_attention(q, k, v, valid)
    raise ValueError(f"attention impl={impl!r} is unknown; choose one of {', '.join(IMPLEMENTATIONS)}")


def choose_implementation(num_tokens: int, dtype) -> str:
    """The implementation that "auto" resolves to on the default backend for this length and dtype."""
    backend = jax.default_backend()
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if backend == "gpu" and half:
        return "cudnn"
    if backend == "tpu" and num_tokens % 128 == 0:
        return "splash"
    return "dense" if num_tokens <= DENSE_MAX_TOKENS else "blockwise"


def _group_queries(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """[B, T, N, H] -> [B, T, K, G, H]: query head j*G + g is served by kv head j."""
    b, t, n, h = q.shape
    return q.reshape(b, t, num_kv_heads, n // num_kv_heads, h)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array) -> jax.Array:
    """Reference attention: full score matrix, softmax in float32."""
    b, t, n, h = q.shape
    qg = _group_queries(q, k.shape[2])
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * h**-0.5
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    mask = causal[None, None, None] & valid[:, None, None, None, :]
    probs = jax.nn.softmax(jnp.where(mask, scores, _MASKED), axis=-1)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, *,
                        block_size: int = 512) -> jax.Array:
    """Memory-efficient attention: online softmax over key blocks, one query block at a time.

    Never holds more than a [B, N, block, block] score tile, and never visits key blocks that
    lie entirely after the query block (the causal mask hides them).
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    block = min(block_size, t)
    padded = -(-t // block) * block
    pad = [(0, 0), (0, padded - t), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    valid = jnp.pad(valid, [(0, 0), (0, padded - t)])
    num_blocks = padded // block
    q_blocks = _group_queries(q, kv_heads).reshape(b, num_blocks, block, kv_heads, n // kv_heads, h)
    scale = h**-0.5

    def one_query_block(i):
        qb = q_blocks[:, i]                                             # [B, Q, K, G, H]
        q_pos = i * block + jnp.arange(block)

        def visit(j, carry):
            running_max, denom, acc = carry
            kb = jax.lax.dynamic_slice_in_dim(k, j * block, block, axis=1)  # [B, S, K, H]
            vb = jax.lax.dynamic_slice_in_dim(v, j * block, block, axis=1)
            kb_valid = jax.lax.dynamic_slice_in_dim(valid, j * block, block, axis=1)
            k_pos = j * block + jnp.arange(block)
            scores = jnp.einsum("BQKGH,BSKH->BKGQS", qb, kb, preferred_element_type=jnp.float32) * scale
            mask = (q_pos[:, None] >= k_pos[None, :])[None, None, None] & kb_valid[:, None, None, None, :]
            scores = jnp.where(mask, scores, _MASKED)
            new_max = jnp.maximum(running_max, scores.max(axis=-1))
            probs = jnp.where(mask, jnp.exp(scores - new_max[..., None]), 0.0)
            correction = jnp.exp(running_max - new_max)
            denom = denom * correction + probs.sum(axis=-1)
            update = jnp.einsum("BKGQS,BSKH->BKGQH", probs.astype(vb.dtype), vb,
                                preferred_element_type=jnp.float32)
            return new_max, denom, acc * correction[..., None] + update

        stats_shape = (b, kv_heads, n // kv_heads, block)
        init = (jnp.full(stats_shape, _MASKED, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
                jnp.zeros(stats_shape + (h,), jnp.float32))
        _, denom, acc = jax.lax.fori_loop(0, i + 1, visit, init)
        out = acc / jnp.where(denom == 0, 1.0, denom)[..., None]       # [B, K, G, Q, H]
        return jnp.einsum("BKGQH->BQKGH", out).reshape(b, block, n, h)

    out = jax.lax.map(one_query_block, jnp.arange(num_blocks))         # [blocks, B, Q, N, H]
    out = jnp.einsum("bBQNH->BbQNH", out).reshape(b, padded, n, h)
    return out[:, :t].astype(q.dtype)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, *,
                    implementation: str | None = "cudnn") -> jax.Array:
    """`jax.nn.dot_product_attention` (cuDNN flash attention on GPU; None lets XLA choose)."""
    key_mask = valid[:, None, None, :]                                   # [B, 1, 1, S]
    return jax.nn.dot_product_attention(q, k, v, mask=key_mask, is_causal=True,
                                        implementation=implementation)
