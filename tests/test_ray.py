"""Embedding on a local Ray cluster as users run it: `embed-corpus --engine ray` with two workers, one of
them killed with SIGKILL mid-run, writes the very files a one-process run writes; `EmbedBatch` in a Ray
Data pipeline gives `encode`'s vectors."""

import filecmp
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from qwen3_jax.corpus import embed_corpus, read_manifests

from tests.test_corpus import _documents, _write

# the ray extra (installed with the test extra); Ray itself runs only in the processes these tests start
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the ray extra")


def _worker_pids(job: int) -> list[int]:
    """The Ray shard workers among process `job`'s descendants (its own cluster's: not another suite's)."""
    table = [line.split(None, 2) for line in subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True,
                                                            text=True).stdout.splitlines()]
    mine, grew = {job}, True
    while grew:
        grew = False
        for pid, parent, *_ in table:
            if int(parent) in mine and int(pid) not in mine:
                mine.add(int(pid))
                grew = True
    return [int(pid) for pid, _, *args in table if int(pid) in mine and args and "ray::ShardWorker" in args[0]]


def test_a_ray_job_with_a_killed_worker_writes_a_one_process_runs_folder(embedder, checkpoint, tmp_path, compile_cache):
    documents = _documents(500, seed=7)
    path = _write(tmp_path / "docs.jsonl", documents)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    process = subprocess.Popen([sys.executable, "-m", "qwen3_jax.cli", "embed-corpus", "--model", str(checkpoint),
                                "--input", path, "--output", str(tmp_path / "ray"), "--shard-size", "20", "--quiet",
                                "--engine", "ray", "--workers", "2", "--compile-cache", compile_cache],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    killed, deadline = None, time.time() + 300
    while time.time() < deadline and process.poll() is None and killed is None:
        manifests = read_manifests(tmp_path / "ray") if (tmp_path / "ray").is_dir() else []
        workers = _worker_pids(process.pid)
        if manifests and len(manifests[0]["shards"]) >= 2 and len(workers) == 2:
            killed = workers[0]
            os.kill(killed, signal.SIGKILL)                 # one worker, mid-run: Ray restarts it
        time.sleep(0.05)
    assert killed is not None, "the job ended before a worker could be killed"
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert len(read_manifests(tmp_path / "ray")[0]["shards"]) == 25

    embed_corpus(embedder, path, tmp_path / "local", shard_size=20, model_name=str(checkpoint), quiet=True,
                 out=lambda _: None)
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ray").iterdir())
    names.remove(".lock")                                        # it names the job that held the folder last
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "local", tmp_path / "ray", names, shallow=False)
    assert not mismatch and not errors, mismatch                 # byte for byte, manifest included


PIPELINE = """
import json, sys
import numpy as np
import ray
from qwen3_jax.corpus.ray_data import EmbedBatch

model, texts = sys.argv[1], json.loads(sys.argv[2])
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
rows = ray.data.from_items([{"text": t, "n": i} for i, t in enumerate(texts)]).map_batches(
    EmbedBatch, fn_constructor_kwargs={"model": model, "dim": 32}, batch_size=8, concurrency=1).take_all()
rows.sort(key=lambda row: row["n"])
np.save(sys.argv[3], np.stack([row["embedding"] for row in rows]))
print(json.dumps([row["text"] for row in rows]))
"""


def test_embed_batch_in_a_ray_data_pipeline_is_encode(embedder, checkpoint, tmp_path):
    """A user's Ray Data pipeline, in a process of its own (Ray's threads stay out of the test process)."""
    texts = [d["text"] for d in _documents(24, seed=8)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-c", PIPELINE, str(checkpoint), json.dumps(texts), tmp_path / "out.npy"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == texts
    assert np.abs(np.load(tmp_path / "out.npy") - embedder.encode(texts, dim=32)).max() <= 1e-6
