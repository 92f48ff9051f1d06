"""Qwen3Reranker against the official transformers scoring recipe on the same checkpoint."""

import json

import numpy as np
import pytest

from qwen3_jax.cli import main
from qwen3_jax.engine.reranking import format_pair
from qwen3_jax.reranker import Qwen3Reranker
from qwen3_jax.safetensors_file import SafetensorsFile
from tests.conftest import CORPUS, long_text
from tests.reference import CARD_INSTRUCTION, official_rerank_scores

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
    ref = official_rerank_scores(reranker_checkpoint, QUERY, DOCS)
    ours = reranker.score(QUERY, DOCS, batch_size=4)            # the default instruction
    assert ours.shape == (len(DOCS),) and ((ours >= 0) & (ours <= 1)).all()
    assert np.abs(ours - ref).max() <= 1e-4
    assert ref.std() > 1e-3  # the random head separates the documents, so the check can fail


@pytest.mark.parametrize("task", ["Retrieve semantically similar text", ""])
def test_custom_instruction_and_pairs(reranker, reranker_checkpoint, task):
    ref = official_rerank_scores(reranker_checkpoint, QUERY, DOCS[:3], task)
    pairs = [(QUERY, d) for d in DOCS[:3]]
    assert np.abs(reranker.score_pairs(pairs, instruction=task) - ref).max() <= 1e-4


def test_long_documents_are_cut_inside_the_document(reranker_checkpoint, reranker):
    head = reranker.tokenizer.token_ids([format_pair(CARD_INSTRUCTION, QUERY, "")])[0]
    limit = len(reranker.prefix_ids) + len(head) + 20 + len(reranker.suffix_ids)
    small = Qwen3Reranker.from_pretrained(reranker_checkpoint, max_length=limit)
    with pytest.warns(UserWarning, match="truncated"):
        rows = small.prompt_ids([(QUERY, long_text())], CARD_INSTRUCTION)
    assert len(rows[0]) == limit
    assert rows[0][len(small.prefix_ids):][: len(head) - 1] == head[:-1]
    assert rows[0][-len(small.suffix_ids):] == small.suffix_ids
    assert rows[0][: len(small.prefix_ids)] == small.prefix_ids
    ref = official_rerank_scores(reranker_checkpoint, QUERY, [long_text(), CORPUS[0]], max_length=limit)
    with pytest.warns(UserWarning):
        ours = small.score(QUERY, [long_text(), CORPUS[0]])
    assert np.abs(ours - ref).max() <= 1e-4


def test_left_truncation_keeps_a_long_documents_end(reranker_checkpoint, reranker):
    """side="left" (TEI's truncation_direction) cuts a document's start: the prompt's prefix, the
    instruction and query, and the document's last tokens survive; a prompt that fits is not touched."""
    head = reranker.tokenizer.token_ids([format_pair(CARD_INSTRUCTION, QUERY, "")])[0]
    limit = len(reranker.prefix_ids) + len(head) + 20 + len(reranker.suffix_ids)
    small = Qwen3Reranker.from_pretrained(reranker_checkpoint, max_length=limit)
    document = long_text() + " the very end"
    with pytest.warns(UserWarning, match="truncated"):
        row, fits = small.prompts.ids([(QUERY, document), (QUERY, CORPUS[0])], CARD_INSTRUCTION, side="left")
    end = reranker.tokenizer.token_ids([document])[0][-20:]
    assert len(row) == limit and row[:len(small.prefix_ids)] == small.prefix_ids
    assert row[len(small.prefix_ids):][:len(head)] == head
    assert row[-len(small.suffix_ids) - 20:-len(small.suffix_ids)] == end
    assert fits == small.prompt_ids([(QUERY, CORPUS[0])], CARD_INSTRUCTION)[0]


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


def test_rerank_cli_skips_blank_lines_and_keeps_line_ids(reranker_checkpoint, reranker, tmp_path, capsys):
    (tmp_path / "docs.txt").write_text(f"{DOCS[0]}\n\n{DOCS[1]}\n   \n{DOCS[4]}\n")
    assert main(["rerank", "--model", str(reranker_checkpoint), "--query", QUERY,
                 "--input", str(tmp_path / "docs.txt")]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ids = ["docs.txt:1", "docs.txt:3", "docs.txt:5"]                  # NAME:LINE, as every command numbers them
    assert sorted(p["id"] for p in printed) == ids
    scores = dict(zip(ids, reranker.score(QUERY, [DOCS[0], DOCS[1], DOCS[4]])))
    assert all(abs(p["score"] - scores[p["id"]]) <= 1e-6 for p in printed)


def test_bf16_scores_follow_the_fp32_recipe(reranker_checkpoint):
    ref = official_rerank_scores(reranker_checkpoint, QUERY, DOCS)
    bf16 = Qwen3Reranker.from_pretrained(reranker_checkpoint, dtype="bfloat16")
    assert np.abs(bf16.score(QUERY, DOCS) - ref).max() <= 0.02


def test_scores_under_a_mesh_with_a_padded_vocabulary(reranker_checkpoint, reranker):
    import jax

    from qwen3_jax import make_mesh

    vocab = reranker.model.config.vocab_size
    model_axis = next(m for m in (4, 8, 2) if vocab % m)           # a vocabulary the axis does not divide
    mesh = make_mesh(data=8 // model_axis, model=model_axis, devices=jax.devices()[:8])
    sharded = Qwen3Reranker.from_pretrained(reranker_checkpoint, mesh=mesh)
    assert sharded.model.embed[...].shape[0] == -(-vocab // model_axis) * model_axis > vocab
    assert np.abs(sharded.score(QUERY, DOCS) - reranker.score(QUERY, DOCS)).max() <= 1e-5


def test_confident_scores_do_not_overflow():
    import warnings

    from qwen3_jax.engine.reranking import yes_probability

    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # numpy's overflow warning fails the test
        scores = yes_probability(np.array([1000.0, -1000.0, 0.0, 2.0], np.float32))
    np.testing.assert_allclose(scores, [1.0, 0.0, 0.5, 1 / (1 + np.exp(-2.0))], rtol=1e-6)
    assert scores.dtype == np.float32
