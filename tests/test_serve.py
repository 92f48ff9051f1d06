"""`qwen3-jax serve`: a real server in a subprocess on a loopback port, driven by real clients (the official
openai client, httpx) and checked against Qwen3Embedder / Qwen3Reranker on the same checkpoints."""

import asyncio
import base64
import signal

import httpx
import numpy as np
import pytest

from qwen3_jax import Qwen3Embedder, Qwen3Reranker
from tests.conftest import CORPUS, long_text
from tests.servers import Server, serving

TASK = "Given a web search query, retrieve relevant passages that answer the query"
CARD_QUERY = f"Instruct: {TASK}\nQuery:"          # the published "query" prompt, from the model card
LIMITS = ["--max-length", "256", "--max-batch-tokens", "512"]
ROOMY = [*LIMITS, "--max-queue-tokens", "1048576"]         # for the tests that must not meet a full queue


@pytest.fixture(scope="module")
def server(checkpoint, reranker_folder, tmp_path_factory):
    with serving("--model", str(checkpoint), "--reranker", str(reranker_folder), *ROOMY, "--served-model-name", "emb",
                 log=tmp_path_factory.mktemp("serve") / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def local(checkpoint):
    """What the server must equal: encode on the same checkpoint, with the server's length limit."""
    return Qwen3Embedder.from_pretrained(checkpoint, max_length=256)


def _client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_the_openai_client_gets_what_encode_gives(server, local):
    client = _client(server)
    texts = [*CORPUS, long_text(30)]
    for fmt in ("float", "base64"):         # base64 asked for explicitly: the client hands back the string
        response = client.embeddings.create(model="emb", input=texts, encoding_format=fmt)
        got = np.array([np.frombuffer(base64.b64decode(item.embedding), "<f4") if fmt == "base64" else item.embedding
                        for item in response.data], np.float32)
        assert [item.index for item in response.data] == list(range(len(texts)))
        assert np.abs(got - local.encode(texts)).max() <= 1e-6, fmt
    expected_tokens = sum(len(r) for r in local.tokenizer.encode(texts, 256))
    assert response.usage.prompt_tokens == response.usage.total_tokens == expected_tokens
    default = client.embeddings.create(model="emb", input=texts[:3])          # the client's default: base64
    assert np.abs(np.array([d.embedding for d in default.data]) - local.encode(texts[:3])).max() <= 1e-6
    small = client.embeddings.create(model="emb", input="What is the capital of China?", dimensions=32,
                                     extra_body={"instruction": TASK})
    expected = local.encode(["What is the capital of China?"], instruction=TASK, dim=32)
    assert len(small.data[0].embedding) == 32 and np.abs(np.array(small.data[0].embedding) - expected).max() <= 1e-6
    named = client.embeddings.create(model="emb", input=["Explain gravity"], extra_body={"prompt_name": "query"})
    expected = local.encode(["Explain gravity"], prompt_name="query")
    assert np.abs(np.array(named.data[0].embedding) - expected).max() <= 1e-6
    ids = local.tokenizer.token_ids(texts[:2])
    tokens = client.embeddings.create(model="emb", input=ids)
    assert np.abs(np.array([d.embedding for d in tokens.data]) - local.encode(texts[:2])).max() <= 1e-6
    assert [m.id for m in client.models.list().data] == ["emb", server_reranker_name(server)]


def server_reranker_name(server) -> str:
    return httpx.get(server.url + "/v1/models").json()["data"][1]["id"]


def test_rerank_endpoints_score_as_the_reranker(server, reranker_folder):
    reranker = Qwen3Reranker.from_pretrained(reranker_folder)
    query, documents = "What is the capital of China?", CORPUS[:6]
    expected = reranker.score(query, documents)
    tei = httpx.post(server.url + "/rerank", json={"query": query, "texts": documents, "return_text": True}).json()
    assert [hit["index"] for hit in tei] == list(np.argsort(-expected, kind="stable"))
    assert max(abs(hit["score"] - expected[hit["index"]]) for hit in tei) <= 1e-6
    assert all(hit["text"] == documents[hit["index"]] for hit in tei)
    raw = httpx.post(server.url + "/rerank", json={"query": query, "texts": documents, "raw_scores": True}).json()
    margins = {hit["index"]: hit["score"] for hit in raw}
    assert max(abs(1 / (1 + np.exp(-margins[i])) - expected[i]) for i in margins) <= 1e-6
    cohere = httpx.post(server.url + "/v1/rerank", json={"query": query, "documents": [{"text": d} for d in documents],
                                                         "top_n": 3, "return_documents": True,
                                                         "instruction": "Find the matching sentence"}).json()
    with_instruction = reranker.score(query, documents, instruction="Find the matching sentence")
    assert [r["index"] for r in cohere["results"]] == list(np.argsort(-with_instruction, kind="stable")[:3])
    assert max(abs(r["relevance_score"] - with_instruction[r["index"]]) for r in cohere["results"]) <= 1e-6
    assert cohere["results"][0]["document"]["text"] == documents[cohere["results"][0]["index"]]
    assert cohere["usage"]["total_tokens"] > 0


def test_huggingface_hubs_inference_client_gets_what_encode_and_sentence_transformers_give(server, local, checkpoint):
    """InferenceClient(model=URL).feature_extraction posts TEI's fields to the bare URL; left truncation
    keeps a text's end as sentence-transformers does with truncation_side="left"."""
    from huggingface_hub import InferenceClient
    from sentence_transformers import SentenceTransformer

    client = InferenceClient(model=server.url)
    texts = CORPUS[:4]
    got = client.feature_extraction(texts)
    assert got.shape == (4, local.dimension) and np.abs(got - local.encode(texts)).max() <= 1e-6
    query = client.feature_extraction("Explain gravity", prompt_name="query", dimensions=32)
    assert np.abs(query - local.encode(["Explain gravity"], prompt_name="query", dim=32)).max() <= 1e-6
    raw = client.feature_extraction(texts[:2], normalize=False)
    assert np.abs(raw - local.encode(texts[:2], normalize=False)).max() <= 1e-5
    long = [long_text(400), long_text(300) + " the end"]
    right = client.feature_extraction(long, truncate=True, truncation_direction="right")
    assert np.abs(right - local.encode(long)).max() <= 1e-6
    left = client.feature_extraction(long, truncate=True, truncation_direction="left")
    reference = SentenceTransformer(str(checkpoint), device="cpu")
    reference.max_seq_length = 256
    reference.tokenizer.truncation_side = "left"
    assert np.abs(left - reference.encode(long, normalize_embeddings=True)).max() <= 1e-4
    assert np.abs(left - right).max() > 1e-2                          # the two ends really differ


def test_tei_embed_all_similarity_and_predict_through_huggingface_hub_and_transformers(server, checkpoint,
                                                                                     reranker_folder,
                                                                                     sentence_transformer):
    """/embed_all: every token's state as transformers computes it; /similarity (InferenceClient's
    sentence_similarity, posted to the bare URL): sentence-transformers' cosines; /predict: the model card's
    P("yes") of each [query, document] pair."""
    from huggingface_hub import InferenceClient

    from tests.reference import official_rerank_scores, transformers_hidden_states

    text = "Gravity is a force that attracts two bodies towards each other."
    states = InferenceClient(model=server.url + "/embed_all").feature_extraction(text, prompt_name="query")
    ids = np.asarray(sentence_transformer.tokenize([CARD_QUERY + text])["input_ids"])
    _, reference = transformers_hidden_states(checkpoint, ids, np.ones_like(ids))
    assert states.shape == reference.shape and np.abs(states - reference).max() <= 1e-4
    several = httpx.post(server.url + "/embed_all", json={"inputs": [text, "Beijing"]}, timeout=120).json()
    for got, each in zip(several, (text, "Beijing")):            # lengths that are no power of two
        ids = np.asarray(sentence_transformer.tokenize([each])["input_ids"])
        assert np.abs(np.asarray(got) - transformers_hidden_states(checkpoint, ids, np.ones_like(ids))[1][0]).max() \
            <= 1e-4

    source, others = "What is the capital of China?", CORPUS[:4]
    scores = InferenceClient(model=server.url).sentence_similarity(source, other_sentences=others)
    expected = sentence_transformer.similarity(sentence_transformer.encode([source]),
                                               sentence_transformer.encode(others)).numpy()[0]
    assert np.abs(np.asarray(scores) - expected).max() <= 1e-4
    direct = httpx.post(server.url + "/similarity", json={"inputs": {"source_sentence": source, "sentences": others}})
    assert np.abs(np.asarray(direct.json()) - expected).max() <= 1e-4

    pairs = [[source, document] for document in CORPUS[:3]]
    card = official_rerank_scores(reranker_folder, source, CORPUS[:3])
    batch = httpx.post(server.url + "/predict", json={"inputs": pairs}).json()
    assert [[item["label"] for item in answer] for answer in batch] == [["yes"]] * 3
    assert np.abs(np.array([answer[0]["score"] for answer in batch]) - card).max() <= 1e-5
    one = httpx.post(server.url + "/predict", json={"inputs": pairs[0], "raw_scores": True}).json()
    assert abs(1 / (1 + np.exp(-one[0]["score"])) - card[0]) <= 1e-5
    lone = httpx.post(server.url + "/predict", json={"inputs": "just a text"})
    assert lone.status_code == 422 and "[query, document] pair" in lone.json()["error"]["message"]


def test_the_cohere_client_embeds_and_reranks_as_the_models_and_sentence_transformers_quantize(
        server, local, reranker_folder):
    import cohere
    from sentence_transformers.util.quantization import quantize_embeddings

    from qwen3_jax.quantize import DEFAULT_CALIBRATION_TEXTS

    client = cohere.ClientV2(api_key="unused", base_url=server.url)
    name = server_reranker_name(server)
    query, documents = "What is the capital of China?", CORPUS[:6]
    ranked = client.rerank(model=name, query=query, documents=documents, top_n=3)
    expected = Qwen3Reranker.from_pretrained(reranker_folder).score(query, documents)
    assert [r.index for r in ranked.results] == list(np.argsort(-expected, kind="stable")[:3])
    assert max(abs(r.relevance_score - expected[r.index]) for r in ranked.results) <= 1e-6

    texts = DEFAULT_CALIBRATION_TEXTS[:6]
    kinds = ["float", "int8", "uint8", "binary", "ubinary"]
    response = client.embed(model="emb", texts=texts, input_type="search_document", embedding_types=kinds)
    floats = np.array(response.embeddings.float_, np.float32)
    assert np.abs(floats - local.encode(texts)).max() <= 1e-6
    queries = client.embed(model="emb", texts=texts[:2], input_type="search_query", embedding_types=["float"],
                           output_dimension=32)
    assert np.abs(np.array(queries.embeddings.float_) - local.encode(texts[:2], prompt_name="query", dim=32)).max() <= 1e-6
    calibration = local.encode(DEFAULT_CALIBRATION_TEXTS)
    for kind in ("binary", "ubinary"):                                # the same floats: the same bits
        assert np.array_equal(np.array(getattr(response.embeddings, kind)), quantize_embeddings(floats, kind)), kind
    # calibrated on the same texts: equal, but where a value lies within float noise of a step's edge
    # (the server's and this process's embeddings of the calibration texts differ by ~1e-7)
    starts, ends = calibration.min(axis=0), calibration.max(axis=0)
    position = (floats - starts) / ((ends - starts) / 255)
    at_an_edge = np.abs(position - np.round(position)) < 1e-3
    for kind in ("int8", "uint8"):
        got = np.array(getattr(response.embeddings, kind), np.int64)
        reference = quantize_embeddings(floats, kind, calibration_embeddings=calibration).astype(np.int64)
        assert np.all((got == reference) | ((np.abs(got - reference) == 1) & at_an_edge)), kind


def test_vllm_score_tei_tokenize_decode_and_invocations(server, local, reranker_folder):
    reranker = Qwen3Reranker.from_pretrained(reranker_folder)
    pairs = [("What is the capital of China?", CORPUS[0]), ("Explain gravity", CORPUS[1]), ("Explain gravity", CORPUS[4])]
    paired = httpx.post(server.url + "/v1/score", json={"text_1": [q for q, _ in pairs],
                                                        "text_2": [d for _, d in pairs]}).json()
    assert [item["index"] for item in paired["data"]] == [0, 1, 2] and paired["object"] == "list"
    assert max(abs(item["score"] - s) for item, s in zip(paired["data"], reranker.score_pairs(pairs))) <= 1e-6
    one = httpx.post(server.url + "/score", json={"text_1": "Explain gravity", "text_2": CORPUS[:3]}).json()
    expected = reranker.score("Explain gravity", CORPUS[:3])
    assert max(abs(item["score"] - s) for item, s in zip(one["data"], expected)) <= 1e-6
    assert one["usage"]["prompt_tokens"] == sum(map(len, reranker.prompt_ids([("Explain gravity", d) for d in CORPUS[:3]])))
    mismatched = httpx.post(server.url + "/score", json={"text_1": ["a", "b"], "text_2": ["c", "d", "e"]})
    assert mismatched.status_code == 400

    tokens = httpx.post(server.url + "/tokenize", json={"inputs": CORPUS[:3]}).json()
    assert [[t["id"] for t in row] for row in tokens] == local.tokenizer.encode(CORPUS[:3], 256)
    assert all("".join(t["text"] for t in row if not t["special"]) == text for row, text in zip(tokens, CORPUS))
    assert all(row[-1]["special"] and row[-1]["start"] is None for row in tokens)
    bare = httpx.post(server.url + "/tokenize", json={"inputs": "Explain gravity", "add_special_tokens": False,
                                                      "prompt_name": "query"}).json()
    assert [t["id"] for t in bare[0]] == local.tokenizer.token_ids([local.prompts["query"] + "Explain gravity"])[0]
    ids = local.tokenizer.token_ids(CORPUS[:2])
    decoded = httpx.post(server.url + "/decode", json={"ids": ids}).json()
    assert decoded == CORPUS[:2]

    embedded = httpx.post(server.url + "/invocations", json={"inputs": CORPUS[:2]}).json()
    assert np.abs(np.array(embedded) - local.encode(CORPUS[:2])).max() <= 1e-6
    reranked = httpx.post(server.url + "/invocations", json={"query": "Explain gravity", "texts": CORPUS[:3]}).json()
    assert reranked == httpx.post(server.url + "/rerank", json={"query": "Explain gravity", "texts": CORPUS[:3]}).json()
    assert httpx.get(server.url + "/ping").status_code == 200


def _metric(text: str, name: str, **labels) -> float:
    """The value of one sample of the Prometheus exposition."""
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_concurrent_requests_of_mixed_sizes_each_get_their_own_answer(server, local):
    """64 requests at once, from single short queries to batches of long documents: each response equals
    its own encode, and the metrics show batches that merged several requests."""
    rng = np.random.default_rng(0)
    requests = []
    for r in range(64):
        count = int(rng.choice([1, 1, 2, 5, 12]))
        requests.append([f"{CORPUS[(r + i) % len(CORPUS)]} {long_text(int(rng.integers(2, 40)))}" for i in range(count)])
    before = httpx.get(server.url + "/metrics").text

    async def send_all():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*[client.post(server.url + "/v1/embeddings", json={"input": texts})
                                          for texts in requests])

    responses = asyncio.run(send_all())
    for texts, response in zip(requests, responses):
        assert response.status_code == 200, response.text
        got = np.array([d["embedding"] for d in response.json()["data"]], np.float32)
        assert np.abs(got - local.encode(texts)).max() <= 1e-6
    after = httpx.get(server.url + "/metrics").text
    merged = _metric(after, "qwen3_batch_requests_count", model="emb") - _metric(after, "qwen3_batch_requests_bucket",
                                                                                 model="emb", le="1.0")
    merged -= _metric(before, "qwen3_batch_requests_count", model="emb") - _metric(before, "qwen3_batch_requests_bucket",
                                                                                   model="emb", le="1.0")
    assert merged >= 1                                       # batches that held two requests or more
    assert _metric(after, "qwen3_requests_total", endpoint="/v1/embeddings", status="200") >= 64
    real, computed = (_metric(after, "qwen3_tokens_total", model="emb", kind=kind) for kind in ("real", "computed"))
    assert 0 < real <= computed
    assert _metric(after, "qwen3_compiled_programs", model="emb") >= 1 and "qwen3_queue_tokens" in after


