"""Qwen3Reranker: relevance of a document to a query, read off the LM's "yes" / "no" logits."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from jax.sharding import Mesh

from qwen3_jax.checks import UsageError, check_max_length, check_texts
from qwen3_jax.compile_cache import use_default_compilation_cache
from qwen3_jax.hub import resolve_model
from qwen3_jax.loader import load_model
from qwen3_jax.model import Qwen3Model
from qwen3_jax.runner import LastTokenRunner
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


def answer_margins(hidden: np.ndarray, answer_rows: np.ndarray) -> np.ndarray:
    """logit("yes") - logit("no") of last hidden states [n, D], given the output rows of ("no", "yes")
    [2, D] (TEI's raw score)."""
    logits = np.einsum("BD,AD->BA", hidden, answer_rows)          # A: ("no", "yes")
    return logits[:, 1] - logits[:, 0]


def yes_probability(margin: np.ndarray) -> np.ndarray:
    """softmax([no, yes])[1] = sigmoid(yes - no), float32, without overflow for confident margins:
    1 / (1 + exp(-m)) computed as exp(-log(1 + exp(-m)))."""
    return np.exp(-np.logaddexp(0.0, -np.asarray(margin, np.float64))).astype(np.float32)


class Qwen3Reranker:
    """Scores (query, document) pairs with a Qwen3-Reranker checkpoint: P("yes") in [0, 1]."""

    def __init__(self, model: Qwen3Model, tokenizer: TextTokenizer, *, max_length: int = DEFAULT_MAX_LENGTH,
                 mesh: Mesh | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.prompts = RerankerPrompts(tokenizer, max_length)
        self.max_length, self.yes_id, self.no_id = self.prompts.max_length, self.prompts.yes_id, self.prompts.no_id
        self.prefix_ids, self.suffix_ids = self.prompts.prefix_ids, self.prompts.suffix_ids
        # Only two rows of the output projection are ever needed: "no" and "yes".
        self.answer_rows = np.asarray(model.output_rows([self.no_id, self.yes_id]), np.float32)
        self.runner = LastTokenRunner(model, pad_id=tokenizer.end_of_text_id, mesh=mesh)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, dtype: str = "float32", param_dtype: str | None = None,
                        attention: str = "auto", mesh: Mesh | None = None, fsdp: bool = False,
                        revision: str | None = None, cache_dir: str | None = None, strict: bool = False,
                        **kwargs) -> "Qwen3Reranker":
        """Loads a local reranker folder or a hub id ("Qwen/Qwen3-Reranker-0.6B"); tied or separate LM head."""
        use_default_compilation_cache()
        folder = resolve_model(name_or_path, revision=revision, cache_dir=cache_dir)
        model = load_model(folder, dtype=dtype, param_dtype=param_dtype, attention=attention, mesh=mesh,
                           fsdp=fsdp, with_lm_head=True, strict=strict)
        return cls(model, TextTokenizer.from_folder(folder), mesh=mesh, **kwargs)

    def prompt_ids(self, pairs: Sequence[tuple[str, str]], instruction: str | None = None) -> list[list[int]]:
        """Token ids of each prompt (see RerankerPrompts.ids)."""
        return self.prompts.ids(pairs, instruction)

    def score_pairs(self, pairs: Sequence[tuple[str, str]], *, instruction: str | None = None,
                    batch_size: int = 16, show_progress_bar: bool = False) -> np.ndarray:
        """P("yes") for each (query, document) pair, float32 [n]."""
        pairs = list(pairs)
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise TypeError(f"pairs[{i}] must be a (query, document) pair of strings")
        rows = self.prompt_ids(pairs, instruction)
        hidden = self.runner(rows, batch_size=batch_size, progress=show_progress_bar)
        return yes_probability(self.answer_logits(hidden))

    def answer_logits(self, hidden: np.ndarray) -> np.ndarray:
        """logit("yes") - logit("no") of last hidden states [n, D] (TEI's raw score)."""
        return answer_margins(hidden, self.answer_rows)

    def score(self, query: str, documents: Sequence[str], *, instruction: str | None = None,
              batch_size: int = 16, show_progress_bar: bool = False) -> np.ndarray:
        """P("yes") of each document for one query, float32 [len(documents)]."""
        documents = check_texts(documents)
        return self.score_pairs([(query, d) for d in documents], instruction=instruction, batch_size=batch_size,
                                show_progress_bar=show_progress_bar)

    def rank(self, query: str, documents: Sequence[str], *, top_k: int | None = None,
             instruction: str | None = None, batch_size: int = 16, show_progress_bar: bool = False) -> list[dict]:
        """Documents sorted by score: [{"index", "score", "document"}], the best `top_k` of them."""
        if top_k is not None and top_k < 1:
            raise UsageError(f"top_k={top_k} must be at least 1")
        scores = self.score(query, documents, instruction=instruction, batch_size=batch_size,
                            show_progress_bar=show_progress_bar)
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [{"index": int(i), "score": float(scores[i]), "document": documents[i]} for i in order]
