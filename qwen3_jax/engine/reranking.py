"""The reranking engine: a (query, document) pair in the official Qwen3-Reranker prompt as token rows (an
over-long document cut inside its part, so the prompt's prefix and suffix survive), the last hidden
state, and the score read off it: the yes-no logit margin (TEI's raw score) or P("yes") = sigmoid of it,
the one place that maths lives (the reranker, the server, training's evaluation and verify use it)."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from qwen3_jax.checks import UsageError, check_max_length
from qwen3_jax.engine.running import Engine
from qwen3_jax.model import Qwen3Model
from qwen3_jax.runner import LastTokenRunner
from qwen3_jax.sharding import fetch_global
from qwen3_jax.tokenization import TextTokenizer, TooLong

DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
          "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_MAX_LENGTH = 8192


def format_pair(instruction: str, query: str, document: str) -> str:
    """The user turn of the official reranker prompt."""
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


class RerankerPrompts:
    """The official prompt as token ids, and the ids of its two answers, for a tokenizer and max_length;
    shared by scoring and training."""

    def __init__(self, tokenizer: TextTokenizer, max_length: int = DEFAULT_MAX_LENGTH):
        self.tokenizer = tokenizer
        self.max_length = check_max_length(max_length)
        vocab = tokenizer.tokenizer
        self.yes_id, self.no_id = vocab.token_to_id("yes"), vocab.token_to_id("no")
        if self.yes_id is None or self.no_id is None:
            raise ValueError("the tokenizer has no 'yes' / 'no' tokens; is this a Qwen3-Reranker checkpoint?")
        self.prefix_ids, self.suffix_ids = tokenizer.token_ids([PREFIX, SUFFIX])
        if len(self.prefix_ids) + len(self.suffix_ids) >= self.max_length:
            raise UsageError(f"max_length={max_length} leaves no room between the prompt's prefix and suffix")

    def ids(self, pairs: Sequence[tuple[str, str]], instruction: str | None = None, *,
            truncate: bool = True, side: str = "right") -> list[list[int]]:
        """Token ids of each prompt (instruction None: the default); an over-long document is cut inside
        the document part, so the prefix and suffix survive (`truncate=False`: TooLong instead): its end,
        or with `side="left"` its start (the document then tokenized apart from the query before it)."""
        instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
        budget = self.max_length - len(self.prefix_ids) - len(self.suffix_ids)
        bodies = self.tokenizer.token_ids([format_pair(instruction, q, d) for q, d in pairs])
        too_long = [i for i, body in enumerate(bodies) if len(body) > budget]
        if too_long and not truncate:
            raise TooLong(too_long, len(bodies[too_long[0]]) + self.max_length - budget, self.max_length)
        cut = len(too_long)
        if cut:
            warnings.warn(f"{cut} prompt(s) exceed max_length={self.max_length} tokens; their documents were "
                          "truncated (the prompt's prefix and suffix are kept)", stacklevel=3)
        if cut and side == "left":
            heads = self.tokenizer.token_ids([format_pair(instruction, pairs[i][0], "") for i in too_long])
            documents = self.tokenizer.token_ids([pairs[i][1] for i in too_long])
            for i, head, document in zip(too_long, heads, documents):
                bodies[i] = head + document[len(document) - max(budget - len(head), 0):]
        return [self.prefix_ids + body[:budget] + self.suffix_ids for body in bodies]


def yes_no_margins(hidden: np.ndarray, answer_rows: np.ndarray) -> np.ndarray:
    """logit("yes") - logit("no") of last hidden states [n, D], given the output rows of ("no", "yes")
    [2, D] (TEI's raw score)."""
    logits = np.einsum("BD,AD->BA", hidden, answer_rows)          # A: ("no", "yes")
    return logits[:, 1] - logits[:, 0]


def yes_probability(margin: np.ndarray) -> np.ndarray:
    """softmax([no, yes])[1] = sigmoid(yes - no), float32, without overflow for confident margins:
    1 / (1 + exp(-m)) computed as exp(-log(1 + exp(-m)))."""
    return np.exp(-np.logaddexp(0.0, -np.asarray(margin, np.float64))).astype(np.float32)


def best_first(scores: np.ndarray) -> list[int]:
    """Indices of `scores` [n], best first; equal scores keep their order (the lower index first)."""
    return [int(i) for i in np.argsort(-scores, kind="stable")]


class RerankingEngine(Engine):
    """(query, document) pairs to Qwen3-Reranker scores for one model: `model` (with its LM head) and its
    `tokenizer`, the `runner` over the model, and `max_length` (tokens a prompt may hold)."""

    def __init__(self, model: Qwen3Model, tokenizer: TextTokenizer, runner: LastTokenRunner, *,
                 max_length: int = DEFAULT_MAX_LENGTH):
        super().__init__(runner)
        self.model, self.tokenizer = model, tokenizer
        self.prompts = RerankerPrompts(tokenizer, max_length)
        self.max_length = self.prompts.max_length
        # Only two rows of the output projection are ever needed: "no" and "yes".
        self.answer_rows = fetch_global(model.output_rows([self.prompts.no_id, self.prompts.yes_id])).astype(
            np.float32)
        self.keep_known_prefixes(tokenizer)

    def known_prefixes(self) -> list[str]:
        """The string every prompt starts with: the system turn (where a runner would keep a known prefix)."""
        return [PREFIX]

    def rows(self, pairs: Sequence[tuple[str, str]], *, instruction: str | None = None, truncate: bool = True,
             side: str = "right") -> list[list[int]]:
        """Token rows of each (query, document) pair in the official prompt (instruction None: the model
        card's web-search one); an over-long document is cut (`side` "right": its end, "left": its start)
        with a warning, or the pairs refused with TooLong when not `truncate`."""
        return self.prompts.ids(pairs, instruction, truncate=truncate, side=side)

    def margins(self, hidden: np.ndarray) -> np.ndarray:
        """logit("yes") - logit("no") of last hidden states [n, D] (TEI's raw score)."""
        return yes_no_margins(hidden, self.answer_rows)

    def scores(self, hidden: np.ndarray, *, raw: bool = False) -> np.ndarray:
        """P("yes") of last hidden states [n, D], float32 [n]; `raw`: the yes-no logit margin instead."""
        margins = self.margins(hidden)
        return margins if raw else yes_probability(margins)
