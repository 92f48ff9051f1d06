"""Studying the architecture: TransformerLens' hooks and caches, interventions, lenses and pictures."""

from qwen3_jax.study.forward import HookPoint, hook_names
from qwen3_jax.study.hooked import ActivationCache, HookedQwen3, Tokens, act_name
from qwen3_jax.study.interventions import ablate_heads, ablate_neurons, patching_sweep, steer
from qwen3_jax.study.lenses import layer_cosines, layer_embeddings, layer_scores, logit_lens, yes_no_margins

__all__ = ["ActivationCache", "HookPoint", "HookedQwen3", "Tokens", "ablate_heads", "ablate_neurons", "act_name",
           "hook_names", "layer_cosines", "layer_embeddings", "layer_scores", "logit_lens", "patching_sweep", "steer",
           "yes_no_margins"]
