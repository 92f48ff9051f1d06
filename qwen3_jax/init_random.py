"""Random-weight checkpoints in the published layout, written by our own code (no torch, no network).

`qwen3-jax init-random OUT --shape tiny|0.6B|4B|8B` writes what a downloaded Qwen3-Embedding (or, with
`--reranker`, Qwen3-Reranker) folder holds: config.json in the transformers-4.51 dialect (top-level
`rope_theta`), safetensors weights under the published names (sharded with an index above the shard
size), the tokenizer, and the sentence-transformers module files. transformers, sentence-transformers
and Infinity load it as they load the real checkpoints, so every command can be tried offline, and the
benchmarks and tests use it for their checkpoints.

The tokenizer is one you give (a folder holding a Qwen3 tokenizer.json) or a small byte-level BPE built
here with the Qwen3 special tokens, trained on a fixed text that holds the prompts the models use.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from tokenizers import Tokenizer

from qwen3_jax.checks import UsageError, whole_number
from qwen3_jax.config import PRESETS, Qwen3Config, preset
from qwen3_jax.convert import staged_folder, write_weight_files
from qwen3_jax.progress import progress_bar
from qwen3_jax.engine.reranking import PREFIX, SUFFIX, format_pair
from qwen3_jax.tokenization import END_OF_TEXT, QUERY_PROMPT
from qwen3_jax.weights import WEIGHTS, hf_key, hf_layer_shape

# The test models' shape: small enough to compile in seconds, every structural feature kept
# (GQA, num_heads * head_dim != hidden).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32)
SHAPES = ("tiny", *PRESETS)
STORED_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
SPECIAL_TOKENS = (END_OF_TEXT, "<|im_start|>", "<|im_end|>")
SMALL_VOCAB = 1024
# What the small tokenizer learns its merges from: the prompts both models put before every text, and
# everyday English, so prompts take a few dozen tokens as with the real tokenizer, not hundreds.
TRAINING_TEXT = [
    QUERY_PROMPT, PREFIX, SUFFIX, format_pair("Given a web search query, retrieve relevant passages that answer the "
                                              "query", "What is the capital of China?", "Beijing."),
    "Given a question, retrieve Wikipedia passages that answer the question. Retrieve semantically similar text.",
    "The capital of China is Beijing. Gravity is a force that attracts two bodies towards each other. It gives "
    "weight to physical objects and is responsible for the movement of planets around the sun.",
    "where does the person live? who lives in the city near the river and the mountain; what is the answer to "
    "this question about history, science, music, language, search, documents, models and vectors",
    "the of and to in is was for on that with as by at from his her an which or were are be this it not have "
    "one all their there been has more if will would can about when what so no out up into than them only",
]


def small_tokenizer(vocab_size: int = SMALL_VOCAB) -> Tokenizer:
    """A byte-level BPE tokenizer with the Qwen3 special tokens (and "yes" / "no", the reranker's
    answers), trained on TRAINING_TEXT: any text encodes, the prompts compactly. Deterministic."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TRAINING_TEXT * 4, trainer)
    tokenizer.add_tokens(["yes", "no"])
    return tokenizer


def with_appended_end_of_text(tokenizer: Tokenizer) -> Tokenizer:
    """A copy with Qwen3-Embedding's post-processor, which appends <|endoftext|> to every input."""
    from tokenizers import processors

    copy = Tokenizer.from_str(tokenizer.to_str())
    eot = copy.token_to_id(END_OF_TEXT)
    copy.post_processor = processors.TemplateProcessing(
        single=f"$A {END_OF_TEXT}", pair=f"$A $B {END_OF_TEXT}", special_tokens=[(END_OF_TEXT, eot)])
    return copy


def random_config(shape: str, *, layers: int | None = None, vocab_size: int | None = None,
                  tie_word_embeddings: bool = False) -> Qwen3Config:
    """The config of a published shape ("0.6B", "4B", "8B") or of "tiny" (the tests' shape, its
    vocabulary the tokenizer's), optionally with fewer layers."""
    if shape not in SHAPES:
        raise UsageError(f"--shape {shape!r}: choose one of {', '.join(SHAPES)}")
    overrides = {"tie_word_embeddings": tie_word_embeddings}
    if layers is not None:
        overrides["num_hidden_layers"] = whole_number(layers, "--layers")
    if shape == "tiny":
        if vocab_size is None:
            raise ValueError("the tiny shape takes its vocabulary size from the tokenizer")
        return Qwen3Config(**{**TINY, **overrides}, vocab_size=vocab_size, rope_theta=1e6, rms_norm_eps=1e-6,
                           max_position_embeddings=32768)
    return preset(shape, **overrides)


