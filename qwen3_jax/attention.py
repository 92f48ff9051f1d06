"""Causal self-attention behind one signature, with interchangeable implementations.

Shapes: q [B, T, N, H]; k, v [B, T, K, H] (K key/value heads, N = K * G query heads);
`segments` [B, T] int32: 0 marks padding, equal positive ids mark the tokens of one text. Several
texts may be packed into one row; a token attends to the earlier tokens of its own text only.
Padding may sit on either side. Padding rows produce finite values that callers ignore.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qwen3_jax.sharding import BATCH_AXIS

IMPLEMENTATIONS = ("auto", "dense", "blockwise", "cudnn", "splash")
# Up to this many tokens "auto" uses the dense kernel on CPU; beyond, causal block skipping pays.
DENSE_MAX_TOKENS = 256
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
# The row length at which packs_rows asks "auto" what it would choose.
PACKED_ROW_HINT = 512


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *,
              impl: str = "auto", block_size: int | None = None, interpret: bool = False) -> jax.Array:
    """Causal GQA attention within segments; `impl` picks the kernel (see IMPLEMENTATIONS)."""
    if impl == "auto":
        impl = choose_implementation(q.shape[1], q.dtype)
    if impl in ("dense", "blockwise"):
        kernel = dense_attention if impl == "dense" else \
            functools.partial(blockwise_attention, block_size=block_size or default_block(q.shape[1]))
        return row_by_row(kernel, q, k, v, segments, rows_per_step=default_rows_per_step())
    if impl == "cudnn":
        return fused_attention(q, k, v, segments, implementation="cudnn")
    if impl == "splash":
        return splash_attention(q, k, v, segments, interpret=interpret)
    raise ValueError(f"attention impl={impl!r} is unknown; choose one of {', '.join(IMPLEMENTATIONS)}")


def choose_implementation(num_tokens: int, dtype) -> str:
    """The implementation that "auto" resolves to on the default backend for this length and dtype."""
    backend = jax.default_backend()
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if backend == "tpu" and num_tokens % 128 == 0:
        return "splash"
    if backend == "gpu" and num_tokens <= 4096:
        return "dense"
    return "dense" if num_tokens <= DENSE_MAX_TOKENS else "blockwise"


def default_rows_per_step() -> int | None:
    """How many rows the XLA kernels compute together: all at once on accelerators (None); on the
    CPU one row per data shard at a time, so a row's scores stay in cache between the two products
    and the softmax (1.3-2x faster there). The data-shard count comes from the mesh set with
    `jax.set_mesh`, so each device loops over its own rows."""
    if jax.default_backend() != "cpu":
        return None
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else mesh.shape.get(BATCH_AXIS, 1)


def default_block(num_tokens: int) -> int:
    """Key/query block of the blockwise kernel: two blocks for short rows, 256 or 512 beyond."""
    if num_tokens < 512:
        return -(-num_tokens // 16) * 8
    return 256 if num_tokens <= 4096 else 512


def row_by_row(kernel, q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *,
               rows_per_step: int | None) -> jax.Array:
    """`kernel` on `rows_per_step` rows at a time (a loop over the rest), or on all rows when None.

    The loop runs over the second factor of rows = [rows_per_step, steps], so rows split over data
    shards stay on their device.
    """
    b = q.shape[0]
    if rows_per_step is None or rows_per_step >= b or b % rows_per_step:
        return kernel(q, k, v, segments)
    to_steps = lambda x: jnp.swapaxes(x.reshape(rows_per_step, b // rows_per_step, *x.shape[1:]), 0, 1)
    out = jax.lax.map(lambda xs: kernel(*xs), tuple(to_steps(x) for x in (q, k, v, segments)))
    return jnp.swapaxes(out, 0, 1).reshape(q.shape)


def _group_queries(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """[B, T, N, H] -> [B, T, K, G, H]: query head j*G + g is served by kv head j."""
    b, t, n, h = q.shape
    return q.reshape(b, t, num_kv_heads, n // num_kv_heads, h)


def _heads_first(q: jax.Array, k: jax.Array, v: jax.Array):
    """q [B, K, G, T, H] and k, v [B, K, T, H]: each kv head's work is one batched matrix product."""
    qg = jnp.einsum("BTKGH->BKGTH", _group_queries(q, k.shape[2]))
    return qg, jnp.einsum("BTKH->BKTH", k), jnp.einsum("BTKH->BKTH", v)


