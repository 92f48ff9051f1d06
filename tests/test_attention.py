"""Every attention implementation that runs on the CPU against the dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen3_jax.attention import attention, attention_at, blockwise_attention, dense_attention, fused_attention, row_by_row
from qwen3_jax.attention.blockwise import window_ladder
from qwen3_jax.backend import Backend
from qwen3_jax.config import preset
from qwen3_jax.model import Qwen3Model


def _inputs(batch, length, heads=4, kv_heads=2, head_dim=32, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim))
    k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim))
    v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim))
    # row 0: one text, right padding; row 1: left padding; row 2: three packed texts then padding
    segments = np.zeros((batch, length), np.int32)
    segments[0, : length - 7] = 1
    segments[1, 5:] = 1
    cut = [0, length // 3, length // 2, length - 3]
    for s in range(3):
        segments[2, cut[s]:cut[s + 1]] = s + 1
    return q, k, v, jnp.asarray(segments)


def _close_on_real_tokens(a, b, segments, tol):
    real = np.asarray(segments) > 0
    assert np.abs(np.asarray(a)[real] - np.asarray(b)[real]).max() <= tol


@pytest.mark.parametrize("length,block", [(100, 32), (256, 64), (300, 128), (64, 512)])
def test_blockwise_matches_dense(length, block):
    q, k, v, seg = _inputs(3, length)
    _close_on_real_tokens(blockwise_attention(q, k, v, seg, block_size=block), dense_attention(q, k, v, seg), seg, 1e-5)


@pytest.mark.parametrize("text_length", [20, 300, 700])
def test_blockwise_picks_its_block_from_the_texts_and_matches_dense(text_length):
    """Without block_size the kernel picks the block on the device from the mean text length; every
    choice gives dense attention's result on packed texts, and its gradient (taken in one block size
    for all, whatever the forward pass picked) dense attention's gradient."""
    q, k, v = (x[:1] for x in _inputs(3, 2048)[:3])
    segments = np.zeros((1, 2048), np.int32)
    for i, start in enumerate(range(0, 2048 - text_length, text_length)):
        segments[0, start:start + text_length - i % 3] = i + 1
    seg = jnp.asarray(segments)
    _close_on_real_tokens(blockwise_attention(q, k, v, seg), dense_attention(q, k, v, seg), seg, 1e-5)
    d_out = jnp.where(seg[..., None, None] > 0, jax.random.normal(jax.random.PRNGKey(1), q.shape), 0.0)
    grads = [jax.vjp(lambda *x: kernel(*x, seg), q, k, v)[1](d_out) for kernel in (blockwise_attention, dense_attention)]
    for got, want in zip(*grads):
        _close_on_real_tokens(got, want, seg, 1e-4)


def _layouts(length: int) -> jnp.ndarray:
    """Rows the packed GPU kernel must get right: several texts, texts of one token, one long text,
    left and right padding, and a row of padding alone."""
    rows = np.zeros((6, length), np.int32)
    edges = [0, 7, 8, 9, 40, 41, length - 20]
    for s, (a, b) in enumerate(zip(edges, edges[1:])):
        rows[0, a:b] = s + 1                     # seven texts, three of one token
    rows[1, :] = 1                               # one text filling the row
    rows[2, 30:] = 1                             # left padding
    rows[3, :length - 50] = 1                    # right padding
    rows[4, ::1] = np.arange(length) + 1         # every token its own text
    return jnp.asarray(rows)                     # row 5: padding alone


@pytest.mark.parametrize("length, block", [(200, 16), (256, 64), (77, 32)])
def test_packed_pallas_kernel_matches_dense_values_and_gradients(length, block):
    """The GPU kernel (Triton on a GPU; here the same kernels in Pallas interpret mode) against dense
    attention on packed rows: its block skipping and segment mask, forward and backward, GQA."""
    from qwen3_jax.attention import packed_flash_attention

    segments = _layouts(length)
    q, k, v = _inputs(6, length, heads=4, kv_heads=2, head_dim=32, seed=3)[:3]
    kernel = lambda q, k, v: packed_flash_attention(q, k, v, segments, block=block, interpret=True)
    reference = lambda q, k, v: dense_attention(q, k, v, segments)
    _close_on_real_tokens(kernel(q, k, v), reference(q, k, v), segments, 1e-5)
    d_out = jnp.where(segments[..., None, None] > 0, jax.random.normal(jax.random.PRNGKey(4), q.shape), 0.0)
    for name, got, want in zip("qkv", jax.vjp(kernel, q, k, v)[1](d_out), jax.vjp(reference, q, k, v)[1](d_out)):
        assert np.abs(np.asarray(got - want)).max() <= 1e-4 * max(1.0, float(np.abs(want).max())), name


def test_packed_pallas_kernel_visits_only_the_blocks_its_texts_reach():
    """The first key block each query block starts from: its earliest text's (not the row's start)."""
    from qwen3_jax.attention.pallas_gpu import key_block_range

    segments = np.zeros((1, 128), np.int32)
    segments[0, :40], segments[0, 40:100], segments[0, 100:] = 1, 2, 3
    first, last = key_block_range(jnp.asarray(segments), 16)
    assert first[0].tolist() == [0, 0, 0, 2, 2, 2, 2, 6]            # blocks 3-6 start at text 2's block
    assert last[0].tolist() == [2, 2, 6, 6, 6, 6, 7, 7]             # the last query block each key block serves


