"""`qwen3-jax bench train`: our training step beside sentence-transformers' (torch, peft) on the same batch.

Each configuration compiles our step once (the working memory and FLOPs are that program's), times its
first step (compiling included) and `repeats` more; torch runs on the same device (CUDA on a GPU). Both
sides use the same texts (queries, positives and hard negatives of exactly `tokens` tokens), float32
weights and AdamW with clipping, computing in float32 or bf16 (ours bf16 compute, torch's autocast).
Reported: step times and their ratio, first steps, XLA's working memory, the step's model TFLOP/s (the
useful work, recomputation not counted) and, on known GPUs, its fraction of the datasheet bf16 peak.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from typing import Sequence

import jax
import numpy as np

from qwen3_jax.bench.common import dtype_keyword, bench_checkpoint, datasheet_tflops, forward_flops, synthetic_texts
from qwen3_jax.checks import UsageError
from qwen3_jax.extras import require
from qwen3_jax.loader import load_model
from qwen3_jax.tokenization import TextTokenizer
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


def _ours(folder, examples, pad_id: int, rank: int | None, remat: str, mini_batch: int | None, repeats: int,
          dtype: str) -> dict:
    """Our step, compiled once (XLA's working memory and FLOPs from that same program), then timed."""
    model = load_model(folder, dtype=dtype, param_dtype="float32")
    if rank:
        add_lora(model, LoRAConfig(rank=rank, alpha=2 * rank))
    texts = len(examples) * (2 + len(examples[0].negatives))      # a query, its positive, its negatives
    mini_batches = texts // mini_batch if mini_batch else 1
    step = TrainStep(model, objective=Objective(temperature=TEMPERATURE), optimizer=OptimizerConfig(learning_rate=1e-5),
                     remat=remat, mini_batches=mini_batches)
    batch = contrastive_batch(examples, negatives=len(examples[0].negatives), pad_id=pad_id, mini_batches=mini_batches)
    state = step.init()
    start = time.perf_counter()
    compiled = step.compile(state, batch)
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    first_step_s = time.perf_counter() - start
    times = []
    with resident_growth() as growth:
        for _ in range(repeats):
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    # Model FLOPs, as MFU counts them: the forward pass, and the backward pass at twice it for full
    # fine-tuning (activations' and weights' gradients) or once it for LoRA (activations' only);
    # recomputation (remat, GradCache) is not useful work and is not counted.
    lengths = [len(t) for e in examples for t in (e.query, e.positive, *e.negatives)]
    model_flops = (3 if rank is None else 2) * forward_flops(model.config, lengths)
    result = {"step_s": step_s, "first_step_s": first_step_s, "activations_gib": compiled.working_memory_bytes / 2**30,
              "resident_growth_gib": growth[0], "loss": float(metrics["loss"]),
              "model_tflops": model_flops / step_s / 1e12}
    peak = datasheet_tflops(jax.devices()[0].device_kind, dtype)
    if peak:
        result["mfu_vs_datasheet"] = result["model_tflops"] / peak
    return result


def _torch(folder, columns: list[list[str]], rank: int | None, remat: str, mini_batch: int | None,
           repeats: int, dtype: str) -> dict:
    """The same step with sentence-transformers on the device JAX uses (CUDA on a GPU):
    MultipleNegativesRankingLoss (CachedMNRL for GradCache), a peft LoRA adapter on its transformers model,
    transformers' gradient checkpointing; float32 weights, bf16 compute through autocast when asked."""
    require("reference", "the training benchmark's sentence-transformers side (or pass --no-reference)")
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses

    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    model = SentenceTransformer(str(folder), device=device,
                                model_kwargs={"attn_implementation": "sdpa", dtype_keyword(): torch.float32})
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
    features = [{k: v.to(device) if hasattr(v, "to") else v for k, v in f.items()} for f in features]
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def one_step() -> float:
        optimizer.zero_grad()
        with autocast:
            loss = loss_fn(features, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    start = time.perf_counter()
    one_step()
    first_step_s = time.perf_counter() - start
    times = []
    with resident_growth() as growth:
        for _ in range(repeats):
            start = time.perf_counter()
            loss = one_step()
            times.append(time.perf_counter() - start)
    return {"reference_step_s": statistics.median(times), "reference_first_step_s": first_step_s,
            "reference_resident_growth_gib": growth[0], "reference_loss": loss}


def run_train_benchmark(*, model: str | None, random: str | None, layers: int | None, tokenizer: str | None,
                        queries: int = 8, negatives: int = 3, tokens: int = 256, repeats: int = 3,
                        reference: bool = True, dtype: str = "float32", configs: Sequence[str] | None = None,
                        out=print) -> list[dict]:
    """The CONFIGS rows (all, or those named in `configs`), ours and torch's, in `dtype` compute,
    printed as a table; returns the rows."""
    chosen = [c for c in CONFIGS if configs is None or c[0] in configs]
    if configs is not None and len(chosen) != len(configs):
        raise UsageError(f"unknown training configs; choose among: {'; '.join(c[0] for c in CONFIGS)}")
    rows = []
    with bench_checkpoint(model=model, random=random, layers=layers, tokenizer=tokenizer, out=out) as folder:
        tokenizer_ = TextTokenizer.from_folder(folder)
        texts = synthetic_texts(tokenizer_, queries * (2 + negatives), tokens)
        columns = [texts[c * queries:(c + 1) * queries] for c in range(2 + negatives)]   # queries, positives, ...
        encoded = [tokenizer_.encode(column, tokens) for column in columns]
        examples = [ContrastiveExample(encoded[0][i], encoded[1][i], [encoded[2 + k][i] for k in range(negatives)])
                    for i in range(queries)]
        step_tokens = sum(len(t) for column in encoded for t in column)
        for name, rank, remat, mini_batch in chosen:
            row = {"config": name, "dtype": dtype, "texts": len(texts), "tokens": step_tokens,
                   **_ours(folder, examples, tokenizer_.end_of_text_id, rank, remat, mini_batch, repeats, dtype)}
            row["tokens_per_s"] = step_tokens / row["step_s"]
            if reference:
                row.update(_torch(folder, columns, rank, remat, mini_batch, repeats, dtype))
                row["ratio"] = row["reference_step_s"] / row["step_s"]
            rows.append(row)
            out(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    out(f"\n{'config':<24} {'step s':>7} {'tok/s':>7} {'torch s':>8} {'ratio':>6} {'first s':>7} {'torch 1st':>9} "
        f"{'activ GiB':>9} {'TFLOP/s':>8} {'MFU':>5}")
    for r in rows:
        out(f"{r['config']:<24} {r['step_s']:7.3f} {r['tokens_per_s']:7.0f} {r.get('reference_step_s', np.nan):8.3f} "
            f"{r.get('ratio', np.nan):6.2f} {r['first_step_s']:7.1f} {r.get('reference_first_step_s', np.nan):9.1f} "
            f"{r['activations_gib']:9.3f} {r['model_tflops']:8.3f} {r.get('mfu_vs_datasheet', np.nan):5.2f}")
    return rows
