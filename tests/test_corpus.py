"""Embedding a corpus as users run it: streamed into shards, killed with SIGKILL and resumed, split over
two processes, bad lines, then searched exactly."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from qwen3_jax.corpus import embed_corpus, read_manifests
from qwen3_jax.index import Index
from qwen3_jax.textio import InputError

WORDS = "river mountain city garden market school harbor forest light paper 東京 数据".split()


def _documents(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"id": f"doc-{i}", "text": " ".join(rng.choice(WORDS, int(n)))}
            for i, n in enumerate(rng.integers(1, 60, count))]


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _load(folder) -> tuple[list, np.ndarray]:
    """(ids, embeddings) of every listed shard, in shard order."""
    index = Index.open(folder)
    return index.ids, np.concatenate([np.asarray(v, np.float32) for v in index._vectors] or
                                     [np.zeros((0, index.dim), np.float32)])


def _cli(cache, *args) -> list[str]:
    return [sys.executable, "-m", "qwen3_jax.cli", "embed-corpus", *map(str, args), "--quiet", "--compile-cache", cache]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return {"documents": _documents(240), "path": _write(folder / "docs.jsonl", _documents(240))}


def test_corpus_shards_hold_what_encode_gives(embedder, checkpoint, corpus, tmp_path):
    manifest = embed_corpus(embedder, corpus["path"], tmp_path / "out", shard_size=64, dim=48, quiet=True,
                            model_name=str(checkpoint), out=lambda _: None)
    assert [(e["start"], e["end"]) for e in manifest["shards"]] == [(0, 64), (64, 128), (128, 192), (192, 240)]
    ids, vectors = _load(tmp_path / "out")
    assert ids == [d["id"] for d in corpus["documents"]]
    expected = embedder.encode([d["text"] for d in corpus["documents"]], dim=48)
    assert np.abs(vectors - expected).max() <= 1e-5
    half = embed_corpus(embedder, corpus["path"], tmp_path / "half", output_dtype="float16", quiet=True,
                        out=lambda _: None)
    assert half["complete"] and np.load(tmp_path / "half" / "shard-000000.npy").dtype == np.float16
    # a folder made with another dim, prompt or model is refused
    for other in ({"dim": 32}, {"instruction": "Find the document"}):
        with pytest.raises(FileExistsError, match="other settings"):
            embed_corpus(embedder, corpus["path"], tmp_path / "out", shard_size=64, **{"dim": 48, **other},
                         model_name=str(checkpoint), quiet=True)
    another = shutil.copytree(checkpoint, tmp_path / "another-model")
    with pytest.raises(FileExistsError, match=r"other settings \(model\)"):
        embed_corpus(embedder, corpus["path"], tmp_path / "out", shard_size=64, dim=48, model_name=str(another),
                     quiet=True)


def _kill_when(command: list, folder, ready) -> None:
    """Runs `command` and kills it with SIGKILL once `ready(its manifest's shards)`; the folder is then
    not complete."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        manifests = read_manifests(folder) if folder.is_dir() else []
        if manifests and ready(manifests[0]["shards"]):
            break
        time.sleep(0.02)
    assert process.poll() is None, process.stderr.read()
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    with pytest.raises(ValueError, match="not complete"):
        Index.open(folder)