def test_attention_at_chosen_positions_matches_dense():
    """The pruned last layer's attention (queries at the pooled positions only) gives dense attention's
    rows there, and their gradients: each text's last token, the middle of a text, a padding slot."""
    q, k, v, seg = _inputs(3, 100)
    at = jnp.asarray([[92, 40, 97], [99, 5, 60], [32, 49, 96]], jnp.int32)
    pick = lambda x: jnp.take_along_axis(x, at[:, :, None, None], axis=1)
    real = np.take_along_axis(np.asarray(seg), np.asarray(at), axis=1) > 0
    d_out = jax.random.normal(jax.random.PRNGKey(1), pick(q).shape) * real[..., None, None]
    got, got_grad = jax.vjp(lambda q, k, v: attention_at(pick(q), k, v, seg, at), q, k, v)
    want, want_grad = jax.vjp(lambda q, k, v: pick(dense_attention(q, k, v, seg)), q, k, v)
    assert np.abs(np.asarray(got)[real] - np.asarray(want)[real]).max() <= 1e-5
    assert np.isfinite(np.asarray(got)).all()
    for a, b in zip(got_grad(d_out), want_grad(d_out)):
        _close_on_real_tokens(a, b, seg, 1e-5)


def test_window_ladder_steps_at_most_one_and_a_half():
    for blocks in (1, 2, 5, 64, 1000):
        ladder = window_ladder(blocks)
        assert ladder[0] == 1 and ladder[-1] == blocks and list(ladder) == sorted(set(ladder))
        assert all(b <= max(a + 1, 1.5 * a) for a, b in zip(ladder, ladder[1:]))


def test_dot_product_attention_path_matches_dense_on_unpacked_rows():
    q, k, v, _ = _inputs(3, 96)
    seg = jnp.asarray((np.arange(96)[None] < np.array([[96], [50], [1]])).astype(np.int32))
    _close_on_real_tokens(fused_attention(q, k, v, seg, implementation=None), dense_attention(q, k, v, seg), seg, 1e-5)


def test_rows_are_not_packed_for_cudnn():
    assert not Backend.resolve("cudnn").packs_rows
    assert Backend.resolve("dense").packs_rows and Backend.resolve("blockwise").packs_rows


def test_splash_in_interpret_mode_matches_dense():
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    q, k, v, seg = _inputs(3, 256, head_dim=128)
    out = attention(q, k, v, seg, backend=Backend.resolve("splash"), interpret=True)
    _close_on_real_tokens(out, dense_attention(q, k, v, seg), seg, 1e-5)


def test_packed_texts_do_not_see_each_other():
    q, k, v, seg = _inputs(3, 60)
    alone = dense_attention(q[2:3, 20:30], k[2:3, 20:30], v[2:3, 20:30], jnp.ones((1, 10), jnp.int32))
    packed = dense_attention(q, k, v, seg)[2:3, 20:30]
    assert np.abs(np.asarray(alone) - np.asarray(packed)).max() <= 1e-5


def test_unknown_implementation():
    q, k, v, seg = _inputs(3, 8)
    with pytest.raises(ValueError, match="impl='flash' is unknown"):
        attention(q, k, v, seg, backend=Backend.resolve("flash"))


def test_long_input_at_real_width_blockwise_equals_dense():
    """0.6B width (16/8 heads of 128, hidden 1024), 2 layers, one 4,096-token input."""
    cfg = preset("0.6B", num_hidden_layers=2, vocab_size=4096)
    dense = Qwen3Model(cfg, attention_impl="dense", rngs=nnx.Rngs(0))
    blockwise = Qwen3Model(cfg, attention_impl="blockwise", rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (1, 4096), 0, cfg.vocab_size)
    seg = jnp.ones((1, 4096), jnp.int32)
    a = jax.jit(lambda m, i, s: m(i, s))(dense, ids, seg)
    b = jax.jit(lambda m, i, s: m(i, s))(blockwise, ids, seg)
    assert float(jnp.abs(a).max()) > 1.0                      # an absolute bound on states of this size
    assert float(jnp.abs(a - b).max()) <= 1e-5


@pytest.mark.parametrize("rows_per_step", [1, 2])
@pytest.mark.parametrize("impl", ["dense", "blockwise"])
def test_row_loop_matches_all_rows_at_once(impl, rows_per_step):
    q, k, v, seg = _inputs(4, 90)
    kernel = {"dense": dense_attention, "blockwise": lambda *a: blockwise_attention(*a, block_size=32)}[impl]
    looped = row_by_row(kernel, q, k, v, seg, rows_per_step=rows_per_step)
    _close_on_real_tokens(looped, kernel(q, k, v, seg), seg, 1e-6)     # padding outputs are unspecified


@pytest.mark.parametrize("impl", ["blockwise", "dense rows"])
def test_gradients_flow_through_every_cpu_kernel(impl):
    """Fine-tuning needs reverse-mode gradients; blockwise must agree with dense there too."""
    q, k, v, seg = _inputs(3, 80)

    def loss(q, k, v, kernel):
        out = kernel(q, k, v, seg)
        return jnp.sum(jnp.where(seg[..., None, None] > 0, out, 0.0) ** 2)

    kernels = {"dense rows": lambda *a: row_by_row(dense_attention, *a, rows_per_step=1),
               "blockwise": lambda *a: blockwise_attention(*a, block_size=16)}
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, kernels[impl])
    reference = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, dense_attention)
    for got, want in zip(grads, reference):
        assert np.isfinite(np.asarray(got)).all()
        assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-4
