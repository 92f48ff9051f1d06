"""Optional stacks: what each extra of `pip install "qwen3-jax[EXTRA]"` installs, checked where it is needed.

The base install embeds, reranks, trains and converts. Comparing against PyTorch (`verify`, `bench`,
`mteb_encoder`), serving over HTTP and reading Parquet need more; without it a feature stops at once
with the one command that installs it, never with a bare "No module named ...".
"""

from __future__ import annotations

import importlib

EXTRAS = {
    "reference": ("torch", "transformers", "sentence_transformers"),    # the PyTorch side of verify and bench
    "mteb": ("mteb",),
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
    "parquet": ("pyarrow",),
    "ann": ("faiss",),
    "ray": ("ray",),
    "study": ("matplotlib", "treescope"),      # the study toolkit's pictures and notebook views
    "tensorboard": ("tensorboardX",),          # train --tensorboard DIR
}


def require(extra: str, feature: str) -> None:
    """Imports the modules of `extra`, or raises ImportError saying that `feature` needs them and how to
    install them."""
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            raise ImportError(f"{feature} needs {module}, which is not installed: pip install "
                              f"\"qwen3-jax[{extra}]\"") from None
