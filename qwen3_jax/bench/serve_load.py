"""`qwen3-jax bench serve`: a bounded load generator against our server, and against Infinity serving the
same checkpoint folder, one after the other in the same run.

Both servers are started here on loopback ports; before any timing, both embed the same sample of
texts and must agree (float32 within 1e-4, bfloat16 by a cosine of 0.99). First lone queries of 5-30 tokens, one at a time, each sent to every
server in turn (`lone_queries`: a latency of a few milliseconds is compared, so the machine's drift
must fall on both alike). Then, at each concurrency level C, C clients (threads, each with its
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

import numpy as np

from qwen3_jax.bench.common import synthetic_texts
from qwen3_jax.serve.settings import ServeSettings
from qwen3_jax.tokenization import TextTokenizer, format_instruction

QUERY_TOKENS = (5, 30)
DOCUMENT_TOKENS = (80, 500)
DOCUMENTS_PER_BATCH = (8, 32)
QUERY_SHARE = 0.7
AGREEMENT = 1e-4            # float32: max abs difference of the normalised vectors
AGREEMENT_COSINE = 0.99     # bfloat16: cosine of each pair of vectors


@dataclasses.dataclass(frozen=True)
class Request:
    texts: list[str]
    tokens: int


def workload(tokenizer: TextTokenizer, count: int, *, seed: int = 0, instruction: str | None = None) -> list[Request]:
    """`count` requests of the mix in the module docstring, in a fixed order (QUERY_SHARE are queries, each
    in Qwen3's instruction format when an `instruction` is given)."""
    rng = np.random.default_rng(seed)
    requests = []
    for number in range(count):
        if rng.random() < QUERY_SHARE:
            texts = synthetic_texts(tokenizer, 1, *QUERY_TOKENS, seed=seed * 100_003 + number)
            if instruction is not None:
                texts = [format_instruction(instruction) + text for text in texts]
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

    def settle(self, timeout: float) -> None:
        """Waits until the server compiles nothing in the background (our /metrics'
        qwen3_programs_compiling is 0; a server without it is taken as settled), at most `timeout` s."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            try:
                connection.request("GET", "/metrics")
                text = connection.getresponse().read().decode()
            finally:
                connection.close()
            compiling = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                         if line.startswith("qwen3_programs_compiling{")]
            if not any(compiling):
                return
            time.sleep(1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def clients(port: int, *, concurrency: int, count: int, max_seconds: float, send,
            progress=None) -> list[tuple[int, float, float, bool]]:
    """`concurrency` threads, each with its own keep-alive connection to `port`, calling
    `send(connection, n) -> ok` for n = 0, 1, ... until `count` were sent or `max_seconds` passed (a
    connection that fails is a failure, and is made again); (n, sent at, seconds, ok) of each request.
    `progress(sent, seconds)` is called at every tenth of `count`."""
    lock = threading.Lock()
    sent, done = [0], []
    started = time.perf_counter()

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while True:
            with lock:
                if sent[0] >= count or time.perf_counter() - started > max_seconds:
                    break
                number = sent[0]
                sent[0] += 1
                if progress and (number + 1) % max(1, count // 10) == 0:
                    progress(number + 1, time.perf_counter() - started)
            begin = time.perf_counter()
            try:
                ok = send(connection, number)
            except OSError:
                ok = False
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            with lock:
                done.append((number, begin, time.perf_counter() - begin, ok))
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done


def drive(target: Target, requests: list[Request], *, concurrency: int, max_requests: int,
          max_seconds: float) -> dict:
    """C clients sending `requests` in turn (wrapping around) until `max_requests` were sent or
    `max_seconds` passed; returns the level's figures."""
    busy = [0]
    started = time.perf_counter()

    def send(connection, number: int) -> bool:
        return target.embed(requests[number % len(requests)].texts, connection,
                            on_busy=lambda: busy.__setitem__(0, busy[0] + 1)) is not None

    done = clients(target.port, concurrency=concurrency, count=max_requests, max_seconds=max_seconds, send=send)
    timed = [(requests[number % len(requests)], latency, ok) for number, _, latency, ok in done]
    return _figures(target.name, concurrency, timed, busy[0], time.perf_counter() - started)


def lone_queries(targets: list[Target], queries: list[Request], *, max_requests: int, max_seconds: float) -> list[dict]:
    """Each query sent to every server in turn, one request at a time, the others paused meanwhile
    (SIGSTOP), the order alternating: the machine's drift over the run falls on every server alike
    (a few milliseconds matter here, and a shared 2-core machine drifts by more). A row per server."""
    timed = {target.name: [] for target in targets}
    connections = {target.name: http.client.HTTPConnection("127.0.0.1", target.port, timeout=600) for target in targets}
    started = time.perf_counter()
    for number in range(max_requests):
        if time.perf_counter() - started > max_seconds:
            break
        query = queries[number % len(queries)]
        for target in targets[::-1] if number % 2 else targets:
            _signal_others(target, targets, signal.SIGSTOP)
            begin = time.perf_counter()
            ok = target.embed(query.texts, connections[target.name]) is not None
            timed[target.name].append((query, time.perf_counter() - begin, ok))
            _signal_others(target, targets, signal.SIGCONT)
    for connection in connections.values():
        connection.close()
    return [_figures(name, 1, rows, 0, sum(latency for _, latency, _ in rows)) for name, rows in timed.items()]


def _figures(server: str, concurrency: int, timed: list[tuple[Request, float, bool]], retried_429: int,
             seconds: float) -> dict:
    """A level's row from its (request, seconds, answered) triples over `seconds` of sending."""
    answered = [request for request, _, ok in timed if ok]
    ordered = sorted(latency for _, latency, ok in timed if ok) or [float("nan")]
    return {"server": server, "concurrency": concurrency, "requests": len(answered),
            "failures": len(timed) - len(answered), "retried_429": retried_429, "seconds": seconds,
            "texts_per_s": sum(len(r.texts) for r in answered) / seconds,
            "tokens_per_s": sum(r.tokens for r in answered) / seconds,
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
                        instruction: str | None = None, out=print) -> list[dict]:
    """Ours (and Infinity, given its `infinity_emb` executable) on `folder`: agreement, then each level.
    With an `instruction`, every query carries it, and ours also runs with --no-share-prefixes (as it
    served before shared prefixes: "qwen3-jax whole")."""
    tokenizer = TextTokenizer.from_folder(folder)
    requests = workload(tokenizer, 400, instruction=instruction)
    lone = [r for r in requests if len(r.texts) == 1]
    ours = [sys.executable, "-m", "qwen3_jax.cli", "serve", "--model", str(folder), "--port", "{port}",
            "--dtype", dtype, "--max-length", str(DOCUMENT_TOKENS[1] + 16)]
    if max_batch_tokens:
        ours += ["--max-batch-tokens", str(max_batch_tokens)]
    targets = [Target("qwen3-jax", ours, Path(folder).name, scratch / "qwen3-jax.log")]
    if instruction is not None:
        targets.append(Target("qwen3-jax whole", ours + ["--no-share-prefixes"], Path(folder).name,
                              scratch / "qwen3-jax-whole.log"))
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
        for other, got in zip(started[1:], vectors[1:]):
            difference = float(np.abs(vectors[0] - got).max())
            cosine = float((vectors[0] * got).sum(-1).min())
            out(f"agreement on {len(sample)} texts: max |ours - {other.name}| = {difference:.2e}, "
                f"min cosine {cosine:.4f}")
            if difference > AGREEMENT if dtype == "float32" else cosine < AGREEMENT_COSINE:
                raise RuntimeError(f"the servers disagree (max difference {difference:.2e}, min cosine {cosine:.4f}; "
                                   f"float32 needs <= {AGREEMENT}, bfloat16 a cosine >= {AGREEMENT_COSINE}); "
                                   "not timing them")
        for target in started:
            _signal_others(target, started, signal.SIGSTOP)          # only the server under test has work
            drive(target, lone, concurrency=1, max_requests=5, max_seconds=60)          # warm
            target.settle(timeout=600)
            _signal_others(target, started, signal.SIGCONT)
        rows += [{**row, "mix": "lone query"}
                 for row in lone_queries(started, lone, max_requests=max_requests, max_seconds=max_seconds)]
        for target in started:
            _signal_others(target, started, signal.SIGSTOP)
            for level in levels:
                rows.append({**drive(target, requests, concurrency=level, max_requests=max_requests,
                                     max_seconds=max_seconds), "mix": "queries + documents"})
                _print_row(rows[-1], out)
            _signal_others(target, started, signal.SIGCONT)
    out(f"\n{'server':>10} {'mix':>20} {'C':>3} {'requests':>8} {'fail':>4} {'429s':>4} {'texts/s':>8} {'tokens/s':>9} "
        f"{'p50 s':>7} {'p99 s':>7}")
    for row in rows:
        _print_row(row, out)
    # The mix's requests as many as any level of ours sent within its budgets (all of max_requests would
    # take encode far longer than the levels did on a slow machine).
    sent = max([row["requests"] for row in rows if row["server"] == "qwen3-jax" and row["mix"] != "lone query"] + [1])
    encoded = encode_rate(folder, requests[:min(sent, max_requests)], dtype=dtype, max_batch_tokens=max_batch_tokens)
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


def encode_rate(folder: Path, requests: list[Request], *, dtype: str, max_batch_tokens: int | None) -> float:
    """Tokens/s of Qwen3Embedder.encode on the requests' texts in this process (after a warm-up call
    that compiles): the rate the server is measured against. `folder`: the checkpoint, loaded in compute
    `dtype`; a batch holds the server's budget, `max_batch_tokens` (None: the server's default for the
    model's backend)."""
    from qwen3_jax.embedder import Qwen3Embedder
    from qwen3_jax.packing import TOKENS_PER_TEXT

    embedder = Qwen3Embedder.from_pretrained(folder, dtype=dtype)
    texts = [text for request in requests for text in request.texts]
    budget = ServeSettings(max_batch_tokens=max_batch_tokens).batch_tokens(embedder.model.backend.platform)
    batch_size = max(1, budget // TOKENS_PER_TEXT)
    embedder.encode(texts, batch_size=batch_size)
    start = time.perf_counter()
    embedder.encode(texts, batch_size=batch_size)
    return sum(request.tokens for request in requests) / (time.perf_counter() - start)


def _print_row(row: dict, out) -> None:
    out(f"{row['server']:>10} {row['mix']:>20} {row['concurrency']:>3} {row['requests']:>8} {row['failures']:>4} "
        f"{row['retried_429']:>4} {row['texts_per_s']:8.2f} {row['tokens_per_s']:9.0f} {row['p50_s']:7.3f} {row['p99_s']:7.3f}")


# --- the soak -------------------------------------------------------------------------------------------

SOAK_CLIENTS = 8
SOAK_WARM_UP = 500
BAD_SHARE = 0.05                     # requests the server must refuse (400), so error paths are soaked too


def soak_requests(tokenizer: TextTokenizer, model: str, count: int, *, seed: int = 1) -> list[tuple[str, bytes, int]]:
    """(path, JSON body, the status it must get) of `count` requests: the mix of `workload` through the
    OpenAI (base64) and TEI routes, and BAD_SHARE of requests with an empty input."""
    rng = np.random.default_rng(seed)
    out = []
    for request in workload(tokenizer, min(count, 400), seed=seed):
        pick = rng.random()
        if pick < BAD_SHARE:
            out.append(("/v1/embeddings", json.dumps({"model": model, "input": []}).encode(), 400))
        elif pick < 0.3:
            out.append(("/embed", json.dumps({"inputs": request.texts}).encode(), 200))
        else:
            out.append(("/v1/embeddings", json.dumps({"model": model, "input": request.texts,
                                                      "encoding_format": "base64"}).encode(), 200))
    return out


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024


def soak(folder: Path, *, requests: int, max_seconds: float, dtype: str, scratch: Path, out=print) -> dict:
    """`requests` requests from SOAK_CLIENTS clients (after SOAK_WARM_UP to warm up), bounded by
    `max_seconds`; the server's RSS after warm-up, at its peak and at the end, and latency drift (the
    median of the first tenth against the last tenth)."""
    tokenizer = TextTokenizer.from_folder(folder)
    model = Path(folder).name
    mix = soak_requests(tokenizer, model, requests)
    command = [sys.executable, "-m", "qwen3_jax.cli", "serve", "--model", str(folder), "--port", "{port}",
               "--dtype", dtype, "--max-length", str(DOCUMENT_TOKENS[1] + 16)]
    target = Target("qwen3-jax", command, model, scratch / "soak.log")

    def send(connection, number: int) -> bool:
        path, body, status = mix[number % len(mix)]
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status == status

    with running([target], timeout=1800):
        pid = target.process.pid
        out(f"qwen3-jax: ready in {target.startup_s:.1f} s; warming up with {SOAK_WARM_UP} requests")
        clients(target.port, concurrency=SOAK_CLIENTS, count=SOAK_WARM_UP, max_seconds=max_seconds, send=send)
        warm = rss_mib(pid)
        out(f"RSS after warm-up: {warm:.0f} MiB; sending {requests} requests ({SOAK_CLIENTS} clients, at most "
            f"{max_seconds:.0f} s)")
        samples, finished = [warm], threading.Event()

        def sample() -> None:
            while not finished.wait(0.25):
                samples.append(rss_mib(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        done = clients(target.port, concurrency=SOAK_CLIENTS, count=requests, max_seconds=max_seconds, send=send,
                       progress=lambda sent, seconds: out(f"  {sent} sent, {seconds:.0f} s, RSS {samples[-1]:.0f} MiB"))
        finished.set()
        sampler.join()
        end = rss_mib(pid)
    latencies = [latency for _, _, latency, _ in sorted(done, key=lambda item: item[1])]
    tenth = max(1, len(latencies) // 10)
    failures = sum(not ok for *_, ok in done)
    result = {"requests": len(done), "failures": failures, "rss_warm_mib": warm, "rss_peak_mib": max(samples),
              "rss_end_mib": end, "rss_growth": end / warm - 1,
              "p50_first_tenth_s": statistics.median(latencies[:tenth]),
              "p50_last_tenth_s": statistics.median(latencies[-tenth:])}
    out(f"\nsoak: {result['requests']} requests, {failures} failures; RSS {warm:.0f} MiB after warm-up, peak "
        f"{result['rss_peak_mib']:.0f}, end {end:.0f} ({100 * result['rss_growth']:+.1f}%); median latency "
        f"{1000 * result['p50_first_tenth_s']:.1f} ms in the first tenth, {1000 * result['p50_last_tenth_s']:.1f} ms "
        "in the last")
    return result
