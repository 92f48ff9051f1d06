"""The Flax model against transformers, layer by layer, on the same random checkpoint."""

import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax import load_model
from qwen3_jax.tokenize import TextTokenizer, pad_batch
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
