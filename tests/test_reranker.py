"""Qwen3Reranker against the official transformers scoring recipe on the same checkpoint."""

import json

import numpy as np
import pytest

from qwen3_jax.cli import main
from qwen3_jax.reranker import DEFAULT_INSTRUCTION, Qwen3Reranker, format_pair
from qwen3_jax.safetensors_file import SafetensorsFile
from tests.conftest import CORPUS, long_text
from tests.reference import official_rerank_scores

QUERY = "What is the capital of China?"
DOCS = [CORPUS[0], CORPUS[1], "", long_text(200), CORPUS[4], CORPUS[6]]


@pytest.fixture(scope="module")
def reranker(reranker_checkpoint):
    return Qwen3Reranker.from_pretrained(reranker_checkpoint)


def test_checkpoint_layout(reranker_checkpoint):
    keys = set(SafetensorsFile(reranker_checkpoint / "model.safetensors").entries)
    assert "model.embed_tokens.weight" in keys
    tied = json.loads((reranker_checkpoint / "config.json").read_text())["tie_word_embeddings"]
    assert ("lm_head.weight" in keys) == (not tied)


def test_scores_match_the_official_recipe(reranker, reranker_checkpoint):
    ref = official_rerank_scores(reranker_checkpoint, QUERY, DOCS, DEFAULT_INSTRUCTION)
    ours = reranker.score(QUERY, DOCS, batch_size=4)
    assert ours.shape == (len(DOCS),) and ((ours >= 0) & (ours <= 1)).all()
    assert np.abs(ours - ref).max() <= 1e-4
    assert ref.std() > 1e-3  # the random head separates the documents, so the check can fail


def test_custom_instruction_and_pairs(reranker, reranker_checkpoint):
    task = "Retrieve semantically similar text"
    ref = official_rerank_scores(reranker_checkpoint, QUERY, DOCS[:3], task)
    pairs = [(QUERY, d) for d in DOCS[:3]]
    assert np.abs(reranker.score_pairs(pairs, instruction=task) - ref).max() <= 1e-4


def test_long_documents_are_cut_inside_the_document(reranker_checkpoint, reranker):
    head = reranker.tokenizer.token_ids([format_pair(DEFAULT_INSTRUCTION, QUERY, "")])[0]
    limit = len(reranker.prefix_ids) + len(head) + 20 + len(reranker.suffix_ids)
    small = Qwen3Reranker.from_pretrained(reranker_checkpoint, max_length=limit)
    with pytest.warns(UserWarning, match="truncated"):
        rows = small.prompt_ids([(QUERY, long_text())], DEFAULT_INSTRUCTION)
    assert len(rows[0]) == limit
    assert rows[0][len(small.prefix_ids):][: len(head) - 1] == head[:-1]
    assert rows[0][-len(small.suffix_ids):] == small.suffix_ids
    assert rows[0][: len(small.prefix_ids)] == small.prefix_ids
    ref = official_rerank_scores(reranker_checkpoint, QUERY, [long_text(), CORPUS[0]], DEFAULT_INSTRUCTION,
                                 max_length=limit)
    with pytest.warns(UserWarning):
        ours = small.score(QUERY, [long_text(), CORPUS[0]])
    assert np.abs(ours - ref).max() <= 1e-4


def test_rank_orders_by_score(reranker):
    scores = reranker.score(QUERY, DOCS)
    ranked = reranker.rank(QUERY, DOCS, top_k=3)
    assert [r["index"] for r in ranked] == list(np.argsort(-scores, kind="stable")[:3])
    assert ranked[0]["document"] == DOCS[ranked[0]["index"]]
    with pytest.raises(ValueError, match="top_k=0"):
        reranker.rank(QUERY, DOCS, top_k=0)
    with pytest.raises(TypeError, match=r"pairs\[0\]"):
        reranker.score_pairs([("only a query",)])


def test_rerank_cli(reranker_checkpoint, reranker, tmp_path, capsys):
    lines = [json.dumps({"id": f"d{i}", "text": d}) for i, d in enumerate(DOCS)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines))
    assert main(["rerank", "--model", str(reranker_checkpoint), "--query", QUERY,
                 "--input", str(tmp_path / "docs.jsonl"), "--top-k", "2"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = reranker.rank(QUERY, DOCS, top_k=2)
    assert [p["id"] for p in printed] == [f"d{e['index']}" for e in expected]
    assert abs(printed[0]["score"] - expected[0]["score"]) <= 1e-6
