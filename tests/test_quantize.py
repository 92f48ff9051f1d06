"""Quantized embeddings against sentence-transformers' quantize_embeddings on the same floats."""

import numpy as np
import pytest
from sentence_transformers.util.quantization import quantize_embeddings

from qwen3_jax.quantize import calibration_ranges, quantize


@pytest.mark.parametrize("width", [64, 36])
@pytest.mark.parametrize("precision", ["float32", "int8", "uint8", "binary", "ubinary"])
def test_quantize_equals_sentence_transformers(precision, width):
    rng = np.random.default_rng(width)
    calibration = rng.normal(0, 0.1, (200, width)).astype(np.float32)
    embeddings = rng.normal(0, 0.15, (50, width)).astype(np.float32)        # some beyond the calibration range
    embeddings[0, :4] = calibration.min(axis=0)[:4]                         # the range's ends themselves
    embeddings[1, :4] = calibration.max(axis=0)[:4]
    got = quantize(embeddings, precision, calibration_ranges(calibration))
    expected = quantize_embeddings(embeddings, precision, calibration_embeddings=calibration)
    assert got.dtype == expected.dtype and np.array_equal(got, expected)


def test_int8_needs_ranges_and_a_flat_dimension_does_not_divide_by_zero():
    with pytest.raises(ValueError, match="calibration ranges"):
        quantize(np.zeros((2, 8), np.float32), "int8")
    flat = np.zeros((3, 8), np.float32)
    assert np.array_equal(quantize(flat, "uint8", calibration_ranges(flat)), np.zeros((3, 8), np.uint8))
    with pytest.raises(ValueError, match="precision='int4'"):
        quantize(flat, "int4")
