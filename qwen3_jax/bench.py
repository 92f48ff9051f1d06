"""`qwen3-jax bench`: our encode and sentence-transformers on the same texts, in the same run."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qwen3_jax.checks import UsageError
from qwen3_jax.config import Qwen3Config
from qwen3_jax.extras import require
from qwen3_jax.kernels.projection import project
from qwen3_jax.tokenize import TextTokenizer

WORDS = ("the of and to in is was for on that with as by at from his her an which or were are be this "
         "model vector search query document language retrieval embedding attention layer token memory "
         "compute device mesh shard river mountain history science music city garden winter paper light "
         "system network energy market policy health water school travel story design answer question").split()
CJK_WORDS = ("模型", "向量", "检索", "语言", "注意力", "数据", "文本", "東京", "日本語", "研究", "機械学習", "検索")


def synthetic_texts(tokenizer: TextTokenizer, count: int, min_tokens: int, max_tokens: int | None = None, *,
                    long_tail: bool = False, seed: int = 0) -> list[str]:
    """Deterministic English-like texts with some numbers and CJK words, each of min..max tokens
    (counting the appended <|endoftext|>): lengths uniform, or log-uniform with `long_tail`."""
    rng = np.random.default_rng(seed)
    low, high = min_tokens, max_tokens or min_tokens
    if not 2 <= low <= high:
        raise UsageError(f"token range {low}-{high}: need 2 <= MIN <= MAX")
    targets = np.exp(rng.uniform(np.log(low), np.log(high + 1), count)) if long_tail else \
        rng.integers(low, high + 1, count)
    units = WORDS + [str(n) for n in (7, 42, 365, 2024, 31415)] + list(CJK_WORDS)
    weights = np.array([1.0] * len(WORDS) + [0.6] * 5 + [0.5] * len(CJK_WORDS))
    costs = dict(zip(units, map(len, tokenizer.token_ids([" " + u for u in units]))))
    single = [w for w in WORDS if costs[w] == 1]
    texts = []
    for target in np.minimum(targets.astype(int), high):
        words, size = [], 1                              # 1: the appended <|endoftext|>
        while size < target:
            word = str(rng.choice(units, p=weights / weights.sum()))
            word = word if size + costs[word] <= target else str(rng.choice(single))
            words.append(word)
            size += costs[word]
        texts.append(_exactly(" ".join(words), int(target), tokenizer, single))
    return texts


def _exactly(text: str, target: int, tokenizer: TextTokenizer, filler: list[str]) -> str:
    """`text` grown or cut by whole words until it has `target` tokens with <|endoftext|>."""
    for _ in range(64):
        size = len(tokenizer.token_ids([text])[0]) + 1
        if size == target:
            return text
        text = text + " " + filler[0] if size < target else text.rsplit(" ", 1)[0]
    return text


def _dtype_keyword() -> str:
    """transformers 4.56 renamed from_pretrained's torch_dtype to dtype."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def forward_flops(cfg: Qwen3Config, lengths) -> float:
    """Matrix FLOPs a forward pass needs for texts of these token lengths: the projections and MLP of
    every token, and causal attention (each query against itself and the keys before it)."""
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    n, k, layers = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
    per_token = 2 * layers * (d * h * (2 * n + 2 * k) + 3 * d * f)
    lengths = np.asarray(lengths, np.float64)
    causal_pairs = (lengths * (lengths + 1) / 2).sum()
    return float(per_token * lengths.sum() + layers * 4 * n * h * causal_pairs)


# Dense bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, by device-kind prefix, most specific first.
DATASHEET_BF16_TFLOPS = (("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100", 989.4), ("NVIDIA H200", 989.4))


def datasheet_tflops(device_kind: str, dtype: str) -> float | None:
    """The device's nominal bf16 peak, where we know it."""
    if dtype != "bfloat16":
        return None
    return next((peak for prefix, peak in DATASHEET_BF16_TFLOPS if device_kind.startswith(prefix)), None)


