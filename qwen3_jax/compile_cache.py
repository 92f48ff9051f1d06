"""JAX's persistent compilation cache, on by default: a second run of the same command compiles nothing.

Compiled programs are kept in a folder (default `~/.cache/qwen3-jax/xla`, under `$XDG_CACHE_HOME` when
set). `--compile-cache DIR` or the environment variable QWEN3_JAX_COMPILE_CACHE moves it; either set to
`off` disables it. A folder already given to JAX itself (JAX_COMPILATION_CACHE_DIR, or
`jax.config.update("jax_compilation_cache_dir", ...)`) is left as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENVIRONMENT = "QWEN3_JAX_COMPILE_CACHE"
OFF = ("off", "none", "0", "false")
_chosen = False          # set once enable_compilation_cache has been called in this process


def default_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwen3-jax" / "xla"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
    """Keeps compiled programs in `path` across processes (every program, however quick to compile);
    None: QWEN3_JAX_COMPILE_CACHE, else the default folder. "off" disables the cache. Returns the folder
    in use, or None when there is none."""
    global _chosen
    _chosen = True
    path = os.environ.get(ENVIRONMENT) if path is None else str(path)
    if path is not None and path.strip().lower() in OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    folder = Path(path).expanduser() if path else default_folder()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return str(folder)


def use_default_compilation_cache() -> str | None:
    """The cache of `enable_compilation_cache()` unless a folder was already chosen (by JAX's own
    settings, or an earlier call): what `from_pretrained` and the command line start with."""
    if _chosen or jax.config.jax_compilation_cache_dir:
        enabled = jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir
        return jax.config.jax_compilation_cache_dir if enabled else None
    return enable_compilation_cache()
