"""Each operation of qwen3_jax/ops with a hand-written gradient against jax.grad of its plain jnp version."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax.backend import Backend
from qwen3_jax.ops.embedding import embed_tokens
from qwen3_jax.ops.projection import project
from qwen3_jax.ops.rms_norm import rms_norm

# The CPU's choices (float32 accumulation, materialised gradients, float32 weight gradients with the smaller
# operand left) and an accelerator's (none of them): each takes its own path through the gradients.
BACKENDS = {"cpu": Backend.resolve("dense", platform="cpu")}
BACKENDS["accelerator"] = dataclasses.replace(BACKENDS["cpu"], half_products_in_float32=False,
                                              materialise_gradients=False, weight_gradients_in_float32=False)


def _gradients(f, args, cotangent_seed: int = 1):
    """The gradients of f at args for one random cotangent of its output."""
    out, pullback = jax.vjp(f, *args)
    cotangent = jax.random.normal(jax.random.PRNGKey(cotangent_seed), out.shape, jnp.float32).astype(out.dtype)
    return out, pullback(cotangent)


def _assert_same_gradients(ours, plain, args, *, rtol=1e-5, atol=1e-5):
    out, grads = _gradients(ours, args)
    plain_out, plain_grads = _gradients(plain, args)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(plain_out, np.float32), rtol=rtol, atol=atol)
    for arg, grad, plain_grad in zip(args, grads, plain_grads):
        assert grad.dtype == arg.dtype and grad.shape == arg.shape
        np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(plain_grad, np.float32),
                                   rtol=rtol, atol=atol)


def test_embedding_gradient_adds_repeated_ids():
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    table = jax.random.normal(keys[0], (11, 6))
    ids = jnp.array([[3, 3, 0, 10], [3, 7, 0, 1]])                  # repeated ids: their rows' gradients add
    out, (d_table,) = _gradients(lambda t: embed_tokens(t, ids), (table,))
    _, (plain,) = _gradients(lambda t: t[ids], (table,))
    np.testing.assert_array_equal(out, table[ids])
    np.testing.assert_allclose(d_table, plain, rtol=1e-6, atol=1e-6)
    assert not np.asarray(d_table)[[2, 4, 5, 6, 8, 9]].any()       # rows no id reads get no gradient


# The model's products: queries (D -> N x H), the output projection (N x H -> D), the MLP up (D -> F,
# x the smaller operand) and down (F -> D, d_out the smaller: the CPU's swapped product).
SPECS = {"BTD,DNH->BTNH": ((2, 5, 8), (8, 3, 4)), "BTNH,NHD->BTD": ((2, 5, 3, 4), (3, 4, 8)),
         "BTD,DF->BTF": ((2, 5, 8), (8, 24)), "BTF,FD->BTD": ((2, 5, 24), (24, 8))}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", SPECS)
def test_projection_gradients_match_the_plain_einsum(spec, backend):
    x_shape, w_shape = SPECS[spec]
    keys = jax.random.split(jax.random.PRNGKey(2), 2)
    x, weight = jax.random.normal(keys[0], x_shape), jax.random.normal(keys[1], w_shape)
    _assert_same_gradients(lambda x, w: project(spec, x, w, BACKENDS[backend]),
                           lambda x, w: jnp.einsum(spec, x, w, precision="highest"), (x, weight))


@pytest.mark.parametrize("backend", BACKENDS)
def test_projection_gradients_in_bfloat16_keep_their_dtypes(backend):
    """bf16 operands: the gradients come back in bf16, within bf16's rounding of the float32 ones."""
    spec = "BTF,FD->BTD"
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    x, weight = (jax.random.normal(key, shape).astype(jnp.bfloat16) for key, shape in zip(keys, SPECS[spec]))
    _assert_same_gradients(lambda x, w: project(spec, x, w, BACKENDS[backend]),
                           lambda x, w: jnp.einsum(spec, x.astype(jnp.float32), w.astype(jnp.float32)).astype(x.dtype),
                           (x, weight), rtol=2e-2, atol=5e-2)


def test_rms_norm_gradients_match_the_plain_formula():
    keys = jax.random.split(jax.random.PRNGKey(4), 2)
    x, weight = 3 * jax.random.normal(keys[0], (2, 5, 16)) + 1, 1 + jax.random.normal(keys[1], (16,))

    def plain(x, w):
        return w * x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)

    _assert_same_gradients(lambda x, w: rms_norm(x, w, 1e-6), plain, (x, weight))
