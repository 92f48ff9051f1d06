"""Causal self-attention behind one signature, with interchangeable implementations.

Shapes: q [B, T, N, H]; k, v [B, T, K, H] (K key/value heads, N = K * G query heads);
`segments` [B, T] int32: 0 marks padding, equal positive ids mark the tokens of one text. Several
texts may be packed into one row; a token attends to the earlier tokens of its own text only.
Padding may sit on either side. Padding rows produce finite values that callers ignore.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from qwen3_jax.attention.blockwise import blockwise_attention
from qwen3_jax.attention.cudnn import fused_attention
from qwen3_jax.attention.dense import attention_at, dense_attention
from qwen3_jax.attention.masking import positions_from_segments
from qwen3_jax.attention.pallas_gpu import packed_flash_attention
from qwen3_jax.attention.splash import splash_attention
from qwen3_jax.checks import UsageError
from qwen3_jax.sharding import BATCH_AXIS, MODEL_AXIS

__all__ = ["AUTO", "IMPLEMENTATIONS", "attention", "attention_at", "blockwise_attention", "dense_attention",
           "fused_attention", "KERNEL_PLATFORMS", "kernel_named_on_failure", "packed_flash_attention", "packed_row_limit", "packs_rows", "per_device",
           "positions_from_segments", "resolve_implementation", "row_by_row", "splash_attention"]

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
        return per_device(functools.partial(packed_flash_attention, interpret=interpret), q, k, v, segments)
    if impl == "cudnn":
        return fused_attention(q, k, v, segments, implementation="cudnn")
    return per_device(functools.partial(splash_attention, interpret=interpret), q, k, v, segments)


def per_device(kernel, q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array) -> jax.Array:
    """`kernel` on each device's own rows and heads under the mesh set with `jax.set_mesh`: a Pallas
    kernel is one opaque call that XLA cannot split (Mosaic refuses to; Triton's would have q, k and v
    gathered whole to every device). Heads split over "model" when both head counts divide."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v, segments)
    data, model = mesh.shape.get(BATCH_AXIS, 1), mesh.shape.get(MODEL_AXIS, 1)
    rows = BATCH_AXIS if data > 1 and q.shape[0] % data == 0 else None
    heads = MODEL_AXIS if model > 1 and q.shape[2] % model == 0 and k.shape[2] % model == 0 else None
    spec = PartitionSpec(rows, None, heads, None)
    return jax.shard_map(kernel, in_specs=(spec, spec, spec, PartitionSpec(rows, None)), out_specs=spec,
                         check_vma=False)(q, k, v, segments)


AUTO = {"gpu": "pallas", "tpu": "splash"}          # "auto" on each platform; anywhere else blockwise


def resolve_implementation(impl: str, dtype=None, platform: str | None = None) -> str:
    """The kernel `impl` names; "auto" is a pure function of the platform (default: JAX's backend):
    the packed Pallas kernel on GPUs, splash on TPUs, blockwise elsewhere, in every dtype. Nothing is
    tried out: `qwen3-jax doctor` checks each kernel on a device, and a kernel that fails there is an
    error that names --attention."""
    if impl not in IMPLEMENTATIONS:
        raise UsageError(f"attention impl={impl!r} is unknown; choose one of {', '.join(IMPLEMENTATIONS)}")
    if impl != "auto":
        return impl
    return AUTO.get(platform or jax.default_backend(), "blockwise")


KERNEL_PLATFORMS = {"pallas": "gpu", "cudnn": "gpu", "splash": "tpu"}      # kernels built for one platform each


@contextlib.contextmanager
def kernel_named_on_failure(impl: str):
    """A failure to lower, compile or run a device kernel becomes an error that names --attention."""
    try:
        yield
    except Exception as error:
        if impl not in KERNEL_PLATFORMS:
            raise
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        raise RuntimeError(f"the {impl} attention kernel failed on this {jax.default_backend()} device "
                           f"({type(error).__name__}: {first}); run `qwen3-jax doctor`, and choose another kernel "
                           "with --attention (blockwise runs everywhere)") from error


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
