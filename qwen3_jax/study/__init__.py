"""Studying the architecture: TransformerLens' hooks and caches, interventions, lenses and pictures (each
name imported on first use: see qwen3_jax/lazy.py)."""

from qwen3_jax.lazy import lazy_names

_HOMES = {**dict.fromkeys(["HookPoint", "hook_names"], "qwen3_jax.study.forward"),
          **dict.fromkeys(["ActivationCache", "HookedQwen3", "Tokens", "act_name"], "qwen3_jax.study.hooked"),
          **dict.fromkeys(["ablate_heads", "ablate_neurons", "patching_sweep", "steer"],
                          "qwen3_jax.study.interventions"),
          **dict.fromkeys(["layer_cosines", "layer_embeddings", "layer_scores", "logit_lens", "yes_no_margins"],
                          "qwen3_jax.study.lenses")}

__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_names(__name__, _HOMES)
