"""`qwen3-jax bench --serve`: a bounded load generator against our server, and against Infinity serving the
same checkpoint folder, one after the other in the same run.

Both servers are started here on loopback ports; before any timing, both embed the same sample of
texts and must agree within 1e-4. Then, at each concurrency level C, C clients (threads, each with its
own keep-alive connection, stdlib HTTP only) send requests from one fixed mix, each the moment its last
answer came: single queries of 5-30 tokens, and batches of 8-32 documents of 80-500 tokens. A level
stops after its request budget or its time budget, whichever comes first. Reported per level and
server: texts/s, tokens/s, p50/p99 latency (from a request's first try), failures, and the 429s that
were retried after their Retry-After (as the openai client retries them); and each server's start-up.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import jax
import numpy as np

from qwen3_jax.serve.settings import ServeSettings
from qwen3_jax.tokenize import TextTokenizer

QUERY_TOKENS = (5, 30)
DOCUMENT_TOKENS = (80, 500)
DOCUMENTS_PER_BATCH = (8, 32)
QUERY_SHARE = 0.7
AGREEMENT = 1e-4


@dataclasses.dataclass(frozen=True)
class Request:
    texts: list[str]
    tokens: int


def workload(tokenizer: TextTokenizer, count: int, *, seed: int = 0) -> list[Request]:
    """`count` requests of the mix in the module docstring, in a fixed order (QUERY_SHARE are queries)."""
    from qwen3_jax.bench import synthetic_texts

    rng = np.random.default_rng(seed)
    requests = []
    for number in range(count):
        if rng.random() < QUERY_SHARE:
            texts = synthetic_texts(tokenizer, 1, *QUERY_TOKENS, seed=seed * 100_003 + number)
        else:
            size = int(rng.integers(DOCUMENTS_PER_BATCH[0], DOCUMENTS_PER_BATCH[1] + 1))
            texts = synthetic_texts(tokenizer, size, *DOCUMENT_TOKENS, seed=seed * 100_003 + number)
        requests.append(Request(texts, sum(len(ids) for ids in tokenizer.encode(texts, 1 << 20))))
    return requests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Target:
    """A server under test: its command, started on a free loopback port, stopped with SIGTERM."""

    def __init__(self, name: str, command: Sequence[str], model: str, log: Path):
        self.name, self.model, self.log = name, model, log
        self.port = _free_port()
        self.command = [part.format(port=self.port) for part in command]
        self.process: subprocess.Popen | None = None
        self.startup_s = float("nan")

    def start(self, timeout: float) -> "Target":
        started = time.perf_counter()
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"),
                                        start_new_session=True)
        while time.perf_counter() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited while starting; see {self.log}")
            with contextlib.suppress(OSError):
                if self.embed(["ready?"]) is not None:
                    self.startup_s = time.perf_counter() - started
                    return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"{self.name} was not ready within {timeout:.0f} s; see {self.log}")

    def embed(self, texts: list[str], connection: http.client.HTTPConnection | None = None,
              on_busy=None) -> np.ndarray | None:
        """The vectors of `texts` from the server's OpenAI endpoint (base64), None on an error status. A 429
        is retried after its Retry-After, as the openai client does (up to 5 times; `on_busy` counts them)."""
        own = connection is None
        connection = connection or http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            for _ in range(6):
                connection.request("POST", "/embeddings", json.dumps({"model": self.model, "input": texts,
                                                                      "encoding_format": "base64"}),
                                   {"Content-Type": "application/json"})
                response = connection.getresponse()
                body = response.read()
                if response.status != 429:
                    break
                if on_busy:
                    on_busy()
                time.sleep(float(response.getheader("Retry-After", "1")))
                connection.close()                   # the server may have closed it meanwhile; reconnect
        finally:
            if own:
                connection.close()
        if response.status != 200:
            return None
        data = sorted(json.loads(body)["data"], key=lambda item: item["index"])
        return np.stack([np.frombuffer(base64.b64decode(item["embedding"]), "<f4") for item in data])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def drive(target: Target, requests: list[Request], *, concurrency: int, max_requests: int,
          max_seconds: float) -> dict:
    """C clients sending `requests` in turn (wrapping around) until `max_requests` were sent or
    `max_seconds` passed; returns the level's figures."""
    lock = threading.Lock()
    sent, latencies, texts, tokens, failures, busy = [0], [], [0], [0], [0], [0]
    started = time.perf_counter()

    def count_busy() -> None:
        with lock:
            busy[0] += 1

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", target.port, timeout=600)
        while True:
            with lock:
                if sent[0] >= max_requests or time.perf_counter() - started > max_seconds:
                    break
                request = requests[sent[0] % len(requests)]
                sent[0] += 1
            begin = time.perf_counter()
            try:
                ok = target.embed(request.texts, connection, on_busy=count_busy) is not None
            except OSError:
                ok = False
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", target.port, timeout=600)
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - begin)
                    texts[0] += len(request.texts)
                    tokens[0] += request.tokens
                else:
                    failures[0] += 1
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    ordered = sorted(latencies) or [float("nan")]
    return {"server": target.name, "concurrency": concurrency, "requests": len(latencies), "failures": failures[0],
            "retried_429": busy[0],
            "seconds": seconds, "texts_per_s": texts[0] / seconds, "tokens_per_s": tokens[0] / seconds,
            "p50_s": statistics.median(ordered), "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


@contextlib.contextmanager
def running(targets: list[Target], timeout: float) -> Iterator[list[Target]]:
    try:
        yield [target.start(timeout) for target in targets]
    finally:
        for target in targets:
            target.stop()


def run_serve_benchmark(folder: Path, *, infinity: str | None, dtype: str, levels: Sequence[int],
                        max_requests: int, max_seconds: float, max_batch_tokens: int | None, scratch: Path,
                        out=print) -> list[dict]:
    """Ours (and Infinity, given its `infinity_emb` executable) on `folder`: agreement, then each level."""
    tokenizer = TextTokenizer.from_folder(folder)
    requests = workload(tokenizer, 400)
    lone = [r for r in requests if len(r.texts) == 1]
    ours = [sys.executable, "-m", "qwen3_jax.cli", "serve", "--model", str(folder), "--port", "{port}",
            "--dtype", dtype, "--max-length", str(DOCUMENT_TOKENS[1] + 16)]
    if max_batch_tokens:
        ours += ["--max-batch-tokens", str(max_batch_tokens)]
    targets = [Target("qwen3-jax", ours, Path(folder).name, scratch / "qwen3-jax.log")]
    if infinity:
        targets.append(Target("infinity", [infinity, "v2", "--model-id", str(folder), "--engine", "torch", "--device",
                                           "cpu", "--dtype", dtype, "--host", "127.0.0.1", "--port", "{port}",
                                           "--served-model-name", Path(folder).name, "--no-vector-disk-cache"],
                              Path(folder).name, scratch / "infinity.log"))
    rows = []
    with running(targets, timeout=1800) as started:
        sample = [text for r in requests[:12] for text in r.texts][:48]
        vectors = [target.embed(sample) for target in started]
        for target, got in zip(started, vectors):
            out(f"{target.name}: ready in {target.startup_s:.1f} s")
            if got is None:
                raise RuntimeError(f"{target.name} refused the sample; see {target.log}")
        if len(vectors) == 2:
            difference = float(np.abs(vectors[0] - vectors[1]).max())
            out(f"agreement on {len(sample)} texts: max |ours - Infinity| = {difference:.2e}")
            if difference > AGREEMENT:
                raise RuntimeError(f"the servers disagree by {difference:.2e} (> {AGREEMENT}); not timing them")
        for target in started:
            _signal_others(target, started, signal.SIGSTOP)          # only the server under test has work
            drive(target, lone, concurrency=1, max_requests=5, max_seconds=60)          # warm
            rows.append({**drive(target, lone, concurrency=1, max_requests=max(10, max_requests // 4),
                                 max_seconds=max_seconds / 2), "mix": "lone query"})
            for level in levels:
                rows.append({**drive(target, requests, concurrency=level, max_requests=max_requests,
                                     max_seconds=max_seconds), "mix": "queries + documents"})
                _print_row(rows[-1], out)
            _signal_others(target, started, signal.SIGCONT)
    out(f"\n{'server':>10} {'mix':>20} {'C':>3} {'requests':>8} {'fail':>4} {'429s':>4} {'texts/s':>8} {'tokens/s':>9} "
        f"{'p50 s':>7} {'p99 s':>7}")
    for row in rows:
        _print_row(row, out)
    budget = max_batch_tokens or ServeSettings().batch_tokens(jax.default_backend())
    encoded = encode_rate(folder, requests[:max_requests], dtype=dtype, token_budget=budget)
    ours = max(row["tokens_per_s"] for row in rows if row["server"] == "qwen3-jax")
    out(f"\nencode on the same texts in one process: {encoded:.0f} tokens/s; the server at its best level keeps "
        f"{ours / encoded:.2f} of it")
    rows.append({"server": "encode", "tokens_per_s": encoded, "server_fraction": ours / encoded})
    return rows


def _signal_others(target: Target, targets: list[Target], number: int) -> None:
    """Sends signal `number` to every running server but `target` (SIGSTOP pauses one, SIGCONT resumes it)."""
    for other in targets:
        if other is not target and other.process.poll() is None:
            os.killpg(other.process.pid, number)


def encode_rate(folder: Path, requests: list[Request], *, dtype: str, token_budget: int) -> float:
    """Tokens/s of Qwen3Embedder.encode on the requests' texts in this process (after a warm-up call
    that compiles), with the server's batch budget: the rate the server is measured against."""
    from qwen3_jax.embedder import Qwen3Embedder
    from qwen3_jax.layout import TOKENS_PER_TEXT

    embedder = Qwen3Embedder.from_pretrained(folder, dtype=dtype)
    texts = [text for request in requests for text in request.texts]
    batch_size = max(1, token_budget // TOKENS_PER_TEXT)
    embedder.encode(texts, batch_size=batch_size)
    start = time.perf_counter()
    embedder.encode(texts, batch_size=batch_size)
    return sum(request.tokens for request in requests) / (time.perf_counter() - start)


def _print_row(row: dict, out) -> None:
    out(f"{row['server']:>10} {row['mix']:>20} {row['concurrency']:>3} {row['requests']:>8} {row['failures']:>4} "
        f"{row['retried_429']:>4} {row['texts_per_s']:8.2f} {row['tokens_per_s']:9.0f} {row['p50_s']:7.3f} {row['p99_s']:7.3f}")
