"""qwen3-jax: Qwen3-Embedding and Qwen3-Reranker in JAX / Flax NNX."""

from qwen3_jax.config import Qwen3Config
from qwen3_jax.embedder import Qwen3Embedder
from qwen3_jax.loader import load_model
from qwen3_jax.model import Qwen3Model
from qwen3_jax.compile_cache import enable_compilation_cache
from qwen3_jax.reranker import Qwen3Reranker
from qwen3_jax.sharding import make_mesh

__all__ = ["Qwen3Config", "Qwen3Embedder", "Qwen3Model", "Qwen3Reranker", "enable_compilation_cache", "load_model", "make_mesh"]
__version__ = "0.1.0"
