"""`qwen3-jax bench search --vectors N`: exact against approximate search (recall@10, queries/s, build time, size)
and quantized shards (size on disk, recall@10 against float32) over N synthetic unit vectors.

The vectors are drawn around N/100 random centres (embeddings of real corpora cluster by topic; vectors
uniform on the sphere have no neighbours to find), and each query is a corpus vector with noise of the
same size, so its true neighbours are a topic's vectors, as a real query's are.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from qwen3_jax.bench.common import peak_rss_gib

SHARD = 100_000


def synthetic_corpus(folder: Path, count: int, width: int, output_dtype: str, seed: int = 0) -> np.ndarray:
    """Writes a complete corpus folder of `count` clustered unit vectors (shards of SHARD); returns
    1,000 queries near them."""
    from qwen3_jax.corpus import CorpusSettings, manifest_name, new_manifest, write_shard
    from qwen3_jax.embedder import normalize_rows
    from qwen3_jax.quantize import calibration_ranges, quantize

    rng = np.random.default_rng(seed)
    centres = normalize_rows(rng.standard_normal((max(count // 100, 1), width), np.float32))
    manifest = new_manifest(CorpusSettings(model="random", input="random", dim=width, prefix="",
                                           output_dtype=output_dtype, shard_size=SHARD), process=0)
    ranges = None
    for k, start in enumerate(range(0, count, SHARD)):
        rows = min(SHARD, count - start)
        picked = np.random.default_rng([seed, k]).integers(0, len(centres), rows)
        vectors = normalize_rows(centres[picked] + np.random.default_rng([seed, k, 1]).standard_normal(
            (rows, width), np.float32) / np.sqrt(width))
        if output_dtype == "int8" and ranges is None:
            ranges = calibration_ranges(vectors[:10_000])
            manifest["calibration"] = ranges.tolist()
        stored = quantize(vectors, output_dtype, ranges) if output_dtype in ("int8", "binary") \
            else vectors.astype(output_dtype)
        entry = write_shard(folder, k, stored, list(range(start, start + rows)), start=start, records=rows)
        entry["digest"] = f"random-{k}"
        manifest["shards"].append(entry)
    manifest.update(complete=True, records=count)
    (folder / manifest_name(0, 1)).write_text(json.dumps(manifest))
    near = np.random.default_rng([seed, 2])
    chosen = normalize_rows(centres[near.integers(0, len(centres), 1000)] +
                            near.standard_normal((1000, width), np.float32) / np.sqrt(width))
    return normalize_rows(chosen + near.standard_normal((1000, width), np.float32) / np.sqrt(width))


def _recall(found: list, exact: list) -> float:
    return float(np.mean([len(set(a) & set(b)) / max(len(b), 1) for a, b in zip(found, exact)]))


def _size_mib(paths) -> float:
    return sum(p.stat().st_size for p in paths) / 2**20


def run_search_benchmark(*, vectors: int, width: int, kinds: list[str], quantized: list[str], efs: list[int] = (),
                         out=print) -> dict:
    """Exact search of 1,000 queries over `vectors` float16 vectors of `width`; then each approximate
    index kind (build, recall@10 against exact, queries/s at its default ef and at each of `efs`) and
    each quantized storage (size, recall@10)."""
    from qwen3_jax.ann import AnnSettings, build_ann
    from qwen3_jax.index import Index

    result: dict = {"vectors": vectors, "width": width}
    with tempfile.TemporaryDirectory(prefix="qwen3-jax-search-") as tmp:
        folder = Path(tmp) / "float16"
        folder.mkdir()
        queries = synthetic_corpus(folder, vectors, width, "float16")
        index = Index.open(folder)
        begun = time.perf_counter()
        _, exact = index.search(queries, 10)
        exact_s = time.perf_counter() - begun
        result.update(exact_qps=1000 / exact_s, float16_mib=_size_mib(folder.glob("shard-*.npy")))
        out(f"exact: {1000 / exact_s:,.1f} queries/s over {vectors:,} float16 vectors of width {width} "
            f"({result['float16_mib']:,.0f} MiB)")
        for kind in kinds:
            begun = time.perf_counter()
            build_ann(index, AnnSettings(kind=kind), quiet=True)
            built = time.perf_counter() - begun
            searched = Index.open(folder)
            searched.search(queries[:10], 10, approximate=True)          # reads the index once
            index_mib = _size_mib((folder / "ann").glob("index-*"))
            for ef in [None, *efs]:
                begun = time.perf_counter()
                _, found = searched.search(queries, 10, approximate=True, ef=ef)
                seconds = time.perf_counter() - begun
                name = kind if ef is None else f"{kind} ef={ef}"
                row = {"build_s": built, "recall_at_10": _recall(found, exact), "qps": 1000 / seconds,
                       "speedup": exact_s / seconds, "index_mib": index_mib}
                result[name] = row
                out(f"{name}: built in {built:,.1f} s, recall@10 {row['recall_at_10']:.3f}, {row['qps']:,.0f} "
                    f"queries/s ({row['speedup']:,.0f}x exact), index {row['index_mib']:,.0f} MiB")
        for precision in quantized:
            other = Path(tmp) / precision
            other.mkdir()
            synthetic_corpus(other, vectors, width, precision)
            begun = time.perf_counter()
            _, found = Index.open(other).search(queries, 10)
            seconds = time.perf_counter() - begun
            row = {"mib": _size_mib(other.glob("shard-*.npy")), "recall_at_10": _recall(found, exact),
                   "qps": 1000 / seconds}
            result[precision] = row
            out(f"{precision}: {row['mib']:,.0f} MiB on disk, recall@10 {row['recall_at_10']:.3f} against float16, "
                f"{row['qps']:,.1f} queries/s (exact)")
    result["peak_rss_gib"] = peak_rss_gib()
    return result
