"""Evaluation: mteb runs our model and sentence-transformers on the same random checkpoint and a retrieval
task built here from local files, and gets the same metrics; `qwen3-jax eval` gets mteb's figures."""

import json

import numpy as np
import pytest

from qwen3_jax.evaluation import evaluate_beir, mteb_cross_encoder, mteb_encoder, read_beir
from qwen3_jax.textio import InputError

WORDS = "river mountain city garden market school harbor forest light paper music winter".split()


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    """A small retrieval set in the BEIR layout: 60 documents (some titled), 12 queries, graded qrels."""
    folder = tmp_path_factory.mktemp("beir")
    rng = np.random.default_rng(0)
    documents = {f"d{i}": " ".join(rng.choice(WORDS, int(n))) for i, n in enumerate(rng.integers(3, 25, 60))}
    titles = {d: rng.choice(WORDS) for d in list(documents)[::4]}
    (folder / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": d, "title": titles.get(d, ""), "text": t}) + "\n" for d, t in documents.items()))
    queries = {f"q{i}": " ".join(rng.choice(WORDS, 3)) for i in range(12)}
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items()))
    (folder / "qrels").mkdir()
    lines = ["query-id\tcorpus-id\tscore"]
    for q in queries:
        for d in rng.choice(list(documents), int(rng.integers(1, 4)), replace=False):
            lines.append(f"{q}\t{d}\t{int(rng.integers(1, 3))}")
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return folder


def _task(folder, top_ranked=None):
    """An mteb retrieval task whose data come from the BEIR folder (no download); with `top_ranked`
    ({query id: [document ids]}) a reranking task."""
    from datasets import Dataset
    from mteb.abstasks import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    corpus_lines = [json.loads(line) for line in open(folder / "corpus.jsonl")]
    query_lines = [json.loads(line) for line in open(folder / "queries.jsonl")]
    _, _, qrels = read_beir(folder)

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(name="LocalRetrieval", description="a retrieval set written by the test",
                                dataset={"path": "local/retrieval", "revision": "1"}, type="Retrieval",
                                category="t2t", eval_splits=["test"], eval_langs=["eng-Latn"],
                                main_score="ndcg_at_10", reference=None)

        def load_data(self, **kwargs):
            self.dataset = {"default": {"test": RetrievalSplitData(
                corpus=Dataset.from_list([{"id": r["_id"], "title": r["title"], "text": r["text"]}
                                          for r in corpus_lines]),
                queries=Dataset.from_list([{"id": r["_id"], "text": r["text"]} for r in query_lines]),
                relevant_docs=qrels, top_ranked=top_ranked)}}
            self.data_loaded = True

    return LocalRetrieval()


def _scores(result) -> dict[str, float]:
    (task_result,) = result.task_results
    return task_result.scores["test"][0]


METRICS = {"ndcg@10": "ndcg_at_10", "map@100": "map_at_100", "recall@10": "recall_at_10",
           "recall@100": "recall_at_100", "mrr@10": "mrr_at_10"}


def test_mteb_scores_our_model_as_sentence_transformers(embedder, sentence_transformer, checkpoint, beir, tmp_path):
    import mteb

    ours = _scores(mteb.evaluate(mteb_encoder(embedder), _task(beir), cache=None, show_progress_bar=False))
    reference = _scores(mteb.evaluate(sentence_transformer, _task(beir), cache=None, show_progress_bar=False))
    compared = [k for k, v in reference.items() if isinstance(v, float) and k.split("_at_")[0] in
                ("ndcg", "map", "recall", "mrr", "precision")]
    assert len(compared) >= 20
    assert max(abs(ours[k] - reference[k]) for k in compared) <= 1e-4
    assert 0 < reference["ndcg_at_10"] < 1

    # qwen3-jax eval (the corpus machinery, exact search, our trec_eval metrics) gives mteb's figures
    ours_local = evaluate_beir(embedder, beir, instruction=None, top_k=100)
    # mteb encoded queries with the checkpoint's "query" prompt: give eval the same prompt
    prompted = evaluate_beir(embedder, beir, instruction=_query_instruction(embedder), top_k=100)
    assert max(abs(prompted[name] - reference[key]) for name, key in METRICS.items()) <= 1e-4
    assert ours_local != prompted                          # the instruction matters
    from qwen3_jax.cli import main

    assert main(["eval", "--model", str(checkpoint), "--data", str(beir), "--instruction", _query_instruction(embedder),
                 "--output", str(tmp_path / "scores.json")]) == 0
    assert json.loads((tmp_path / "scores.json").read_text())["metrics"] == pytest.approx(prompted, abs=1e-6)


def _query_instruction(embedder) -> str:
    """The task text inside the checkpoint's query prompt "Instruct: {task}\\nQuery:"."""
    prompt = embedder.prompts["query"]
    assert prompt.startswith("Instruct: ") and prompt.endswith("\nQuery:")
    return prompt[len("Instruct: "):-len("\nQuery:")]