def test_killed_job_resumes_with_every_id_once(embedder, checkpoint, tmp_path, compile_cache):
    documents = _documents(1200, seed=1)
    path = _write(tmp_path / "docs.jsonl", documents)
    killed = tmp_path / "killed"
    _kill_when(_cli(compile_cache, "--model", checkpoint, "--input", path, "--output", killed, "--shard-size", 100),
               killed, lambda shards: len(shards) >= 3)
    done = len(read_manifests(killed)[0]["shards"])
    assert 3 <= done < 12
    finished = subprocess.run(_cli(compile_cache, "--model", checkpoint, "--input", path, "--output", killed, "--shard-size", 100),
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    ids, vectors = _load(killed)
    assert ids == [d["id"] for d in documents]              # every id exactly once, in input order
    expected = embedder.encode([d["text"] for d in documents])
    assert np.abs(vectors - expected).max() <= 1e-5


def test_two_processes_split_the_corpus_like_one(embedder, checkpoint, corpus, tmp_path, compile_cache):
    processes = [subprocess.Popen(_cli(compile_cache, "--model", checkpoint, "--input", corpus["path"], "--output", tmp_path / "two",
                                       "--shard-size", 50, "--num-processes", 2, "--process-id", rank),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    results = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), results
    manifests = read_manifests(tmp_path / "two")
    assert [sorted(e["shard"] for e in m["shards"]) for m in manifests] == [[0, 2, 4], [1, 3]]
    embed_corpus(embedder, corpus["path"], tmp_path / "one", shard_size=50, quiet=True, model_name=str(checkpoint))
    (ids_two, two), (ids_one, one) = _load(tmp_path / "two"), _load(tmp_path / "one")
    assert ids_two == ids_one == [d["id"] for d in corpus["documents"]]
    assert np.abs(two - one).max() <= 1e-6


def test_a_folder_of_txt_jsonl_and_parquet(embedder, tmp_path):
    pa = pytest.importorskip("pyarrow")    # the parquet extra; installed with the test extra
    import pyarrow.parquet as pq

    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("first line\n\nthird line\n", encoding="utf-8")
    _write(root / "sub" / "b.jsonl", [{"text": "from json"}, {"id": 7, "text": "with an id"}])
    pq.write_table(pa.table({"text": ["from parquet", "again"]}), root / "c.parquet")
    embed_corpus(embedder, root, tmp_path / "out", quiet=True)
    ids, vectors = _load(tmp_path / "out")
    assert ids == ["a.txt:1", "a.txt:3", "c.parquet:1", "c.parquet:2", "sub/b.jsonl:1", 7]
    texts = ["first line", "third line", "from parquet", "again", "from json", "with an id"]
    assert np.abs(vectors - embedder.encode(texts)).max() <= 1e-5


def test_bad_lines_stop_or_go_to_rejects(embedder, tmp_path):
    records = _documents(10)
    lines = [json.dumps(r) for r in records]
    lines[4] = '{"id": "x", "body": "no text field"}'
    lines[7] = '{"id": "y", "text": '
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"docs.jsonl:5: each line needs a string field 'text'.*--skip-bad"):
        embed_corpus(embedder, path, tmp_path / "strict", shard_size=100, quiet=True)
    with pytest.raises(ValueError, match="not complete"):
        Index.open(tmp_path / "strict")                        # nothing that looks finished
    messages = []
    embed_corpus(embedder, path, tmp_path / "skip", shard_size=3, skip_bad=True, quiet=True, out=messages.append)
    rejects = [json.loads(line) for line in open(tmp_path / "skip" / "rejects.jsonl")]
    assert [(r["line"], "not valid JSON" in r["error"]) for r in rejects] == [(5, False), (8, True)]
    ids, _ = _load(tmp_path / "skip")
    assert ids == [r["id"] for i, r in enumerate(records) if i not in (4, 7)]
    assert any("2 lines could not be read" in m for m in messages)

    invalid = tmp_path / "latin1.txt"
    invalid.write_bytes("good\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.txt:2: invalid UTF-8 at byte 8"):
        embed_corpus(embedder, invalid, tmp_path / "latin", quiet=True)

    repeated = _write(tmp_path / "repeated.jsonl", [{"id": 1, "text": "a"}, {"id": 2, "text": "b"},
                                                     {"id": 1, "text": "c"}])
    messages = []
    embed_corpus(embedder, repeated, tmp_path / "rep", quiet=True, out=messages.append)
    assert any("1 id occurs more than once (e.g. 1)" in m for m in messages)


def test_empty_input_makes_an_empty_valid_index(embedder, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    embed_corpus(embedder, tmp_path / "empty.txt", tmp_path / "out", quiet=True)
    index = Index.open(tmp_path / "out")
    scores, ids = index.search(embedder.encode(["a query"]), k=5)
    assert len(index) == 0 and scores.shape == (1, 0) and ids == [[]]


def test_search_is_exact_across_blocks_and_shards(embedder, checkpoint, corpus, tmp_path, capsys):
    from qwen3_jax.cli import main

    embed_corpus(embedder, corpus["path"], tmp_path / "out", shard_size=70, quiet=True, model_name=str(checkpoint))
    index = Index.open(tmp_path / "out")
    queries = embedder.encode(["river city", "東京 数据", "paper light garden"], instruction="Find the document")
    scores, ids = index.search(queries, k=7, block_rows=16)
    _, vectors = _load(tmp_path / "out")
    expected = queries @ vectors.T
    order = np.argsort(-expected, axis=1, kind="stable")[:, :7]
    assert ids == [[corpus["documents"][i]["id"] for i in row] for row in order]
    assert np.abs(scores - np.take_along_axis(expected, order, axis=1)).max() <= 1e-6
    assert index.search(queries, k=1000)[0].shape == (3, 240)
    many = np.random.default_rng(3).standard_normal((40, index.dim)).astype(np.float32)   # several blocks of queries
    many /= np.linalg.norm(many, axis=1, keepdims=True)
    many_scores, many_ids = index.search(many, k=5)
    expected = many @ vectors.T
    order = np.argsort(-expected, axis=1, kind="stable")[:, :5]
    assert many_ids == [[corpus["documents"][i]["id"] for i in row] for row in order]
    assert np.abs(many_scores - np.take_along_axis(expected, order, axis=1)).max() <= 1e-6
    with pytest.raises(ValueError, match="dimension 32; this index holds 64"):
        index.search(queries[:, :32])

    assert main(["search", "--index", str(tmp_path / "out"), "--query", "river city", "--top-k", "3",
                 "--instruction", "Find the document"]) == 0
    hits = json.loads(capsys.readouterr().out.splitlines()[0])["hits"]
    assert [h["id"] for h in hits] == ids[0][:3]


def test_equal_scores_come_in_index_order_whatever_k_and_block_size(embedder, checkpoint, tmp_path, capsys):
    """Duplicate documents with identical vectors score alike: the lower position comes first, for every k
    and block size, in Index.search and in `qwen3-jax search`. (Embedded at different places of a packed
    row, equal texts may differ in the last bits; the shard is given one vector for all of them.)"""
    from qwen3_jax.cli import main

    copies = [3, 5, 6, 11, 17, 20, 23, 30, 31, 39]
    texts = ["a river city" if i in copies else f"document {i} about {WORDS[i % len(WORDS)]}" for i in range(40)]
    path = _write(tmp_path / "dupes.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)])
    embed_corpus(embedder, path, tmp_path / "out", model_name=str(checkpoint), quiet=True, out=lambda _: None)
    shard = tmp_path / "out" / "shard-000000.npy"
    vectors = np.load(shard)
    vectors[copies] = vectors[copies[0]]
    np.save(shard, vectors)
    index = Index.open(tmp_path / "out")
    query = embedder.encode(["a river city"])
    copies = [f"d{i}" for i in copies]
    for k in (1, 3, 5, 8):
        for block_rows in (1, 3, 7, 16, 65536):
            assert index.search(query, k, block_rows=block_rows)[1][0] == copies[:k], (k, block_rows)
    assert main(["search", "--index", str(tmp_path / "out"), "--query", "a river city", "--top-k", "4"]) == 0
    assert [h["id"] for h in json.loads(capsys.readouterr().out)["hits"]] == copies[:4]


def test_a_respelled_input_resumes_and_an_edited_one_is_refused(embedder, checkpoint, tmp_path, monkeypatch):
    """The manifest names the input and model by resolved path: another spelling of the same paths (from
    another folder) resumes. An input edited between a kill and the rerun would shift every later
    shard: it is refused with the shard it no longer matches."""
    documents = _documents(50)
    path = tmp_path / "data" / "docs.jsonl"
    path.parent.mkdir()
    _write(path, documents)
    output = tmp_path / "out"
    embed_corpus(embedder, path, output, shard_size=10, model_name=str(checkpoint), quiet=True, out=lambda _: None)
    manifest = output / "manifest-00000-of-00001.json"
    finished = json.loads(manifest.read_text())
    finished["shards"] = finished["shards"][:2]                  # as if killed after two shards
    finished["complete"] = False
    manifest.write_text(json.dumps(finished))
    monkeypatch.chdir(tmp_path / "data")
    respelled = embed_corpus(embedder, "../data/./docs.jsonl", "../out", shard_size=10, quiet=True,
                             model_name=os.path.relpath(checkpoint), out=lambda _: None)
    assert respelled["complete"] and len(respelled["shards"]) == 5
    ids, _ = _load(output)
    assert ids == [d["id"] for d in documents]

    finished["shards"] = finished["shards"][:2]
    manifest.write_text(json.dumps(finished))
    _write(path, documents[:5] + [{"id": "new", "text": "inserted"}] + documents[5:])
    with pytest.raises(InputError, match=r"changed since shard 0 was embedded \(its records 0..9 differ\)"):
        embed_corpus(embedder, path, output, shard_size=10, model_name=str(checkpoint), quiet=True)


class _Counting:
    """The embedder, counting the texts (a token row each) its engine is asked to run."""

    def __init__(self, embedder):
        self.embedder, self.texts = embedder, 0
        self.engine = copy.copy(embedder.engine)
        self.engine.run = self._run

    def __getattr__(self, name):
        return getattr(self.embedder, name)

    def _run(self, rows, **kwargs):
        self.texts += len(rows)
        return self.embedder.engine.run(rows, **kwargs)


@pytest.mark.parametrize("edit, embedded", [
    ("change", 10),                # one record of shard 1 rewritten: that shard alone
    ("append", 4),                 # the last shard (3 records) gains one: it, and nothing before
    ("delete", 10 + 10 + 2),       # a record of shard 2 removed: shards 2, 3 and 4 shift
    ("insert", 10 + 10 + 10 + 4),  # a record in shard 1: every shard from there on shifts
    ("cut", 5),                    # the input ends in shard 2: it is redone, shards 3 and 4 dropped
])
def test_a_changed_input_is_refused_or_updated_to_a_fresh_runs_folder(embedder, checkpoint, tmp_path, edit, embedded):
    documents = _documents(43, seed=3)
    path = tmp_path / "docs.jsonl"
    _write(path, documents)
    settings = dict(shard_size=10, model_name=str(checkpoint), quiet=True, out=lambda _: None)
    embed_corpus(embedder, path, tmp_path / "out", **settings)
    os.utime(path)                                          # touched, not changed: still complete
    messages = []
    embed_corpus(embedder, path, tmp_path / "out", **{**settings, "out": messages.append})
    assert any("up to date" in m for m in messages)

    edited = [dict(d) for d in documents]
    if edit == "change":
        edited[14]["text"] = "a sentence nobody wrote before"
    elif edit == "append":
        edited.append({"id": "new", "text": "appended at the end"})
    elif edit == "delete":
        del edited[25]
    elif edit == "insert":
        edited.insert(12, {"id": "new", "text": "inserted in the middle"})
    else:
        edited = edited[:25]
    _write(path, edited)
    with pytest.raises(InputError, match=r"changed since .* was made \(\d+ shards? changed \(.*--update"):
        embed_corpus(embedder, path, tmp_path / "out", **settings)
    counting = _Counting(embedder)
    manifest = embed_corpus(counting, path, tmp_path / "out", update=True, **settings)
    assert counting.texts == embedded
    embed_corpus(embedder, path, tmp_path / "fresh", **settings)
    (ids, vectors), (fresh_ids, fresh) = _load(tmp_path / "out"), _load(tmp_path / "fresh")
    assert ids == fresh_ids == [d["id"] for d in edited]
    assert np.abs(vectors - fresh).max() <= 1e-6
    assert manifest["shards"] == read_manifests(tmp_path / "fresh")[0]["shards"]
    assert sorted(p.name for p in (tmp_path / "out").glob("shard-*")) == \
        sorted(p.name for p in (tmp_path / "fresh").glob("shard-*"))

    embed_corpus(embedder, path, tmp_path / "out", overwrite=True, **{**settings, "shard_size": 7})
    assert len(read_manifests(tmp_path / "out")[0]["shards"]) == -(-len(edited) // 7)


def test_a_killed_update_resumes_to_a_fresh_runs_folder(embedder, checkpoint, tmp_path, compile_cache):
    documents = _documents(600, seed=4)
    path = tmp_path / "docs.jsonl"
    _write(path, documents)
    command = _cli(compile_cache, "--model", checkpoint, "--input", path, "--output", tmp_path / "out",
                   "--shard-size", 50)
    assert subprocess.run(command, capture_output=True, timeout=300).returncode == 0
    before = {e["shard"]: e["digest"] for e in read_manifests(tmp_path / "out")[0]["shards"]}
    edited = [{"id": "first", "text": "a new first record"}] + documents + [{"id": "last", "text": "appended"}]
    _write(path, edited)                                    # every shard shifts, and a 13th one is added
    _kill_when(command + ["--update"], tmp_path / "out",
               lambda shards: sum(before.get(e["shard"]) != e["digest"] for e in shards) >= 3)
    finished = subprocess.run(command + ["--update"], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    ids, vectors = _load(tmp_path / "out")
    assert ids == [d["id"] for d in edited]
    assert np.abs(vectors - embedder.encode([d["text"] for d in edited])).max() <= 1e-5
