"""Evaluation as the field measures embedders: a model for the `mteb` package, and local retrieval sets
in the BEIR layout scored with trec_eval's definitions (`qwen3-jax eval`).

`mteb` is an optional extra (pip install "qwen3-jax[mteb]"); only `MTEBEncoder` needs it.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from qwen3_jax.corpus import embed_corpus
from qwen3_jax.extras import require
from qwen3_jax.index import Index
from qwen3_jax.retrieval_metrics import evaluate
from qwen3_jax.textio import InputError, iter_json_lines, iter_lines_at

BEIR_METRICS = ("ndcg@10", "map@100", "recall@10", "recall@100", "mrr@10")


def mteb_encoder(embedder, *, model_name: str = "qwen3-jax", instructions: dict[str, str] | None = None,
                 dim: int | None = None, batch_size: int = 32):
    """A model that `mteb.evaluate(model, tasks)` accepts, backed by a Qwen3Embedder.

    Queries get Qwen3's instruction format with, in this order: `instructions[task name]`, the task
    metadata's own prompt (for queries), the checkpoint's "query" prompt; documents get the
    checkpoint's "document" prompt (Qwen3: none). Batching is ours (packed rows), not mteb's.
    """
    require("mteb", "mteb_encoder")
    from mteb.models import ModelMeta
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.types import PromptType

    class MTEBEncoder(AbsEncoder):
        def __init__(self):
            self.engine, self.instructions = embedder.engine, dict(instructions or {})
            self.dim, self.batch_size = self.engine.check_dim(dim), batch_size
            self.mteb_model_meta = ModelMeta.create_empty(overwrites={"name": model_name, "revision": "local",
                                                                      "embed_dim": self.dim})

        def prefix(self, task_metadata, prompt_type) -> str:
            """The string put before each text of this task and prompt type."""
            if prompt_type == PromptType.query:
                instruction = self.instructions.get(task_metadata.name)
                task_prompt = task_metadata.prompt
                if instruction is None and isinstance(task_prompt, dict):
                    instruction = task_prompt.get(PromptType.query.value)
                elif instruction is None and isinstance(task_prompt, str):
                    instruction = task_prompt
                if instruction:
                    return self.engine.prefix(instruction=instruction)
            name = prompt_type.value if prompt_type is not None else None
            return self.engine.prompts.get(name, "") if name else ""

        def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
                   **kwargs: Any) -> np.ndarray:
            texts = [text for batch in inputs for text in batch["text"]]
            rows = self.engine.rows(texts, prompt=self.prefix(task_metadata, prompt_type))
            return self.engine.vectors(self.engine.run(rows, batch_size=self.batch_size), self.dim)

    return MTEBEncoder()


def mteb_cross_encoder(reranker, *, model_name: str = "qwen3-jax-reranker", instructions: dict[str, str] | None = None,
                       batch_size: int = 32):
    """A cross-encoder for mteb's reranking tasks, backed by a Qwen3Reranker: each (query, document) pair
    scored with the official prompt; the instruction is `instructions[task name]`, else the task
    metadata's query prompt, else the reranker's default (the model card's web-search instruction)."""
    require("mteb", "mteb_cross_encoder")
    from mteb.models import ModelMeta
    from mteb.types import PromptType

    class MTEBCrossEncoder:
        def __init__(self):
            self.engine, self.instructions, self.batch_size = reranker.engine, dict(instructions or {}), batch_size
            self.mteb_model_meta = ModelMeta.create_empty(overwrites={"name": model_name, "revision": "local",
                                                                      "is_cross_encoder": True})

        def instruction(self, task_metadata) -> str | None:
            if task_metadata.name in self.instructions:
                return self.instructions[task_metadata.name]
            prompt = task_metadata.prompt
            return prompt.get(PromptType.query.value) if isinstance(prompt, dict) else prompt

        def predict(self, inputs1, inputs2, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
                    **kwargs: Any) -> np.ndarray:
            queries = [text for batch in inputs1 for text in batch["text"]]
            documents = [text for batch in inputs2 for text in batch["text"]]
            rows = self.engine.rows(list(zip(queries, documents)), instruction=self.instruction(task_metadata))
            return self.engine.scores(self.engine.run(rows, batch_size=self.batch_size))

    return MTEBCrossEncoder()


# --- local retrieval sets in the BEIR layout ---------------------------------------------------------

def _read_jsonl(path: Path, fields: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (a BEIR folder holds corpus.jsonl, queries.jsonl, "
                                "qrels/test.tsv)")
    records = []
    for number, _, record in iter_json_lines(path):
        if not isinstance(record, dict) or any(not isinstance(record.get(f), (str, int)) for f in fields):
            raise InputError(f"{path}:{number}: each line needs {' and '.join(map(repr, fields))}")
        records.append(record)
    return records


def read_beir(folder: str | Path, split: str = "test") -> tuple[dict[str, str], dict[str, str], dict]:
    """(corpus {id: text}, queries {id: text}, qrels {query id: {doc id: relevance}}) of a BEIR folder.
    A document's title, when it has one, goes before its text as mteb joins them ("title text")."""
    folder = Path(folder)
    corpus = {str(r["_id"]): (f"{r['title']} {r['text']}".strip() if r.get("title") else r["text"])
              for r in _read_jsonl(folder / "corpus.jsonl", ("_id", "text"))}
    queries = {str(r["_id"]): r["text"] for r in _read_jsonl(folder / "queries.jsonl", ("_id", "text"))}
    if not corpus:
        raise InputError(f"{folder / 'corpus.jsonl'} holds no documents")
    if not queries:
        raise InputError(f"{folder / 'queries.jsonl'} holds no queries")
    qrels_file = folder / "qrels" / f"{split}.tsv"
    if not qrels_file.is_file():
        raise FileNotFoundError(f"{qrels_file} does not exist (a BEIR folder holds qrels/SPLIT.tsv; --split picks "
                                "another split)")
    qrels: dict[str, dict[str, int]] = {}
    for number, _, line in iter_lines_at(qrels_file):
        cells = line.split("\t")
        if number == 1 and cells[0] in ("query-id", "query_id", "qid"):
            continue                                     # the header
        if not line.strip():
            continue
        if len(cells) != 3 or not cells[2].strip().lstrip("-").isdigit():
            raise InputError(f"{qrels_file}:{number}: expected query-id<TAB>corpus-id<TAB>score")
        query, document, score = cells[0], cells[1], int(cells[2])
        if query not in queries:
            raise InputError(f"{qrels_file}:{number}: query {query!r} is not in queries.jsonl")
        if document not in corpus:
            raise InputError(f"{qrels_file}:{number}: document {document!r} is not in corpus.jsonl")
        qrels.setdefault(query, {})[document] = score
    if not qrels:
        raise InputError(f"{qrels_file} judges no query")
    return corpus, queries, qrels


def evaluate_beir(embedder, folder: str | Path, *, instruction: str | None = None, dim: int | None = None,
                  top_k: int = 100, reranker=None, rerank: int = 0, batch_size: int = 32, split: str = "test",
                  metrics=BEIR_METRICS) -> dict[str, float]:
    """Embeds the corpus with the corpus machinery (shards in a temporary folder), searches it exactly
    for each judged query (formatted with `instruction`), optionally rescoring each query's first
    `rerank` hits with a Qwen3Reranker, and scores the rankings (trec_eval definitions)."""
    corpus, queries, qrels = read_beir(folder, split)
    with tempfile.TemporaryDirectory(prefix="qwen3-jax-eval-") as scratch:
        lines = Path(scratch) / "corpus.jsonl"
        lines.write_text("".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n"
                                 for i, t in corpus.items()), encoding="utf-8")
        embed_corpus(embedder, lines, Path(scratch) / "index", dim=dim, batch_size=batch_size, quiet=True,
                     out=lambda _: None)
        index = Index.open(Path(scratch) / "index")
        judged = [q for q in queries if q in qrels]
        vectors = embedder.encode([queries[q] for q in judged], instruction=instruction, dim=index.dim,
                                  batch_size=batch_size)
        scores, ids = index.search(vectors, top_k)
    rankings = {}
    for query, row_scores, row_ids in zip(judged, scores, ids):
        ranked = list(zip(row_ids, row_scores.tolist()))
        if reranker is not None and rerank:
            head = ranked[:rerank]
            new = reranker.score(queries[query], [corpus[d] for d, _ in head], batch_size=batch_size)
            ranked = sorted(zip([d for d, _ in head], new.tolist()), key=lambda x: -x[1]) + ranked[rerank:]
        rankings[query] = [d for d, _ in ranked]
    return evaluate(rankings, qrels, metrics)


def print_table(results: dict[str, float], out=sys.stdout) -> None:
    for name, value in results.items():
        print(f"{name:<12} {value:.5f}", file=out)
