"""What a corpus folder, an approximate index and a search promise at their edges (docs/corpus-and-search.md,
"Guarantees"): tie order whatever the call, complete only when every process agrees, one writer at a
time, the weights' fingerprint checked, every refusal before anything is deleted."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from qwen3_jax.checks import UsageError
from qwen3_jax.corpus import (CorpusSettings, LOCK, embed_corpus, manifest_name, new_manifest, read_manifests,
                              write_shard)
from qwen3_jax.embedder import normalize_rows
from qwen3_jax.index import Index
from qwen3_jax.quantize import calibration_ranges, quantize
from qwen3_jax.textio import FolderBusy

from tests.test_corpus import _documents, _write

WIDTH = 64


def _folder(folder, vectors: np.ndarray, output_dtype: str = "float32", *, processes: int = 1, shard: int = 50):
    """A complete corpus folder holding `vectors` (ids: their positions), written as embed-corpus writes one."""
    folder.mkdir(exist_ok=True)
    settings = CorpusSettings(model="random", input="random", dim=vectors.shape[1], prefix="",
                              output_dtype=output_dtype, shard_size=shard, num_processes=processes)
    manifests = [new_manifest(settings, process=p) for p in range(processes)]
    ranges = calibration_ranges(vectors) if output_dtype == "int8" else None
    for m in manifests:
        m["calibration"] = None if ranges is None else ranges.tolist()
    for k, start in enumerate(range(0, len(vectors), shard)):
        rows = vectors[start:start + shard]
        stored = quantize(rows, output_dtype, ranges) if output_dtype in ("int8", "binary") else rows.astype(output_dtype)
        entry = write_shard(folder, k, stored, list(range(start, start + len(rows))), start=start, records=len(rows))
        manifests[k % processes]["shards"].append({**entry, "digest": f"random-{k}"})
    for p, m in enumerate(manifests):
        m.update(complete=True, records=len(vectors), input=[["random", len(vectors), 0]])
        (folder / manifest_name(p, processes)).write_text(json.dumps(m))
    return folder


@pytest.mark.parametrize("output_dtype", ["float32", "float16", "int8", "binary"])
def test_equal_scores_come_lower_position_first_whatever_the_call(tmp_path, output_dtype):
    rng = np.random.default_rng(0)
    vectors = normalize_rows(rng.standard_normal((400, WIDTH)).astype(np.float32))
    duplicate = vectors[7].copy()
    copies = np.arange(7, 400, 9)                          # 45 copies of one document, in every shard and block
    vectors[copies] = duplicate
    index = Index.open(_folder(tmp_path / "index", vectors, output_dtype))
    near = normalize_rows(duplicate + rng.standard_normal(WIDTH).astype(np.float32) * 0.1)
    others = normalize_rows(rng.standard_normal((40, WIDTH)).astype(np.float32))
    for k in (1, 3, 20):
        results = []
        for block_rows in (13, 64, 1000):
            for batch in (near[None], np.vstack([near, others]), np.vstack([others[:5], near, others])):
                scores, ids = index.search(batch, k, block_rows=block_rows)
                row = int(np.flatnonzero((batch == near).all(axis=1))[0])
                results.append((scores[row].tolist(), ids[row]))
        assert all(result == results[0] for result in results), (k, output_dtype)
        scores, ids = results[0]
        assert ids == copies[:k].tolist() and len(set(scores)) == 1   # every copy scores alike; the first ones win


def test_a_split_folder_is_complete_only_when_every_process_agrees_on_the_input(tmp_path):
    vectors = normalize_rows(np.random.default_rng(1).standard_normal((120, WIDTH)).astype(np.float32))
    folder = _folder(tmp_path / "two", vectors, processes=2)
    assert len(Index.open(folder)) == 120
    second = folder / manifest_name(1, 2)
    manifest = json.loads(second.read_text())
    manifest.update(records=150, input=[["random", 150, 1]])    # process 1 finished an --update, process 0 not
    second.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not complete: its processes finished over different inputs"):
        Index.open(folder)


# --- corpus jobs ---------------------------------------------------------------------------------------------


def _quiet(**settings) -> dict:
    return dict(quiet=True, out=lambda _: None, **settings)


def test_a_second_job_is_refused_at_once_and_a_killed_jobs_lock_goes_with_it(embedder, checkpoint, tmp_path,
                                                                               compile_cache, monkeypatch, capsys):
    from qwen3_jax import Qwen3Embedder
    from qwen3_jax.cli import main

    path = _write(tmp_path / "docs.jsonl", _documents(1500, seed=2))
    folder = tmp_path / "out"
    command = [sys.executable, "-m", "qwen3_jax.cli", "embed-corpus", "--model", str(checkpoint), "--input", path,
               "--output", str(folder), "--shard-size", "100", "--quiet", "--compile-cache", compile_cache]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not (folder.is_dir() and read_manifests(folder) and read_manifests(folder)[0]["shards"]):
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.05)
        for settings in ({}, {"dim": 32}, {"overwrite": True}, {"num_processes": 2, "process": 1}):
            with pytest.raises(FolderBusy, match=rf"{re.escape(str(folder))} is in use by embed-corpus"):
                embed_corpus(embedder, path, folder, shard_size=100, model_name=str(checkpoint), **_quiet(**settings))
        with monkeypatch.context() as patched:            # the command line refuses before it loads the model
            patched.setattr(Qwen3Embedder, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
            assert main(["embed-corpus", "--model", str(checkpoint), "--input", path, "--output", str(folder),
                         "--shard-size", "100", "--quiet"]) == 1
            assert f"{folder} is in use by embed-corpus (pid {first.pid})" in capsys.readouterr().err
        assert first.poll() is None                       # it was never disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    manifest = embed_corpus(embedder, path, folder, shard_size=100, model_name=str(checkpoint), **_quiet())
    assert manifest["complete"] and len(Index.open(folder)) == 1500
    assert (folder / LOCK).is_file()                      # kept: the lock is the kernel's, not the file's


def test_other_weights_at_the_models_path_are_refused_with_overwrite_named(embedder, checkpoint, tokenizers_pair,
                                                                           vocab_size, tmp_path, capsys):
    from qwen3_jax.cli import main
    from tests.conftest import build_checkpoint

    model = shutil.copytree(checkpoint, tmp_path / "model")
    path = _write(tmp_path / "docs.jsonl", _documents(30))
    embed_corpus(embedder, path, tmp_path / "out", shard_size=10, model_name=str(model), **_quiet())
    assert main(["search", "--index", str(tmp_path / "out"), "--query", "river", "--top-k", "1"]) == 0
    build_checkpoint(model, tokenizer=tokenizers_pair[1], vocab_size=vocab_size, seed=1)   # `init-random --overwrite`
    for update in (False, True):
        with pytest.raises(FileExistsError, match=rf"other weights than {model}'s.*--overwrite"):
            embed_corpus(embedder, path, tmp_path / "out", shard_size=10, model_name=str(model), update=update,
                         **_quiet())
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "out"), "--query", "river", "--top-k", "1"]) == 1
    assert f"the weights at {model} are not those {tmp_path / 'out'} was embedded with" in capsys.readouterr().err
    manifest = read_manifests(tmp_path / "out")[0]
    del manifest["weights"]                               # a folder made before manifests kept them resumes
    (tmp_path / "out" / manifest_name(0, 1)).write_text(json.dumps(manifest))
    assert embed_corpus(embedder, path, tmp_path / "out", shard_size=10, model_name=str(model), **_quiet())["complete"]


def test_overwrite_refuses_before_it_deletes_anything(embedder, checkpoint, tmp_path):
    path = _write(tmp_path / "docs.jsonl", _documents(30))
    folder = tmp_path / "out"
    embed_corpus(embedder, path, folder, shard_size=10, model_name=str(checkpoint), **_quiet())
    (folder / "notes.md").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds files embed-corpus did not write \(notes.md\)"):
        embed_corpus(embedder, path, folder, shard_size=20, model_name=str(checkpoint), overwrite=True, **_quiet())
    assert len(Index.open(folder)) == 30                  # the old corpus is whole


def test_settings_and_inputs_are_refused_before_anything_is_written(embedder, checkpoint, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    root = tmp_path / "in"
    root.mkdir()
    (root / "a.txt").write_text("one\ntwo\n")
    with pytest.raises(UsageError, match="--output .* is inside --input"):
        embed_corpus(embedder, root, root / "index", **_quiet())
    for column, kind in (([b"x", b"y"], "binary"), ([[1], [2]], "list"), ([True, False], "bool")):
        pq.write_table(pa.table({"text": ["a", "b"], "id": column}), root / "b.parquet")
        with pytest.raises(UsageError, match=rf"b.parquet: column 'id' holds {kind}.*--id-field"):
            embed_corpus(embedder, root, tmp_path / "out", **_quiet())
    pq.write_table(pa.table({"text": [1, 2]}), root / "b.parquet")
    with pytest.raises(UsageError, match="column 'text' holds int64, not strings"):
        embed_corpus(embedder, root, tmp_path / "out", **_quiet())
    assert not (tmp_path / "out").exists()


def test_a_corpus_embedded_from_python_records_its_model(checkpoint, tmp_path, capsys):
    from qwen3_jax import Qwen3Embedder
    from qwen3_jax.cli import main
    from qwen3_jax.hub import weights_fingerprint

    path = _write(tmp_path / "docs.jsonl", _documents(12))
    manifest = embed_corpus(str(checkpoint), path, tmp_path / "out", **_quiet())
    assert manifest["settings"]["model"] == str(checkpoint.resolve())
    assert manifest["weights"] == weights_fingerprint(checkpoint)
    assert main(["search", "--index", str(tmp_path / "out"), "--query", "river", "--top-k", "2"]) == 0
    assert len(json.loads(capsys.readouterr().out)["hits"]) == 2
    said = []                                             # an embedder alone cannot name its model: it is said
    embed_corpus(Qwen3Embedder.from_pretrained(checkpoint), path, tmp_path / "unnamed", quiet=True, out=said.append)
    assert any("will record no model: pass model_name=" in line for line in said)
    assert main(["search", "--index", str(tmp_path / "unnamed"), "--query", "river"]) == 2
    assert "records no model (it was embedded from Python without model_name); pass --model" in capsys.readouterr().err


@pytest.mark.parametrize("output_dtype", ["float16", "int8", "binary"])
def test_an_update_equals_a_fresh_run_for_every_output_dtype(embedder, checkpoint, tmp_path, output_dtype):
    documents = _documents(60, seed=4)
    path = _write(tmp_path / "docs.jsonl", documents)
    settings = dict(shard_size=20, output_dtype=output_dtype, model_name=str(checkpoint), **_quiet())
    embed_corpus(embedder, path, tmp_path / "updated", **settings)
    documents[0]["text"] = "一 completely different first record, far from the others 🚀"   # moves the ranges
    _write(tmp_path / "docs.jsonl", documents)
    embed_corpus(embedder, path, tmp_path / "updated", update=True, **settings)
    embed_corpus(embedder, path, tmp_path / "fresh", **settings)
    updated, fresh = read_manifests(tmp_path / "updated")[0], read_manifests(tmp_path / "fresh")[0]
    assert updated.get("calibration") == fresh.get("calibration")          # int8's ranges: the new input's
    for k in range(3):
        name = f"shard-{k:06d}.npy"
        assert np.array_equal(np.load(tmp_path / "updated" / name), np.load(tmp_path / "fresh" / name)), name


# --- approximate indexes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [{"m": 0}, {"m": 1}, {"m": 10**9}, {"ef_search": 0}, {"ef_search": -1},
                                 {"ef_construction": 0}, {"ef_construction": 10**9}, {"lists": -1},
                                 {"kind": "ivf-pq", "code_bytes": 7}, {"kind": "flat"}])
def test_approximate_index_settings_are_checked_before_anything_is_built(tmp_path, bad):
    from qwen3_jax.ann import AnnSettings, build_ann

    pytest.importorskip("faiss")
    vectors = normalize_rows(np.random.default_rng(2).standard_normal((100, WIDTH)).astype(np.float32))
    index = Index.open(_folder(tmp_path / "index", vectors))
    with pytest.raises(UsageError, match=r"--(m|ef-search|ef-construction|lists|kind)|code bytes"):
        build_ann(index, AnnSettings(**bad), quiet=True)
    assert not (tmp_path / "index" / "ann").exists()
    build_ann(index, quiet=True)
    for ef in (0, -3, 10**9):
        with pytest.raises(UsageError, match="ef="):
            index.search(vectors[:2], 3, approximate=True, ef=ef)


@pytest.mark.parametrize("kind", ["hnsw", "ivf-pq"])
@pytest.mark.parametrize("count", [0, 1, 5, 15, 40])
def test_empty_and_tiny_corpora_get_a_valid_index(tmp_path, kind, count):
    from qwen3_jax.ann import AnnSettings, build_ann

    pytest.importorskip("faiss")
    vectors = normalize_rows(np.random.default_rng(count).standard_normal((count, WIDTH)).astype(np.float32))
    index = Index.open(_folder(tmp_path / "index", vectors, shard=16))
    record = build_ann(index, AnnSettings(kind=kind), quiet=True)
    assert record["vectors"] == count
    queries = normalize_rows(np.random.default_rng(9).standard_normal((3, WIDTH)).astype(np.float32))
    exact_scores, exact = index.search(queries, 10)
    scores, found = Index.open(tmp_path / "index").search(queries, 10, approximate=True, ef=64)
    assert found == exact and np.array_equal(scores, exact_scores)


def test_approximate_results_have_as_many_ids_as_scores(tmp_path):
    from qwen3_jax.ann import AnnSettings, build_ann

    pytest.importorskip("faiss")
    rng = np.random.default_rng(3)
    vectors = normalize_rows(rng.standard_normal((400, WIDTH)).astype(np.float32))
    index = Index.open(_folder(tmp_path / "index", vectors))
    build_ann(index, AnnSettings(kind="ivf-pq"), quiet=True)
    queries = normalize_rows(rng.standard_normal((6, WIDTH)).astype(np.float32))
    scores, found = index.search(queries, 60, approximate=True, ef=1)   # one list probed: fewer than 60 found
    assert scores.shape == (6, 60) and [len(row) for row in found] == [60] * 6
    exact_scores, exact = index.search(queries, 60)
    assert found == exact and np.array_equal(scores, exact_scores)      # those queries were searched exactly


def test_an_approximate_index_over_other_weights_is_refused_and_rebuilt(tmp_path):
    from qwen3_jax.ann import build_ann

    pytest.importorskip("faiss")
    vectors = normalize_rows(np.random.default_rng(4).standard_normal((100, WIDTH)).astype(np.float32))
    folder = _folder(tmp_path / "index", vectors)
    build_ann(Index.open(folder), quiet=True)
    manifest = read_manifests(folder)[0]
    manifest["weights"] = "re-embedded with other weights"     # the same records, so the same shard digests
    (folder / manifest_name(0, 1)).write_text(json.dumps(manifest))
    index = Index.open(folder)
    with pytest.raises(ValueError, match="build-ann --index"):
        index.search(vectors[:2], 3, approximate=True)
    assert build_ann(index, quiet=True)["added"] == 100                 # rebuilt whole
    assert index.search(vectors[:2], 1, approximate=True)[1] == [[0], [1]]


# --- the server's gate -------------------------------------------------------------------------------------------


def test_the_gates_refusals_are_counted_under_the_endpoint_asked_for():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from qwen3_jax.serve.gate import Gate
    from qwen3_jax.serve.metrics import Metrics

    app, metrics = FastAPI(), Metrics()

    @app.post("/v1/embeddings")
    async def embeddings() -> dict:
        return {}

    app.add_middleware(Gate, metrics=metrics, api_key="secret", payload_limit=100, read_timeout_s=5)
    client = TestClient(app)
    assert client.post("/v1/embeddings", json={}).status_code == 401                      # no key
    assert client.post("/v1/embeddings", content=b"x" * 200,
                       headers={"authorization": "Bearer secret"}).status_code == 413     # over the limit
    assert client.post("/v1/embeddings", json={}, headers={"authorization": "Bearer secret"}).status_code == 200
    assert client.post("/nowhere", json={}).status_code == 401
    counted = {(s.labels["endpoint"], s.labels["status"]): s.value for family in metrics.registry.collect()
               if family.name == "qwen3_requests" for s in family.samples if s.name == "qwen3_requests_total"}
    assert counted == {("/v1/embeddings", "401"): 1, ("/v1/embeddings", "413"): 1, ("/v1/embeddings", "200"): 1,
                       ("unknown", "401"): 1}
