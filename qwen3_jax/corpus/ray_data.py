"""Embedding with Ray (the `ray` extra): a cluster's workers, one model each, embed whole shards at a time.

- `RayEngine`: the engine of `embed-corpus --engine ray`. This process reads the input and keeps the
  manifest, exactly as a one-process job does; each worker (a Ray actor holding one Qwen3Embedder)
  embeds whole shards and writes their files. A worker that dies is restarted by Ray and its shard
  tried again (the shard's files are replaced atomically; the manifest lists a shard once, when its
  result comes back), so the folder is the one a one-process run writes, and a killed job resumes as
  one does.
- `EmbedBatch`: a callable class for `ray.data.Dataset.map_batches`, for pipelines of your own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwen3_jax.corpus.local import embed_shard, encode_texts
from qwen3_jax.corpus.store import CorpusSettings
from qwen3_jax.extras import require


def _ray():
    require("ray", "--engine ray")
    import ray

    return ray


def _load(model: str, dtype: str, max_length: int | None):
    from qwen3_jax.embedder import Qwen3Embedder

    return Qwen3Embedder.from_pretrained(model, dtype=dtype, max_length=max_length)


class ShardWorker:
    """One worker's model (a Ray actor when wrapped by `ray.remote`)."""

    def __init__(self, model: str, dtype: str, max_length: int | None, batch_size: int):
        """Loads `model` (a folder or hub id) in compute `dtype`, texts cut at `max_length`, embedded
        `batch_size` a batch."""
        self.embedder, self.batch_size = _load(model, dtype, max_length), batch_size

    def describe(self, prompt_name: str | None, instruction: str | None) -> tuple[int, str, int]:
        """(dimension, the prefix of the prompt named `prompt_name` or of the `instruction`, max length)
        of this worker's model."""
        embedder = self.embedder
        return embedder.dimension, embedder.engine.prefix(prompt_name, None, instruction), embedder.max_length

    def encode(self, settings: CorpusSettings, texts: list[str]) -> np.ndarray:
        """`texts` embedded as the corpus's `settings` say (int8's calibration)."""
        return encode_texts(self.embedder, settings, texts, self.batch_size)

    def embed(self, settings: CorpusSettings, calibration, output: str, shard: int, items: list) -> tuple[dict, int]:
        """Embeds and writes one shard (`local.embed_shard`'s arguments); returns its manifest entry and
        the tokens it embedded."""
        before = self.embedder.tokens_embedded
        entry = embed_shard(self.embedder, settings, calibration, Path(output), shard, items,
                            batch_size=self.batch_size)
        return entry, self.embedder.tokens_embedded - before


class RayEngine:
    """`workers` Ray actors, each with its own model (`num_gpus` each: 1 on GPU nodes), embedding shards
    for a `CorpusJob`; at most two shards a worker are in flight, so memory stays a few shards."""

    def __init__(self, model: str, *, workers: int = 2, address: str | None = None, dtype: str = "float32",
                 max_length: int | None = None, batch_size: int = 32, num_gpus: float = 0):
        """`model`: a folder or hub id, loaded by each worker in compute `dtype` (texts cut at
        `max_length`, embedded `batch_size` a batch); `address`: the cluster's (None: one started here
        with a CPU a worker)."""
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     **({} if address else {"num_cpus": workers}))
        actor = ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=1, num_gpus=num_gpus)(ShardWorker)
        self.workers = [actor.remote(model, dtype, max_length, batch_size) for _ in range(workers)]
        self.dimension, _, self.max_length = ray.get(self.workers[0].describe.remote(None, None))
        self._pending: list = []            # results to come, oldest first
        self._submitted = 0
        self.tokens_embedded = 0

    def resolve_prefix(self, prompt_name: str | None, instruction: str | None) -> str:
        """The text put before every text for the prompt named `prompt_name` or the `instruction`."""
        return _ray().get(self.workers[0].describe.remote(prompt_name, instruction))[1]

    def encode(self, settings: CorpusSettings, texts: list[str]) -> np.ndarray:
        """`texts` embedded by the first worker as the corpus's `settings` say (int8's calibration)."""
        return _ray().get(self.workers[0].encode.remote(settings, texts))

    def submit(self, settings: CorpusSettings, calibration, output: Path, shard: int, items: list) -> list[dict]:
        """Hands the shard to the next worker in turn (first waiting while every worker has two in
        flight); returns the entries of shards finished meanwhile."""
        finished = self._finished(wait_for=max(0, len(self._pending) + 1 - 2 * len(self.workers)))
        worker = self.workers[self._submitted % len(self.workers)]
        self._submitted += 1
        self._pending.append(worker.embed.remote(settings, calibration, str(output), shard, items))
        return finished

    def drain(self) -> list[dict]:
        """The entries of every shard still in flight, once they are finished."""
        return self._finished(wait_for=len(self._pending))

    def _finished(self, wait_for: int) -> list[dict]:
        """The entries of every finished shard, after waiting until at least `wait_for` are."""
        if not self._pending:
            return []
        ray = _ray()
        if wait_for:
            done, self._pending = ray.wait(self._pending, num_returns=wait_for)
        else:
            done, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)
        entries = []
        for entry, tokens in ray.get(done):
            self.tokens_embedded += tokens
            entries.append(entry)
        return entries

    def close(self) -> None:
        """Ends the workers."""
        for worker in self.workers:
            _ray().kill(worker)


class EmbedBatch:
    """For `ds.map_batches(EmbedBatch, fn_constructor_kwargs={"model": ...}, batch_size=..., concurrency=N)`:
    each actor loads the model once; a batch's `text_column` is embedded into an "embedding" column
    (`prompt_name` or `instruction` for queries, `dim` for MRL)."""

    def __init__(self, model: str, *, dtype: str = "float32", max_length: int | None = None,
                 prompt_name: str | None = None, instruction: str | None = None, dim: int | None = None,
                 text_column: str = "text", batch_size: int = 32):
        self.embedder = _load(model, dtype, max_length)
        self.prompt_name, self.instruction, self.dim = prompt_name, instruction, dim
        self.text_column, self.batch_size = text_column, batch_size

    def __call__(self, batch: dict) -> dict:
        texts = [str(text) for text in batch[self.text_column]]
        vectors = self.embedder.encode(texts, prompt_name=self.prompt_name, instruction=self.instruction, dim=self.dim,
                                       batch_size=self.batch_size)
        return {**batch, "embedding": vectors}
