"""JAX's persistent compilation cache, on by default: a second run of the same command compiles nothing.

Compiled programs are kept in a folder (default `~/.cache/qwen3-jax/xla`, under `$XDG_CACHE_HOME` when
set). `--compile-cache DIR` or the environment variable QWEN3_JAX_COMPILE_CACHE moves it; either set to
`off` disables it. A folder already given to JAX itself (JAX_COMPILATION_CACHE_DIR, or
`jax.config.update("jax_compilation_cache_dir", ...)`) is left as it is.

JAX is not imported here: before it is imported (a command starting), the settings go into the environment
variables JAX reads when it is, so the command line can print its first line without waiting for JAX.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENVIRONMENT = "QWEN3_JAX_COMPILE_CACHE"
OFF = ("off", "none", "0", "false")
_chosen = False          # set once enable_compilation_cache has been called in this process


def _set(name: str, value) -> None:
    """One of JAX's settings (`name`, e.g. jax_compilation_cache_dir) to `value`: through jax.config once
    JAX is imported, else through the environment variable JAX reads at its import (JAX_COMPILATION_CACHE_DIR)."""
    if "jax" in sys.modules:
        sys.modules["jax"].config.update(name, value)
    else:
        os.environ[name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)


def _get(name: str):
    """One of JAX's settings as JAX has it, or will have it once imported (see `_set`)."""
    if "jax" in sys.modules:
        return getattr(sys.modules["jax"].config, name)
    value = os.environ.get(name.upper())
    if name == "jax_enable_compilation_cache":        # a boolean, on by default
        return value is None or value.strip().lower() in ("1", "true", "yes", "on", "t", "y")
    return value


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
        _set("jax_enable_compilation_cache", False)
        return None
    folder = Path(path).expanduser() if path else default_folder()
    folder.mkdir(parents=True, exist_ok=True)
    _set("jax_enable_compilation_cache", True)
    _set("jax_compilation_cache_dir", str(folder))
    _set("jax_persistent_cache_min_compile_time_secs", 0.0)
    _set("jax_persistent_cache_min_entry_size_bytes", 0)
    return str(folder)


def use_default_compilation_cache() -> str | None:
    """The cache of `enable_compilation_cache()` unless a folder was already chosen (by JAX's own
    settings, or an earlier call): what `from_pretrained` and the command line start with."""
    if _chosen or _get("jax_compilation_cache_dir"):
        enabled = _get("jax_enable_compilation_cache") and _get("jax_compilation_cache_dir")
        return _get("jax_compilation_cache_dir") if enabled else None
    return enable_compilation_cache()
