"""Checkpoints for the tests, written to disk at test time by transformers in the published layout."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

# Set before JAX starts, and inherited by the tests' subprocesses:
# - eight simulated CPU devices for the mesh tests (single-device code uses the first);
# - LLVM's optimisations off: XLA's optimised programs are the same (a training step's HLO after
#   optimisation is identical with and without the flag), only their machine code is not tuned, and
#   it compiles in 40% less time. Compiling is most of the suite's time: 456 of 820 s in process,
#   282 of 622 s with the flag. Users and `qwen3-jax bench` keep XLA's default.
TEST_XLA_FLAGS = {"xla_force_host_platform_device_count": "8", "xla_backend_optimization_level": "0"}
_GIVEN = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_GIVEN] + [f"--{flag}={value}" for flag, value in TEST_XLA_FLAGS.items()
                                                if flag not in _GIVEN]).strip()

from qwen3_jax.config import Qwen3Config
from qwen3_jax.init_random import TINY, small_tokenizer, with_appended_end_of_text, write_random_checkpoint

CORPUS = [
    "The capital of China is Beijing.", "Gravity is a force that attracts two bodies towards each other.",
    "What is the capital of China?", "Explain gravity", "机器学习是人工智能的一个分支。", "東京は日本の首都です。",
    "Emoji test 🚀🔥 works", "def add(a, b):\n    return a + b", "JAX compiles numerical programs with XLA.",
]


def base_tokenizer():
    """The real Qwen3 tokenizer when QWEN3_TOKENIZER_DIR points at it, else the small one `init-random` builds."""
    from tokenizers import Tokenizer

    folder = os.environ.get("QWEN3_TOKENIZER_DIR")
    if folder and (Path(folder) / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    return small_tokenizer()


def transformers5_config(folder: Path) -> None:
    """Rewrites config.json in the dialect transformers 5 writes (`rope_parameters`, `dtype`)."""
    raw = json.loads((folder / "config.json").read_text())
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": raw.pop("rope_theta")}
    raw["dtype"] = raw.pop("torch_dtype")
    raw.pop("rope_scaling", None)
    (folder / "config.json").write_text(json.dumps(raw, indent=2))


def build_checkpoint(folder: Path, *, tokenizer, vocab_size: int, dtype: str = "float32", seed: int = 0,
                     hub_config: bool = True, causal_lm: bool = False, tie: bool = False,
                     max_shard_size: str | None = None) -> Path:
    """A random checkpoint of the tests' tiny shape, written by `qwen3-jax init-random`'s writer in the
    published layout (keys without "model." unless causal_lm); every weight random, norms included."""
    cfg = Qwen3Config(**TINY, vocab_size=vocab_size, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=4096,
                      tie_word_embeddings=tie)
    write_random_checkpoint(folder, cfg, reranker=causal_lm, tokenizer=tokenizer, dtype=dtype, seed=seed, std=0.05,
                            max_seq_length=1024, max_shard_bytes=max_shard_size or "5GB", overwrite=True)
    if not hub_config:
        transformers5_config(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory):
    """JAX's persistent compilation cache for the session: the many models of the same tiny shapes that
    the tests build compile each program once. Subprocesses get the folder through --compile-cache."""
    from qwen3_jax.compile_cache import ENVIRONMENT, enable_compilation_cache

    folder = str(tmp_path_factory.mktemp("compiled"))
    os.environ[ENVIRONMENT] = folder          # subprocesses too: nothing is written to the user's cache
    enable_compilation_cache(folder)
    return folder


@pytest.fixture
def one_device_env():
    """The environment of a subprocess that joins a multi-process run with one CPU device."""
    flags = re.sub(r"(xla_force_host_platform_device_count)=\d+", r"\1=1", os.environ["XLA_FLAGS"])
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")


@pytest.fixture
def free_port() -> int:
    """A loopback port for jax.distributed's coordinator."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tokenizers_pair():
    """(base tokenizer, variant that appends <|endoftext|>), real Qwen3 ones when available."""
    base = base_tokenizer()
    return base, with_appended_end_of_text(base)


@pytest.fixture(scope="session")
def vocab_size(tokenizers_pair):
    return tokenizers_pair[0].get_vocab_size(with_added_tokens=True)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizers_pair, vocab_size):
    """fp32 embedding checkpoint, hub-style config, tokenizer that appends <|endoftext|>."""
    return build_checkpoint(tmp_path_factory.mktemp("fp32"), tokenizer=tokenizers_pair[1], vocab_size=vocab_size)


@pytest.fixture(scope="session")
def checkpoint_base_tokenizer(tmp_path_factory, checkpoint, tokenizers_pair):
    """The same weights with the older tokenizer that does not append <|endoftext|>."""
    folder = tmp_path_factory.mktemp("fp32-base-tok")
    shutil.copytree(checkpoint, folder, dirs_exist_ok=True)
    (folder / "tokenizer.json").write_text(tokenizers_pair[0].to_str())
    return folder


@pytest.fixture(scope="session")
def checkpoint_bf16(tmp_path_factory, tokenizers_pair, vocab_size):
    """bf16 weights, sharded with an index, config in the transformers-5 dialect."""
    return build_checkpoint(tmp_path_factory.mktemp("bf16"), tokenizer=tokenizers_pair[1], vocab_size=vocab_size,
                            dtype="bfloat16", hub_config=False, max_shard_size="40KB")


@pytest.fixture(scope="session", params=["untied", "tied"])
def reranker_checkpoint(request, tmp_path_factory, tokenizers_pair, vocab_size):
    """A causal-LM checkpoint ("model." keys) with a separate or a tied LM head, base tokenizer."""
    return build_checkpoint(tmp_path_factory.mktemp(f"reranker-{request.param}"), tokenizer=tokenizers_pair[0],
                            vocab_size=vocab_size, causal_lm=True, tie=request.param == "tied", seed=1)


@pytest.fixture(scope="session")
def reranker_folder(tmp_path_factory, tokenizers_pair, vocab_size):
    """One reranker checkpoint (untied head, base tokenizer) for the servers' tests."""
    return build_checkpoint(tmp_path_factory.mktemp("serve-reranker"), tokenizer=tokenizers_pair[0],
                            vocab_size=vocab_size, causal_lm=True, seed=3)


@pytest.fixture(scope="session")
def sentence_transformer(checkpoint):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(checkpoint), device="cpu")


@pytest.fixture(scope="session")
def embedder(checkpoint):
    from qwen3_jax import Qwen3Embedder

    return Qwen3Embedder.from_pretrained(checkpoint)


def long_text(words: int = 450, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    vocab = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega graph tensor mesh".split()
    return " ".join(rng.choice(vocab, words))
