"""Pallas splash attention (TPU): segment ids keep packed texts apart."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen3_jax.attention.masking import group_queries


SPLASH_BLOCK = 128


def _splash_kernel(num_groups: int, length: int, interpret: bool, save_residuals: bool = False):
    """The MQA kernel for one kv head's G query heads, forward and backward blocks alike (with
    `save_residuals`, the forward pass alone, returning each query's log-sum-exp too). Made anew in
    each trace: a kernel kept from another trace carries that trace's mask arrays into this one."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    mask = masks.MultiHeadMask([masks.CausalMask((length, length))] * num_groups)
    block = min(SPLASH_BLOCK, length)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret,
                                  save_residuals=save_residuals)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *,
                     interpret: bool = False) -> jax.Array:
    """Pallas splash attention (TPU; `interpret=True` runs it anywhere): one MQA kernel per kv head."""
    return _splash(q, k, v, segments, interpret, save_residuals=False)


def splash_attention_with_logsumexp(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *,
                                    interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """`splash_attention`'s output and each query's log-sum-exp of its scores, float32 [B, T, N]
    (inference: no gradient)."""
    return _splash(q, k, v, segments, interpret, save_residuals=True)


def _splash(q, k, v, segments, interpret: bool, *, save_residuals: bool):
    """The rows padded to whole blocks, one kernel call per kv head, cut back (see the two callers)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    padded = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK
    pad = [(0, 0), (0, padded - t), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(x, pad) for x in (q * jnp.asarray(h**-0.5, q.dtype), k, v))
    segments = jnp.pad(segments, [(0, 0), (0, padded - t)])
    kernel = _splash_kernel(n // kv_heads, padded, interpret, save_residuals)
    qg = jnp.einsum("BTKGH->BKGTH", group_queries(q, kv_heads))
    kg, vg = jnp.einsum("BTKH->BKTH", k), jnp.einsum("BTKH->BKTH", v)

    def one(q_heads, k_head, v_head, seg):
        return kernel(q_heads, k_head, v_head, segment_ids=splash.SegmentIds(q=seg, kv=seg))

    per_kv_head = jax.vmap(one, in_axes=(0, 0, 0, None))
    result = jax.vmap(per_kv_head)(qg, kg, vg, segments)                 # [B, K, G, T, H]
    out, residuals = result if save_residuals else (result, None)
    out = jnp.einsum("BKGTH->BTKGH", out).reshape(b, padded, n, h)[:, :t].astype(q.dtype)
    if not save_residuals:
        return out
    (logsumexp,) = residuals                                              # [B, K, G, T]
    return out, jnp.einsum("BKGT->BTKG", logsumexp).reshape(b, padded, n)[:, :t].astype(jnp.float32)