def _mask(q_segments, k_segments, q_pos, k_pos) -> jax.Array:
    """[B, Q, S]: same text, key not padding, key not after the query."""
    same = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] > 0)
    return same & (q_pos[:, None] >= k_pos[None, :])[None]


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array) -> jax.Array:
    """Reference attention: the full score matrix, softmax statistics in float32."""
    b, t, n, h = q.shape
    qg, kt, vt = _heads_first(q, k, v)
    positions = jnp.arange(t)
    bias = jnp.where(_mask(segments, segments, positions, positions), 0.0, _MASKED)[:, None, None]
    scores = jnp.einsum("BKGTH,BKSH->BKGTS", qg, kt, preferred_element_type=jnp.float32) * h**-0.5 + bias
    probs = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
    out = jnp.einsum("BKGTS,BKSH->BKGTH", probs.astype(v.dtype), vt, preferred_element_type=jnp.float32)
    out = out / probs.sum(axis=-1, keepdims=True)                      # normalise after the product
    return jnp.einsum("BKGTH->BTKGH", out).reshape(b, t, n, h).astype(q.dtype)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *,
                        block_size: int = 256) -> jax.Array:
    """Memory-efficient attention: online softmax over key blocks, one query block at a time.

    Never holds more than a [B, N, block, block] score tile, and skips the key blocks that lie
    entirely after the query block (the causal mask hides them). Differentiable (scan and cond only),
    so it serves fine-tuning as well as inference.
    """
    b, t, n, h = q.shape
    block = min(block_size, t)
    padded = -(-t // block) * block
    pad = [(0, 0), (0, padded - t), (0, 0), (0, 0)]
    qg, kt, vt = _heads_first(*(jnp.pad(x, pad) for x in (q, k, v)))  # [B, K, G, T, H], [B, K, T, H]
    segments = jnp.pad(segments, [(0, 0), (0, padded - t)])
    scale = h**-0.5

    def one_query_block(i):
        qb = jax.lax.dynamic_slice_in_dim(qg, i * block, block, axis=3)     # [B, K, G, Q, H]
        q_seg = jax.lax.dynamic_slice_in_dim(segments, i * block, block, axis=1)
        q_pos = i * block + jnp.arange(block)

        def visit(carry, j):
            running_max, denom, acc = carry
            kb = jax.lax.dynamic_slice_in_dim(kt, j * block, block, axis=2)  # [B, K, S, H]
            vb = jax.lax.dynamic_slice_in_dim(vt, j * block, block, axis=2)
            k_seg = jax.lax.dynamic_slice_in_dim(segments, j * block, block, axis=1)
            mask = _mask(q_seg, k_seg, q_pos, j * block + jnp.arange(block))[:, None, None]
            scores = jnp.einsum("BKGQH,BKSH->BKGQS", qb, kb, preferred_element_type=jnp.float32) * scale
            scores = jnp.where(mask, scores, _MASKED)
            new_max = jnp.maximum(running_max, scores.max(axis=-1))
            probs = jnp.where(mask, jnp.exp(scores - new_max[..., None]), 0.0)
            correction = jnp.exp(running_max - new_max)
            denom = denom * correction + probs.sum(axis=-1)
            update = jnp.einsum("BKGQS,BKSH->BKGQH", probs.astype(vb.dtype), vb,
                                preferred_element_type=jnp.float32)
            return new_max, denom, acc * correction[..., None] + update

        def step(carry, j):                     # key blocks after the query block are skipped, not masked
            return jax.lax.cond(j <= i, visit, lambda c, _: c, carry, j), None

        stats_shape = qb.shape[:-1]
        init = (jnp.full(stats_shape, _MASKED, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
                jnp.zeros(qb.shape, jnp.float32))
        (_, denom, acc), _ = jax.lax.scan(step, init, jnp.arange(padded // block))
        return acc / jnp.where(denom == 0, 1.0, denom)[..., None]       # [B, K, G, Q, H]

    out = jax.lax.map(one_query_block, jnp.arange(padded // block))    # [blocks, B, K, G, Q, H]
    out = jnp.einsum("bBKGQH->BbQKGH", out).reshape(b, padded, n, h)
    return out[:, :t].astype(q.dtype)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *,
                    implementation: str | None = "cudnn") -> jax.Array:
    """`jax.nn.dot_product_attention`: cuDNN flash attention on GPU (None lets XLA choose).

    Uses cuDNN's causal-with-padding mask, so each row must hold one right-padded text: the
    runner does not pack rows for this implementation (see `packs_rows`).
    """
    lengths = (segments > 0).sum(axis=1).astype(jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                        key_value_seq_lengths=lengths, implementation=implementation)


def packs_rows(impl: str, dtype) -> bool:
    """Whether this implementation handles several texts per row (all but cuDNN's fused kernel)."""
    resolved = choose_implementation(PACKED_ROW_HINT, dtype) if impl == "auto" else impl
    return resolved != "cudnn"


SPLASH_BLOCK = 128


@functools.cache
def _splash_kernel(num_groups: int, length: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    mask = masks.MultiHeadMask([masks.CausalMask((length, length))] * num_groups)
    block = min(SPLASH_BLOCK, length)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block)
    return splash.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *,
                     interpret: bool = False) -> jax.Array:
    """Pallas splash attention (TPU; `interpret=True` runs it anywhere): one MQA kernel per kv head."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    padded = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK
    pad = [(0, 0), (0, padded - t), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(x, pad) for x in (q * jnp.asarray(h**-0.5, q.dtype), k, v))
    segments = jnp.pad(segments, [(0, 0), (0, padded - t)])
    kernel = _splash_kernel(n // kv_heads, padded, interpret)
    qg = jnp.einsum("BTKGH->BKGTH", _group_queries(q, kv_heads))
    kg, vg = jnp.einsum("BTKH->BKTH", k), jnp.einsum("BTKH->BKTH", v)

    def one(q_heads, k_head, v_head, seg):
        return kernel(q_heads, k_head, v_head, segment_ids=splash.SegmentIds(q=seg, kv=seg))

    per_kv_head = jax.vmap(one, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_kv_head)(qg, kg, vg, segments)                    # [B, K, G, T, H]
    return jnp.einsum("BKGTH->BTKGH", out).reshape(b, padded, n, h)[:, :t].astype(q.dtype)