def test_task_instruction_mapping_changes_the_queries_only(embedder, beir):
    import mteb

    mapped = mteb_encoder(embedder, instructions={"LocalRetrieval": "Find the passage"})
    task = _task(beir)
    from mteb.types import PromptType

    assert mapped.prefix(task.metadata, PromptType.query) == "Instruct: Find the passage\nQuery:"
    assert mapped.prefix(task.metadata, PromptType.document) == embedder.prompts.get("document", "")
    scores = _scores(mteb.evaluate(mapped, task, cache=None, show_progress_bar=False))
    expected = evaluate_beir(embedder, beir, instruction="Find the passage", top_k=100)
    assert max(abs(expected[name] - scores[key]) for name, key in METRICS.items()) <= 1e-4


def test_reranking_follows_the_rerankers_scores(embedder, beir, monkeypatch):
    class Reverse:
        """A reranker that scores documents by their id number: the ranking must follow it."""

        def score(self, query, documents, batch_size=32):
            corpus, _, _ = read_beir(beir)
            by_text = {t: int(d[1:]) for d, t in corpus.items()}
            return np.asarray([by_text[d] for d in documents], np.float32)

    plain = evaluate_beir(embedder, beir, top_k=100)
    reranked = evaluate_beir(embedder, beir, top_k=100, reranker=Reverse(), rerank=100)
    assert plain != reranked
    corpus, queries, qrels = read_beir(beir)
    order = sorted(corpus, key=lambda d: -int(d[1:]))        # every query's ranking is the reranker's order
    from qwen3_jax.retrieval_metrics import evaluate

    assert reranked == pytest.approx(evaluate({q: order for q in qrels}, qrels, list(reranked)))


@pytest.mark.parametrize("reranker_checkpoint", ["untied"], indirect=True)
def test_mteb_reranking_with_our_reranker_scores_as_the_reranker_ranks(reranker_checkpoint, beir):
    import mteb

    from qwen3_jax.retrieval_metrics import evaluate
    from qwen3_jax.reranker import Qwen3Reranker

    reranker = Qwen3Reranker.from_pretrained(reranker_checkpoint)
    corpus, queries, qrels = read_beir(beir)
    candidates = {q: list(corpus)[int(q[1:]) * 3:int(q[1:]) * 3 + 10] + list(relevant) for q, relevant in qrels.items()}
    candidates = {q: list(dict.fromkeys(ids)) for q, ids in candidates.items()}
    model = mteb_cross_encoder(reranker, instructions={"LocalRetrieval": "Find where the words match"})
    scores = _scores(mteb.evaluate(model, _task(beir, candidates), cache=None, show_progress_bar=False))
    pairs = [(q, d) for q, ids in candidates.items() for d in ids]
    pair_scores = dict(zip(pairs, reranker.score_pairs([(queries[q], corpus[d]) for q, d in pairs],
                                                       instruction="Find where the words match")))
    rankings = {q: sorted(ids, key=lambda d: -pair_scores[q, d]) for q, ids in candidates.items()}
    expected = evaluate(rankings, qrels, list(METRICS))
    assert max(abs(expected[name] - scores[key]) for name, key in METRICS.items()) <= 1e-4
    assert 0 < scores["ndcg_at_10"] <= 1


@pytest.mark.parametrize("breakage, message", [
    (lambda f: (f / "qrels" / "test.tsv").open("a").write("q1\tnope\t1\n"), r"test.tsv:\d+: document 'nope'"),
    (lambda f: (f / "qrels" / "test.tsv").open("a").write("qx\td1\t1\n"), r"test.tsv:\d+: query 'qx'"),
    (lambda f: (f / "queries.jsonl").write_text(""), "holds no queries"),
    (lambda f: (f / "corpus.jsonl").write_text("\n"), "holds no documents"),
])
def test_bad_beir_folders(beir, tmp_path, breakage, message):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(beir, folder)
    breakage(folder)
    with pytest.raises(InputError, match=message):
        read_beir(folder)


def test_metrics_on_a_case_worked_by_hand():
    """Three relevant documents, ranked a, b, x, c: the ideal ranking of nDCG@k is cut at k too."""
    import math

    from qwen3_jax.retrieval_metrics import evaluate

    qrels = {"q": {"a": 1, "b": 1, "c": 1}, "unranked": {"a": 1}}
    rankings = {"q": ["a", "b", "x", "c"]}
    found = evaluate(rankings, qrels, ["ndcg@2", "ndcg@4", "recall@2", "map@4", "mrr@10"])
    by_hand = {"ndcg@2": 1.0,                                   # both slots hold relevant documents
               "ndcg@4": (1 + 1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3) + 1 / math.log2(4)),
               "recall@2": 2 / 3, "map@4": (1 / 1 + 2 / 2 + 3 / 4) / 3, "mrr@10": 1.0}
    for name, value in by_hand.items():              # a judged query without a ranking scores 0
        assert abs(found[name] - value / 2) <= 1e-12, name


def test_a_missing_qrels_file_says_which_and_why(beir, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(beir, folder)
    (folder / "qrels" / "test.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"qrels/test.tsv does not exist .*--split picks another split"):
        read_beir(folder)
