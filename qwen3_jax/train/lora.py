"""LoRA: low-rank adapters as parameters beside the frozen base weights, in peft's format.

An adapter on a projection W adds `scale * B(A(dropout(x)))` to `W x`, scale = alpha / rank, as peft
computes it. Its matrices are `LoRAParam`s, a subclass of `nnx.Param`: the training step tells them
from the frozen weights by type, so LoRA is a parameter filter, not a second model class. Which
projections can carry one, and their peft names, come from the weight table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3_jax.arguments import setting
from qwen3_jax.backend import Backend
from qwen3_jax.checks import UsageError, whole_number
from qwen3_jax.model import Qwen3Model
from qwen3_jax.ops.projection import ADAPTER_SUFFIX, input_gradient, materialised, project, weight_gradient
from qwen3_jax.safetensors_file import CheckpointError, SafetensorsFile, write_safetensors
from qwen3_jax.weights import WEIGHTS, WeightRule, hf_key

# peft's name of each projection ("q_proj", ..., "down_proj") -> its rule in the weight table.
PROJECTIONS = {rule.hf_name.split(".")[-2]: rule for rule in WEIGHTS
               if rule.layout in ("heads_out", "heads_in", "linear")}
# How many leading axes of a projection's weight are its input (the rest are its output).
_INPUT_AXES = {"heads_out": 1, "heads_in": 2, "linear": 1}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoRAParam(nnx.Param):
    """An adapter matrix: the only parameters a LoRA run trains."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank, alpha, dropout and target projections (peft names, or "all-linear" = all seven, given as a
    tuple or as one comma-separated string); each field declared once as its `qwen3-jax train` flag
    (`setting`, under the prefix lora_: --lora-rank, ...)."""

    rank: int = setting(8, exclusive="lora", help="LoRA rank (default 8)")
    alpha: float = setting(32.0, help="LoRA scale numerator (alpha / rank)")
    dropout: float = setting(0.0, help="dropout on the LoRA branch")
    targets: tuple[str, ...] = setting(
        "all-linear", help="all-linear or some of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(self.targets.split(",")))
        if self.targets in (("all-linear",), ("all",)):
            object.__setattr__(self, "targets", tuple(PROJECTIONS))
        unknown = [t for t in self.targets if t not in PROJECTIONS]
        if unknown or not self.targets:
            raise UsageError(f"LoRA targets {', '.join(unknown) or '(none)'} do not exist; choose among "
                             f"{', '.join(PROJECTIONS)} or all-linear")
        whole_number(self.rank, "LoRA rank")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"LoRA dropout={self.dropout} must be in [0, 1)")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def spelled_targets(self) -> str:
        """The targets as the flag spells them: "all-linear" for all seven, else comma-separated."""
        return "all-linear" if self.targets == tuple(PROJECTIONS) else ",".join(self.targets)


class LoRA(nnx.Module):
    """One adapter: a [input..., rank] and b [rank, output...] in the layout of the projection it serves."""

    def __init__(self, a: jax.Array, b: jax.Array, *, scale: float, dropout: float):
        self.a = LoRAParam(a)
        self.b = LoRAParam(b)
        self.scale = scale
        self.dropout = dropout

    def __call__(self, spec: str, x: jax.Array, weight: jax.Array, backend: Backend,
                 rng: jax.Array | None) -> jax.Array:
        """`einsum(spec, x, W)` plus the adapter's addition, the same contraction through rank R. In float32
        without dropout the adapter folds into the weight (see _adapted); otherwise it is added apart, so
        that in bf16 an update smaller than the weight's rounding step still moves the output."""
        dropout = rng is not None and self.dropout > 0
        if x.dtype == jnp.float32 and not dropout:
            return _adapted(spec, self.scale, backend, x, weight, self.a[...], self.b[...])
        source = x
        if dropout:
            keep = jax.random.bernoulli(rng, 1.0 - self.dropout, x.shape)
            source = jnp.where(keep, x / (1.0 - self.dropout), 0.0).astype(x.dtype)
        low = project(_low_spec(spec), source, self.a[...], backend)
        return project(spec, x, weight, backend) + (
            self.scale * project(_up_spec(spec), low, self.b[...], backend)).astype(x.dtype)


