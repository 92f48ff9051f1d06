"""qwen3-jax: Qwen3-Embedding and Qwen3-Reranker in JAX / Flax NNX.

The names below are imported on first use (PEP 562's module `__getattr__`), so `import qwen3_jax` and the
command line start without loading JAX: `qwen3-jax --version` answers at once, and a command's first line
comes before JAX is imported.
"""

import importlib

# Each public name and the module that holds it.
_HOMES = {"Qwen3Config": "qwen3_jax.config", "Qwen3Embedder": "qwen3_jax.embedder", "Qwen3Model": "qwen3_jax.model",
          "Qwen3Reranker": "qwen3_jax.reranker", "enable_compilation_cache": "qwen3_jax.compile_cache",
          "load_model": "qwen3_jax.loader", "make_mesh": "qwen3_jax.sharding"}

__all__ = sorted(_HOMES)
__version__ = "0.1.0"


def __getattr__(name: str):
    """A public name (`name`), imported from its module the first time it is asked for."""
    if name not in _HOMES:
        raise AttributeError(f"module 'qwen3_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
