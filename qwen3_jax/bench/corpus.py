"""`qwen3-jax bench corpus`: embed-corpus's rate and resume check, and exact search over many vectors."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from qwen3_jax.bench.common import bench_checkpoint, parse_token_range, peak_rss_gib, synthetic_texts

def run_corpus_benchmark(*, model: str | None, random: str | None, layers: int | None, tokenizer: str | None,
                         dtype: str, documents: int, tokens: str, batch_size: int, search_vectors: int,
                         out=print) -> dict:
    """embed-corpus on `documents` synthetic texts (log-uniform lengths over `tokens`): documents/s,
    tokens/s, peak RSS, and the time a rerun takes to find the job complete; then exact search of
    1,000 queries over `search_vectors` random float16 vectors of the model's width."""
    from qwen3_jax.corpus import embed_corpus
    from qwen3_jax.embedder import Qwen3Embedder

    low, high = parse_token_range(tokens)
    result: dict = {"documents": documents, "tokens_range": tokens, "dtype": dtype}
    with bench_checkpoint(model=model, random=random, layers=layers, tokenizer=tokenizer, out=out) as folder, \
            tempfile.TemporaryDirectory(prefix="qwen3-jax-corpus-") as tmp:
        embedder = Qwen3Embedder.from_pretrained(folder, dtype=dtype)
        texts = synthetic_texts(embedder.tokenizer, documents, low, high, long_tail=True)
        (Path(tmp) / "corpus.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
        start = time.perf_counter()
        embed_corpus(embedder, Path(tmp) / "corpus.txt", Path(tmp) / "index", batch_size=batch_size,
                     shard_size=max(1, documents // 10), out=lambda _: None)
        seconds = time.perf_counter() - start
        real = embedder.tokens_embedded
        start = time.perf_counter()
        embed_corpus(embedder, Path(tmp) / "corpus.txt", Path(tmp) / "index", batch_size=batch_size,
                     shard_size=max(1, documents // 10), out=lambda _: None)
        result.update(seconds=seconds, documents_per_s=documents / seconds, tokens_per_s=real / seconds,
                      real_tokens=real, computed_per_real=embedder.tokens_computed / real,
                      compiled_programs=embedder.compiled_programs, rerun_complete_s=time.perf_counter() - start,
                      peak_rss_gib=peak_rss_gib())
        width = embedder.dimension
    if search_vectors:
        result.update(_search_benchmark(search_vectors, width, out))
    out(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return result


def _search_benchmark(count: int, width: int, out) -> dict:
    """1,000 queries over `count` unit vectors (bench search's synthetic corpus) stored as float16."""
    from qwen3_jax.bench.search import synthetic_corpus
    from qwen3_jax.index import Index

    with tempfile.TemporaryDirectory(prefix="qwen3-jax-search-") as tmp:
        queries = synthetic_corpus(Path(tmp), count, width, "float16")
        start = time.perf_counter()
        Index.open(tmp).search(queries, 10)
        seconds = time.perf_counter() - start
        out(f"search: 1,000 queries, top 10, over {count:,} float16 vectors of width {width}: {seconds:.1f} s")
        return {"search_vectors": count, "search_s": seconds, "search_peak_rss_gib": peak_rss_gib()}