BAD_REQUESTS = [
    ("/v1/embeddings", {"input": []}, 400, "empty_input"),
    ("/v1/embeddings", {"input": [""]}, 400, "empty_input"),
    ("/v1/embeddings", {"input": ["a"] * 513}, 400, "too_many_inputs"),
    ("/v1/embeddings", {"input": "a", "dimensions": 7}, 400, "invalid_dimensions"),
    ("/v1/embeddings", {"input": "a", "dimensions": 65}, 400, "invalid_dimensions"),
    ("/v1/embeddings", {"input": "a", "encoding_format": "int8"}, 400, "invalid_encoding_format"),
    ("/v1/embeddings", {"input": 5}, 422, "invalid_request"),
    ("/v1/embeddings", {"input": ["a", 3]}, 422, "invalid_request"),
    ("/v1/embeddings", {"inputs": "a"}, 422, "invalid_request"),
    ("/v1/embeddings", {"input": "a", "model": "another"}, 404, "model_not_found"),
    ("/v1/embeddings", {"input": [[1, 2, 10 ** 9]]}, 400, "invalid_tokens"),
    ("/v1/embeddings", {"input": "a", "prompt_name": "nope"}, 400, "invalid_prompt"),
    ("/v1/embeddings", {"input": long_text(400)}, 400, "context_length_exceeded"),
    ("/embed", {"inputs": [long_text(400)]}, 413, "context_length_exceeded"),
    ("/embed", {"inputs": "a", "truncation_direction": "middle"}, 422, "invalid_request"),
    ("/rerank", {"query": "q", "texts": []}, 400, "empty_input"),
    ("/rerank", {"query": "q", "texts": [long_text(400)]}, 413, "context_length_exceeded"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, 400, "invalid_top_n"),
    ("/v1/rerank", {"query": "q", "documents": "a"}, 422, "invalid_request"),
]


