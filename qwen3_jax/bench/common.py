"""What every benchmark shares: synthetic texts of exact token counts, FLOPs and peaks, compile timers,
peak memory, and the checkpoint (a hub id, a folder, or a random one of a published shape) it runs on."""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from qwen3_jax.backend import Backend
from qwen3_jax.checks import UsageError
from qwen3_jax.config import Qwen3Config
from qwen3_jax.extras import require
from qwen3_jax.ops.projection import project
from qwen3_jax.tokenization import TextTokenizer

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


def dtype_keyword() -> str:
    """transformers 4.56 renamed from_pretrained's torch_dtype to dtype."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def projection_flops(cfg: Qwen3Config, tokens: float) -> dict[str, float]:
    """FLOPs of one layer's projections for `tokens` tokens, by the stage that holds them (model.LAYER_STAGES)."""
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    n, k = cfg.num_attention_heads, cfg.num_key_value_heads
    return {"attention/qkv": 2 * tokens * d * h * (n + 2 * k), "attention/out": 2 * tokens * n * h * d,
            "mlp/gate_up": 2 * tokens * d * 2 * f, "mlp/down": 2 * tokens * f * d}


def forward_flops(cfg: Qwen3Config, lengths) -> float:
    """Matrix FLOPs a forward pass needs for texts of these token lengths: the projections and MLP of
    every token, and causal attention (each query against itself and the keys before it)."""
    lengths = np.asarray(lengths, np.float64)
    causal_pairs = (lengths * (lengths + 1) / 2).sum()
    layers = cfg.num_hidden_layers
    return float(layers * sum(projection_flops(cfg, lengths.sum()).values())
                 + layers * 4 * cfg.num_attention_heads * cfg.head_dim * causal_pairs)


# Dense bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, by device-kind prefix, most specific first.
DATASHEET_BF16_TFLOPS = (("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100", 989.4), ("NVIDIA H200", 989.4))


def datasheet_tflops(device_kind: str, dtype: str) -> float | None:
    """The device's nominal bf16 peak, where we know it."""
    if dtype != "bfloat16":
        return None
    return next((peak for prefix, peak in DATASHEET_BF16_TFLOPS if device_kind.startswith(prefix)), None)


def matmul_gflops(dtype, products: int = 10) -> float:
    """GFLOP/s of back-to-back square matrix products in JAX on the default device: a sustained rate,
    as a forward pass sustains its own (2048 x 2048 on the CPU, 8192 x 8192 on accelerators), with the
    model's own accumulation (`project`)."""
    backend = Backend.resolve()
    size = 2048 if backend.platform == "cpu" else 8192
    square_product = jax.jit(functools.partial(project, "MK,KN->MN", backend=backend))   # as the model accumulates
    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (size, size), dtype)
    b = jax.random.normal(jax.random.fold_in(key, 1), (size, size), dtype)
    square_product(a, b).block_until_ready()
    start = time.perf_counter()
    for _ in range(products):
        c = square_product(a, b)
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
                     out=print, reranker: bool = False):
    """Yields the folder of a hub id / local checkpoint, or of a random checkpoint of a published shape
    written to a temporary folder (removed afterwards; a reranker's with `reranker`)."""
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
        folder = write_random_checkpoint(Path(tmp) / "checkpoint", random, layers=layers, tokenizer=tokenizer,
                                         reranker=reranker)
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
                                     model_kwargs={dtype_keyword(): getattr(torch, dtype),
                                                   "attn_implementation": "sdpa"})
            st.max_seq_length = ours.max_length       # both cut over-long texts alike
        yield ours, st, loaded


def print_figures(result: dict, out) -> None:
    """One figure a line, names right-aligned."""
    for key, value in result.items():
        out(f"{key:>26}: {value:.4g}" if isinstance(value, float) else f"{key:>26}: {value}")


def parse_token_range(spec: str) -> tuple[int, int]:
    """"512" -> (512, 512); "80-185" -> (80, 185)."""
    low, _, high = spec.partition("-")
    if not low.isdigit() or not (high.isdigit() or not high):
        raise UsageError(f"--tokens {spec!r}: expected N or MIN-MAX, e.g. 512 or 80-185")
    return int(low), int(high or low)


