"""The server when the model fails or the queue is full, through the real HTTP stack on a loopback socket
(uvicorn in a thread of the test, so that a test can hand the server a runner that breaks): a failing
batch costs only its requests (500, the request id in body and log), repeated failures make /health
503, a dead scheduler answers 503 instead of hanging, and a full queue refuses before tokenizing."""

import contextlib
import socket
from concurrent.futures import ThreadPoolExecutor
import threading
import time

import httpx
import numpy as np
import pytest

from qwen3_jax import Qwen3Embedder
from qwen3_jax.serve.server import listener
from qwen3_jax.serve.service import Service
from qwen3_jax.serve.settings import ServeSettings
from tests.conftest import CORPUS
from tests.test_scheduler import FlakyRunner


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(embedder: Qwen3Embedder, checkpoint, **limits):
    """`embedder` served over HTTP in this process; yields (the service, its URL)."""
    settings = ServeSettings(model=str(checkpoint), port=_port(), max_batch_tokens=512, **limits)
    service = Service(settings, embedder, None)
    server = listener(service)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield service, f"http://127.0.0.1:{settings.port}"
    finally:
        server.should_exit = True
        thread.join(60)


@pytest.fixture
def fresh(checkpoint):
    """An embedder of its own (a test swaps its runner) and the one encode answers are checked against."""
    return Qwen3Embedder.from_pretrained(checkpoint, max_length=256)


def test_a_failing_batch_costs_only_its_requests(fresh, embedder, checkpoint, caplog):
    fresh.runner = FlakyRunner(fresh.runner, fail={2, 4, 5, 6})
    with serving(fresh, checkpoint, max_queue_tokens=100_000) as (service, url):
        first = httpx.post(url + "/embed", json={"inputs": CORPUS[:2]})
        failed = httpx.post(url + "/v1/embeddings", json={"input": CORPUS[2:4]}, headers={"x-request-id": "doomed-7"})
        later = httpx.post(url + "/embed", json={"inputs": CORPUS[4:]})
        assert first.status_code == 200 and later.status_code == 200
        assert np.abs(np.array(first.json()) - embedder.encode(CORPUS[:2])).max() <= 1e-6
        assert np.abs(np.array(later.json()) - embedder.encode(CORPUS[4:])).max() <= 1e-6
        assert failed.status_code == 500 and failed.headers["x-request-id"] == "doomed-7"
        error = failed.json()["error"]
        assert error["code"] == "internal_error" and "doomed-7" in error["message"]
        assert "injected" not in error["message"] and "Traceback" not in failed.text       # nothing internal
        assert "doomed-7" in caplog.text and "injected failure of batch 2" in caplog.text
        assert httpx.get(url + "/health").status_code == 200
        for _ in range(3):                                       # batches 4, 5, 6: the device is gone
            assert httpx.post(url + "/embed", json={"inputs": "a"}).status_code == 500
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and "failed" in health.json()["error"]["message"]
        assert httpx.get(url + "/ping").status_code == 503
        assert httpx.post(url + "/embed", json={"inputs": "a"}).status_code == 200          # it came back
        assert httpx.get(url + "/health").status_code == 200
        metrics = httpx.get(url + "/metrics").text
        assert 'qwen3_requests_total{endpoint="/embed",status="500"} 3.0' in metrics
        assert 'qwen3_requests_total{endpoint="/v1/embeddings",status="500"} 1.0' in metrics


def test_a_dead_scheduler_answers_503_instead_of_hanging(fresh, checkpoint):
    with serving(fresh, checkpoint, max_queue_tokens=100_000) as (service, url):
        scheduler = service.schedulers["embedding"]
        scheduler.died = RuntimeError("the scheduler thread died")          # as _guarded records it
        response = httpx.post(url + "/embed", json={"inputs": "a"}, timeout=30)
        assert response.status_code == 503 and "scheduler stopped" in response.json()["error"]["message"]
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and "restart" in health.json()["error"]["message"]
        scheduler.died = None


def test_a_full_queue_refuses_before_tokenizing(fresh, checkpoint):
    """The device holds a batch and the queue is full: a new request gets 429 without its texts being
    tokenized, and the held requests are answered once the device lets go."""
    hold = threading.Event()
    fresh.runner = FlakyRunner(fresh.runner, hold=hold)
    tokenized = []
    encode = fresh.tokenizer.encode
    fresh.tokenizer.encode = lambda texts, *args, **kwargs: tokenized.append(len(texts)) or encode(texts, *args, **kwargs)
    with serving(fresh, checkpoint, max_queue_tokens=600) as (service, url):
        with httpx.Client(timeout=120) as client, ThreadPoolExecutor(3) as pool:
            scheduler, held = service.schedulers["embedding"], []
            for i in range(3):                        # 251 tokens each: one held in dispatch, two queued
                held.append(pool.submit(client.post, url + "/v1/embeddings", json={"input": [[5 + i] * 250]}))
                deadline = time.time() + 60
                while fresh.runner.dispatched + scheduler.queued_tokens // 251 < i + 1 and time.time() < deadline:
                    time.sleep(0.02)
            assert scheduler.queued_tokens == 502
            refused = client.post(url + "/embed", json={"inputs": ["a new text"] * 60})
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
            assert tokenized == []                      # refused before its texts were tokenized
            hold.set()
            assert all(future.result().status_code == 200 for future in held)
