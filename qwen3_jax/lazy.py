"""Public names imported on first use (PEP 562's module `__getattr__`), so importing a package, and the
command line that does, loads none of JAX until a name that needs it is asked for."""

from __future__ import annotations

import importlib
import sys


def lazy_names(package: str, homes: dict[str, str]):
    """The `__getattr__` and `__dir__` of the package named `package` whose public names live in the
    modules `homes` gives ({name: module}); a name is imported the first time it is asked for, then kept."""
    def __getattr__(name: str):
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(homes[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *homes})

    return __getattr__, __dir__
