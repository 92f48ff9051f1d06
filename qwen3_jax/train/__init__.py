"""Fine-tuning Qwen3-Embedding and Qwen3-Reranker in JAX: losses, LoRA, the jitted step (each name imported
on first use: see qwen3_jax/lazy.py)."""

from qwen3_jax.lazy import lazy_names

_HOMES = {**dict.fromkeys(["ContrastiveExample", "contrastive_batch", "pointwise_batch"], "qwen3_jax.train.batch"),
          **dict.fromkeys(["infonce", "matryoshka", "reranker_loss"], "qwen3_jax.train.losses"),
          **dict.fromkeys(["LoRAConfig", "add_lora", "load_peft_adapter", "merge_lora", "save_peft_adapter"],
                          "qwen3_jax.train.lora"),
          **dict.fromkeys(["Objective", "OptimizerConfig", "TrainState", "TrainStep"], "qwen3_jax.train.step")}

__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_names(__name__, _HOMES)
