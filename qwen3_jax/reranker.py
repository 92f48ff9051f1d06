"""Qwen3Reranker: relevance of a document to a query, read off the LM's "yes" / "no" logits, over the
reranking engine (qwen3_jax/engine/reranking.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from jax.sharding import Mesh

from qwen3_jax.checks import UsageError, check_texts
from qwen3_jax.compile_cache import use_default_compilation_cache
from qwen3_jax.engine.running import OnEngine
from qwen3_jax.engine.reranking import DEFAULT_MAX_LENGTH, RerankingEngine, best_first
from qwen3_jax.hub import resolve_model
from qwen3_jax.loader import load_model
from qwen3_jax.model import Qwen3Model
from qwen3_jax.runner import LastTokenRunner
from qwen3_jax.tokenization import TextTokenizer


class Qwen3Reranker(OnEngine):
    """Scores (query, document) pairs with a Qwen3-Reranker checkpoint: P("yes") in [0, 1]."""

    def __init__(self, model: Qwen3Model, tokenizer: TextTokenizer, *, max_length: int = DEFAULT_MAX_LENGTH,
                 mesh: Mesh | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.engine = RerankingEngine(model, tokenizer, LastTokenRunner(model, pad_id=tokenizer.end_of_text_id,
                                                                        mesh=mesh), max_length=max_length)
        self.prompts = self.engine.prompts
        self.max_length, self.yes_id, self.no_id = self.prompts.max_length, self.prompts.yes_id, self.prompts.no_id
        self.prefix_ids, self.suffix_ids = self.prompts.prefix_ids, self.prompts.suffix_ids

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, dtype: str = "float32", param_dtype: str | None = None,
                        attention: str = "auto", mesh: Mesh | None = None, fsdp: bool = False,
                        revision: str | None = None, cache_dir: str | None = None, strict: bool = False,
                        **kwargs) -> "Qwen3Reranker":
        """Loads a local reranker folder or a hub id ("Qwen/Qwen3-Reranker-0.6B"); tied or separate LM head.
        The arguments and the compilation cache are as for Qwen3Embedder.from_pretrained."""
        use_default_compilation_cache()
        folder = resolve_model(name_or_path, revision=revision, cache_dir=cache_dir)
        model = load_model(folder, dtype=dtype, param_dtype=param_dtype, attention=attention, mesh=mesh,
                           fsdp=fsdp, with_lm_head=True, strict=strict)
        return cls(model, TextTokenizer.from_folder(folder), mesh=mesh, **kwargs)

    def prompt_ids(self, pairs: Sequence[tuple[str, str]], instruction: str | None = None) -> list[list[int]]:
        """Token ids of each prompt (see RerankingEngine.rows)."""
        return self.engine.rows(pairs, instruction=instruction)

    def score_pairs(self, pairs: Sequence[tuple[str, str]], *, instruction: str | None = None,
                    batch_size: int = 16, show_progress_bar: bool = False) -> np.ndarray:
        """P("yes") for each (query, document) pair, float32 [n]."""
        pairs = list(pairs)
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise TypeError(f"pairs[{i}] must be a (query, document) pair of strings")
        rows = self.engine.rows(pairs, instruction=instruction)
        return self.engine.scores(self.engine.run(rows, batch_size=batch_size, progress=show_progress_bar))

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
        return [{"index": i, "score": float(scores[i]), "document": documents[i]} for i in best_first(scores)[:top_k]]
