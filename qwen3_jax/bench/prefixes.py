"""`qwen3-jax bench prefixes`: the two workloads whose texts share a prefix, ours against their reference in
the same run.

- queries: N queries of 3-20 words, each with the model card's instruction, embedded by us (the shared
  instruction computed once) and by sentence-transformers;
- reranking: one query against N documents of 20-120 words in the official Qwen3-Reranker prompt, scored
  by us (the system prompt, instruction and query computed once) and by the model card's transformers
  code, asking only for the last position's logits (`logits_to_keep=1`).

Each prints real and computed tokens (prefixes included: the reranker's each call, as for a new query;
the instruction once, then kept), our figures with sharing switched off (what sharing saves), and the
agreement with the reference.
"""

from __future__ import annotations

import statistics
import time
import warnings

import numpy as np

from qwen3_jax.bench.common import bench_checkpoint, bench_models, dtype_keyword, print_figures

TASK = "Given a web search query, retrieve relevant passages that answer the query"
WORDS = ("alpha beta gamma delta river city capital mountain science history music planet ocean energy "
         "language market garden winter summer bridge engine forest island museum theory").split()


def word_texts(count: int, low: int, high: int, seed: int) -> list[str]:
    """`count` texts of `low`-`high` words drawn from a small vocabulary."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(low, high + 1)))) for _ in range(count)]


def _rounds(runs: dict, repeats: int) -> tuple[dict, dict]:
    """Each of `runs` ({name: function of no arguments}) called once untimed, then `repeats` rounds in
    which each is called once, the order alternating, so that the machine's drift falls on all alike.
    Returns ({name: median seconds}, {name: last result})."""
    results = {name: run() for name, run in runs.items()}
    times = {name: [] for name in runs}
    for round_ in range(repeats):
        for name in (list(runs) if round_ % 2 == 0 else list(runs)[::-1]):
            start = time.perf_counter()
            results[name] = runs[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results


def _counted(runner, run, *, shared: bool):
    """`run` (with `runner` computing every text whole unless `shared`) and a [tokens, calls] total of what
    `runner` computes in it, the prefixes it computes included."""
    total = [0, 0]

    def counted():
        kept = runner.prefixes
        if not shared:
            runner.prefixes = None
        before = runner.tokens_computed + (kept.prefix_tokens_computed if kept else 0)
        try:
            return run()
        finally:
            runner.prefixes = kept
            total[0] += runner.tokens_computed + (kept.prefix_tokens_computed if kept else 0) - before
            total[1] += 1

    return counted, total


def _figures(workload: str, count: int, real: int, computed: list, whole_computed: list, seconds: dict,
             results: dict) -> dict:
    """A workload's row: tokens, rates, ratios against the reference, agreement with it."""
    return {"workload": workload, "texts": count, "real_tokens": real,
            "computed_tokens": computed[0] / computed[1], "computed_unshared": whole_computed[0] / whole_computed[1],
            "ours_tokens_per_s": real / seconds["ours"], "unshared_tokens_per_s": real / seconds["unshared"],
            "reference_tokens_per_s": real / seconds["reference"], "ratio": seconds["reference"] / seconds["ours"],
            "ratio_unshared": seconds["reference"] / seconds["unshared"],
            "max_abs_diff": float(np.abs(results["ours"] - results["reference"]).max())}


def query_workload(*, random: str, layers: int | None, tokenizer: str | None, dtype: str, count: int,
                   repeats: int, attention: str, out=print) -> dict:
    """Queries with the card's instruction: ours (shared, and unshared) against sentence-transformers."""
    queries = word_texts(count, 3, 20, seed=0)
    with bench_models(model=None, random=random, layers=layers, tokenizer=tokenizer, dtype=dtype,
                      attention=attention, reference=True, out=out) as (ours, st, _):
        formatted = [f"Instruct: {TASK}\nQuery:{q}" for q in queries]
        real = sum(len(r) for r in ours.tokenizer.encode(formatted, ours.max_length))
        encode = lambda: ours.encode(queries, instruction=TASK)
        shared, computed = _counted(ours.runner, encode, shared=True)
        whole, whole_computed = _counted(ours.runner, encode, shared=False)
        seconds, results = _rounds({"ours": shared, "unshared": whole, "reference": lambda: st.encode(formatted)},
                                   repeats)
    return _figures("queries", count, real, computed, whole_computed, seconds, results)


