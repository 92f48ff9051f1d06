"""Approximate search and quantized corpora as users run them: build-ann over an embed-corpus folder, search
with --ann against exact search, the index brought up to date after --update, int8 and binary shards
against sentence-transformers' quantize_embeddings."""

import json

import numpy as np
import pytest

from qwen3_jax.ann import ApproximateIndex, AnnSettings, build_ann
from qwen3_jax.cli import main
from qwen3_jax.corpus import embed_corpus, read_manifests
from qwen3_jax.index import Index

from tests.test_corpus import _documents, _write

pytest.importorskip("faiss")          # the ann extra; installed with the test extra


def _recall(found: list, exact: list) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, exact)]))


@pytest.fixture(scope="module")
def queries(embedder):
    return embedder.encode([f"river {w} city" for w in "paper light garden 東京 market forest".split()],
                           prompt="Find the document: ")


@pytest.mark.parametrize("kind", ["hnsw", "ivf-pq"])
def test_approximate_search_finds_what_exact_finds_and_follows_updates(embedder, checkpoint, queries, tmp_path,
                                                                       kind, capsys):
    documents = _documents(400, seed=5)
    path = _write(tmp_path / "docs.jsonl", documents)
    settings = dict(shard_size=64, model_name=str(checkpoint), quiet=True, out=lambda _: None)
    embed_corpus(embedder, path, tmp_path / "out", **settings)
    index = Index.open(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="build-ann --index"):
        index.search(queries, 10, approximate=True)
    record = build_ann(index, AnnSettings(kind=kind), quiet=True)
    assert record["vectors"] == 400
    exact_scores, exact = index.search(queries, 10)
    scores, found = index.search(queries, 10, approximate=True)
    assert _recall(found, exact) >= (1.0 if kind == "hnsw" else 0.9)
    same = [row for row, (a, b) in enumerate(zip(found, exact)) if a == b]
    assert same and np.array_equal(scores[same], exact_scores[same])      # candidates scored exactly, as exact does

    documents[3]["text"] = "a text changed after the index was built"
    documents.append({"id": "new", "text": "river paper city, appended"})
    _write(tmp_path / "docs.jsonl", documents)
    embed_corpus(embedder, path, tmp_path / "out", update=True, **settings)
    index = Index.open(tmp_path / "out")
    with pytest.raises(ValueError, match="built before its corpus changed.*build-ann"):
        index.search(queries, 10, approximate=True)
    record = build_ann(index, quiet=True)                    # the same kind, brought up to date
    assert record["settings"]["kind"] == kind and record["vectors"] == 401
    assert record["added"] == (401 if kind == "hnsw" else 64 + 17)   # hnsw: a changed shard rebuilds the graph
    exact_scores, exact = index.search(queries, 10)
    assert _recall(index.search(queries, 10, approximate=True)[1], exact) >= (1.0 if kind == "hnsw" else 0.9)

    documents.append({"id": "newer", "text": "appended once more"})
    _write(tmp_path / "docs.jsonl", documents)
    assert main(["embed-corpus", "--model", str(checkpoint), "--input", path, "--output", str(tmp_path / "out"),
                 "--shard-size", "64", "--update", "--quiet"]) == 0          # brings the ann index along
    # hnsw keeps the last shard's 17 held rows and adds its new one; ivf-pq drops and re-adds the shard
    assert ApproximateIndex.load(tmp_path / "out").record["added"] == (1 if kind == "hnsw" else 18)
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "out"), "--query", "river paper city", "--top-k", "3",
                 "--prompt-name", "query", "--ann"]) == 0
    approximate = json.loads(capsys.readouterr().out)["hits"]
    assert main(["search", "--index", str(tmp_path / "out"), "--query", "river paper city", "--top-k", "3",
                 "--prompt-name", "query"]) == 0
    assert approximate == json.loads(capsys.readouterr().out)["hits"]


