"""Shared prefixes through `qwen3-jax serve`: a lone query computes only its own tokens once the prefix it
continues is kept (the card's instruction, known and its programs compiled from the start; a client's own,
from its second use), with the vectors encode gives; the server's metrics count real and computed tokens."""

import re
import time

import httpx
import numpy as np
import pytest

from qwen3_jax import Qwen3Embedder, Qwen3Reranker
from tests.conftest import CORPUS
from tests.servers import serving

TASK = "Given a web search query, retrieve relevant passages that answer the query"
OWN_TASK = "Given a question about animals, find the passage that answers it"
QUERIES = ["what do bees eat", "where do whales sleep", "how tall is the tallest tree", "why do cats purr",
           "how fast can a cheetah run", "do penguins have knees"] * 20


def tokens(server, model: str) -> dict[str, float]:
    """The server's real and computed token counters for `model`, from /metrics."""
    text = httpx.get(server.url + "/metrics").text
    found = re.findall(r'qwen3_tokens_total\{([^}]*)\} ([0-9.e+]+)', text)
    counts = {}
    for labels, value in found:
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if fields.get("model") == model:
            counts[fields["kind"]] = float(value)
    return counts


@pytest.fixture(scope="module")
def server(checkpoint, reranker_folder, tmp_path_factory):
    with serving("--model", str(checkpoint), "--reranker", str(reranker_folder), "--max-length", "256",
                 "--max-batch-tokens", "512", "--served-model-name", "emb",
                 log=tmp_path_factory.mktemp("serve-prefixes") / "server.log") as running:
        yield running


def _lone_queries_until_shared(server, instruction: str, whole, seconds: float = 300) -> int:
    """Sends lone queries with `instruction` (the openai client, one at a time) until one computes fewer
    tokens than it holds; each vector must equal the unshared encode's. Returns how many were sent."""
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    deadline = time.time() + seconds
    for sent, query in enumerate(QUERIES, 1):
        before = tokens(server, "emb")
        response = client.embeddings.create(model="emb", input=[query], extra_body={"instruction": instruction})
        after = tokens(server, "emb")
        expected = whole.encode([query], instruction=instruction)
        assert np.abs(np.array(response.data[0].embedding) - expected).max() <= 1e-6
        if after["computed"] - before.get("computed", 0) < after["real"] - before.get("real", 0):
            return sent
        assert time.time() < deadline, f"no lone query shared its instruction within {seconds} s"
        time.sleep(0.5)                        # the table's programs compile in the background meanwhile
    raise AssertionError("no lone query shared its instruction")


def test_a_lone_query_with_the_cards_instruction_computes_its_own_tokens(server, checkpoint):
    whole = Qwen3Embedder.from_pretrained(checkpoint, max_length=256)
    whole.runner.prefixes = None
    assert _lone_queries_until_shared(server, TASK, whole) == 1           # its programs compiled at start-up
    assert _lone_queries_until_shared(server, OWN_TASK, whole) >= 2        # computed whole the first time


def test_reranking_through_the_server_shares_the_query_prompt(server, reranker_folder):
    whole = Qwen3Reranker.from_pretrained(reranker_folder)
    whole.runner.prefixes = None
    expected = whole.score("What is the capital of China?", CORPUS[:6])
    name = httpx.get(server.url + "/v1/models").json()["data"][1]["id"]
    deadline = time.time() + 300
    while True:                                  # until the table's programs are compiled, prompts run whole
        before = tokens(server, name)
        response = httpx.post(server.url + "/rerank", json={"query": "What is the capital of China?",
                                                            "texts": CORPUS[:6]}, timeout=120)
        after = tokens(server, name)
        assert response.status_code == 200, response.text
        got = {item["index"]: item["score"] for item in response.json()}
        assert np.abs(np.array([got[i] for i in range(6)]) - expected).max() <= 1e-6
        if after["computed"] - before.get("computed", 0) < after["real"] - before.get("real", 0):
            break
        assert time.time() < deadline, "the reranker's prompts never shared their query"
        time.sleep(0.5)
