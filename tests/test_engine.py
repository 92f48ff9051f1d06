"""The engines under every entry point (qwen3_jax/engine): what a text or pair becomes, the one place of the
reranker's margin and probability, the typed refusals, and the one table the server maps them through."""

import subprocess
import sys

import numpy as np
import pytest

from qwen3_jax.engine import EmbeddingEngine
from qwen3_jax.engine.errors import Invalid, NotServed, RequestTooLarge, TooManyCharacters
from qwen3_jax.engine.reranking import PREFIX, yes_no_margins
from qwen3_jax.reranker import Qwen3Reranker
from qwen3_jax.serve.scheduler import BatchFailed, Overloaded, Scheduler, ShuttingDown
from qwen3_jax.tokenization import QUERY_PROMPT, TooLong, format_instruction
from tests.conftest import CORPUS, long_text


def test_embedding_rows_are_what_encode_embeds(embedder):
    engine = embedder.engine
    rows = engine.rows(CORPUS[:3], instruction="Find it")
    assert rows == embedder.tokenizer.encode([format_instruction("Find it") + t for t in CORPUS[:3]],
                                             embedder.max_length)
    vectors = engine.vectors(engine.run(rows, batch_size=4), 64)
    assert np.abs(vectors - embedder.encode(CORPUS[:3], instruction="Find it", dim=64)).max() <= 1e-6
    with pytest.raises(TooLong):
        engine.rows([long_text()], truncate=False, max_length=64)
    with pytest.raises(Invalid) as unknown:
        engine.rows(["a"], prompt_name="nope")
    assert unknown.value.reason == "invalid_prompt" and unknown.value.param == "prompt_name"
    with pytest.raises(Invalid) as tokens:
        engine.token_rows([[1, 2], [embedder.config.vocab_size]])
    assert tokens.value.reason == "invalid_tokens" and "input[1]" in str(tokens.value)


def test_known_prefixes_are_the_prompts_and_the_default_instruction(embedder, reranker_folder):
    def known(prompts):
        return EmbeddingEngine(embedder.model, embedder.tokenizer, embedder.runner, prompts=prompts,
                               max_length=64).known_prefixes()

    assert known({"query": "Q: ", "document": ""}) == ["Q: ", QUERY_PROMPT]
    assert known({"query": QUERY_PROMPT}) == [QUERY_PROMPT]                  # each once
    assert Qwen3Reranker.from_pretrained(reranker_folder).engine.known_prefixes() == [PREFIX]


def test_scores_are_the_yes_no_margin_or_its_probability(reranker_folder):
    reranker = Qwen3Reranker.from_pretrained(reranker_folder)
    engine = reranker.engine
    hidden = engine.run(engine.rows([("q", d) for d in CORPUS[:4]]), batch_size=4)
    logits = hidden @ np.asarray(reranker.model.output_rows([reranker.yes_id, reranker.no_id]), np.float32).T
    np.testing.assert_allclose(engine.scores(hidden, raw=True), logits[:, 0] - logits[:, 1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(engine.scores(hidden), 1 / (1 + np.exp(-(logits[:, 0] - logits[:, 1]))),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(yes_no_margins(hidden, engine.answer_rows), engine.scores(hidden, raw=True))
    np.testing.assert_allclose(engine.scores(hidden), reranker.score("q", CORPUS[:4]), atol=1e-6)


def test_a_request_larger_than_the_queue_is_refused_before_it_is_queued(embedder):
    scheduler = Scheduler(embedder.runner, max_batch_tokens=64, max_queue_tokens=100)
    engine = embedder.engine.scheduled(scheduler)
    assert embedder.engine.scheduler is None                  # the embedder's own engine runs at once
    with pytest.raises(RequestTooLarge) as large:
        engine.submit([[5] * 60, [6] * 41])
    assert (large.value.tokens, large.value.limit) == (101, 100) and scheduler.queued_tokens == 0


@pytest.mark.parametrize("error, family, status, code", [
    (TooLong([0], 9, 8), "tei", 413, "context_length_exceeded"),
    (TooLong([0], 9, 8), "openai", 400, "context_length_exceeded"),
    (TooManyCharacters("texts[0] holds 9 characters", param="texts"), "tei", 413, "context_length_exceeded"),
    (TooManyCharacters("texts[0] holds 9 characters", param="texts"), "cohere", 400, "context_length_exceeded"),
    (Invalid("input is empty", reason="empty_input", param="input"), "tei", 400, "empty_input"),
    (NotServed("no such model", param="model"), "vllm", 404, "model_not_found"),
    (RequestTooLarge(200, 100), "openai", 413, "request_too_large"),
    (Overloaded(90, 100, 3), "cohere", 429, "queue_full"),
    (ShuttingDown("the server is shutting down"), "tei", 503, "unavailable"),
    (BatchFailed("a batch failed"), "vllm", 500, "internal_error"),
])
def test_one_table_maps_each_typed_error_to_its_familys_status(error, family, status, code):
    from qwen3_jax.serve.errors import refusal

    answer = refusal(error, family)
    assert (answer.status, answer.code) == (status, code)
    if isinstance(error, Invalid):
        assert answer.param == error.param and answer.message == str(error)
    if isinstance(error, Overloaded):
        assert answer.headers == {"Retry-After": "3"}


def test_the_service_holds_no_http():
    """serve/service.py runs without FastAPI (the routes hold HTTP)."""
    probe = ("import sys; import qwen3_jax.serve.service; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
