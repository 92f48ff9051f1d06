"""The Flax model against transformers, layer by layer, on the same random checkpoint."""

import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax import load_model
from qwen3_jax.tokenization import TextTokenizer, pad_batch
from tests.conftest import CORPUS, long_text
from tests.reference import cosine_rows, transformers_hidden_states


def _batch(folder, side="right"):
    tok = TextTokenizer.from_folder(folder)
    rows = tok.encode(["", long_text(), CORPUS[4], CORPUS[6]], max_length=1024)
    length = max(map(len, rows))
    assert length > 400
    return pad_batch(rows, length, len(rows), tok.end_of_text_id, side)


@pytest.mark.parametrize("side", ["right", "left"])
def test_fp32_layers_match_transformers(checkpoint, side):
    ids, valid = _batch(checkpoint, side)
    ref_layers, ref_final = transformers_hidden_states(checkpoint, ids, valid)
    model = load_model(checkpoint, dtype="float32")
    final, layers = model(jnp.asarray(ids), jnp.asarray(valid), return_layer_states=True)
    final, layers = np.asarray(final), np.asarray(layers)
    assert layers.shape[0] == ref_layers.shape[0] + 1
    for i, ref in enumerate(ref_layers):
        assert np.abs(layers[i][valid] - ref[valid]).max() <= 1e-4, f"layer {i}"
    assert np.abs(final[valid] - ref_final[valid]).max() <= 1e-4


def test_states_at_chosen_positions_match_transformers(checkpoint):
    """`at` runs the last layer's output projection and MLP on the chosen tokens only (pooling asks for
    the last token of each text); any positions work, several per row."""
    ids, valid = _batch(checkpoint)
    _, ref_final = transformers_hidden_states(checkpoint, ids, valid)
    lengths = valid.sum(axis=1)
    at = np.stack([np.maximum(lengths - 1, 0), lengths // 2, np.zeros_like(lengths)], axis=1)
    model = load_model(checkpoint, dtype="float32")
    real = valid[np.arange(len(at))[:, None], at]
    expected = np.take_along_axis(ref_final, at[..., None], axis=1)
    for prune_last in (False, True):
        states = np.asarray(model(jnp.asarray(ids), jnp.asarray(valid), at=jnp.asarray(at), prune_last=prune_last))
        assert states.shape == (*at.shape, ref_final.shape[-1])
        assert np.abs(states[real] - expected[real]).max() <= 1e-4, f"prune_last={prune_last}"
    with pytest.raises(ValueError, match="return_layer_states"):
        model(jnp.asarray(ids), jnp.asarray(valid), at=jnp.asarray(at), return_layer_states=True)
    with pytest.raises(ValueError, match="prune_last needs"):
        model(jnp.asarray(ids), jnp.asarray(valid), prune_last=True)


def test_bf16_compute_stays_close_to_fp32_reference(checkpoint):
    ids, valid = _batch(checkpoint)
    _, ref_final = transformers_hidden_states(checkpoint, ids, valid)
    model = load_model(checkpoint, dtype="bfloat16")
    final = np.asarray(model(jnp.asarray(ids), jnp.asarray(valid)).astype(jnp.float32))
    assert final.dtype == np.float32
    assert cosine_rows(final[valid], ref_final[valid]).min() >= 0.99


def test_padding_side_does_not_change_real_tokens(checkpoint):
    right_ids, right_valid = _batch(checkpoint, "right")
    left_ids, left_valid = _batch(checkpoint, "left")
    model = load_model(checkpoint)
    right = np.asarray(model(jnp.asarray(right_ids), jnp.asarray(right_valid)))
    left = np.asarray(model(jnp.asarray(left_ids), jnp.asarray(left_valid)))
    np.testing.assert_allclose(right[right_valid], left[left_valid], atol=1e-4)


def test_parameter_and_compute_dtypes_are_explicit(checkpoint_bf16):
    model = load_model(checkpoint_bf16, dtype="float32", param_dtype="bfloat16")
    assert model.embed[...].dtype == jnp.bfloat16
    out = model(jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), bool))
    assert out.dtype == jnp.float32


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float32_products_ask_for_full_precision(checkpoint, dtype):
    """GPUs round float32 products to TF32 and TPUs to bf16 unless told otherwise: every product of the
    forward pass, its gradient and the contrastive loss asks for HIGHEST in float32, none in bf16."""
    import jax
    from flax import nnx

    from qwen3_jax.train.losses import infonce

    graphdef, params = nnx.split(load_model(checkpoint, dtype=dtype))

    def loss(params, ids, valid):
        states = nnx.merge(graphdef, params)(ids, valid).astype(jnp.float32)
        documents = states[1::2, -1].reshape(2, 1, -1)
        return infonce(states[::2, -1], documents, jnp.ones((2, 1), bool), temperature=0.05)[0]

    ids, valid = jnp.ones((4, 64), jnp.int32), jnp.ones((4, 64), bool)
    text = jax.jit(jax.grad(loss)).lower(params, ids, valid).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert len(dots) > 10
    full = [line for line in dots if "precision = [HIGHEST, HIGHEST]" in line]
    if dtype == "float32":
        assert full == dots
    else:       # bf16 products keep the fast default; the loss and attention gradient compute in float32
        assert 0 < len(full) < len(dots)
