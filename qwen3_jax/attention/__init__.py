"""Causal self-attention behind one signature, with interchangeable implementations.

Shapes: q [B, T, N, H]; k, v [B, T, K, H] (K key/value heads, N = K * G query heads);
`segments` [B, T] int32: 0 marks padding, equal positive ids mark the tokens of one text. Several
texts may be packed into one row; a token attends to the earlier tokens of its own text only.
Padding may sit on either side. Padding rows produce finite values that callers ignore.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from qwen3_jax.attention.blockwise import blockwise_attention
from qwen3_jax.attention.cudnn import fused_attention
from qwen3_jax.attention.dense import attention_at, dense_attention
from qwen3_jax.attention.masking import positions_from_segments
from qwen3_jax.attention.pallas_gpu import packed_flash_attention
from qwen3_jax.attention.splash import splash_attention
from qwen3_jax.checks import UsageError
from qwen3_jax.sharding import BATCH_AXIS

__all__ = ["IMPLEMENTATIONS", "attention", "attention_at", "blockwise_attention", "dense_attention",
           "fused_attention", "packed_flash_attention", "packed_row_limit", "packs_rows", "positions_from_segments", "resolve_implementation", "row_by_row",
           "splash_attention"]

IMPLEMENTATIONS = ("auto", "dense", "blockwise", "pallas", "cudnn", "splash")
# The longest packed row each kernel is given. dense and splash compute every causal pair of a row,
# texts alike or not, so their rows stay short; blockwise skips the pairs of different texts, so one
# row may hold a whole batch. cuDNN's kernel takes one text a row (see `packs_rows`).
PACKED_ROW_LIMIT = {"dense": 2048, "splash": 2048, "blockwise": None, "pallas": None}


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *,
              impl: str = "auto", block_size: int | None = None, interpret: bool = False) -> jax.Array:
    """Causal GQA attention within segments; `impl` picks the kernel (see IMPLEMENTATIONS)."""
    impl = resolve_implementation(impl, q.dtype)
    if impl in ("dense", "blockwise"):
        kernel = dense_attention if impl == "dense" else functools.partial(blockwise_attention, block_size=block_size)
        return row_by_row(kernel, q, k, v, segments, rows_per_step=default_rows_per_step())
    if impl == "pallas":
        return packed_flash_attention(q, k, v, segments, interpret=interpret)
    if impl == "cudnn":
        return fused_attention(q, k, v, segments, implementation="cudnn")
    return splash_attention(q, k, v, segments, interpret=interpret)


def resolve_implementation(impl: str, dtype) -> str:
    """The kernel `impl` names; "auto" picks one for the default backend and dtype: the packed Pallas
    kernel on GPUs (where it compiles there; else cuDNN for half precision, blockwise for float32),
    splash on TPUs, blockwise elsewhere."""
    if impl not in IMPLEMENTATIONS:
        raise UsageError(f"attention impl={impl!r} is unknown; choose one of {', '.join(IMPLEMENTATIONS)}")
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "gpu":
        if _pallas_runs_here(jnp.dtype(dtype).name):
            return "pallas"
        return "cudnn" if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "blockwise"
    return "splash" if backend == "tpu" else "blockwise"


@functools.cache
def _pallas_runs_here(dtype: str) -> bool:
    """Whether the packed Pallas kernel compiles and agrees with dense attention on this device, tried
    once per process on a small row (so a GPU or Triton the kernel was never run on falls back)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (1, 128, 4, 128), dtype)
    k, v = (jax.random.normal(key, (1, 128, 2, 128), dtype) for key in keys[1:])
    segments = jnp.repeat(jnp.arange(1, 5, dtype=jnp.int32), 32)[None]
    try:
        got = jax.jit(packed_flash_attention)(q, k, v, segments)
        difference = jnp.abs(got.astype(jnp.float32) - dense_attention(q, k, v, segments).astype(jnp.float32)).max()
        return bool(difference < (1e-3 if dtype == "float32" else 3e-2))
    except Exception as error:  # noqa: BLE001 - any failure to build or run the kernel means: do not use it
        warnings.warn(f"the packed Pallas attention kernel does not run on this device ({type(error).__name__}: "
                      f"{error}); using cuDNN / blockwise attention", stacklevel=2)
        return False


def packs_rows(impl: str, dtype) -> bool:
    """Whether this implementation handles several texts per row (all but cuDNN's fused kernel)."""
    return resolve_implementation(impl, dtype) != "cudnn"


def packed_row_limit(impl: str, dtype) -> int | None:
    """The longest row of packed texts to give this implementation (None: any length)."""
    return PACKED_ROW_LIMIT.get(resolve_implementation(impl, dtype))


def default_rows_per_step() -> int | None:
    """How many rows the XLA kernels compute together: all at once on accelerators (None); on the
    CPU one row per data shard at a time, so a row's scores stay in cache between the two products
    and the softmax (1.3-2x faster there). The data-shard count comes from the mesh set with
    `jax.set_mesh`, so each device loops over its own rows."""
    if jax.default_backend() != "cpu":
        return None
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else mesh.shape.get(BATCH_AXIS, 1)


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
