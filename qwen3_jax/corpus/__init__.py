"""Embedding a whole corpus into a folder that `index` searches and `ann` indexes.

- `sources`: the input read as one stream of records (.txt, .jsonl, Parquet, a folder of them, stdin).
- `store`: the folder on disk (shards, manifests) and its atomic writes.
- `job`: the embed-corpus job (claim the folder, plan the shards, run, resume, update).
- `local`, `ray_data`: the engines that embed a job's shards, in this process or on a Ray cluster.
"""

from qwen3_jax.claims import LOCK
from qwen3_jax.corpus.job import CorpusJob, check_folder_free, check_input, embed_corpus
from qwen3_jax.corpus.local import LocalEngine
from qwen3_jax.corpus.ray_data import EmbedBatch, RayEngine
from qwen3_jax.corpus.sources import given_texts, iter_corpus, read_corpus
from qwen3_jax.corpus.store import (ANN_FOLDER, CorpusSettings, manifest_name, new_manifest, read_manifests,
                                    write_shard)

__all__ = ["ANN_FOLDER", "CorpusJob", "CorpusSettings", "EmbedBatch", "LOCK", "LocalEngine", "RayEngine",
           "check_folder_free", "check_input", "embed_corpus", "given_texts", "iter_corpus", "manifest_name",
           "new_manifest", "read_corpus", "read_manifests", "write_shard"]
