"""`qwen3-jax bench device`: everything a lent accelerator is for, in one run sized for 9 minutes."""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qwen3_jax.bench.common import bench_checkpoint
from qwen3_jax.bench.encode import GPU_SUITE, LENGTH_MIXES, SUITE_TOKENS, run_benchmark, run_mixes, run_suite
from qwen3_jax.bench.serve_load import run_serve_benchmark
from qwen3_jax.bench.train import run_train_benchmark



def check_packed_kernel(out=print, tokens: int = 1024) -> dict:
    """The packed Pallas kernel compiled for this device (not interpreted) against dense attention,
    float32 and bf16, values and gradients, on two rows of `tokens`: one of many 25-token texts, one of
    a single text."""
    from qwen3_jax.doctor import difference_from_dense

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    segments = np.zeros((2, tokens), np.int32)
    short = tokens // 25
    segments[0, :short * 25] = np.repeat(np.arange(1, short + 1), 25)   # 40 texts of 25 tokens in 1,024
    segments[1, :] = 1                                                   # one text of them all
    result = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        q = jax.random.normal(keys[0], (2, tokens, 16, 128), dtype)
        k, v = (jax.random.normal(key, (2, tokens, 8, 128), dtype) for key in keys[1:])
        name = jnp.dtype(dtype).name
        result[name] = difference_from_dense("pallas", q, k, v, jnp.asarray(segments))
        out(f"packed kernel on {jax.devices()[0].device_kind}, {name}: values {result[name]['max_abs_value_diff']:.2e}, "
            f"gradients {result[name]['max_abs_gradient_diff']:.2e} from dense attention")
    return result


# Each part of the device suite and its share of the 9 minutes one H200 run is sized for (compiles included).
DEVICE_BUDGET_S = {"kernel": 20, "mixes_bf16_auto": 90, "mixes_bf16_cudnn": 90, "mixes_float32": 60, "suite": 90,
                   "train_0.6B": 90, "train_4B": 60, "serve": 40}
# A rehearsal (--texts given) cuts every text at this many tokens and runs the shortest mix and the long
# tail (packing's one row and its several buckets): every code path runs, small.
REHEARSAL_TOKENS = 128
REHEARSAL_MIXES = (LENGTH_MIXES[0], LENGTH_MIXES[-1])
REHEARSAL_SHAPE = "0.6B"                 # the one shape of a rehearsal: the 4B parts' code paths run on it
REHEARSAL_BATCH_TOKENS = 1024            # the rehearsal server's batch budget (its longest text is 516 tokens)


def run_device_suite(*, tokenizer: str | None, layers: int | None, repeats: int, texts: int | None = None,
                     json_path: str | None = None, out=print) -> dict:
    """The checks a lent accelerator is for, in one run: the packed kernel against dense attention on the
    device; the length mixes in bf16 with the packed kernel and with cuDNN's one text a row; float32's
    first compile; the 512-token suite; training steps of the 0.6B (and 4B LoRA) shape against torch; the
    server against encode. Each part's figures (or its error) and seconds are written to `json_path`
    as soon as the part ends, so a run cut short keeps what it measured; a failing part does not stop
    the others. Each shape's random checkpoint is written once, by the first part that needs it, for all.
    `texts` makes the run a rehearsal (on a CPU: a few) and sizes every part: the mixes' texts, the suite's
    batch, a training step's queries (a quarter of it, 2 to 8) and the server's requests a level (and its
    one level); a rehearsal also runs every part at the 0.6B shape (the 4B parts' configurations
    included), REHEARSAL_MIXES only, cuts every text at REHEARSAL_TOKENS, the kernel's rows at twice that,
    and the server's batches at REHEARSAL_BATCH_TOKENS. None: the device run's sizes."""

    rehearsal = texts is not None
    texts = texts or 512
    longest = REHEARSAL_TOKENS if rehearsal else None
    figures: dict = {"device": jax.devices()[0].device_kind, "budget_s": DEVICE_BUDGET_S, "seconds": {}}
    with contextlib.ExitStack() as written:
        folders: dict[str, str] = {}

        def checkpoint(shape: str) -> str:
            """The random checkpoint of `shape`, written once (by the first part that needs it) for all."""
            if shape not in folders:
                folders[shape] = str(written.enter_context(bench_checkpoint(model=None, random=shape, layers=layers,
                                                                            tokenizer=tokenizer, out=out)))
            return folders[shape]

        def serve() -> list[dict]:
            with tempfile.TemporaryDirectory(prefix="qwen3-jax-serve-") as scratch:
                return run_serve_benchmark(Path(checkpoint("0.6B")), infinity=None, dtype="bfloat16",
                                           levels=[min(16, texts)] if rehearsal else [16, 64],
                                           max_requests=texts if rehearsal else 200, max_seconds=60,
                                           max_batch_tokens=REHEARSAL_BATCH_TOKENS if rehearsal else None,
                                           scratch=Path(scratch), out=out)

        def suite() -> list[dict] | dict:
            if not rehearsal:
                return run_suite(tokenizer=tokenizer, layers=layers, repeats=repeats, out=out)
            return {size: run_benchmark(model=checkpoint(size), random=None, layers=layers, tokenizer=tokenizer,
                                        dtype="bfloat16", texts=texts, tokens=str(min(SUITE_TOKENS, longest)),
                                        long_tail=False, input=None, batch_size=texts, repeats=repeats,
                                        attention="auto", reference=True, out=out)
                    for size in GPU_SUITE if size == REHEARSAL_SHAPE}

        mixes = lambda dtype, count, batch, runs, attention="auto": lambda: run_mixes(
            tokenizer=tokenizer, layers=layers, dtype=dtype, texts=count, batch_size=batch, repeats=runs,
            attention=attention, model=checkpoint("0.6B"), longest=longest,
            mixes=REHEARSAL_MIXES if rehearsal else None, out=out)
        queries = max(2, min(8, texts // 4)) if rehearsal else 8
        sized = {"tokens": longest} if rehearsal else {}
        train = lambda shape, configs: lambda: run_train_benchmark(
            model=checkpoint(shape), random=None, layers=layers, tokenizer=tokenizer, queries=queries,
            repeats=repeats, dtype="bfloat16", configs=configs, out=out, **sized)
        kernel_tokens = 2 * longest if rehearsal else 1024
        large = REHEARSAL_SHAPE if rehearsal else "4B"           # a rehearsal writes and loads no 4B checkpoint
        parts = [("kernel", "the packed kernel against dense attention",
                  lambda: check_packed_kernel(out, tokens=kernel_tokens)),
                 ("mixes_bf16_auto", f"mixes, bf16, {texts} texts, batch 64, attention auto",
                  mixes("bfloat16", texts, 64, repeats)),
                 ("mixes_bf16_cudnn", f"mixes, bf16, {texts} texts, batch 64, attention cudnn",
                  mixes("bfloat16", texts, 64, repeats, "cudnn")),
                 ("mixes_float32", "mixes, float32, 32 texts (its first compile)",
                  mixes("float32", min(texts, 32), 32, 1)),
                 ("suite", "512-token suite, bf16", suite),
                 ("train_0.6B", "training, 0.6B, bf16", train("0.6B", ["full", "full, remat", "LoRA r=16"])),
                 ("train_4B", f"training, {large} LoRA, bf16", train(large, ["LoRA r=16, remat"])),
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
