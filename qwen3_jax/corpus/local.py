"""What every corpus engine does with a shard (`embed_shard`, through `encode_texts`, the one call to
the embedder's EmbeddingEngine), and `LocalEngine`, which does it in this process (`ray_data.RayEngine`:
on a Ray cluster's workers). An engine gives a `CorpusJob` the model's dimension and max length, and
`resolve_prefix`, `encode`, `submit`, `drain` and `tokens_embedded`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwen3_jax.checks import check_max_length
from qwen3_jax.corpus.sources import Item
from qwen3_jax.corpus.store import (CorpusSettings, calibration_tag, records_digest, write_rejects,
                                    write_shard)
from qwen3_jax.quantize import quantize


def encode_texts(embedder, settings: CorpusSettings, texts: list[str], batch_size: int) -> np.ndarray:
    """`texts` embedded by the engine of `embedder` (a Qwen3Embedder) as the corpus's `settings` say
    (prefix, dim, max length), `batch_size` texts a batch."""
    engine = embedder.engine
    rows = engine.rows(texts, prompt=settings.prefix, max_length=check_max_length(settings.max_length))
    return engine.vectors(engine.run(rows, batch_size=batch_size), settings.dim)


def embed_shard(embedder, settings: CorpusSettings, calibration, output: Path, shard: int, items: list[Item], *,
                batch_size: int = 32) -> dict:
    """Embeds the readable records among `items`, shard `shard` of the folder `output`, with
    `embedder` (a Qwen3Embedder, `batch_size` texts a batch) and writes its files (vectors as the
    folder stores them, quantized with `calibration`'s ranges for int8; ids; its unreadable lines),
    each atomically; returns its manifest entry. Whichever engine runs it, the same shard gives the
    same files."""
    good = [item for item in items if item.error is None]
    bad = [item for item in items if item.error is not None]
    vectors = encode_texts(embedder, settings, [item.text for item in good], batch_size) if good \
        else np.zeros((0, settings.dim), np.float32)
    if settings.output_dtype in ("int8", "binary"):
        stored = quantize(vectors, settings.output_dtype,
                          np.asarray(calibration, np.float32) if settings.output_dtype == "int8" else None)
    else:
        stored = vectors.astype(settings.output_dtype)
    entry = write_shard(output, shard, stored, [item.id for item in good], start=shard * settings.shard_size,
                        records=len(items))
    entry["digest"] = records_digest(items)
    if settings.output_dtype == "int8":
        entry["calibration"] = calibration_tag(calibration)
    write_rejects(output, shard, bad)
    if bad:
        entry["rejected"] = len(bad)
    return entry


class LocalEngine:
    """Embeds a job's shards in this process, one after the other, with a Qwen3Embedder."""

    def __init__(self, embedder, batch_size: int = 32):
        """`embedder`: a Qwen3Embedder; `batch_size`: texts a batch."""
        self.embedder, self.batch_size = embedder, batch_size
        self.dimension, self.max_length = embedder.dimension, embedder.max_length

    @property
    def tokens_embedded(self) -> int:
        return self.embedder.tokens_embedded

    def resolve_prefix(self, prompt_name: str | None, instruction: str | None) -> str:
        """The text put before every text for the prompt named `prompt_name` or the `instruction`."""
        return self.embedder.engine.prefix(prompt_name, None, instruction)

    def encode(self, settings: CorpusSettings, texts: list[str]) -> np.ndarray:
        """`texts` embedded as the corpus's `settings` say (int8's calibration)."""
        return encode_texts(self.embedder, settings, texts, self.batch_size)

    def submit(self, settings: CorpusSettings, calibration, output: Path, shard: int, items: list[Item]) -> list[dict]:
        """Embeds and writes the shard (see embed_shard); returns the manifest entries of the shards now finished."""
        return [embed_shard(self.embedder, settings, calibration, output, shard, items, batch_size=self.batch_size)]

    def drain(self) -> list[dict]:
        """The entries of shards still being embedded, once they are finished (none here)."""
        return []
