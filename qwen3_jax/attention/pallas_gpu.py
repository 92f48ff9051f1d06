"""Flash attention for packed rows as a Pallas GPU (Triton) kernel, forward and backward.

Texts lie end to end in a row; segment ids keep them apart, and each query block visits only the key
blocks from the start of the earliest text it holds up to itself (causal), so a row of many short texts
costs about what its texts cost alone, not the row's length squared. GQA: query head h reads kv head
h // G. Softmax statistics and every accumulation are float32; the output is in q's dtype.

The kernels are written for Pallas' Triton backend (program ids, fori_loops over dynamic slices) and
ask for it by their compiler parameters: without them, jax 0.10 and later lower a GPU pallas_call with
Mosaic GPU, whose layout rules these kernels do not meet. `interpret=True` runs the same kernels
anywhere (the CPU tests compare them with dense attention, values and gradients); the lowering tests
lower them for CUDA from the CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from qwen3_jax.attention.masking import MASKED, positions_from_segments
from qwen3_jax.numerics import precision

BLOCK = 64
TRITON = pltriton.CompilerParams(num_warps=4, num_stages=2)     # 64x64 tiles: 4 warps, a 2-stage pipeline


def packed_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *,
                           block: int = BLOCK, interpret: bool = False) -> jax.Array:
    """Causal GQA attention within segments: q [B, T, N, H], k, v [B, T, K, H], segments [B, T]."""
    return _packed(q, k, v, segments, block, interpret, with_logsumexp=False)


def packed_flash_attention_with_logsumexp(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *,
                                          block: int = BLOCK, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """`packed_flash_attention`'s output and each query's log-sum-exp of its scores, float32 [B, T, N]
    (inference: no gradient)."""
    return _packed(q, k, v, segments, block, interpret, with_logsumexp=True)


def _packed(q, k, v, segments, block: int, interpret: bool, *, with_logsumexp: bool):
    """The rows padded to whole blocks, run through the kernel, cut back (see the two callers)."""
    t = q.shape[1]
    padded = -(-t // block) * block
    pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - t)] + [(0, 0)] * (x.ndim - 2))
    segments = pad(segments.astype(jnp.int32))
    per_token = lambda x: jnp.repeat(x, block, axis=1)             # a block's value at each of its tokens
    first_key_block, last_query_block = key_block_range(segments, block)
    if with_logsumexp:
        out, logsumexp = _forward(pad(q), pad(k), pad(v), segments, per_token(first_key_block), block, interpret)
        return out[:, :t], jnp.einsum("BNT->BTN", logsumexp)[:, :t]
    out = _flash(pad(q), pad(k), pad(v), segments, per_token(first_key_block), per_token(last_query_block),
                 block, interpret)
    return out[:, :t]


def key_block_range(segments: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """For each block of a row of whole blocks [B, T]: the first key block its queries need (the block
    of its earliest text's start) and the last query block whose texts reach it as keys, int32 [B, T/block]."""
    b, t = segments.shape
    index = jnp.arange(t)
    # Where each token's text starts (a padding token: where it stands) grows along a row, so both
    # are monotone: the first key blocks by searchsorted give the last query blocks.
    starts = jnp.where(segments > 0, index - positions_from_segments(segments), index)
    first_key_block = (starts.reshape(b, -1, block).min(axis=2) // block).astype(jnp.int32)
    blocks = jnp.arange(t // block)
    last_query_block = jax.vmap(lambda first: jnp.searchsorted(first, blocks, side="right") - 1)(first_key_block)
    return first_key_block, last_query_block.astype(jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash(q, k, v, segments, first_key_block, last_query_block, block, interpret):
    return _forward(q, k, v, segments, first_key_block, block, interpret)[0]


def _flash_fwd(q, k, v, segments, first_key_block, last_query_block, block, interpret):
    out, logsumexp = _forward(q, k, v, segments, first_key_block, block, interpret)
    return out, (q, k, v, segments, first_key_block, last_query_block, out, logsumexp)


def _tile_mask(q_segments, k_segments, q_start, k_start, block: int) -> jax.Array:
    """[Q, S]: same text, key not padding, key not after the query."""
    q_pos = q_start + jnp.arange(block)
    k_pos = k_start + jnp.arange(block)
    return (q_segments[:, None] == k_segments[None, :]) & (k_segments[None, :] > 0) & (q_pos[:, None] >= k_pos[None, :])


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b accumulated in float32 (full float32 products for float32 inputs: Triton rounds to TF32
    unless told, see numerics.py)."""
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision(a, b))


def _scores(q, k, scale):
    return _dot(q, k.T) * scale


def _forward_kernel(q_ref, k_ref, v_ref, segments_ref, first_ref, out_ref, logsumexp_ref, *, block: int):
    """One query block of one head: online softmax over the key blocks its texts reach."""
    i = pl.program_id(0)
    q = q_ref[...]
    scale = q.shape[-1] ** -0.5
    q_segments = segments_ref[pl.ds(i * block, block)]

    def visit(j, carry):
        acc, top, total = carry
        keys = pl.ds(j * block, block)
        mask = _tile_mask(q_segments, segments_ref[keys], i * block, j * block, block)
        scores = jnp.where(mask, _scores(q, k_ref[keys, :], scale), MASKED)
        new_top = jnp.maximum(top, scores.max(axis=1))
        probs = jnp.exp(scores - new_top[:, None])
        correction = jnp.exp(top - new_top)
        total = total * correction + probs.sum(axis=1)
        acc = acc * correction[:, None] + _dot(probs.astype(v_ref.dtype), v_ref[keys, :])
        return acc, new_top, total

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((block,), MASKED, jnp.float32), jnp.zeros((block,), jnp.float32))
    acc, top, total = jax.lax.fori_loop(jnp.min(first_ref[...]), i + 1, visit, init)
    out_ref[...] = (acc / total[:, None]).astype(out_ref.dtype)
    logsumexp_ref[...] = top + jnp.log(total)


def _forward(q, k, v, segments, first_key_block, block: int, interpret: bool):
    b, t, n, h = q.shape
    groups = n // k.shape[2]
    grid = (t // block, b, n)
    out, logsumexp = pl.pallas_call(
        functools.partial(_forward_kernel, block=block),
        grid=grid,
        in_specs=[pl.BlockSpec((None, block, None, h), lambda i, r, x: (r, i, x, 0)),
                  pl.BlockSpec((None, t, None, h), lambda i, r, x: (r, 0, x // groups, 0)),
                  pl.BlockSpec((None, t, None, h), lambda i, r, x: (r, 0, x // groups, 0)),
                  pl.BlockSpec((None, t), lambda i, r, x: (r, 0)),
                  pl.BlockSpec((None, block), lambda i, r, x: (r, i))],
        out_specs=[pl.BlockSpec((None, block, None, h), lambda i, r, x: (r, i, x, 0)),
                   pl.BlockSpec((None, None, block), lambda i, r, x: (r, x, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
        interpret=interpret, compiler_params=TRITON, name="packed_flash_forward",
    )(q, k, v, segments, first_key_block)
    return out, logsumexp


def _query_gradient_kernel(q_ref, k_ref, v_ref, segments_ref, first_ref, d_out_ref, logsumexp_ref, delta_ref,
                           dq_ref, *, block: int):
    """dq of one query block of one head, over the key blocks its texts reach."""
    i = pl.program_id(0)
    q, d_out = q_ref[...], d_out_ref[...]
    scale = q.shape[-1] ** -0.5
    q_segments = segments_ref[pl.ds(i * block, block)]
    logsumexp, delta = logsumexp_ref[...], delta_ref[...]

    def visit(j, dq):
        keys = pl.ds(j * block, block)
        mask = _tile_mask(q_segments, segments_ref[keys], i * block, j * block, block)
        k = k_ref[keys, :]
        probs = jnp.where(mask, jnp.exp(_scores(q, k, scale) - logsumexp[:, None]), 0.0)
        d_scores = probs * (_dot(d_out, v_ref[keys, :].T) - delta[:, None]) * scale
        return dq + _dot(d_scores.astype(k.dtype), k)

    dq = jax.lax.fori_loop(jnp.min(first_ref[...]), i + 1, visit, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _key_gradient_kernel(q_ref, k_ref, v_ref, segments_ref, last_ref, d_out_ref, logsumexp_ref, delta_ref,
                         dk_ref, dv_ref, *, block: int, groups: int):
    """dk and dv of one key block of one kv head: over its G query heads and the query blocks from
    itself to the last one whose texts reach it."""
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    scale = k.shape[-1] ** -0.5
    k_segments = segments_ref[pl.ds(j * block, block)]
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for g in range(groups):
        def visit(i, carry, g=g):
            dk, dv = carry
            queries = pl.ds(i * block, block)
            q, d_out = q_ref[queries, g, :], d_out_ref[queries, g, :]
            mask = _tile_mask(segments_ref[queries], k_segments, i * block, j * block, block)
            probs = jnp.where(mask, jnp.exp(_scores(q, k, scale) - logsumexp_ref[g, queries][:, None]), 0.0)
            dv = dv + _dot(probs.astype(d_out.dtype).T, d_out)
            d_scores = probs * (_dot(d_out, v.T) - delta_ref[g, queries][:, None]) * scale
            return dk + _dot(d_scores.astype(q.dtype).T, q), dv
        dk, dv = jax.lax.fori_loop(j, jnp.max(last_ref[...]) + 1, visit, (dk, dv))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _flash_bwd(block: int, interpret: bool, saved, d_out):
    q, k, v, segments, first_key_block, last_query_block, out, logsumexp = saved
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    groups = n // kv_heads
    delta = jnp.einsum("BTNH,BTNH->BNT", d_out.astype(jnp.float32), out.astype(jnp.float32))
    d_out = d_out.astype(q.dtype)
    query_block = pl.BlockSpec((None, block, None, h), lambda i, r, x: (r, i, x, 0))
    whole_kv = pl.BlockSpec((None, t, None, h), lambda i, r, x: (r, 0, x // groups, 0))
    row = pl.BlockSpec((None, t), lambda i, r, x: (r, 0))
    per_query = pl.BlockSpec((None, None, block), lambda i, r, x: (r, x, i))
    dq = pl.pallas_call(
        functools.partial(_query_gradient_kernel, block=block), grid=(t // block, b, n),
        in_specs=[query_block, whole_kv, whole_kv, row, pl.BlockSpec((None, block), lambda i, r, x: (r, i)),
                  query_block, per_query, per_query],
        out_specs=query_block, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret, compiler_params=TRITON, name="packed_flash_dq",
    )(q, k, v, segments, first_key_block, d_out, logsumexp, delta)
    grouped = lambda x: x.reshape(b, t, kv_heads, groups, h)
    by_group = lambda x: x.reshape(b, kv_heads, groups, t)
    whole_queries = pl.BlockSpec((None, t, None, groups, h), lambda j, r, x: (r, 0, x, 0, 0))
    per_group = pl.BlockSpec((None, None, groups, t), lambda j, r, x: (r, x, 0, 0))
    key_block = pl.BlockSpec((None, block, None, h), lambda j, r, x: (r, j, x, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_key_gradient_kernel, block=block, groups=groups), grid=(t // block, b, kv_heads),
        in_specs=[whole_queries, key_block, key_block, row, pl.BlockSpec((None, block), lambda j, r, x: (r, j)),
                  whole_queries, per_group, per_group],
        out_specs=[key_block, key_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=interpret, compiler_params=TRITON, name="packed_flash_dkv",
    )(grouped(q), k, v, segments, last_query_block, grouped(d_out), by_group(logsumexp), by_group(delta))
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