_square_product = jax.jit(functools.partial(project, "MK,KN->MN"))      # accumulating as the model does


def matmul_gflops(dtype, products: int = 10) -> float:
    """GFLOP/s of back-to-back square matrix products in JAX on the default device: a sustained rate,
    as a forward pass sustains its own (2048 x 2048 on the CPU, 8192 x 8192 on accelerators), with the
    model's own accumulation (`project`)."""
    size = 2048 if jax.default_backend() == "cpu" else 8192
    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (size, size), dtype)
    b = jax.random.normal(jax.random.fold_in(key, 1), (size, size), dtype)
    _square_product(a, b).block_until_ready()
    start = time.perf_counter()
    for _ in range(products):
        c = _square_product(a, b)
    c.block_until_ready()
    return 2 * size**3 * products / (time.perf_counter() - start) / 1e9


@contextlib.contextmanager
def compile_seconds():
    """Adds up JAX's own tracing, lowering and compilation durations inside the block: yields a list
    whose one element holds the running total."""
    total = [0.0]

    def record(name: str, duration: float, **_) -> None:
        if name.startswith("/jax/core/compile/"):
            total[0] += duration

    jax.monitoring.register_event_duration_secs_listener(record)
    try:
        yield total
    finally:
        jax.monitoring.unregister_event_duration_listener(record)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@contextlib.contextmanager
def bench_checkpoint(*, model: str | None, random: str | None, layers: int | None, tokenizer: str | None,
                     out=print):
    """Yields the folder of a hub id / local checkpoint, or of a random checkpoint of a published shape
    written to a temporary folder (removed afterwards)."""
    # torch shares the accelerator in this process: JAX must not grab most of its memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if not random:
        from qwen3_jax.hub import resolve_model

        yield resolve_model(model)
        return
    from qwen3_jax.init_random import write_random_checkpoint

    if not tokenizer:
        out("no --tokenizer (or QWEN3_TOKENIZER_DIR): the small built-in tokenizer is used, so texts of the same "
            "token counts hold fewer words than with Qwen3's")
    with tempfile.TemporaryDirectory(prefix="qwen3-jax-bench-") as tmp:
        start = time.perf_counter()
        folder = write_random_checkpoint(Path(tmp) / "checkpoint", random, layers=layers, tokenizer=tokenizer)
        out(f"random {random} checkpoint ({layers or 'all'} layers) written in {time.perf_counter() - start:.1f} s")
        yield folder


@contextlib.contextmanager
def bench_models(*, model: str | None, random: str | None, layers: int | None, tokenizer: str | None, dtype: str,
                 attention: str, reference: bool, out=print):
    """Yields (ours, sentence-transformers or None, figures of our load) for a checkpoint (bench_checkpoint)."""
    from qwen3_jax.embedder import Qwen3Embedder

    with bench_checkpoint(model=model, random=random, layers=layers, tokenizer=tokenizer, out=out) as folder:
        start = time.perf_counter()
        ours = Qwen3Embedder.from_pretrained(folder, dtype=dtype, attention=attention)
        loaded = {"load_s": time.perf_counter() - start, "peak_rss_gib_after_load": peak_rss_gib()}
        st = None
        if reference:
            require("reference", "the benchmark's sentence-transformers side (or pass --no-reference)")
            import torch
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(str(folder), device="cpu" if jax.default_backend() == "cpu" else "cuda",
                                     model_kwargs={_dtype_keyword(): getattr(torch, dtype),
                                                   "attn_implementation": "sdpa"})
            st.max_seq_length = ours.max_length       # both cut over-long texts alike
        yield ours, st, loaded


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


def _print(result: dict, out) -> None:
    for key, value in result.items():
        out(f"{key:>26}: {value:.4g}" if isinstance(value, float) else f"{key:>26}: {value}")