def random_tensors(cfg: Qwen3Config, *, reranker: bool, dtype: str, seed: int, std: float):
    """(published name, array) for every tensor: matrices normal(0, std), norm weights 1 + 0.1 normal (not
    ones, so a norm mapped to the wrong place cannot hide). Each tensor has its own random stream."""
    from qwen3_jax.loader import abstract_model     # shapes only: nothing is allocated

    from flax import nnx

    stored = STORED_DTYPES[dtype]
    model = abstract_model(cfg, param_dtype=np.float32, dtype=np.float32, attention="auto",
                           with_lm_head=reranker)
    shapes = {path: var.shape for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    prefix = "model." if reranker else ""
    number = 0
    for rule in WEIGHTS:
        if rule.path not in shapes:
            continue
        shape = hf_layer_shape(rule, shapes[rule.path], cfg.vocab_size)
        for layer in range(cfg.num_hidden_layers) if rule.per_layer else [None]:
            noise = np.random.default_rng([seed, number]).standard_normal(shape, dtype=np.float32)
            number += 1
            values = 1.0 + 0.1 * noise if "norm" in rule.hf_name else std * noise
            name = rule.hf_name if rule.hf_name == "lm_head.weight" else prefix + hf_key(rule, layer)
            yield name, values.astype(stored)


def write_sentence_transformers_files(folder: Path, *, hidden_size: int, max_seq_length: int,
                                      prompts: dict[str, str] | None = None,
                                      default_prompt_name: str | None = None) -> None:
    """The module files sentence-transformers reads beside a Qwen3-Embedding checkpoint, as published:
    Transformer -> last-token Pooling (every pooling key listed: sentence-transformers 3 adds mean
    pooling to a file that gives only the last-token one) -> Normalize, the prompts and max_seq_length."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden_size, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": True, "include_prompt": True}, indent=2))
    prompts = {"query": QUERY_PROMPT, "document": ""} if prompts is None else prompts
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": prompts, "default_prompt_name": default_prompt_name, "similarity_fn_name": "cosine"}, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2))


def _tokenizer_files(folder: Path, tokenizer: Tokenizer | str | Path | None, *, append_end_of_text: bool,
                     max_length: int) -> Tokenizer:
    """tokenizer.json (and tokenizer_config.json) in `folder`: a given folder's files, a given Tokenizer,
    or the small one; Qwen3-Embedding's appends <|endoftext|>, Qwen3-Reranker's does not."""
    config = None
    if isinstance(tokenizer, (str, Path)):
        source = Path(tokenizer)
        if not (source / "tokenizer.json").is_file():
            raise FileNotFoundError(f"tokenizer folder {source} holds no tokenizer.json")
        if (source / "tokenizer_config.json").is_file():
            config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
        tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    elif tokenizer is None:
        tokenizer = small_tokenizer()
    for token in SPECIAL_TOKENS:
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"the tokenizer has no {token} token; give a Qwen3 tokenizer")
    if append_end_of_text:
        tokenizer = with_appended_end_of_text(tokenizer)
    else:
        tokenizer = Tokenizer.from_str(tokenizer.to_str())
        tokenizer.post_processor = None
    (folder / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    if config is None:   # a class that transformers 4.x (Infinity) and 5.x both read
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": END_OF_TEXT,
                  "model_max_length": max_length, "padding_side": "right" if append_end_of_text else "left"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return tokenizer


def write_random_checkpoint(folder: str | Path, cfg: Qwen3Config | str = "tiny", *, layers: int | None = None,
                            reranker: bool = False, tie_word_embeddings: bool = False,
                            tokenizer: Tokenizer | str | Path | None = None,
                            dtype: str = "bfloat16", seed: int = 0, std: float = 0.02,
                            max_seq_length: int | None = None, max_shard_bytes: int | str = "5GB",
                            overwrite: bool = False, progress: bool = False) -> Path:
    """Writes a random-weight checkpoint in the published layout to `folder` (see the module
    docstring); `cfg` is a shape name (SHAPES) or a Qwen3Config; a reranker has an LM head unless
    `tie_word_embeddings`. Written to a temporary folder first
    and renamed, so an interrupted write leaves nothing that looks complete."""
    if dtype not in STORED_DTYPES:
        raise UsageError(f"--dtype {dtype!r}: choose one of {', '.join(STORED_DTYPES)}")
    with staged_folder(folder, overwrite) as staging:
        written = _tokenizer_files(staging, tokenizer, append_end_of_text=not reranker,
                                   max_length=max_seq_length or 32768)
        if isinstance(cfg, str):
            cfg = random_config(cfg, layers=layers, vocab_size=written.get_vocab_size(with_added_tokens=True),
                                tie_word_embeddings=tie_word_embeddings)
        tensors = random_tensors(cfg, reranker=reranker, dtype=dtype, seed=seed, std=std)
        total = sum(cfg.num_hidden_layers if rule.per_layer else 1 for rule in WEIGHTS) - (not reranker or
                                                                                           cfg.tie_word_embeddings)
        with progress_bar(total, "tensor", enabled=progress, iterable=tensors) as bar:
            write_weight_files(staging, bar, max_shard_bytes=max_shard_bytes)
        hf_config = {**cfg.to_hf_dict(), "torch_dtype": dtype, "bos_token_id": written.token_to_id(END_OF_TEXT),
                     "eos_token_id": written.token_to_id("<|im_end|>")}
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2))
        if not reranker:
            write_sentence_transformers_files(staging, hidden_size=cfg.hidden_size,
                                              max_seq_length=max_seq_length or cfg.max_position_embeddings)
    return Path(folder)

