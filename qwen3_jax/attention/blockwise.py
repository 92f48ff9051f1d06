"""Block-sparse attention for packed rows: each query block scores only the keys of the texts it holds.

The forward pass and the flash-attention backward pass (recomputing each tile from the saved
log-sum-exp) are written out; on the CPU the block size follows the row's mean text length.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qwen3_jax.attention.masking import MASKED, group_queries, heads_first, positions_from_segments, segment_mask
from qwen3_jax.numerics import einsum

# Query blocks by the mean text length of a row (up to the first bound, the first size, ...): a block
# of short texts should look back little, long texts run fewer, larger products. The gradient runs one
# size for all, which keeps a training step's compile time down (docs/design/attention.md has the
# measurements behind both).
CPU_BLOCKS = ((192, 32), (384, 64), (None, 128))
CPU_BACKWARD_BLOCK = 64


def window_ladder(num_blocks: int) -> tuple[int, ...]:
    """Key-window sizes, in blocks, that the blockwise kernel picks from: 1, 2, 3, 4, 6, 8, 12, ...
    (steps of at most 1.5x), ending at the whole row."""
    sizes, size = [], 1
    while size < num_blocks:
        sizes.append(size)
        size = size + 1 if size < 4 else size + (1 << (size.bit_length() - 2))
    return tuple(sizes) + (num_blocks,)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *,
                        block_size: int | None = None) -> jax.Array:
    """Block-sparse attention for packed rows (see `blocks_of`); without `block_size`, the block
    size is picked on the device from the row's mean text length (CPU_BLOCKS).

    The segments are tied to the queries first. Inside a scan over layers, they are the same at every
    layer, and when the scan is differentiated JAX computes whatever depends on them alone once, out of
    the loop: every query block's mask for every window width, stacked (tens of GiB). Tied to the
    queries, the masks stay in the block loop, one tile at a time.
    """
    segments, q = jax.lax.optimization_barrier((segments, q))
    if block_size is not None:
        return blocks_of(q, k, v, segments, block_size=block_size)
    return _by_text_length(q, k, v, segments)


def blockwise_attention_with_logsumexp(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *,
                                       block_size: int | None = None) -> tuple[jax.Array, jax.Array]:
    """`blockwise_attention`'s output and each query's log-sum-exp of its scores, float32 [B, T, N]
    (inference: the gradient is not the flash backward pass)."""
    if block_size is None:
        out, logsumexp, _ = _forward_by_text_length(q, k, v, segments)
    else:
        out, by_block = _block_sparse_forward(heads_first(q, k, v), segments, min(block_size, q.shape[1]))
        logsumexp = _by_token(by_block, q.shape[1])
    return out, jnp.einsum("BKGT->BTKG", logsumexp).reshape(q.shape[:3])


def _forward_by_text_length(q, k, v, segments):
    """The blockwise forward pass in the CPU_BLOCKS size for the row's mean text length: the output,
    each query's log-sum-exp [B, K, G, T] and the heads-first q, k, v (see _block_sparse_fwd)."""
    def kernel(block):
        def run(heads, segments):
            out, logsumexp = _block_sparse_forward(heads, segments, min(block, q.shape[1]))
            return out, _by_token(logsumexp, q.shape[1])
        return run

    starts = (segments > 0) & (segments != jnp.pad(segments, [(0, 0), (1, 0)])[:, :-1])
    mean_length = (segments > 0).sum() / jnp.maximum(starts.sum(), 1)
    bounds = jnp.asarray([bound for bound, _ in CPU_BLOCKS[:-1]])
    heads = heads_first(q, k, v)
    out, logsumexp = jax.lax.switch(jnp.searchsorted(bounds, mean_length),
                                    [kernel(size) for _, size in CPU_BLOCKS], heads, segments)
    return out, logsumexp, heads


@jax.custom_vjp
def _by_text_length(q, k, v, segments):
    return _forward_by_text_length(q, k, v, segments)[0]


def _by_text_length_fwd(q, k, v, segments):
    out, logsumexp, heads = _forward_by_text_length(q, k, v, segments)
    return out, (heads, segments, out, logsumexp)


def _by_text_length_bwd(saved, d_out):
    heads, segments, out, logsumexp = saved
    block = min(CPU_BACKWARD_BLOCK, segments.shape[1])
    return _block_sparse_bwd(block, (heads, segments, out, _by_block(logsumexp, block)), d_out)


_by_text_length.defvjp(_by_text_length_fwd, _by_text_length_bwd)


def _by_token(logsumexp: jax.Array, length: int) -> jax.Array:
    """[blocks, B, K, G, Q] -> [B, K, G, T]."""
    return jnp.moveaxis(logsumexp, 0, 3).reshape(*logsumexp.shape[1:4], -1)[..., :length]


