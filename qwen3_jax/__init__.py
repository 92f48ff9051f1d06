"""qwen3-jax: Qwen3-Embedding and Qwen3-Reranker in JAX / Flax NNX.

The names below are imported on first use (PEP 562's module `__getattr__`), so `import qwen3_jax` and the
command line start without loading JAX: `qwen3-jax --version` answers at once, and a command's first line
comes before JAX is imported.
"""

from qwen3_jax.lazy import lazy_names

# Each public name and the module that holds it.
_HOMES = {"Qwen3Config": "qwen3_jax.config", "Qwen3Embedder": "qwen3_jax.embedder", "Qwen3Model": "qwen3_jax.model",
          "Qwen3Reranker": "qwen3_jax.reranker", "enable_compilation_cache": "qwen3_jax.compile_cache",
          "load_model": "qwen3_jax.loader", "make_mesh": "qwen3_jax.sharding"}

__all__ = sorted(_HOMES)
__version__ = "0.1.0"
__getattr__, __dir__ = lazy_names(__name__, _HOMES)