def parse_token_range(spec: str) -> tuple[int, int]:
    """"512" -> (512, 512); "80-185" -> (80, 185)."""
    low, _, high = spec.partition("-")
    if not low.isdigit() or not (high.isdigit() or not high):
        raise UsageError(f"--tokens {spec!r}: expected N or MIN-MAX, e.g. 512 or 80-185")
    return int(low), int(high or low)


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
    _print(result, out)
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
                _print(result, out)
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
              repeats: int, attention: str = "auto", out=print) -> list[dict]:
    """Ours against sentence-transformers on each LENGTH_MIXES mix of synthetic texts, at the 0.6B shape
    and `dtype`, one checkpoint for all; one table at the end."""
    rows = []
    with bench_models(model=None, random="0.6B", layers=layers, tokenizer=tokenizer, dtype=dtype,
                      attention=attention, reference=True, out=out) as (ours, st, loaded):
        for tokens, long_tail in LENGTH_MIXES:
            mix = tokens + (" long tail" if long_tail else "")
            out(f"\n== {dtype}, {texts or 32} texts of {mix} tokens ==")
            corpus = synthetic_texts(ours.tokenizer, texts or 32, *parse_token_range(tokens), long_tail=long_tail)
            result = compare(ours, st, corpus, batch_size=batch_size, repeats=repeats, dtype=dtype, attention=attention)
            _print(result, out)
            rows.append({"mix": mix, **loaded, **result})
    out(f"\n{'tokens':>17} {'ours tok/s':>11} {'torch tok/s':>11} {'ratio':>6} {'computed':>8} {'programs':>8} "
        f"{'max diff':>9} {'min cos':>8}")
    for r in rows:
        out(f"{r['mix']:>17} {r['ours_tokens_per_s']:11.0f} {r['reference_tokens_per_s']:11.0f} {r['ratio']:6.2f} "
            f"{r['computed_per_real']:8.3f} {r['compiled_programs']:8d} {r['max_abs_diff']:9.2e} {r['min_cosine']:8.4f}")
    return rows


