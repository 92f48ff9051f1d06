"""Loads one checkpoint in transformers and in qwen3-jax and compares them side by side.

    python convert/verify.py --model Qwen/Qwen3-Embedding-0.6B [--dtype float32|bfloat16]

Prints each layer's max difference, the embeddings' max difference and cosine, and the model card's
2x2 similarity table from both; exits 1 beyond the tolerances. Same as `qwen3-jax verify`.
"""

import sys

from qwen3_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["verify", *sys.argv[1:]]))