def card_scores(folder, query: str, documents: list[str], dtype: str):
    """The Qwen3-Reranker model card's scoring (its prompt, left padding, one batch), its model kept, as a
    function of no arguments returning P("yes") per document."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwen3_jax.engine.reranking import DEFAULT_INSTRUCTION, PREFIX, SUFFIX, format_pair

    tokenizer = AutoTokenizer.from_pretrained(str(folder), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(folder), **{dtype_keyword(): getattr(torch, dtype)}).eval()
    prefix, suffix = (tokenizer.encode(part, add_special_tokens=False) for part in (PREFIX, SUFFIX))
    no, yes = tokenizer.convert_tokens_to_ids(["no", "yes"])

    def run():
        bodies = tokenizer([format_pair(DEFAULT_INSTRUCTION, query, d) for d in documents], padding=False,
                           truncation="longest_first", return_attention_mask=False,
                           max_length=8192 - len(prefix) - len(suffix))
        inputs = {"input_ids": [prefix + ids + suffix for ids in bodies["input_ids"]]}
        inputs = tokenizer.pad(inputs, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs, logits_to_keep=1).logits[:, -1, :]
        pair = torch.stack([logits[:, no], logits[:, yes]], dim=1).float()
        return torch.nn.functional.log_softmax(pair, dim=1)[:, 1].exp().numpy()

    return run


def rerank_workload(*, random: str, layers: int | None, tokenizer: str | None, dtype: str, count: int,
                    repeats: int, attention: str, out=print) -> dict:
    """One query against `count` documents: ours (shared, and unshared) against the model card's code."""
    from qwen3_jax.reranker import Qwen3Reranker

    question = "what is the tallest mountain on the island"
    documents = word_texts(count, 20, 120, seed=1)
    with bench_checkpoint(model=None, random=random, layers=layers, tokenizer=tokenizer, out=out,
                          reranker=True) as folder:
        ours = Qwen3Reranker.from_pretrained(folder, dtype=dtype, attention=attention)
        real = sum(len(r) for r in ours.prompt_ids([(question, d) for d in documents]))

        def score():                             # each call a new query: its prefix computed in the call
            ours.runner.prefixes.forget()
            return ours.score(question, documents)

        shared, computed = _counted(ours.runner, score, shared=True)
        whole, whole_computed = _counted(ours.runner, lambda: ours.score(question, documents), shared=False)
        seconds, results = _rounds({"ours": shared, "unshared": whole,
                                    "reference": card_scores(folder, question, documents, dtype)}, repeats)
    return _figures("reranking", count, real, computed, whole_computed, seconds, results)


def run_prefix_workloads(*, random: str = "0.6B", layers: int | None = 8, tokenizer: str | None = None,
                         dtype: str = "float32", texts: int = 64, repeats: int = 3, attention: str = "auto",
                         out=print) -> list[dict]:
    """Both workloads (see the module's text) at one shape and dtype; one table at the end."""
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for workload in (query_workload, rerank_workload):
            out(f"\n== {workload.__name__.split('_')[0]}, {random} shape, {layers or 'all'} layers, {dtype} ==")
            result = workload(random=random, layers=layers, tokenizer=tokenizer, dtype=dtype, count=texts,
                              repeats=repeats, attention=attention, out=out)
            print_figures(result, out)
            rows.append(result)
    out(f"\n{'workload':>10} {'real':>7} {'computed':>8} {'unshared':>8} {'ours tok/s':>10} {'ref tok/s':>10} "
        f"{'ratio':>6} {'unshared':>8} {'max diff':>9}")
    for r in rows:
        out(f"{r['workload']:>10} {r['real_tokens']:7d} {r['computed_tokens']:8.0f} {r['computed_unshared']:8.0f} "
            f"{r['ours_tokens_per_s']:10.0f} {r['reference_tokens_per_s']:10.0f} {r['ratio']:6.2f} "
            f"{r['ratio_unshared']:8.2f} {r['max_abs_diff']:9.2e}")
    return rows
