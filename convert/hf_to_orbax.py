"""Hugging Face safetensors folder (or hub id) -> Orbax checkpoint that restores into any mesh.

    python convert/hf_to_orbax.py Qwen/Qwen3-Embedding-0.6B ./qwen3-0.6b-orbax [--overwrite] [--strict]

Same as `qwen3-jax convert SOURCE DESTINATION --to orbax`.
"""

import sys

from qwen3_jax.cli import convert_to

if __name__ == "__main__":
    sys.exit(convert_to("orbax", sys.argv[1:], "hf_to_orbax.py"))
