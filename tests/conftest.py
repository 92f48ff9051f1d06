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

from qwen3_jax.tokenize import END_OF_TEXT, QUERY_PROMPT, with_appended_end_of_text, write_sentence_transformers_files
CORPUS = [
    "The capital of China is Beijing.", "Gravity is a force that attracts two bodies towards each other.",
    "What is the capital of China?", "Explain gravity", "机器学习是人工智能的一个分支。", "東京は日本の首都です。",
    "Emoji test 🚀🔥 works", "def add(a, b):\n    return a + b", "JAX compiles numerical programs with XLA.",
]


def tiny_tokenizer():
    """A small byte-level BPE tokenizer with the Qwen3 special tokens, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[END_OF_TEXT, "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.add_tokens(["yes", "no"])  # the reranker reads these two tokens' logits
    return tok


def base_tokenizer():
    """The real Qwen3 tokenizer when QWEN3_TOKENIZER_DIR points at it, else the tiny one."""
    from tokenizers import Tokenizer

    folder = os.environ.get("QWEN3_TOKENIZER_DIR")
    if folder and (Path(folder) / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    return tiny_tokenizer()


def save_tokenizer(tok, folder: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token=END_OF_TEXT)
    fast.padding_side = "right"
    fast.save_pretrained(folder)
    # save_pretrained may rewrite the post-processor; keep exactly the tokenizer we were given.
    (folder / "tokenizer.json").write_text(tok.to_str())


def randomize(model, seed: int) -> None:
    """Random values for every parameter, norms included, so a mis-mapped weight cannot hide."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.05 * noise)


def hub_style_config(folder: Path) -> None:
    """Rewrites config.json in the transformers-4.51 dialect of the published checkpoints."""
    raw = json.loads((folder / "config.json").read_text())
    rope = raw.pop("rope_parameters", None) or {}
    raw["rope_theta"] = rope.get("rope_theta", raw.get("rope_theta", 1e6))
    raw["torch_dtype"] = raw.pop("dtype", "float32")
    raw["architectures"] = ["Qwen3ForCausalLM"]
    (folder / "config.json").write_text(json.dumps(raw, indent=2))


def build_checkpoint(folder: Path, *, tokenizer, vocab_size: int, dtype: str = "float32", seed: int = 0,
                     hub_config: bool = True, causal_lm: bool = False, tie: bool = False,
                     layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, head_dim: int = 32,
                     intermediate: int = 128, max_shard_size: str | None = None) -> Path:
    """A random Qwen3 checkpoint in the published layout (keys without "model." unless causal_lm)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None)
    model = (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config)
    randomize(model, seed)
    model = model.to(getattr(torch, dtype))
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    if hub_config:
        hub_style_config(folder)
    save_tokenizer(tokenizer, folder)
    write_sentence_transformers_files(folder, hidden_size=hidden, max_seq_length=1024)
    return folder


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory):
    """JAX's persistent compilation cache for the session: the many models of the same tiny shapes that
    the tests build compile each program once. Subprocesses get the folder through --compile-cache."""
    from qwen3_jax.runner import enable_compilation_cache

    folder = str(tmp_path_factory.mktemp("compiled"))
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
def sentence_transformer(checkpoint):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(checkpoint), device="cpu")


@pytest.fixture(scope="session")
def embedder(checkpoint):
    from qwen3_jax import Qwen3Embedder

    return Qwen3Embedder.from_pretrained(checkpoint)


def long_text(words: int = 450) -> str:
    rng = np.random.default_rng(0)
    vocab = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega graph tensor mesh".split()
    return " ".join(rng.choice(vocab, words))
