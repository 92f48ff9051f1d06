"""`qwen3-jax serve` under careless and hostile traffic, over a real socket: bodies far over the payload
limit, clients that stop sending, the API key before the body, invalid Unicode and thousands of mutated
requests (a 4xx or an answer, never a 5xx), Starlette's own errors in the API's body, request ids."""

import json
import random
import select
import socket
import time

import httpx
import numpy as np
import pytest

from qwen3_jax import Qwen3Embedder
from tests.conftest import CORPUS
from tests.servers import Server, serving

KEY = {"Authorization": "Bearer sesame"}
OPTIONS = ["--served-model-name", "emb", "--max-length", "256", "--max-batch-tokens", "512", "--max-queue-tokens", "1048576", "--api-key", "sesame",
           "--read-timeout-s", "1", "--graceful-timeout-s", "3"]


@pytest.fixture(scope="module")
def server(checkpoint, reranker_folder, tmp_path_factory):
    with serving("--model", str(checkpoint), "--reranker", str(reranker_folder), *OPTIONS,
                 log=tmp_path_factory.mktemp("hostile") / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def local(checkpoint):
    return Qwen3Embedder.from_pretrained(checkpoint, max_length=256)


def _raw(server, head: bytes, body: bytes = b"", *, wait: float = 5.0) -> bytes:
    """Sends bytes on a fresh connection and returns what the server answers within `wait` seconds."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait) as connection:
        connection.sendall(head + body)
        answer = b""
        try:
            while chunk := connection.recv(65536):
                answer += chunk
        except socket.timeout:
            pass
    return answer


def test_a_body_over_the_payload_limit_is_refused_unread(server):
    """64 MiB declared: 413 with the error body before the client has sent it (the answer comes to a
    client that sends only the headers); sent whole, or chunked, the same, and the server's memory
    unchanged."""
    declared = _raw(server, b"POST /embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sesame\r\n"
                            b"content-type: application/json\r\ncontent-length: 67108878\r\n\r\n", b'{"inputs": "')
    assert declared.startswith(b"HTTP/1.1 413") and b"payload_too_large" in declared
    before = server.rss_mib()
    body = b'{"inputs": "' + b"a" * (64 << 20) + b'"}'
    whole = httpx.post(server.url + "/embed", content=body, headers={**KEY, "content-type": "application/json"},
                       timeout=30)
    assert whole.status_code == 413 and whole.json()["error"]["code"] == "payload_too_large"

    def chunks():
        yield b'{"inputs": "'
        for _ in range(64):
            yield b"a" * (1 << 20)
        yield b'"}'
    chunked = httpx.post(server.url + "/v1/embeddings", content=chunks(),
                         headers={**KEY, "content-type": "application/json"}, timeout=30)
    assert chunked.status_code == 413 and "--payload-limit" in chunked.json()["error"]["message"]
    assert server.rss_mib() - before < 50
    assert httpx.get(server.url + "/health").status_code == 200


def test_the_api_key_is_checked_before_the_body_is_read(server):
    """Without the key, a request is refused at its headers: 401 comes although the body (declared
    1 MB) is never sent; a server that waited for it would answer 408 after --read-timeout-s."""
    answer = _raw(server, b"POST /embed HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                          b"content-length: 1000000\r\n\r\n", b'{"inputs": ', wait=3)
    assert answer.startswith(b"HTTP/1.1 401") and b"invalid_api_key" in answer


def test_a_client_that_stops_sending_or_trickles_gets_408(server):
    started = time.perf_counter()
    answer = _raw(server, b"POST /embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sesame\r\n"
                          b"content-type: application/json\r\ncontent-length: 100\r\n\r\n", b'{"inputs": "a', wait=5)
    assert answer.startswith(b"HTTP/1.1 408") and b"--read-timeout-s" in answer
    assert 0.9 < time.perf_counter() - started < 4
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as trickle:      # a byte every 0.25 s
        trickle.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sesame\r\n"
                        b"content-type: application/json\r\ncontent-length: 100\r\n\r\n")
        started, answer = time.perf_counter(), b""
        for _ in range(40):
            try:
                trickle.sendall(b" ")
            except OSError:
                break
            readable, _, _ = select.select([trickle], [], [], 0.25)
            if readable:
                answer = trickle.recv(65536)
                break
    assert answer.startswith(b"HTTP/1.1 408") and 0.9 < time.perf_counter() - started < 3


@pytest.mark.parametrize("path, body", [
    ("/v1/embeddings", {"input": ["fine", "\ud800"]}),
    ("/v1/embeddings", {"input": "a", "instruction": "\udfff task"}),
    ("/embed", {"inputs": "\ud800"}),
    ("/", {"inputs": ["x\udc00y"]}),
    ("/rerank", {"query": "\ud800", "texts": ["a"]}),
    ("/v1/rerank", {"query": "q", "documents": [{"text": "\ud83d"}]}),
    ("/v2/embed", {"texts": ["\ud800"], "input_type": "search_document"}),
    ("/score", {"text_1": "q", "text_2": ["\ud800"]}),
    ("/tokenize", {"inputs": "\ud800"}),
])
def test_invalid_unicode_is_a_422_naming_the_field(server, path, body):
    response = httpx.post(server.url + path, content=json.dumps(body), headers={**KEY, "content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert "lone surrogate" in response.json()["error"]["message"]


def test_starlettes_own_answers_have_the_error_body_and_every_response_a_request_id(server):
    missing = httpx.get(server.url + "/no/such/path", headers=KEY)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.get(server.url + "/embed", headers=KEY)
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    deep = httpx.post(server.url + "/embed", content=b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                      headers={**KEY, "content-type": "application/json"})
    assert deep.status_code in (400, 422) and deep.json()["error"]["message"]
    named = httpx.post(server.url + "/embed", json={"inputs": "a"}, headers={**KEY, "x-request-id": "trace-42"})
    assert named.status_code == 200 and named.headers["x-request-id"] == "trace-42"
    fresh = [httpx.get(server.url + "/health").headers["x-request-id"] for _ in range(2)]
    assert len(set(fresh)) == 2 and all(len(i) == 32 for i in fresh)
    hostile = httpx.get(server.url + "/health", headers={"x-request-id": "a b\tc"})
    assert hostile.headers["x-request-id"] != "a b\tc"


VALID = {
    "/v1/embeddings": {"input": ["What is the capital of China?", "Gravity"], "model": "emb", "dimensions": 32,
                       "encoding_format": "base64", "instruction": "Find it", "truncate": True, "user": "u"},
    "/embed": {"inputs": ["a b c", "d"], "normalize": True, "truncate": True, "truncation_direction": "left",
               "prompt_name": "query", "dimensions": 48},
    "/": {"inputs": "hello", "normalize": False},
    "/invocations": {"query": "q", "texts": ["a", "b"], "raw_scores": True},
    "/rerank": {"query": "q", "texts": ["a", "b"], "return_text": True, "truncate": True, "truncation_direction": "left"},
    "/v1/rerank": {"query": "q", "documents": ["a", {"text": "b"}], "top_n": 1, "return_documents": True,
                   "max_tokens_per_doc": 5},
    "/v2/embed": {"texts": ["a", "b"], "input_type": "search_query", "embedding_types": ["float", "int8", "ubinary"],
                  "truncate": "START", "max_tokens": 5, "output_dimension": 32},
    "/score": {"text_1": "q", "text_2": ["a", "b"], "truncate_prompt_tokens": -1},
    "/tokenize": {"inputs": ["a", "b c"], "add_special_tokens": True, "prompt_name": "query"},
    "/decode": {"ids": [[1, 2], [3]], "skip_special_tokens": False},
}
ODD_VALUES = [None, True, False, 0, -1, 1, 7, 2 ** 63, 10 ** 30, -10 ** 30, 1.5, float("nan"), float("inf"),
              float("-inf"), "", " ", "\ud800", "x" * 5000, "left", "Left", "START", "NONE", "int8", "binary", "query",
              [], [[]], [None], ["\udfff"], [1, "a"], [[1, 2], [3]], [-1], [10 ** 12], [2 ** 70], [[0] * 300],
              ["a"] * 600, {}, {"text": 5}, {"a": {"b": [1]}}, [{"text": "a"}], [[["deep"]]], "emb", "query text"]


def _mutated(rng: random.Random) -> tuple[str, bytes]:
    """One request from VALID, changed in one to three ways: a field's value swapped for an odd one,
    a field dropped or added, the body replaced, or its JSON text cut, spliced or nested deep."""
    path = rng.choice(list(VALID))
    body = json.loads(json.dumps(VALID[path]))
    for _ in range(rng.randint(1, 3)):
        move = rng.random()
        if move < 0.55 and body:
            body[rng.choice(list(body))] = rng.choice(ODD_VALUES)
        elif move < 0.65 and body:
            body.pop(rng.choice(list(body)))
        elif move < 0.75:
            body[rng.choice(["extra", "inputs", "texts", "query", "input", "ids", "text_1"])] = rng.choice(ODD_VALUES)
        elif move < 0.8:
            body = rng.choice(ODD_VALUES)
            break
    text = json.dumps(body, allow_nan=True).encode()
    move = rng.random()
    if move < 0.05:
        text = text[:rng.randint(0, len(text))]
    elif move < 0.1:
        at = rng.randint(0, len(text))
        text = text[:at] + rng.choice([b"NaN", b"\xff\xfe", b"\\ud800", b"}", b"[" * 2000, b"1e999", b"\x00"]) + text[at:]
    return path, text


def test_thousands_of_mutated_requests_never_get_a_5xx(server, local):
    rng = random.Random(0)
    statuses = {}
    with httpx.Client(headers={**KEY, "content-type": "application/json"}, timeout=60) as client:
        for _ in range(3000):
            path, text = _mutated(rng)
            response = client.post(server.url + path, content=text)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (path, text[:300], response.text)
            if response.status_code >= 400:
                assert response.json()["error"]["message"], (path, text[:300], response.text)
        answered = client.post(server.url + "/embed", json={"inputs": CORPUS})
    assert statuses.get(200, 0) >= 300 and sum(v for k, v in statuses.items() if 400 <= k < 500) >= 1000, statuses
    assert np.abs(np.array(answered.json()) - local.encode(CORPUS)).max() <= 1e-6
    assert httpx.get(server.url + "/health").status_code == 200


def test_sigterm_does_not_wait_for_a_client_that_never_finishes_sending(checkpoint, tmp_path):
    """A client holds a request open, sending nothing more: SIGTERM still exits 0 within the grace period,
    after answering the request that was complete."""
    running = Server("--model", str(checkpoint), "--max-length", "256", "--max-batch-tokens", "512",
                     "--read-timeout-s", "60", "--graceful-timeout-s", "2", log=tmp_path / "server.log")
    try:
        stalled = socket.create_connection(("127.0.0.1", running.port))
        stalled.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                        b"content-length: 100\r\n\r\n{\"inputs\":")
        assert httpx.post(running.url + "/embed", json={"inputs": "a"}).status_code == 200
        started = time.perf_counter()
        assert running.stop() == 0
        assert time.perf_counter() - started < 15
        stalled.close()
    finally:
        running.kill()
