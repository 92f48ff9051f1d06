"""Fine-tuning Qwen3-Embedding and Qwen3-Reranker in JAX: losses, LoRA, the jitted step."""

from qwen3_jax.train.batch import ContrastiveExample, contrastive_batch, pointwise_batch
from qwen3_jax.train.losses import infonce, matryoshka, reranker_loss
from qwen3_jax.train.lora import LoRAConfig, add_lora, load_peft_adapter, merge_lora, save_peft_adapter
from qwen3_jax.train.step import Objective, OptimizerConfig, TrainState, TrainStep

__all__ = ["ContrastiveExample", "LoRAConfig", "Objective", "OptimizerConfig", "TrainState", "TrainStep",
           "add_lora", "contrastive_batch", "infonce", "load_peft_adapter", "matryoshka", "merge_lora",
           "pointwise_batch", "reranker_loss", "save_peft_adapter"]
