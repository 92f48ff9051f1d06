"""`qwen3-jax bench encode`: our encode and sentence-transformers on the same texts, in the same run: one set of
texts, the length mixes (--suite mixes), and the 512-token accelerator suite (--suite gpu)."""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwen3_jax.bench.common import (bench_models, compile_seconds, datasheet_tflops, forward_flops, matmul_gflops,
                                    parse_token_range, peak_rss_gib, print_figures, synthetic_texts)

def compare(ours, st, corpus: list[str], *, batch_size: int, repeats: int, dtype: str, attention: str) -> dict:
    """Our encode and sentence-transformers' (when given) on `corpus`, alternating with a plain matrix
    product, so drift hits all three alike; the figures as a dict."""
    cfg = ours.config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # over-long texts of a user's file are cut alike on both sides
        lengths = [len(r) for r in ours.tokenizer.encode(corpus, ours.max_length)]
        programs_before, computed_before = ours.compiled_programs, ours.tokens_computed
        with compile_seconds() as compiling:
            ours_out = ours.encode(corpus, batch_size=batch_size)
        computed = ours.tokens_computed - computed_before
        if st is not None:
            st_out = st.encode(corpus, batch_size=batch_size)
        ours_times, st_times, matmul_rates = [], [], []
        for _ in range(repeats):
            start = time.perf_counter()
            ours_out = ours.encode(corpus, batch_size=batch_size)
            ours_times.append(time.perf_counter() - start)
            matmul_rates.append(matmul_gflops(jnp.dtype(dtype)))
            if st is not None:
                start = time.perf_counter()
                st_out = st.encode(corpus, batch_size=batch_size)
                st_times.append(time.perf_counter() - start)

    num_tokens = sum(lengths)
    ours_s = statistics.median(ours_times)
    peak = statistics.median(matmul_rates)
    result = {
        "device": f"{jax.default_backend()} x{jax.device_count()} ({jax.devices()[0].device_kind})",
        "shape": f"hidden={cfg.hidden_size} layers={cfg.num_hidden_layers} heads={cfg.num_attention_heads}/"
                 f"{cfg.num_key_value_heads}", "dtype": dtype, "attention": attention,
        "texts": len(corpus), "batch_size": batch_size, "min_tokens": min(lengths), "max_tokens": max(lengths),
        "real_tokens": num_tokens, "computed_tokens": computed, "computed_per_real": computed / num_tokens,
        "ours_tokens_per_s": num_tokens / ours_s, "ours_s": ours_s,
        "compile_s": compiling[0], "compiled_programs": ours.compiled_programs - programs_before,
        "gflops": forward_flops(cfg, lengths) / ours_s / 1e9, "matmul_gflops": peak,
    }
    result["fraction_of_matmul"] = result["gflops"] / peak      # model FLOPs utilisation vs a plain matmul
    nominal = datasheet_tflops(jax.devices()[0].device_kind, dtype)
    if nominal:
        result["mfu_vs_datasheet"] = result["gflops"] / 1e3 / nominal
    if st is not None:
        st_s = statistics.median(st_times)
        result.update(reference_tokens_per_s=num_tokens / st_s, reference_s=st_s, ratio=st_s / ours_s,
                      max_abs_diff=float(np.abs(ours_out - st_out).max()),
                      min_cosine=float((ours_out * st_out).sum(-1).min()))
    result["peak_rss_gib"] = peak_rss_gib()
    return result


def run_benchmark(*, model: str | None, random: str | None, layers: int | None, tokenizer: str | None,
                  dtype: str, texts: int | None, tokens: str, long_tail: bool, input: str | None,
                  batch_size: int, repeats: int, attention: str, reference: bool, out=print) -> dict:
    """Times our encode against sentence-transformers on the same texts (a user's file, or synthetic
    texts of a token range); returns and prints the figures."""
    low, high = parse_token_range(tokens)
    with bench_models(model=model, random=random, layers=layers, tokenizer=tokenizer, dtype=dtype,
                      attention=attention, reference=reference, out=out) as (ours, st, loaded):
        if input:
            from qwen3_jax.textio import read_texts

            corpus = read_texts(input)[1][:texts]
            if not corpus:
                raise ValueError(f"{input} holds no texts to benchmark")
        else:
            corpus = synthetic_texts(ours.tokenizer, texts or 32, low, high, long_tail=long_tail)
        result = {**loaded, **compare(ours, st, corpus, batch_size=batch_size, repeats=repeats, dtype=dtype,
                                      attention=attention)}
    print_figures(result, out)
    return result


