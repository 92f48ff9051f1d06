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


def _timed(run, repeats: int) -> tuple[float, object]:
    """The median seconds of `repeats` calls of `run` (after one untimed call) and its last result."""
    result = run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _without_sharing(runner):
    """A context in which `runner` computes every text whole."""
    class Off:
        def __enter__(self):
            self.kept, runner.prefixes = runner.prefixes, None

        def __exit__(self, *exc):
            runner.prefixes = self.kept

    return Off()


def query_workload(*, random: str, layers: int | None, tokenizer: str | None, dtype: str, count: int,
                   repeats: int, attention: str, out=print) -> dict:
    """Queries with the card's instruction: ours (shared, and unshared) against sentence-transformers."""
    queries = word_texts(count, 3, 20, seed=0)
    with bench_models(model=None, random=random, layers=layers, tokenizer=tokenizer, dtype=dtype,
                      attention=attention, reference=True, out=out) as (ours, st, _):
        formatted = [f"Instruct: {TASK}\nQuery:{q}" for q in queries]
        real = sum(len(r) for r in ours.tokenizer.encode(formatted, ours.max_length))
        prefixes = ours.runner.prefixes
        before = ours.tokens_computed + prefixes.prefix_tokens_computed
        ours_s, ours_out = _timed(lambda: ours.encode(queries, instruction=TASK), repeats)
        computed = (ours.tokens_computed + prefixes.prefix_tokens_computed - before) / (repeats + 1)
        with _without_sharing(ours.runner):
            before = ours.tokens_computed
            whole_s, _ = _timed(lambda: ours.encode(queries, instruction=TASK), repeats)
            whole_computed = (ours.tokens_computed - before) / (repeats + 1)
        st_s, st_out = _timed(lambda: st.encode(formatted), repeats)
    return {"workload": "queries", "texts": count, "real_tokens": real, "computed_tokens": computed,
            "computed_unshared": whole_computed, "ours_tokens_per_s": real / ours_s,
            "unshared_tokens_per_s": real / whole_s, "reference_tokens_per_s": real / st_s,
            "ratio": st_s / ours_s, "ratio_unshared": st_s / whole_s,
            "max_abs_diff": float(np.abs(ours_out - st_out).max())}


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
        prefixes = ours.runner.prefixes
        before = ours.runner.tokens_computed + prefixes.prefix_tokens_computed

        def score():                             # each call a new query: its prefix computed in the call
            prefixes.forget()
            return ours.score(question, documents)

        ours_s, ours_out = _timed(score, repeats)
        computed = (ours.runner.tokens_computed + prefixes.prefix_tokens_computed - before) / (repeats + 1)
        with _without_sharing(ours.runner):
            before = ours.runner.tokens_computed
            whole_s, _ = _timed(lambda: ours.score(question, documents), repeats)
            whole_computed = (ours.runner.tokens_computed - before) / (repeats + 1)
        card_s, card_out = _timed(card_scores(folder, question, documents, dtype), repeats)
    return {"workload": "reranking", "texts": count, "real_tokens": real, "computed_tokens": computed,
            "computed_unshared": whole_computed, "ours_tokens_per_s": real / ours_s,
            "unshared_tokens_per_s": real / whole_s, "reference_tokens_per_s": real / card_s,
            "ratio": card_s / ours_s, "ratio_unshared": card_s / whole_s,
            "max_abs_diff": float(np.abs(ours_out - card_out).max())}


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
