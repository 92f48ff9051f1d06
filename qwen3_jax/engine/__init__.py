"""The engines under every entry point, with no HTTP in them (as TEI's core): texts or (query, document)
pairs to token rows, rows to last hidden states (at once, or through the server's scheduler), and those to
vectors or scores. `Qwen3Embedder`, `Qwen3Reranker`, the server's routes, training's evaluation and the
MTEB adapter call only these."""

from qwen3_jax.engine.embedding import EmbeddingEngine
from qwen3_jax.engine.reranking import RerankingEngine

__all__ = ["EmbeddingEngine", "RerankingEngine"]