# The accelerator comparison: bf16, 0.6B and 4B shapes, 512-token texts, batches of 32 and 128.
GPU_SUITE = {"0.6B": (32, 128), "4B": (32, 128)}
SUITE_TOKENS = 512


def run_suite(*, tokenizer: str | None, layers: int | None, repeats: int, attention: str = "auto",
              out=print) -> list[dict]:
    """Every GPU_SUITE configuration, ours against sentence-transformers (torch sdpa), one table at the end.
    Each size's checkpoint is written and loaded once for all its batch sizes."""
    rows = []
    for size, batches in GPU_SUITE.items():
        with bench_models(model=None, random=size, layers=layers, tokenizer=tokenizer, dtype="bfloat16",
                          attention=attention, reference=True, out=out) as (ours, st, loaded):
            for batch in batches:
                out(f"\n== {size}, bf16, {batch} texts of {SUITE_TOKENS} tokens ==")
                corpus = synthetic_texts(ours.tokenizer, batch, SUITE_TOKENS)
                result = compare(ours, st, corpus, batch_size=batch, repeats=repeats, dtype="bfloat16",
                                 attention=attention)
                print_figures(result, out)
                rows.append({"size": size, "batch": batch, **loaded, **result})
    out(f"\n{'model':>6} {'batch':>5} {'ours tok/s':>11} {'torch tok/s':>11} {'ratio':>6} {'of matmul':>9} "
        f"{'MFU':>5} {'min cos':>8}")
    for r in rows:
        out(f"{r['size']:>6} {r['batch']:>5} {r['ours_tokens_per_s']:11.0f} {r['reference_tokens_per_s']:11.0f} "
            f"{r['ratio']:6.2f} {r['fraction_of_matmul']:9.2f} {r.get('mfu_vs_datasheet', float('nan')):5.2f} "
            f"{r['min_cosine']:8.4f}")
    return rows


# Length mixes a speed figure must hold on: (tokens, long tail) as --tokens and --long-tail take them.
LENGTH_MIXES = (("5-30", False), ("80-185", False), ("512", False), ("10-4000", True))


def run_mixes(*, tokenizer: str | None, layers: int | None, dtype: str, texts: int | None, batch_size: int,
              repeats: int, attention: str = "auto", model: str | None = None, longest: int | None = None,
              mixes: Sequence[tuple[str, bool]] | None = None, out=print) -> list[dict]:
    """Ours against sentence-transformers on each of `mixes` (None: LENGTH_MIXES) of synthetic texts, at the 0.6B
    shape and `dtype`, one checkpoint for all (`model`, a folder of that shape, or random weights written
    here); `longest` cuts every mix's lengths at that many tokens (a rehearsal's small run). One table at
    the end."""
    rows = []
    with bench_models(model=model, random=None if model else "0.6B", layers=layers, tokenizer=tokenizer, dtype=dtype,
                      attention=attention, reference=True, out=out) as (ours, st, loaded):
        for tokens, long_tail in mixes or LENGTH_MIXES:
            low, high = parse_token_range(tokens)
            if longest and high > longest:
                low, high, tokens = min(low, longest), longest, f"{tokens} cut at {longest}"
            mix = tokens + (" long tail" if long_tail else "")
            out(f"\n== {dtype}, {texts or 32} texts of {mix} tokens ==")
            corpus = synthetic_texts(ours.tokenizer, texts or 32, low, high, long_tail=long_tail)
            result = compare(ours, st, corpus, batch_size=batch_size, repeats=repeats, dtype=dtype, attention=attention)
            print_figures(result, out)
            rows.append({"mix": mix, **loaded, **result})
    out(f"\n{'tokens':>17} {'ours tok/s':>11} {'torch tok/s':>11} {'ratio':>6} {'computed':>8} {'programs':>8} "
        f"{'max diff':>9} {'min cos':>8}")
    for r in rows:
        out(f"{r['mix']:>17} {r['ours_tokens_per_s']:11.0f} {r['reference_tokens_per_s']:11.0f} {r['ratio']:6.2f} "
            f"{r['computed_per_real']:8.3f} {r['compiled_programs']:8d} {r['max_abs_diff']:9.2e} {r['min_cosine']:8.4f}")
    return rows


