"""Qwen3Embedder: the public face for embedding text, modelled on sentence-transformers, over the
embedding engine (qwen3_jax/engine/embedding.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from qwen3_jax.checks import UsageError, check_dim, check_max_length, check_texts
from qwen3_jax.compile_cache import use_default_compilation_cache
from qwen3_jax.engine.running import OnEngine
from qwen3_jax.engine.embedding import EmbeddingEngine, normalize_rows
from qwen3_jax.hub import resolve_model
from qwen3_jax.loader import load_model
from qwen3_jax.model import Qwen3Model
from qwen3_jax.runner import LastTokenRunner
from qwen3_jax.tokenization import TextTokenizer, read_sentence_transformers_files


class Qwen3Embedder(OnEngine):
    """Encodes texts into Qwen3-Embedding vectors: last-token pooling, MRL dims, L2 normalisation.
    `truncate_dim` is sentence-transformers': every `encode` keeps that many values unless told otherwise."""

    def __init__(self, model: Qwen3Model, tokenizer: TextTokenizer, *, prompts: dict[str, str] | None = None,
                 default_prompt_name: str | None = None, max_length: int | None = None, mesh: Mesh | None = None,
                 padding_side: str = "right", truncate_dim: int | None = None):
        self.model = model
        self.config = model.config
        self.truncate_dim = None if truncate_dim is None else check_dim(truncate_dim, model.config.hidden_size,
                                                                        name="truncate_dim=")
        runner = LastTokenRunner(model, pad_id=tokenizer.end_of_text_id, mesh=mesh, padding_side=padding_side)
        self.engine = EmbeddingEngine(model, tokenizer, runner, prompts=prompts,
                                      default_prompt_name=default_prompt_name,
                                      max_length=check_max_length(max_length, self.config.max_position_embeddings))

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, dtype: str = "float32", param_dtype: str | None = None,
                        max_length: int | None = None, attention: str = "auto", mesh: Mesh | None = None,
                        fsdp: bool = False, revision: str | None = None, cache_dir: str | None = None,
                        strict: bool = False, **kwargs) -> "Qwen3Embedder":
        """Loads a local checkpoint folder or a hub id ("Qwen/Qwen3-Embedding-0.6B").

        `dtype`: the compute dtype (float32, bfloat16, or auto); `param_dtype`: the weights' (default: as
        stored); `max_length`: tokens a text may hold (default: sentence_bert_config.json's); `attention`:
        the kernel (backend.IMPLEMENTATIONS); `mesh`, `fsdp`: the device mesh and whether parameters split
        over its data axis too; `revision`, `cache_dir`: the hub's; `strict`: refuse unknown weight names.
        This turns on JAX's persistent compilation cache for the process (compile_cache.py), unless a cache
        was chosen before (JAX's own settings, `qwen3_jax.enable_compilation_cache(...)`; "off", or
        QWEN3_JAX_COMPILE_CACHE=off, keeps it off): JAX allows only that process-wide setting."""
        use_default_compilation_cache()
        folder = resolve_model(name_or_path, revision=revision, cache_dir=cache_dir)
        model = load_model(folder, dtype=dtype, param_dtype=param_dtype, attention=attention, mesh=mesh,
                           fsdp=fsdp, strict=strict)
        settings = read_sentence_transformers_files(folder)
        return cls(model, TextTokenizer.from_folder(folder), prompts=settings.prompts,
                   default_prompt_name=settings.default_prompt_name,
                   max_length=max_length if max_length is not None else settings.max_seq_length, mesh=mesh, **kwargs)

    @property
    def tokenizer(self) -> TextTokenizer:
        return self.engine.tokenizer

    @property
    def max_length(self) -> int:
        """Tokens a text may hold, prompt and <|endoftext|> included (longer ones are cut)."""
        return self.engine.max_length

    @property
    def prompts(self) -> dict[str, str]:
        """The checkpoint's prompts, {name: string} (config_sentence_transformers.json)."""
        return self.engine.prompts

    @property
    def default_prompt_name(self) -> str | None:
        """The prompt put before texts when none is chosen (None: no prompt)."""
        return self.engine.default_prompt_name

    @property
    def dimension(self) -> int:
        """The model's full width (hidden size), whatever truncate_dim is."""
        return self.config.hidden_size

    def get_sentence_embedding_dimension(self) -> int:
        """The width `encode` returns by default: truncate_dim when set, else the hidden size (as
        sentence-transformers)."""
        return self.truncate_dim or self.dimension

    get_embedding_dimension = get_sentence_embedding_dimension     # sentence-transformers 5.2+'s name

    @property
    def tokens_embedded(self) -> int:
        """Real tokens embedded so far (prompts and <|endoftext|> included)."""
        return self.runner.tokens_embedded

    @property
    def tokens_computed(self) -> int:
        """Tokens the forward passes computed so far, padding included (>= tokens_embedded)."""
        return self.runner.tokens_computed

    @property
    def compiled_programs(self) -> int:
        """How many (batch, length) programs the forward pass has compiled so far."""
        return self.runner.compiled_programs

    def encode(self, texts: Sequence[str] | str, *, prompt_name: str | None = None, prompt: str | None = None,
               instruction: str | None = None, dim: int | None = None, batch_size: int = 32,
               normalize: bool = True, max_length: int | None = None, show_progress_bar: bool = False,
               truncate_dim: int | None = None, normalize_embeddings: bool = False, convert_to_numpy: bool = True,
               convert_to_tensor: bool = False):
        """Embeds texts: float32 [n, dim or hidden] (a single string gives [dim]).

        `instruction` formats queries as "Instruct: {instruction}\\nQuery:{text}"; `prompt_name`
        uses the prompts of config_sentence_transformers.json; `dim` truncates (MRL) before normalising.
        `batch_size` sizes one forward pass as batch_size x 512 tokens: that many texts of up to 512
        tokens, more shorter ones (packed several to a row), fewer longer ones. `show_progress_bar`
        shows texts/s, tokens/s and time left on stderr.

        sentence-transformers' names, with its semantics: `truncate_dim` keeps the first values of the
        normalised vector (not normalised again unless `normalize_embeddings`; the model's own
        truncate_dim when not given); `convert_to_tensor` returns a jax.Array (this library's tensor);
        `convert_to_numpy=False` a list of one jax.Array a text.
        """
        if dim is not None and truncate_dim is not None:
            raise UsageError("pass dim (truncate, then normalise) or truncate_dim (sentence-transformers': "
                             "truncate the normalised vector), not both")
        single = isinstance(texts, str)
        texts = check_texts([texts] if single else texts)
        if dim is None and truncate_dim is None:
            truncate_dim = self.truncate_dim
        dim = check_dim(dim, self.dimension)
        truncate_dim = check_dim(truncate_dim, self.dimension, name="truncate_dim=")
        max_length = self.max_length if max_length is None else check_max_length(max_length)
        rows = self.engine.rows(texts, prompt_name=prompt_name, prompt=prompt, instruction=instruction,
                                max_length=max_length)
        out = self.engine.vectors(self.engine.run(rows, batch_size=batch_size, progress=show_progress_bar), dim,
                                  normalize)
        out = out[:, :truncate_dim]
        if normalize_embeddings:
            out = normalize_rows(out)
        out = out[0] if single else out
        if convert_to_tensor:
            return jax.numpy.asarray(out)
        return out if convert_to_numpy or single else [jax.numpy.asarray(row) for row in out]

    def encode_query(self, texts: Sequence[str] | str, **kwargs):
        """encode with the "query" prompt when the model has one and no prompt is given (sentence-transformers')."""
        if not {"prompt_name", "prompt", "instruction"} & kwargs.keys() and "query" in self.prompts:
            kwargs["prompt_name"] = "query"
        return self.encode(texts, **kwargs)

    def encode_document(self, texts: Sequence[str] | str, **kwargs):
        """encode with the first of the "document", "passage" and "corpus" prompts the model has, when no
        prompt is given (sentence-transformers')."""
        if not {"prompt_name", "prompt", "instruction"} & kwargs.keys():
            kwargs["prompt_name"] = next((name for name in ("document", "passage", "corpus") if name in self.prompts),
                                         None)
        return self.encode(texts, **kwargs)

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Cosine similarity matrix [len(a), len(b)] (rows are normalised first)."""
        a, b = np.atleast_2d(np.asarray(a, np.float32)), np.atleast_2d(np.asarray(b, np.float32))
        if a.shape[-1] != b.shape[-1]:
            raise ValueError(f"cannot compare {a.shape[-1]}-dim and {b.shape[-1]}-dim embeddings")
        return normalize_rows(a) @ normalize_rows(b).T
