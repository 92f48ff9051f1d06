"""`qwen3-jax bench --suite device`: everything a lent accelerator is for, in one run sized for 9 minutes."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qwen3_jax.bench.common import bench_checkpoint
from qwen3_jax.bench.encode import GPU_SUITE, SUITE_TOKENS, run_benchmark, run_mixes, run_suite
from qwen3_jax.bench.serve_load import run_serve_benchmark
from qwen3_jax.bench.train import run_train_benchmark

def check_packed_kernel(out=print) -> dict:
    """The packed Pallas kernel compiled for this device (not interpreted) against dense attention,
    float32 and bf16, values and gradients, on rows of many short texts and of one long text."""
    from qwen3_jax.doctor import difference_from_dense

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    segments = np.zeros((2, 1024), np.int32)
    segments[0, :1000] = np.repeat(np.arange(1, 41), 25)            # 40 texts of 25 tokens
    segments[1, :] = 1                                               # one text of 1,024
    result = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        q = jax.random.normal(keys[0], (2, 1024, 16, 128), dtype)
        k, v = (jax.random.normal(key, (2, 1024, 8, 128), dtype) for key in keys[1:])
        name = jnp.dtype(dtype).name
        result[name] = difference_from_dense("pallas", q, k, v, jnp.asarray(segments))
        out(f"packed kernel on {jax.devices()[0].device_kind}, {name}: values {result[name]['max_abs_value_diff']:.2e}, "
            f"gradients {result[name]['max_abs_gradient_diff']:.2e} from dense attention")
    return result


# Each part of the device suite and its share of the 9 minutes one H200 run is sized for (compiles included).
DEVICE_BUDGET_S = {"kernel": 20, "mixes_bf16_auto": 90, "mixes_bf16_cudnn": 90, "mixes_float32": 60, "suite": 90,
                   "train_0.6B": 90, "train_4B": 60, "serve": 40}


def run_device_suite(*, tokenizer: str | None, layers: int | None, repeats: int, texts: int | None = None,
                     json_path: str | None = None, out=print) -> dict:
    """The checks a lent accelerator is for, in one run: the packed kernel against dense attention on the
    device; the length mixes in bf16 with the packed kernel and with cuDNN's one text a row; float32's
    first compile; the 512-token suite; training steps of the 0.6B (and 4B LoRA) shape against torch; the
    server against encode. Each part's figures (or its error) and seconds are written to `json_path`
    as soon as the part ends, so a run cut short keeps what it measured; a failing part does not stop
    the others. `texts` sizes every part (a rehearsal on a CPU: a few): the mixes' texts, the suite's batch,
    a training step's queries (a quarter of it, 2 to 8) and the server's requests a level (and its one
    level); None: the device run's sizes."""

    rehearsal = texts is not None
    texts = texts or 512
    figures: dict = {"device": jax.devices()[0].device_kind, "budget_s": DEVICE_BUDGET_S, "seconds": {}}

    def serve() -> list[dict]:
        with bench_checkpoint(model=None, random="0.6B", layers=layers, tokenizer=tokenizer, out=out) as folder, \
                tempfile.TemporaryDirectory(prefix="qwen3-jax-serve-") as scratch:
            return run_serve_benchmark(Path(folder), infinity=None, dtype="bfloat16",
                                       levels=[min(16, texts)] if rehearsal else [16, 64],
                                       max_requests=texts if rehearsal else 200, max_seconds=60,
                                       max_batch_tokens=None, scratch=Path(scratch), out=out)

    def suite() -> list[dict] | dict:
        if not rehearsal:
            return run_suite(tokenizer=tokenizer, layers=layers, repeats=repeats, out=out)
        return {size: run_benchmark(model=None, random=size, layers=layers, tokenizer=tokenizer, dtype="bfloat16",
                                    texts=texts, tokens=str(SUITE_TOKENS), long_tail=False, input=None,
                                    batch_size=texts, repeats=repeats, attention="auto", reference=True, out=out)
                for size in GPU_SUITE}

    mixes = lambda dtype, count, batch, runs, attention="auto": lambda: run_mixes(
        tokenizer=tokenizer, layers=layers, dtype=dtype, texts=count, batch_size=batch, repeats=runs,
        attention=attention, out=out)
    queries = max(2, min(8, texts // 4)) if rehearsal else 8
    train = lambda shape, configs: lambda: run_train_benchmark(model=None, random=shape, layers=layers,
                                                               tokenizer=tokenizer, queries=queries, repeats=repeats,
                                                               dtype="bfloat16", configs=configs, out=out)
    parts = [("kernel", "the packed kernel against dense attention", lambda: check_packed_kernel(out)),
             ("mixes_bf16_auto", f"mixes, bf16, {texts} texts, batch 64, attention auto",
              mixes("bfloat16", texts, 64, repeats)),
             ("mixes_bf16_cudnn", f"mixes, bf16, {texts} texts, batch 64, attention cudnn",
              mixes("bfloat16", texts, 64, repeats, "cudnn")),
             ("mixes_float32", "mixes, float32, 32 texts (its first compile)", mixes("float32", min(texts, 32), 32, 1)),
             ("suite", "512-token suite, bf16", suite),
             ("train_0.6B", "training, 0.6B, bf16", train("0.6B", ["full", "full, remat", "LoRA r=16"])),
             ("train_4B", "training, 4B LoRA, bf16", train("4B", ["LoRA r=16, remat"])),
             ("serve", "qwen3-jax serve, 0.6B, bf16, against encode", serve)]
    for name, title, part in parts:
        if name == "mixes_bf16_cudnn" and jax.default_backend() != "gpu":
            continue
        out(f"\n== {title} (budget {DEVICE_BUDGET_S[name]} s) ==")
        started = time.perf_counter()
        try:
            figures[name] = part()
        except Exception as error:  # noqa: BLE001 - the run goes on; the figures say what failed
            figures[name] = {"error": f"{type(error).__name__}: {error}"}
            out(f"{name} failed: {type(error).__name__}: {error}")
        figures["seconds"][name] = round(time.perf_counter() - started, 1)
        out(f"== {name}: {figures['seconds'][name]:.0f} s of its {DEVICE_BUDGET_S[name]} s budget ==")
        if json_path:
            from qwen3_jax.textio import atomic_output

            with atomic_output(json_path) as handle:
                json.dump(figures, handle, indent=2, default=str)
    return figures