def _letters(spec: str) -> tuple[str, str, str, str, str]:
    """x's letters, the contracted ones, the ones the weight produces, the ones x keeps; and the output."""
    inputs, output = spec.split("->")
    x_letters, w_letters = inputs.split(",")
    contracted = "".join(c for c in w_letters if c in x_letters)
    produced = "".join(c for c in w_letters if c not in x_letters)
    kept = "".join(c for c in x_letters if c not in contracted)
    return x_letters, contracted, produced, kept, output


def _low_spec(spec: str) -> str:
    """x [.., input...] , A [input..., R] -> [.., R]."""
    x_letters, contracted, _, kept, _ = _letters(spec)
    return f"{x_letters},{contracted}R->{kept}R"


def _up_spec(spec: str) -> str:
    """[.., R], B [R, output...] -> the projection's output."""
    _, _, produced, kept, output = _letters(spec)
    return f"{kept}R,R{produced}->{output}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _adapted(spec: str, scale: float, backend: Backend, x: jax.Array, weight: jax.Array, a: jax.Array,
             b: jax.Array) -> jax.Array:
    """x (W + scale A B): without dropout the adapter folds into the weight, so the forward pass and the
    input's gradient are one product each, as without an adapter; the adapter's own gradients are the
    thin products through rank R (see _adapted_bwd). Against adding x A B separately, this saves five
    passes over [tokens, width] arrays per projection. float32 only (see LoRA.__call__)."""
    return project(spec, x, _merged(scale, weight, a, b), backend)