@pytest.mark.parametrize("path, body, status, code", BAD_REQUESTS)
def test_bad_input_gets_its_status_and_an_error_body(server, path, body, status, code):
    response = httpx.post(server.url + path, json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]


def test_malformed_json_and_truncation_on_request(server, local):
    response = httpx.post(server.url + "/v1/embeddings", content=b'{"input": ["a"', timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"
    text = long_text(400)
    cut = httpx.post(server.url + "/embed", json={"inputs": [text], "truncate": True}, timeout=60).json()
    assert np.abs(np.array(cut) - local.encode([text])).max() <= 1e-6          # encode cuts at 256 tokens too


def _texts_of(words: int, count: int, seed: int) -> list[str]:
    """`count` texts of `words` random words (a few dozen to a few hundred tokens, within the limit), no two
    alike from their first word: the server shares no prefix among them, so each costs its whole length."""
    return [long_text(words, seed=seed * count + i + 1) for i in range(count)]


def test_overload_gets_429_and_every_accepted_request_completes(checkpoint, local, tmp_path):
    """A queue of 1,024 tokens and far more offered at once: the excess gets 429 with Retry-After at once,
    everything accepted is answered correctly; the API key is enforced."""
    server = Server("--model", str(checkpoint), *LIMITS, "--max-queue-tokens", "1024", "--api-key", "sesame",
                    log=tmp_path / "server.log")
    try:
        assert httpx.post(server.url + "/embed", json={"inputs": "a"}).status_code == 401
        wrong = httpx.post(server.url + "/embed", json={"inputs": "a"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/health").status_code == 200          # no key needed
        requests = [_texts_of(20, 3, seed) for seed in range(48)]

        async def send_all():
            async with httpx.AsyncClient(timeout=300, headers={"Authorization": "Bearer sesame"}) as client:
                return await asyncio.gather(*[client.post(server.url + "/embed", json={"inputs": texts})
                                              for texts in requests])

        responses = asyncio.run(send_all())
        refused = [r for r in responses if r.status_code == 429]
        assert refused and all(int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "queue_full"
                               for r in refused)
        accepted = [(texts, r) for texts, r in zip(requests, responses) if r.status_code == 200]
        assert accepted and len(accepted) + len(refused) == len(requests)
        for texts, response in accepted:
            assert np.abs(np.array(response.json()) - local.encode(texts)).max() <= 1e-6
        too_big = httpx.post(server.url + "/embed", json={"inputs": _texts_of(40, 40, 0)},
                             headers={"Authorization": "Bearer sesame"})
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
        assert server.stop() == 0
    finally:
        server.kill()


def test_sigterm_during_load_answers_every_accepted_request_and_exits_0(checkpoint, local, tmp_path):
    """SIGTERM while requests are queued: each request the server has received is answered correctly, new
    connections are refused, and the process exits 0. A client that gives up has its queued work
    dropped (499 in the metrics)."""
    server = Server("--model", str(checkpoint), *ROOMY, log=tmp_path / "server.log")
    requests = [_texts_of(40, 24, seed) for seed in range(48)]

    async def load():
        async with httpx.AsyncClient(timeout=300) as client:
            sent = [asyncio.ensure_future(client.post(server.url + "/embed", json={"inputs": texts}))
                    for texts in requests]
            quitter = asyncio.ensure_future(client.post(server.url + "/embed", json={"inputs": _texts_of(40, 24, 99)}))
            for _ in range(400):              # until the server has received every request (and this one)
                metrics = (await client.get(server.url + "/metrics")).text
                if _metric(metrics, "qwen3_requests_in_flight") >= len(requests) + 2:
                    break
                await asyncio.sleep(0.05)
            quitter.cancel()                  # it gives up, its texts still queued behind the others
            dropped = 0
            for _ in range(100):
                dropped = _metric((await client.get(server.url + "/metrics")).text, "qwen3_requests_total",
                                  status="499")
                if dropped:
                    break
                await asyncio.sleep(0.05)
            server.process.send_signal(signal.SIGTERM)
            return await asyncio.gather(*sent), dropped

    try:
        responses, dropped = asyncio.run(load())
        assert dropped == 1
        for texts, response in zip(requests, responses):
            assert response.status_code == 200, response.text
            assert np.abs(np.array(response.json()) - local.encode(texts)).max() <= 1e-6
        assert server.process.wait(timeout=120) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health")
        assert "every accepted request was answered" in server.log.read_text()
    finally:
        server.kill()


def _serve_fails_at_once(*args: str) -> tuple[int, str, float]:
    """(exit status, stderr, seconds) of a `qwen3-jax serve` that must end before loading anything."""
    import subprocess
    import sys
    import time

    began = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "qwen3_jax.cli", "serve", *args], capture_output=True, text=True,
                         timeout=120)
    return run.returncode, run.stderr, time.perf_counter() - began


def test_a_port_out_of_range_or_taken_is_one_line_and_exit_2_before_any_loading(checkpoint):
    import socket

    status, stderr, _ = _serve_fails_at_once("--model", str(checkpoint), "--port", "80000")
    assert status == 2 and stderr == "qwen3-jax: error: --port=80000 is not a port: give one of 1..65535\n"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, stderr, seconds = _serve_fails_at_once("--model", str(checkpoint), "--port", str(port))
    assert status == 2, stderr
    assert stderr == f"qwen3-jax: error: port {port} on 127.0.0.1 is in use by another program: stop it, or give " \
                     "another --port\n"


def test_start_up_says_what_it_compiled_and_what_it_loaded_from_the_cache(checkpoint, tmp_path):
    """Progress from the start (the port held, loading, compiling), and a ready line whose counts are true:
    the first start compiles exactly the programs it writes to an empty cache, the second loads them all."""
    import re

    cache = tmp_path / "cache"
    counts = []
    for start in range(2):
        log = tmp_path / f"server{start}.log"
        with serving("--model", str(checkpoint), *LIMITS, "--compile-cache", str(cache), log=log) as running:
            assert httpx.get(running.url + "/health").status_code == 200
        lines = log.read_text().splitlines()
        assert lines[0] == f"port {running.port} on 127.0.0.1 held; loading {checkpoint}"
        assert lines[1].startswith("loaded in ") and "compiling every batch shape" in lines[1]
        ready = next(line for line in lines if line.startswith("ready in "))
        compiled, loaded = map(int, re.search(r"\((\d+) programs? compiled, (\d+) loaded from the compilation "
                                              r"cache\)", ready).groups())
        counts.append((compiled, loaded, len(list(cache.glob("*-cache")))))
    (compiled, loaded, written), (again_compiled, again_loaded, written_after) = counts
    assert compiled > 0 and loaded == 0 and compiled == written
    assert again_compiled == 0 and again_loaded == compiled and written_after == written