@pytest.mark.parametrize("precision", ["int8", "binary"])
def test_quantized_shards_are_sentence_transformers_quantize_embeddings(embedder, checkpoint, queries, tmp_path,
                                                                         precision):
    from sentence_transformers.quantization import quantize_embeddings

    documents = _documents(300, seed=6)
    path = _write(tmp_path / "docs.jsonl", documents)
    embed_corpus(embedder, path, tmp_path / "float", shard_size=128, quiet=True, out=lambda _: None)
    embed_corpus(embedder, path, tmp_path / "q", shard_size=128, output_dtype=precision, quiet=True, out=lambda _: None)
    manifest = read_manifests(tmp_path / "q")[0]
    stored = np.concatenate([np.load(tmp_path / "q" / f"shard-00000{k}.npy") for k in range(3)])
    floats = embedder.encode([d["text"] for d in documents])
    ranges = np.asarray(manifest["calibration"], np.float32) if precision == "int8" else None
    expected = quantize_embeddings(floats, precision=precision, ranges=ranges)
    assert stored.dtype == expected.dtype == np.int8 and stored.shape == expected.shape
    assert (stored == expected).mean() >= 0.999          # a value within float rounding of a step may round apart
    on_disk = sum(p.stat().st_size for p in (tmp_path / "q").glob("shard-*.npy"))
    assert on_disk < sum(p.stat().st_size for p in (tmp_path / "float").glob("shard-*.npy")) / (3 if precision == "int8" else 20)

    # recall@10 against float32 search: at least that of sentence-transformers' search of the same
    # quantized corpus (its faiss path: uint8 for int8, ubinary for binary; candidates rescored in float)
    from sentence_transformers.quantization import semantic_search_faiss

    exact = Index.open(tmp_path / "float").search(queries, 10)[1]
    scores, found = Index.open(tmp_path / "q").search(queries, 10)
    corpus = floats if precision == "int8" else quantize_embeddings(floats, precision="ubinary")
    hits, _ = semantic_search_faiss(queries, corpus_embeddings=corpus, top_k=10, rescore_multiplier=4,
                                       corpus_precision="uint8" if precision == "int8" else "ubinary",
                                       calibration_embeddings=floats if precision == "int8" else None)
    theirs = [[documents[hit["corpus_id"]]["id"] for hit in row] for row in hits]
    assert _recall(found, exact) >= _recall(theirs, exact), (_recall(found, exact), _recall(theirs, exact))
    # the approximate index holds the read-back values: walking the whole graph (ef >= the corpus) finds
    # exactly what exact search finds; the default walk is a graph search, which may miss (measured: one
    # query's best hit, far from every document, was found from ef 100 on)
    build_ann(Index.open(tmp_path / "q"), quiet=True)
    walked_scores, walked = Index.open(tmp_path / "q").search(queries, 10, approximate=True, ef=len(documents))
    assert walked == found and np.array_equal(walked_scores, scores)
    assert _recall(Index.open(tmp_path / "q").search(queries, 10, approximate=True)[1], found) >= 0.95


def test_the_search_benchmark_prints_recall_and_speed_at_each_ef(tmp_path, capsys):
    figures = tmp_path / "search.json"
    assert main(["bench", "search", "--vectors", "3000", "--width", "32", "--ann-kinds", "hnsw,ivf-pq",
                 "--quantized", "int8", "--ann-ef", "64,1", "--json", str(figures)]) == 0
    printed = capsys.readouterr().out
    assert "hnsw ef=1: built in" in printed and "int8:" in printed
    result = json.loads(figures.read_text())
    assert result["exact_qps"] > 0 and result["vectors"] == 3000
    assert result["hnsw ef=64"]["recall_at_10"] == result["hnsw"]["recall_at_10"] >= 0.9     # 64: the default
    assert result["ivf-pq ef=1"]["recall_at_10"] < result["ivf-pq"]["recall_at_10"]         # one list probed
    assert 0.9 <= result["int8"]["recall_at_10"] <= 1.0
