"""Retrieval metrics as trec_eval (and so MTEB, through pytrec_eval) defines them.

`ranking` is a query's documents best first; `relevance` maps document ids to graded relevance (a
grade <= 0 is not relevant). Gains are linear in the grade and discounts log2(rank + 1), as in
trec_eval's ndcg_cut; a ranking's ties are broken by the order given.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from qwen3_jax.checks import UsageError


def ndcg_at(ranking: Sequence, relevance: Mapping, k: int) -> float:
    gains = [max(relevance.get(doc, 0), 0) for doc in ranking[:k]]
    ideal = sorted((g for g in relevance.values() if g > 0), reverse=True)[:k]
    if not ideal:
        return 0.0
    dcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(gains))
    return dcg / sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal))


def recall_at(ranking: Sequence, relevance: Mapping, k: int) -> float:
    relevant = {doc for doc, grade in relevance.items() if grade > 0}
    return len(relevant.intersection(ranking[:k])) / len(relevant) if relevant else 0.0


def average_precision_at(ranking: Sequence, relevance: Mapping, k: int) -> float:
    """trec_eval's map_cut_k: precision at each relevant document in the top k, over all relevant."""
    relevant = {doc for doc, grade in relevance.items() if grade > 0}
    if not relevant:
        return 0.0
    hits, total = 0, 0.0
    for rank, doc in enumerate(ranking[:k], 1):
        if doc in relevant:
            hits += 1
            total += hits / rank
    return total / len(relevant)


def reciprocal_rank_at(ranking: Sequence, relevance: Mapping, k: int) -> float:
    for rank, doc in enumerate(ranking[:k], 1):
        if relevance.get(doc, 0) > 0:
            return 1.0 / rank
    return 0.0


METRICS = {"ndcg": ndcg_at, "recall": recall_at, "map": average_precision_at, "mrr": reciprocal_rank_at}


def evaluate(rankings: Mapping, qrels: Mapping, metrics: Sequence[str]) -> dict[str, float]:
    """Mean of each "name@k" (e.g. "ndcg@10", "map@100") over every judged query of `qrels`; a judged
    query that `rankings` lacks counts, with a score of 0."""
    results = {}
    for metric in metrics:
        name, _, k = metric.partition("@")
        if name not in METRICS or not k.isdigit():
            raise UsageError(f"metric {metric!r}: expected one of {', '.join(METRICS)} with @k, e.g. ndcg@10")
        scores = [METRICS[name](rankings.get(query, []), relevance, int(k)) for query, relevance in qrels.items()]
        results[metric] = sum(scores) / len(scores) if scores else 0.0
    return results