def _merged(scale: float, weight: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """W + scale A B in float32, stored in W's dtype: one layer's adapter folded into its weight."""
    return (weight.astype(jnp.float32) + scale * jnp.tensordot(a, b, axes=1)).astype(weight.dtype)


def _adapted_fwd(spec, scale, backend, x, weight, a, b):
    merged = _merged(scale, weight, a, b)
    return project(spec, x, merged, backend), (x, merged, a, b)


def _adapted_bwd(spec, scale, backend, saved, d_out):
    x, merged, a, b = saved
    d_out = materialised(d_out, backend)
    through_b = input_gradient(_up_spec(spec), d_out, b, x.dtype, backend)        # dy B^T
    low = project(_low_spec(spec), x, a, backend)                                 # x A
    d_a = scale * weight_gradient(_low_spec(spec), x, through_b, jnp.float32, backend)
    d_b = scale * weight_gradient(_up_spec(spec), low, d_out, jnp.float32, backend)
    return (input_gradient(spec, d_out, merged, x.dtype, backend),
            weight_gradient(spec, x, d_out, merged.dtype, backend),
            d_a.astype(a.dtype), d_b.astype(b.dtype))


_adapted.defvjp(_adapted_fwd, _adapted_bwd)


def _owner(model: Qwen3Model, rule: WeightRule):
    """The (stacked) module holding a projection and the projection's attribute name."""
    module = model
    for name in rule.path[:-1]:
        module = getattr(module, name)
    return module, rule.path[-1]


def add_lora(model: Qwen3Model, config: LoRAConfig, *, seed: int = 0) -> Qwen3Model:
    """Attaches adapters to the target projections of every layer, initialised as peft does: A uniform
    in +-1/sqrt(fan_in), B zero (so the model starts unchanged). Returns the same model."""
    key = jax.random.PRNGKey(seed)
    for index, name in enumerate(config.targets):
        module, attribute = _owner(model, PROJECTIONS[name])
        weight = getattr(module, attribute)[...]
        inputs = _INPUT_AXES[PROJECTIONS[name].layout]
        layers, in_shape, out_shape = weight.shape[0], weight.shape[1:1 + inputs], weight.shape[1 + inputs:]
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(jax.random.fold_in(key, index), (layers, *in_shape, config.rank), jnp.float32,
                               -bound, bound)
        b = jnp.zeros((layers, config.rank, *out_shape), jnp.float32)
        setattr(module, attribute + ADAPTER_SUFFIX, LoRA(a, b, scale=config.scale, dropout=config.dropout))
    return model


def adapters(model: Qwen3Model) -> dict[str, LoRA]:
    """The attached adapters by peft projection name."""
    found = {}
    for name, rule in PROJECTIONS.items():
        module, attribute = _owner(model, rule)
        adapter = getattr(module, attribute + ADAPTER_SUFFIX, None)
        if adapter is not None:
            found[name] = adapter
    return found


def merge_lora(model: Qwen3Model) -> Qwen3Model:
    """Folds every adapter into its projection (W + scale * A B) and removes the adapters, so the model
    exports as a plain checkpoint. Returns the same model."""
    for name, adapter in adapters(model).items():
        module, attribute = _owner(model, PROJECTIONS[name])
        weight = getattr(module, attribute)
        weight[...] = jax.vmap(functools.partial(_merged, adapter.scale))(weight[...], adapter.a[...], adapter.b[...])
        delattr(module, attribute + ADAPTER_SUFFIX)
    return model


def _peft_key(rule: WeightRule, layer: int, matrix: str, key_prefix: str) -> str:
    """peft's stored name, e.g. base_model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    return f"base_model.model.{key_prefix}{hf_key(rule, layer).removesuffix('.weight')}.lora_{matrix}.weight"


def peft_tensors(model: Qwen3Model, key_prefix: str = "") -> dict[str, np.ndarray]:
    """The adapters under peft's names and layouts (lora_A [rank, in], lora_B [out, rank]), float32."""
    tensors = {}
    for name, adapter in adapters(model).items():
        rule = PROJECTIONS[name]
        a, b = np.asarray(adapter.a[...], np.float32), np.asarray(adapter.b[...], np.float32)
        rank = a.shape[-1]
        for layer in range(a.shape[0]):
            tensors[_peft_key(rule, layer, "A", key_prefix)] = np.ascontiguousarray(a[layer].reshape(-1, rank).T)
            tensors[_peft_key(rule, layer, "B", key_prefix)] = np.ascontiguousarray(b[layer].reshape(rank, -1).T)
    return tensors


def save_peft_adapter(model: Qwen3Model, folder: str | Path, *, config: LoRAConfig, base_model: str = "",
                      key_prefix: str = "", task_type: str | None = None) -> Path:
    """Writes the adapters as a peft folder (adapter_config.json, adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained(base, folder)` loads. `key_prefix` is "model." for a causal-LM
    (reranker) base. The folder must exist; the caller stages it so nothing half-written is left."""
    folder = Path(folder)
    write_safetensors(folder / ADAPTER_WEIGHTS, peft_tensors(model, key_prefix).items(), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps({
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": list(config.targets), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
    }, indent=2))
    return folder


def load_peft_adapter(model: Qwen3Model, folder: str | Path, *, dropout: float | None = None) -> LoRAConfig:
    """Attaches the adapters of a peft LoRA folder to `model` (continuing a run, or comparing with
    torch); returns their config. Only plain LoRA (no DoRA, rsLoRA or per-module ranks) is read."""
    folder = Path(folder)
    raw = json.loads((folder / ADAPTER_CONFIG).read_text())
    if raw.get("peft_type") != "LORA" or raw.get("use_dora") or raw.get("use_rslora") or raw.get("rank_pattern") \
            or raw.get("alpha_pattern"):
        raise CheckpointError(f"{folder}: only plain LoRA adapters are supported (no DoRA, rsLoRA or patterns)")
    targets = raw["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    config = LoRAConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]),
                        dropout=raw.get("lora_dropout", 0.0) if dropout is None else dropout,
                        targets=tuple(t for t in PROJECTIONS if t in targets or "all-linear" in targets))
    file = SafetensorsFile(folder / ADAPTER_WEIGHTS)
    prefix = "model." if any(".model.model." in name for name in file.entries) else ""
    for name in config.targets:
        rule = PROJECTIONS[name]
        module, attribute = _owner(model, rule)
        weight = getattr(module, attribute)[...]
        inputs = _INPUT_AXES[rule.layout]
        in_shape, out_shape = weight.shape[1:1 + inputs], weight.shape[1 + inputs:]
        try:
            a = np.stack([file.array(_peft_key(rule, layer, "A", prefix)).T.reshape(*in_shape, config.rank)
                          for layer in range(weight.shape[0])])
            b = np.stack([file.array(_peft_key(rule, layer, "B", prefix)).T.reshape(config.rank, *out_shape)
                          for layer in range(weight.shape[0])])
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{folder}: adapter for {name} is missing or mis-shaped ({err})") from None
        setattr(module, attribute + ADAPTER_SUFFIX, LoRA(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                                                         scale=config.scale, dropout=config.dropout))
    return config