def _by_block(logsumexp: jax.Array, block: int) -> jax.Array:
    """[B, K, G, T] -> [blocks, B, K, G, Q], padded with zeros (padding queries read none)."""
    length = logsumexp.shape[-1]
    padded = jnp.pad(logsumexp, [(0, 0)] * 3 + [(0, -(-length // block) * block - length)])
    return jnp.moveaxis(padded.reshape(*padded.shape[:3], -1, block), 3, 0)


def blocks_of(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *, block_size: int) -> jax.Array:
    """Block-sparse attention for packed rows: each block of queries sees only the keys back to the
    start of the earliest text it holds.

    Texts lie end to end in a row, so the keys a query block needs are one contiguous window ending at
    the block. Its length is read from the segments on the device and rounded up to a size of
    `window_ladder` (a `lax.switch` between static shapes), so a block inside a long text looks far
    back while a block of short texts never scores the rest of the row. Query blocks run one after
    another (`lax.map`), never holding more than a [B, N, block, window] score tile. The gradient is
    flash attention's: the backward pass recomputes each tile from the saved log-sum-exp, so training
    keeps nothing per tile.
    """
    return _block_sparse(q, k, v, segments, min(block_size, q.shape[1]))


class _Tiling(NamedTuple):
    """A row's query blocks, their key windows and the heads-first, padded q, k, v."""

    qg: jax.Array          # [B, K, G, T, H]
    kt: jax.Array          # [B, K, T, H]
    vt: jax.Array
    segments: jax.Array    # [B, T]
    window: jax.Array      # [blocks]: index into `sizes` of each query block's window
    sizes: tuple[int, ...]
    block: int

    @classmethod
    def of(cls, heads, segments, block: int) -> "_Tiling":
        """From the heads-first q, k, v (see heads_first), padded here to whole blocks."""
        b, t = segments.shape
        padded = -(-t // block) * block
        num_blocks = padded // block
        qg, kt, vt = (_pad_axis(x, x.ndim - 2, padded) for x in heads)
        segments = _pad_axis(segments, 1, padded)
        index = jnp.arange(padded)
        text_start = index - positions_from_segments(segments)
        # The earliest text start among each block's real tokens; a block of padding needs no keys.
        first = jnp.where(segments > 0, text_start, index).reshape(b, num_blocks, block).min(axis=(0, 2))
        needed = jnp.arange(1, num_blocks + 1) * block - first
        sizes = tuple(size * block for size in window_ladder(num_blocks))
        return cls(qg, kt, vt, segments, jnp.searchsorted(jnp.asarray(sizes), needed), sizes, block)

    def like_queries(self, x: jax.Array) -> jax.Array:
        """A [B, T, N, ...] array laid out as the queries are: padded, [B, K, G, T, ...]."""
        return jnp.moveaxis(group_queries(_pad_axis(x, 1, self.qg.shape[3]), self.kt.shape[1]), 1, 3)

    def tile(self, i, width: int):
        """Query block i's queries [B, K, G, Q, H], its window's keys and values [B, K, S, H], the
        window's start and the mask [B, 1, 1, Q, S]."""
        block = self.block
        qb = jax.lax.dynamic_slice_in_dim(self.qg, i * block, block, axis=3)
        start = jnp.maximum((i + 1) * block - width, 0)
        kb = jax.lax.dynamic_slice_in_dim(self.kt, start, width, axis=2)
        vb = jax.lax.dynamic_slice_in_dim(self.vt, start, width, axis=2)
        q_seg = jax.lax.dynamic_slice_in_dim(self.segments, i * block, block, axis=1)
        k_seg = jax.lax.dynamic_slice_in_dim(self.segments, start, width, axis=1)
        mask = segment_mask(q_seg, k_seg, i * block + jnp.arange(block), start + jnp.arange(width))[:, None, None]
        return qb, kb, vb, start, mask

    def scores(self, qb, kb, mask):
        scale = qb.shape[-1] ** -0.5
        scores = einsum("BKGQH,BKSH->BKGQS", qb, kb, preferred_element_type=jnp.float32) * scale
        return jnp.where(mask, scores, MASKED)

    def each_block(self, run):
        """`run(width)(i)` for every query block, stacked: a map over the blocks, the width switched per block."""
        one = lambda i: jax.lax.switch(self.window[i], [run(width) for width in self.sizes], i)
        return jax.lax.map(one, jnp.arange(self.window.shape[0]))

    def accumulate(self, run, *carry):
        """carry = `run(width)(i, *carry)` for every query block: one loop per window width over the blocks
        of that width (a switch inside one loop makes XLA copy the carried buffers whole at every block)."""
        order = jnp.argsort(self.window, stable=True)
        sorted_window = self.window[order]
        for index, width in enumerate(self.sizes):
            step = run(width)
            carry = jax.lax.fori_loop(jnp.searchsorted(sorted_window, index, side="left"),
                                      jnp.searchsorted(sorted_window, index, side="right"),
                                      lambda n, c, step=step: step(order[n], *c), carry)
        return carry


def _pad_axis(x: jax.Array, axis: int, length: int) -> jax.Array:
    """x padded with zeros at the end of `axis` to `length`."""
    return jnp.pad(x, [(0, length - x.shape[axis]) if a == axis else (0, 0) for a in range(x.ndim)])


def _unblock(x: jax.Array, qg: jax.Array) -> jax.Array:
    """[blocks, B, K, G, Q, H] -> [B, T, N, H] in the dtype of the heads-first queries qg [B, K, G, T, H],
    cut to their unpadded length T."""
    b, k, g, t = qg.shape[:4]
    x = jnp.moveaxis(x, 0, 1)                                    # [B, blocks, K, G, Q, H]
    x = jnp.moveaxis(x, 4, 2)                                    # [B, blocks, Q, K, G, H]
    return x.reshape(b, -1, k * g, x.shape[-1])[:, :t].astype(qg.dtype)


def _block_sparse_forward(heads, segments, block: int):
    """From the heads-first q, k, v: the output [B, T, N, H] and the log-sum-exp by block."""
    tiling = _Tiling.of(heads, segments, block)

    def run(width):
        def attend(i):
            qb, kb, vb, _, mask = tiling.tile(i, width)
            scores = tiling.scores(qb, kb, mask)
            top = scores.max(axis=-1, keepdims=True)
            probs = jnp.exp(scores - top)
            total = probs.sum(axis=-1, keepdims=True)
            out = einsum("BKGQS,BKSH->BKGQH", probs.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
            return out / total, (top + jnp.log(total))[..., 0]       # normalise after the product
        return attend

    out, logsumexp = tiling.each_block(run)
    return _unblock(out, heads[0]), logsumexp


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _block_sparse(q, k, v, segments, block: int):
    return _block_sparse_forward(heads_first(q, k, v), segments, block)[0]


def _block_sparse_fwd(q, k, v, segments, block: int):
    """Keeps the heads-first q, k, v the forward pass laid out, not q, k, v: the backward pass reads
    them so, and transposing each again costs as much as its share of the products."""
    heads = heads_first(q, k, v)
    out, logsumexp = _block_sparse_forward(heads, segments, block)
    return out, (heads, segments, out, logsumexp)


def _block_sparse_bwd(block: int, saved, d_out):
    heads, segments, out, logsumexp = saved
    tiling = _Tiling.of(tuple(x.astype(jnp.float32) for x in heads), segments, block)
    dog = tiling.like_queries(d_out.astype(jnp.float32))
    # Each query's sum of d_out * out, taken token-major: only the [B, T, N] result is laid out by head.
    # (As an einsum: XLA's CPU compiler runs a jnp.sum over H as a far slower reduction.)
    delta = tiling.like_queries(einsum("BTNH,BTNH->BTN", d_out.astype(jnp.float32), out.astype(jnp.float32)))

    def run(width):
        def step(i, dq, dk, dv):
            qb, kb, vb, start, mask = tiling.tile(i, width)
            lse = logsumexp[i][..., None]
            probs = jnp.where(mask, jnp.exp(tiling.scores(qb, kb, mask) - lse), 0.0)
            do = jax.lax.dynamic_slice_in_dim(dog, i * block, block, axis=3)
            dd = jax.lax.dynamic_slice_in_dim(delta, i * block, block, axis=3)[..., None]
            d_scores = probs * (einsum("BKGQH,BKSH->BKGQS", do, vb) - dd) * qb.shape[-1] ** -0.5
            dq = jax.lax.dynamic_update_index_in_dim(dq, einsum("BKGQS,BKSH->BKGQH", d_scores, kb), i, axis=0)
            add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(
                acc, jax.lax.dynamic_slice_in_dim(acc, start, width, axis=2) + x, start, axis=2)
            dk = add(dk, einsum("BKGQS,BKGQH->BKSH", d_scores, qb))
            dv = add(dv, einsum("BKGQS,BKGQH->BKSH", probs, do))
            return dq, dk, dv
        return step

    b, k_heads, g, padded, h = tiling.qg.shape
    dq = jnp.zeros((padded // block, b, k_heads, g, block, h), jnp.float32)   # [blocks, B, K, G, Q, H]
    zeros = jnp.zeros_like(tiling.kt)
    dq, dk, dv = tiling.accumulate(run, dq, zeros, zeros)
    t = segments.shape[1]
    dk, dv = (jnp.einsum("BKTH->BTKH", x)[:, :t].astype(x_in.dtype) for x, x_in in zip((dk, dv), heads[1:]))
    return _unblock(dq, heads[0]), dk, dv, None


_block_sparse.defvjp(_block_sparse_fwd, _block_sparse_bwd)
