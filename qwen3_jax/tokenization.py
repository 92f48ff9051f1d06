"""Tokenization for Qwen3-Embedding: exactly one trailing <|endoftext|>, instructions, length buckets."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from tokenizers import Tokenizer

END_OF_TEXT = "<|endoftext|>"
QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"


def format_instruction(instruction: str) -> str:
    """The query prompt Qwen3-Embedding was trained with; documents get none."""
    return f"Instruct: {instruction}\nQuery:"


class TooLong(ValueError):
    """Texts longer than max_length that the caller asked not to truncate."""

    def __init__(self, indices: list[int], tokens: int, max_length: int):
        self.indices, self.tokens, self.max_length = indices, tokens, max_length
        self.what = (f"{len(indices)} input(s) (first: index {indices[0]}, {tokens} tokens) exceed the limit of "
                     f"{max_length} tokens")
        super().__init__(f"{self.what}; shorten them, or allow truncation")


class TextTokenizer:
    """A `tokenizers` Tokenizer that always ends every input with exactly one <|endoftext|>."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.end_of_text_id = tokenizer.token_to_id(END_OF_TEXT)
        if self.end_of_text_id is None:
            raise ValueError(f"the tokenizer has no {END_OF_TEXT} token; is this a Qwen3 tokenizer?")
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()

    @classmethod
    def from_folder(cls, folder: str | Path) -> "TextTokenizer":
        file = Path(folder) / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: the checkpoint folder needs its tokenizer.json")
        return cls(Tokenizer.from_file(str(file)))

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """The texts' own tokens, without any special token the post-processor would add."""
        return [encoding.ids for encoding in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, texts: Sequence[str], max_length: int, *, truncate: bool = True,
               side: str = "right") -> list[list[int]]:
        """Token ids per text: the text's own tokens, cut to max_length - 1, then <|endoftext|>.

        The checkpoint's post-processor is bypassed, so the result is the same whether or not its
        tokenizer.json appends the end-of-text token itself. Truncation warns once per call;
        `truncate=False` raises TooLong instead. `side="left"` cuts a text's start instead of its end
        (as a tokenizer with truncation_side="left" does).
        """
        return self.finish(self.token_ids(texts), max_length, truncate=truncate, side=side)

    def finish(self, ids: Sequence[Sequence[int]], max_length: int, *, truncate: bool = True,
               side: str = "right") -> list[list[int]]:
        """Texts' own token ids (e.g. a client's) made into model inputs as `encode` makes them."""
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for text and <|endoftext|>")
        if side not in ("left", "right"):
            raise ValueError(f"side={side!r}: choose 'left' or 'right'")
        too_long = [i for i, row in enumerate(ids) if len(row) >= max_length]
        if too_long and not truncate:
            raise TooLong(too_long, len(ids[too_long[0]]) + 1, max_length)
        if too_long:
            warnings.warn(f"{len(too_long)} text(s) (first: index {too_long[0]}) exceed max_length="
                          f"{max_length} tokens and were truncated; <|endoftext|> was kept", stacklevel=3)
        keep = max_length - 1
        return [list(row[:keep] if side == "right" else row[max(len(row) - keep, 0):]) + [self.end_of_text_id]
                for row in ids]


def pad_batch(rows: Sequence[Sequence[int]], length: int, batch: int, pad_id: int,
              side: str = "right") -> tuple[np.ndarray, np.ndarray]:
    """ids and a validity mask [batch, length]; rows beyond len(rows) are all padding."""
    ids = np.full((batch, length), pad_id, dtype=np.int32)
    valid = np.zeros((batch, length), dtype=bool)
    for i, row in enumerate(rows):
        start = 0 if side == "right" else length - len(row)
        ids[i, start:start + len(row)] = row
        valid[i, start:start + len(row)] = True
    return ids, valid


class SentenceTransformersSettings(NamedTuple):
    """What sentence-transformers reads beside the weights and encode must honour alike."""

    prompts: dict[str, str]
    default_prompt_name: str | None
    max_seq_length: int | None


def read_sentence_transformers_files(folder: Path) -> SentenceTransformersSettings:
    """The prompts and default_prompt_name of config_sentence_transformers.json and the max_seq_length
    of sentence_bert_config.json (empty / None where a file is absent)."""
    settings = {}
    for name in ("config_sentence_transformers.json", "sentence_bert_config.json"):
        if (folder / name).is_file():
            settings.update(json.loads((folder / name).read_text()))
    prompts = dict(settings.get("prompts") or {})
    default = settings.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise ValueError(f"{folder / 'config_sentence_transformers.json'}: default_prompt_name={default!r} is not "
                         f"one of its prompts ({', '.join(prompts) or 'none'})")
    return SentenceTransformersSettings(prompts, default, settings.get("max_seq_length"))

