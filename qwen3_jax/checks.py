"""Checks of what callers pass in, one helper for each kind of value, each failing with one line that
says what is wanted. The embedder, the reranker, training, corpus jobs, search and the server share them."""

from __future__ import annotations

from typing import Sequence

import numpy as np


class UsageError(ValueError):
    """A bad argument or setting, caught before any work: the command line exits 2 for it, as for its
    own parsing errors (1 is for failures while working)."""


# Qwen3-Embedding's Matryoshka range starts at 32 dimensions (the model card's "32..hidden").
MIN_DIM = 32


def whole_number(value, name: str, *, minimum: int = 1, unit: str = "") -> int:
    """`value` as an int when it is a whole number (not a bool) of at least `minimum`, else a UsageError
    naming it, e.g. "batch_size=0 must be a whole number of at least 1"."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UsageError(f"{name}={value!r} must be a whole number{unit} of at least {minimum}")
    return int(value)


def check_dim(dim, hidden_size: int, name: str = "dim=") -> int:
    """A Matryoshka (MRL) dimension in 32..hidden_size (None: the whole width)."""
    if dim is None:
        return hidden_size
    low = min(MIN_DIM, hidden_size)
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not low <= dim <= hidden_size:
        raise UsageError(f"{name}{dim!r} is outside {low}..{hidden_size} supported by this model")
    return int(dim)


def check_texts(texts) -> list[str]:
    """A list of strings (a 1-D numpy array of them too), or a clear error naming the first item that
    is not one."""
    if isinstance(texts, np.ndarray) and texts.ndim == 1:
        texts = texts.tolist()
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, not str")
    return list(texts)


def check_max_length(max_length, default: int | None = None) -> int:
    """A whole number of tokens of at least 2 (a text token and <|endoftext|>); None: `default`."""
    if max_length is None and default is not None:
        return default
    return whole_number(max_length, "max_length", minimum=2, unit=" of tokens")
