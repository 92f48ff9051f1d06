"""Orbax checkpoint (made by hf_to_orbax.py, or a fine-tuned one) -> Hugging Face folder.

    python convert/orbax_to_hf.py ./qwen3-0.6b-orbax ./qwen3-0.6b-hf [--max-shard-size 5GB] [--dtype bfloat16]

The folder has the published key names, dtypes and shapes, config and tokenizer files, and loads in
transformers, sentence-transformers and vLLM. Same as `qwen3-jax convert SOURCE DESTINATION --to hf`.
"""

import sys

from qwen3_jax.cli import convert_to

if __name__ == "__main__":
    sys.exit(convert_to("hf", sys.argv[1:], "orbax_to_hf.py"))