def run_corpus_benchmark(*, model: str | None, random: str | None, layers: int | None, tokenizer: str | None,
                         dtype: str, documents: int, tokens: str, batch_size: int, search_vectors: int,
                         out=print) -> dict:
    """embed-corpus on `documents` synthetic texts (log-uniform lengths over `tokens`): documents/s,
    tokens/s, peak RSS, and the time a rerun takes to find the job complete; then exact search of
    1,000 queries over `search_vectors` random float16 vectors of the model's width."""
    from qwen3_jax.corpus import embed_corpus
    from qwen3_jax.embedder import Qwen3Embedder

    low, high = parse_token_range(tokens)
    result: dict = {"documents": documents, "tokens_range": tokens, "dtype": dtype}
    with bench_checkpoint(model=model, random=random, layers=layers, tokenizer=tokenizer, out=out) as folder, \
            tempfile.TemporaryDirectory(prefix="qwen3-jax-corpus-") as tmp:
        embedder = Qwen3Embedder.from_pretrained(folder, dtype=dtype)
        texts = synthetic_texts(embedder.tokenizer, documents, low, high, long_tail=True)
        (Path(tmp) / "corpus.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
        start = time.perf_counter()
        embed_corpus(embedder, Path(tmp) / "corpus.txt", Path(tmp) / "index", batch_size=batch_size,
                     shard_size=max(1, documents // 10), out=lambda _: None)
        seconds = time.perf_counter() - start
        real = embedder.tokens_embedded
        start = time.perf_counter()
        embed_corpus(embedder, Path(tmp) / "corpus.txt", Path(tmp) / "index", batch_size=batch_size,
                     shard_size=max(1, documents // 10), out=lambda _: None)
        result.update(seconds=seconds, documents_per_s=documents / seconds, tokens_per_s=real / seconds,
                      real_tokens=real, computed_per_real=embedder.tokens_computed / real,
                      compiled_programs=embedder.compiled_programs, rerun_complete_s=time.perf_counter() - start,
                      peak_rss_gib=peak_rss_gib())
        width = embedder.dimension
    if search_vectors:
        result.update(_search_benchmark(search_vectors, width, out))
    out(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return result


def _search_benchmark(count: int, width: int, out) -> dict:
    """1,000 queries over `count` random unit vectors stored as float16 shards of 100,000."""
    from qwen3_jax.corpus import CorpusSettings, manifest_name, new_manifest, write_shard
    from qwen3_jax.embedder import normalize_rows
    from qwen3_jax.index import Index

    rng = np.random.default_rng(0)
    size = 100_000
    with tempfile.TemporaryDirectory(prefix="qwen3-jax-search-") as tmp:
        folder = Path(tmp)
        manifest = new_manifest(CorpusSettings(model="random", input="random", dim=width, prefix="",
                                               output_dtype="float16", shard_size=size), process=0)
        for k, start in enumerate(range(0, count, size)):
            rows = min(size, count - start)
            vectors = normalize_rows(rng.standard_normal((rows, width), np.float32)).astype(np.float16)
            manifest["shards"].append(write_shard(folder, k, vectors, list(range(start, start + rows)),
                                                  start=start, records=rows))
        manifest.update(complete=True, records=count)
        (folder / manifest_name(0, 1)).write_text(json.dumps(manifest))
        queries = normalize_rows(rng.standard_normal((1000, width), np.float32))
        start = time.perf_counter()
        index = Index.open(folder)
        index.search(queries, 10)
        seconds = time.perf_counter() - start
        out(f"search: 1,000 queries, top 10, over {count:,} float16 vectors of width {width}: {seconds:.1f} s")
        return {"search_vectors": count, "search_s": seconds, "search_peak_rss_gib": peak_rss_gib()}


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
    the others."""
    from qwen3_jax.serve.load import run_serve_benchmark
    from qwen3_jax.train.bench import run_train_benchmark

    texts = texts or 512
    figures: dict = {"device": jax.devices()[0].device_kind, "budget_s": DEVICE_BUDGET_S, "seconds": {}}

    def serve() -> list[dict]:
        with bench_checkpoint(model=None, random="0.6B", layers=layers, tokenizer=tokenizer, out=out) as folder, \
                tempfile.TemporaryDirectory(prefix="qwen3-jax-serve-") as scratch:
            return run_serve_benchmark(Path(folder), infinity=None, dtype="bfloat16", levels=[16, 64], max_requests=200,
                                       max_seconds=60, max_batch_tokens=None, scratch=Path(scratch), out=out)

    mixes = lambda dtype, count, batch, runs, attention="auto": lambda: run_mixes(
        tokenizer=tokenizer, layers=layers, dtype=dtype, texts=count, batch_size=batch, repeats=runs,
        attention=attention, out=out)
    train = lambda shape, configs: lambda: run_train_benchmark(model=None, random=shape, layers=layers,
                                                               tokenizer=tokenizer, repeats=repeats, dtype="bfloat16",
                                                               configs=configs, out=out)
    parts = [("kernel", "the packed kernel against dense attention", lambda: check_packed_kernel(out)),
             ("mixes_bf16_auto", f"mixes, bf16, {texts} texts, batch 64, attention auto",
              mixes("bfloat16", texts, 64, repeats)),
             ("mixes_bf16_cudnn", f"mixes, bf16, {texts} texts, batch 64, attention cudnn",
              mixes("bfloat16", texts, 64, repeats, "cudnn")),
             ("mixes_float32", "mixes, float32, 32 texts (its first compile)", mixes("float32", min(texts, 32), 32, 1)),
             ("suite", "512-token suite, bf16", lambda: run_suite(tokenizer=tokenizer, layers=layers, repeats=repeats,
                                                                  out=out)),
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
