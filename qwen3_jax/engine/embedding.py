"""The embedding engine: what a text becomes (prompt or instruction first, one <|endoftext|> last, cut on
the side asked), its last hidden state, and the vector made of it (MRL width, L2 normalisation). encode,
the server's routes, training's evaluation and the MTEB adapter all go through it."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx

from qwen3_jax.checks import check_dim
from qwen3_jax.engine.errors import Invalid
from qwen3_jax.engine.running import Engine
from qwen3_jax.model import Qwen3Model
from qwen3_jax.runner import LastTokenRunner
from qwen3_jax.tokenization import QUERY_PROMPT, TextTokenizer, format_instruction, pad_batch

MIN_EVERY_TOKEN_LENGTH = 16               # every_token's shortest padded length (one program a power of two)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Each row of `x` [n, D] over its L2 norm (an all-zero row stays zero)."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def pooled_vectors(hidden: np.ndarray, dim: int | None = None, normalize: bool = True) -> np.ndarray:
    """Embeddings from last-token hidden states [n, D]: the first `dim` values (MRL; None: all), then
    L2-normalised unless not `normalize` (cut first, then normalise)."""
    out = hidden if dim is None else hidden[:, :dim]
    return normalize_rows(out) if normalize else out


class EmbeddingEngine(Engine):
    """Texts to Qwen3-Embedding vectors for one model: `model` and its `tokenizer`, the `runner` over the
    model, the checkpoint's `prompts` ({name: string}) and `default_prompt_name`, and `max_length` (tokens
    a row may hold, <|endoftext|> included)."""

    def __init__(self, model: Qwen3Model, tokenizer: TextTokenizer, runner: LastTokenRunner, *,
                 prompts: dict[str, str] | None = None, default_prompt_name: str | None = None, max_length: int):
        super().__init__(runner)
        self.model, self.tokenizer = model, tokenizer
        self.prompts = dict(prompts or {})
        self.default_prompt_name = default_prompt_name
        self.max_length = max_length
        self._every_token = None                 # every_token's jitted forward pass and its weights, made on first use
        self.keep_known_prefixes(tokenizer)

    @property
    def dimension(self) -> int:
        """The model's full width (hidden size)."""
        return self.model.config.hidden_size

    def known_prefixes(self) -> list[str]:
        """The strings put before many texts, each once: the checkpoint's prompts, then the web-search
        instruction the server and the model card default to (where a runner would keep a known prefix)."""
        return [prefix for prefix in dict.fromkeys([*self.prompts.values(), QUERY_PROMPT]) if prefix]

    def prefix(self, prompt_name: str | None = None, prompt: str | None = None, instruction: str | None = None) -> str:
        """The string put before every text: at most one of the three ways of choosing it (a prompt of
        the checkpoint by name, a literal prompt, an instruction in Qwen3's query format); none chosen,
        the checkpoint's default_prompt_name (as sentence-transformers does). Invalid otherwise."""
        if sum(x is not None for x in (prompt_name, prompt, instruction)) > 1:
            raise Invalid("pass at most one of prompt_name, prompt and instruction", reason="invalid_prompt",
                          param="prompt_name")
        if instruction is not None:
            return format_instruction(instruction)
        if prompt is None and prompt_name is None:
            prompt_name = self.default_prompt_name
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                known = ", ".join(self.prompts) or "none (no config_sentence_transformers.json)"
                raise Invalid(f"prompt_name={prompt_name!r} is unknown; this model has: {known}",
                              reason="invalid_prompt", param="prompt_name")
            return self.prompts[prompt_name]
        return prompt or ""

    def rows(self, texts: Sequence[str], *, prompt_name: str | None = None, prompt: str | None = None,
             instruction: str | None = None, truncate: bool = True, side: str = "right",
             max_length: int | None = None) -> list[list[int]]:
        """Token rows of `texts` as the model reads them: the prefix `prefix` chooses, the text, one
        <|endoftext|>; a row over `max_length` (None: the engine's) is cut on `side` ("right": the
        text's end, "left": its start) with a warning, or refused with TooLong when not `truncate`."""
        prefix = self.prefix(prompt_name, prompt, instruction)
        return self.tokenizer.encode([prefix + t for t in texts], max_length or self.max_length, truncate=truncate,
                                     side=side)

    def token_rows(self, ids: Sequence[Sequence[int]], *, truncate: bool = True, side: str = "right",
                   param: str = "input") -> list[list[int]]:
        """Rows of a caller's own token ids (the prompt's included), each given its <|endoftext|> as texts
        get theirs; an empty row or an id outside the vocabulary is Invalid (`param` names the argument)."""
        vocabulary = self.model.config.vocab_size
        for i, row in enumerate(ids):
            if not row:
                raise Invalid(f"{param}[{i}] holds no token ids: send at least one", reason="empty_input",
                              param=param)
            if any(not 0 <= token < vocabulary for token in row):
                raise Invalid(f"{param}[{i}] holds token ids outside 0..{vocabulary - 1}", reason="invalid_tokens",
                              param=param)
        return self.tokenizer.finish(ids, self.max_length, truncate=truncate, side=side)

    def check_dim(self, dim: int | None, name: str = "dim") -> int:
        """An MRL width in 32..hidden size (None: the whole width), else Invalid naming `name`."""
        try:
            return check_dim(dim, self.dimension, name=f"{name}=")
        except ValueError as error:
            raise Invalid(str(error), reason="invalid_dimensions", param=name) from None

    @staticmethod
    def vectors(hidden: np.ndarray, dim: int | None = None, normalize: bool = True) -> np.ndarray:
        """Embeddings of last hidden states [n, D] (see pooled_vectors)."""
        return pooled_vectors(hidden, dim, normalize)

    def every_token(self, row: Sequence[int]) -> np.ndarray:
        """Every token's final hidden state of one row, float32 [len(row), D]: the row padded to a power
        of two tokens (at least 16), one program a length, compiled on its first use."""
        if self._every_token is None:
            graphdef, state = nnx.split(self.model)
            self._every_token = jax.jit(lambda state, ids, segments: nnx.merge(graphdef, state)(ids, segments)), state
        forward, state = self._every_token
        length = max(MIN_EVERY_TOKEN_LENGTH, 1 << (len(row) - 1).bit_length())
        ids, valid = pad_batch([row], length, 1, self.tokenizer.end_of_text_id)
        return np.asarray(forward(state, ids, valid.astype(np.int32))[0, :len(row)], np.float32)
