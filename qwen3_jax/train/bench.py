"""`qwen3-jax bench --train`: our training step beside sentence-transformers' (torch, peft) on the same batch.

Each configuration runs one step to compile, then `repeats` timed steps; both sides use the same texts
(queries, positives and hard negatives of exactly `tokens` tokens), fp32, AdamW with clipping. Ours
reports the activation memory XLA allocates for the step (with and without remat); both report the
growth of the process's resident memory while stepping.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time

import jax
import numpy as np

from qwen3_jax.bench import _dtype_keyword, bench_checkpoint, synthetic_texts
from qwen3_jax.extras import require
from qwen3_jax.loader import load_model
from qwen3_jax.tokenize import TextTokenizer
from qwen3_jax.train.batch import ContrastiveExample, contrastive_batch
from qwen3_jax.train.lora import PROJECTIONS, LoRAConfig, add_lora
from qwen3_jax.train.step import Objective, OptimizerConfig, TrainStep

# (name, LoRA rank or None for full fine-tuning, remat, texts per GradCache mini-batch or None)
CONFIGS = (("full", None, "off", None), ("full, remat", None, "full", None), ("LoRA r=16", 16, "off", None),
           ("LoRA r=16, remat", 16, "full", None), ("LoRA r=16, GradCache 8", 16, "off", 8))
TEMPERATURE = 0.05


@contextlib.contextmanager
def resident_growth():
    """Samples the process's resident memory every 50 ms inside the block (more often slows the step
    it measures); yields a list whose one element becomes the peak growth over the start, in GiB."""
    def resident() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * 4096

    start, peak, done = resident(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], resident() - start)
            time.sleep(0.05)

    result = [0.0]
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result[0] = peak[0] / 2**30


def _ours(folder, examples, pad_id: int, rank: int | None, remat: str, mini_batch: int | None,
          repeats: int) -> dict:
    model = load_model(folder)
    if rank:
        add_lora(model, LoRAConfig(rank=rank, alpha=2 * rank))
    texts = len(examples) * (2 + len(examples[0].negatives))      # a query, its positive, its negatives
    mini_batches = texts // mini_batch if mini_batch else 1
    step = TrainStep(model, objective=Objective(temperature=TEMPERATURE), optimizer=OptimizerConfig(learning_rate=1e-5),
                     remat=remat, mini_batches=mini_batches)
    batch = contrastive_batch(examples, negatives=len(examples[0].negatives), pad_id=pad_id, mini_batches=mini_batches)
    state = step.init()
    compiled = step._step.lower(state, step.frozen, step.place(batch)).compile()
    activations = compiled.memory_analysis().temp_size_in_bytes / 2**30
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    with resident_growth() as growth:
        for _ in range(repeats):
            start = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "first_step_s": compile_s, "activations_gib": activations,
            "resident_growth_gib": growth[0], "loss": float(metrics["loss"])}


def _torch(folder, columns: list[list[str]], rank: int | None, remat: str, mini_batch: int | None,
           repeats: int) -> dict:
    """The same step with sentence-transformers: MultipleNegativesRankingLoss (CachedMNRL for GradCache),
    a peft LoRA adapter on its transformers model, transformers' gradient checkpointing; float32."""
    require("reference", "the training benchmark's sentence-transformers side (or pass --no-reference)")
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses

    model = SentenceTransformer(str(folder), device="cpu",
                                model_kwargs={"attn_implementation": "sdpa", _dtype_keyword(): torch.float32})
    if rank:
        from peft import LoraConfig, get_peft_model

        model[0].auto_model = get_peft_model(model[0].auto_model, LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(PROJECTIONS)))
    if remat != "off":
        model.gradient_checkpointing_enable()
    model.train()
    loss_fn = losses.CachedMultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE, mini_batch_size=mini_batch) \
        if mini_batch else losses.MultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    features = [model.preprocess(column) if hasattr(model, "preprocess") else model.tokenize(column)
                for column in columns]

    def one_step() -> float:
        optimizer.zero_grad()
        loss = loss_fn(features, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss.item()

    one_step()
    times = []
    with resident_growth() as growth:
        for _ in range(repeats):
            start = time.perf_counter()
            loss = one_step()
            times.append(time.perf_counter() - start)
    return {"reference_step_s": statistics.median(times), "reference_resident_growth_gib": growth[0],
            "reference_loss": loss}


def run_train_benchmark(*, model: str | None, random: str | None, layers: int | None, tokenizer: str | None,
                        queries: int = 8, negatives: int = 3, tokens: int = 256, repeats: int = 3,
                        reference: bool = True, out=print) -> list[dict]:
    """Every CONFIGS row, ours and torch's, printed as a table; returns the rows."""
    rows = []
    with bench_checkpoint(model=model, random=random, layers=layers, tokenizer=tokenizer, out=out) as folder:
        tokenizer_ = TextTokenizer.from_folder(folder)
        texts = synthetic_texts(tokenizer_, queries * (2 + negatives), tokens)
        columns = [texts[c * queries:(c + 1) * queries] for c in range(2 + negatives)]   # queries, positives, ...
        encoded = [tokenizer_.encode(column, tokens) for column in columns]
        examples = [ContrastiveExample(encoded[0][i], encoded[1][i], [encoded[2 + k][i] for k in range(negatives)])
                    for i in range(queries)]
        step_tokens = sum(len(t) for column in encoded for t in column)
        for name, rank, remat, mini_batch in CONFIGS:
            row = {"config": name, "texts": len(texts), "tokens": step_tokens,
                   **_ours(folder, examples, tokenizer_.end_of_text_id, rank, remat, mini_batch, repeats)}
            row["tokens_per_s"] = step_tokens / row["step_s"]
            if reference:
                row.update(_torch(folder, columns, rank, remat, mini_batch, repeats))
                row["ratio"] = row["reference_step_s"] / row["step_s"]
            rows.append(row)
            out(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    out(f"\n{'config':<24} {'step s':>7} {'tok/s':>7} {'torch s':>8} {'ratio':>6} {'activ GiB':>9} "
        f"{'RSS+ GiB':>8} {'torch RSS+':>10}")
    for r in rows:
        out(f"{r['config']:<24} {r['step_s']:7.2f} {r['tokens_per_s']:7.0f} {r.get('reference_step_s', np.nan):8.2f} "
            f"{r.get('ratio', np.nan):6.2f} {r['activations_gib']:9.2f} {r['resident_growth_gib']:8.2f} "
            f"{r.get('reference_resident_growth_gib', np.nan):10.2f}")
    return rows
