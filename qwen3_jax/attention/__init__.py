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
from jax.sharding import PartitionSpec

from qwen3_jax.attention.blockwise import blockwise_attention, blockwise_attention_with_logsumexp
from qwen3_jax.attention.cudnn import fused_attention
from qwen3_jax.attention.dense import attention_at, dense_attention, dense_attention_with_logsumexp
from qwen3_jax.attention.masking import positions_from_segments
from qwen3_jax.attention.pallas_gpu import packed_flash_attention, packed_flash_attention_with_logsumexp
from qwen3_jax.attention.splash import splash_attention, splash_attention_with_logsumexp
from qwen3_jax.backend import Backend
from qwen3_jax.sharding import BATCH_AXIS, MODEL_AXIS

__all__ = ["attention", "attention_at", "attention_with_logsumexp", "blockwise_attention", "dense_attention", "fused_attention",
           "packed_flash_attention", "per_device", "positions_from_segments", "row_by_row", "splash_attention"]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *, backend: Backend,
              block_size: int | None = None, interpret: bool = False) -> jax.Array:
    """Causal GQA attention within segments, with the kernel `backend.attention` (a Pallas kernel
    `interpret`ed off its own platform, for tests)."""
    return _kernel(backend, block_size, interpret, with_logsumexp=False)(q, k, v, segments)


def attention_with_logsumexp(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *,
                             backend: Backend, block_size: int | None = None,
                             interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """`attention` and each query's log-sum-exp of its scores, float32 [B, T, N]: what merging it
    with attention over other keys needs (prefix.py). Inference only; cuDNN's kernel returns none."""
    if backend.attention == "cudnn":
        raise ValueError("cuDNN's fused attention returns no log-sum-exp: choose blockwise, splash or pallas")
    return _kernel(backend, block_size, interpret, with_logsumexp=True)(q, k, v, segments)


def _kernel(backend: Backend, block_size: int | None, interpret: bool, *, with_logsumexp: bool):
    """The function (q, k, v, segments) -> output (and log-sum-exp) of `backend.attention`, laid out
    per row (CPU) or per device (Pallas kernels)."""
    impl = backend.attention
    if impl in ("dense", "blockwise"):
        block = block_size or backend.blockwise_block
        kernel = {("dense", False): dense_attention, ("dense", True): dense_attention_with_logsumexp,
                  ("blockwise", False): functools.partial(blockwise_attention, block_size=block),
                  ("blockwise", True): functools.partial(blockwise_attention_with_logsumexp, block_size=block),
                  }[impl, with_logsumexp]
        return functools.partial(row_by_row, kernel,
                                 rows_per_step=_rows_per_data_shard() if backend.attention_row_by_row else None)
    if impl == "pallas":
        kernel = packed_flash_attention_with_logsumexp if with_logsumexp else packed_flash_attention
        return functools.partial(per_device, functools.partial(kernel, interpret=interpret))
    if impl == "cudnn":
        return functools.partial(fused_attention, implementation="cudnn")
    kernel = splash_attention_with_logsumexp if with_logsumexp else splash_attention
    return functools.partial(per_device, functools.partial(kernel, interpret=interpret))


def per_device(kernel, q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array):
    """`kernel` on each device's own rows and heads under the mesh set with `jax.set_mesh`: a Pallas
    kernel is one opaque call that XLA cannot split (Mosaic refuses to; Triton's would have q, k and v
    gathered whole to every device). Heads split over "model" when both head counts divide. The
    kernel returns the output [B, T, N, H], or it and a log-sum-exp [B, T, N]."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v, segments)
    data, model = mesh.shape.get(BATCH_AXIS, 1), mesh.shape.get(MODEL_AXIS, 1)
    rows = BATCH_AXIS if data > 1 and q.shape[0] % data == 0 else None
    heads = MODEL_AXIS if model > 1 and q.shape[2] % model == 0 and k.shape[2] % model == 0 else None
    spec = PartitionSpec(rows, None, heads, None)
    out_specs = jax.tree.map(lambda x: PartitionSpec(*(rows, None, heads, None)[:x.ndim]),
                             jax.eval_shape(kernel, q, k, v, segments))
    return jax.shard_map(kernel, in_specs=(spec, spec, spec, PartitionSpec(rows, None)), out_specs=out_specs,
                         check_vma=False)(q, k, v, segments)


def _rows_per_data_shard() -> int:
    """One row per data shard at a time (the CPU's choice: a row's scores stay in cache between the two
    products and the softmax), from the mesh set with `jax.set_mesh`, so each device loops over its own rows."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else mesh.shape.get(BATCH_AXIS, 1)


def row_by_row(kernel, q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *,
               rows_per_step: int | None):
    """`kernel` on `rows_per_step` rows at a time (a loop over the rest), or on all rows when None.

    The loop runs over the second factor of rows = [rows_per_step, steps], so rows split over data
    shards stay on their device. Whatever the kernel returns ([B, ...] arrays) is put back in row order.
    """
    b = q.shape[0]
    if rows_per_step is None or rows_per_step >= b or b % rows_per_step:
        return kernel(q, k, v, segments)
    to_steps = lambda x: jnp.swapaxes(x.reshape(rows_per_step, b // rows_per_step, *x.shape[1:]), 0, 1)
    out = jax.lax.map(lambda xs: kernel(*xs), tuple(to_steps(x) for x in (q, k, v, segments)))
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(b, *x.shape[2:]), out)
