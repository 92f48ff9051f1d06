"""Quantized embeddings with sentence-transformers' `quantize_embeddings` semantics.

int8 / uint8 map each dimension's calibration range [min, max] onto 256 steps, rounding down (int8
shifted by -128); a value outside its range saturates at the range's end. binary / ubinary keep the
sign bit of each value, packed eight to a byte row by row (binary shifted by -128), so a width that is
not a multiple of 8 is padded with zero bits. `dequantize` reads int8 and binary back as float32 for
scoring against float queries.
"""

from __future__ import annotations

import numpy as np

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")
CALIBRATED = ("int8", "uint8")

# Texts whose embeddings set the int8 / uint8 ranges when no calibration set is given: short sentences
# of many kinds and languages, queries and documents alike.
DEFAULT_CALIBRATION_TEXTS = [
    "What is the capital of China?", "The capital of China is Beijing.", "How do vaccines train the immune system?",
    "Vaccines expose the immune system to a harmless piece of a pathogen.", "Explain gravity",
    "Gravity is a force that attracts two bodies towards each other.", "best hiking trails near Zurich",
    "The Uetliberg is a mountain on the edge of Zurich with views over the lake.", "python sort dict by value",
    "sorted(d.items(), key=lambda item: item[1]) returns the pairs ordered by value.",
    "def add(a, b):\n    return a + b", "SELECT name FROM users WHERE age > 30 ORDER BY name;",
    "机器学习是人工智能的一个分支。", "東京は日本の首都です。", "Der Rhein fließt durch Basel und Köln.",
    "La tour Eiffel a été construite pour l'Exposition universelle de 1889.", "¿Cuántos planetas tiene el sistema solar?",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.", "symptoms of iron deficiency",
    "Fatigue, pale skin and shortness of breath are common signs of iron deficiency.",
    "The quarterly revenue grew 12% year over year, driven by subscriptions.", "refund policy for damaged items",
    "Items that arrive damaged can be returned within 30 days for a full refund.", "Emoji test 🚀🔥 works",
    "JAX compiles numerical programs with XLA.", "A transformer layer applies attention and then an MLP.",
    "how long to boil an egg", "A soft-boiled egg takes about six minutes in boiling water.",
    "The 1969 Apollo 11 mission landed the first humans on the Moon.", "Москва — столица России.",
    "सूरज पूर्व में उगता है।", "The court ruled that the contract was void for lack of consideration.",
]


def calibration_ranges(embeddings: np.ndarray) -> np.ndarray:
    """Each dimension's [min, max] over calibration embeddings [n, D]: float32 [2, D]."""
    embeddings = np.asarray(embeddings, np.float32)
    return np.stack([embeddings.min(axis=0), embeddings.max(axis=0)])


def quantize(embeddings: np.ndarray, precision: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """Embeddings [n, D] as `precision` (one of PRECISIONS); int8 and uint8 need `ranges` [2, D]."""
    embeddings = np.asarray(embeddings, np.float32)
    if precision == "float32":
        return embeddings
    if precision in ("binary", "ubinary"):
        packed = np.packbits(embeddings > 0, axis=-1)
        return (packed.astype(np.int16) - 128).astype(np.int8) if precision == "binary" else packed
    if precision not in CALIBRATED:
        raise ValueError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if ranges is None:
        raise ValueError(f"{precision} needs calibration ranges (calibration_ranges of sample embeddings)")
    starts, ends = np.asarray(ranges, np.float32)
    steps = (ends - starts) / 255
    levels = np.clip(np.floor((embeddings - starts) / np.where(steps == 0, 1, steps)), 0, 255)
    return (levels - 128).astype(np.int8) if precision == "int8" else levels.astype(np.uint8)


def dequantize(stored: np.ndarray, precision: str, dim: int, ranges: np.ndarray | None = None) -> np.ndarray:
    """float32 [n, dim] that `stored` (written by `quantize` as int8 or binary) stands for: each int8
    level's midpoint in its range; each sign bit as +-1/sqrt(dim), so a row keeps unit length."""
    if precision == "int8":
        starts, ends = np.asarray(ranges, np.float32)
        return starts + (stored.astype(np.float32) + 128.5) * ((ends - starts) / 255)
    if precision == "binary":
        bits = np.unpackbits((stored.astype(np.int16) + 128).astype(np.uint8), axis=-1)[:, :dim]
        return (bits.astype(np.float32) * 2 - 1) / np.float32(np.sqrt(dim))
    return np.asarray(stored, np.float32)
