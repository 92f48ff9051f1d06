"""Model hyper-parameters, read from a checkpoint's own config.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

# Sanity ceilings: a config beyond these is rejected before anything is allocated.
_LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "num_hidden_layers": 1 << 10,
    "num_attention_heads": 1 << 10,
    "num_key_value_heads": 1 << 10,
    "head_dim": 1 << 11,
    "max_position_embeddings": 1 << 24,
}


class ConfigError(ValueError):
    """A config.json that cannot describe a Qwen3 model."""


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """The Qwen3 decoder's shape and constants; every size comes from config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    checkpoint_dtype: str = "bfloat16"

    def __post_init__(self):
        for name, ceiling in _LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= ceiling:
                raise ConfigError(f"config.json: {name}={value!r} is outside 1..{ceiling}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"config.json: head_dim={self.head_dim} must be even for rotary embeddings")
        if not (self.rope_theta > 0 and self.rms_norm_eps > 0):
            raise ConfigError("config.json: rope_theta and rms_norm_eps must be positive")

    @property
    def num_parameters(self) -> int:
        """Parameter count of the backbone (embedding, layers, final norm)."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        n, k = self.num_attention_heads, self.num_key_value_heads
        per_layer = d * h * (2 * n + 2 * k) + 3 * d * f + 2 * d + 2 * h
        return self.vocab_size * d + self.num_hidden_layers * per_layer + d

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Qwen3Config":
        """Builds a config from either config.json dialect (transformers 4.51 or 5)."""
        rope = raw.get("rope_parameters") or {}
        rope_theta = raw.get("rope_theta", rope.get("rope_theta"))
        required = [
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "rms_norm_eps", "max_position_embeddings",
        ]
        missing = [name for name in required if name not in raw]
        if rope_theta is None:
            missing.append("rope_theta (top level or under rope_parameters)")
        if missing:
            raise ConfigError(f"config.json lacks required field(s): {', '.join(missing)}")
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default" or raw.get("rope_scaling"):
            raise ConfigError(f"config.json: rope scaling {rope_type!r} is not supported; only plain RoPE")
        heads = raw["num_attention_heads"]
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rope_theta=float(rope_theta),
            rms_norm_eps=float(raw["rms_norm_eps"]),
            max_position_embeddings=raw["max_position_embeddings"],
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            checkpoint_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        )

    @classmethod
    def from_hf(cls, path: str | Path) -> "Qwen3Config":
        """Reads `config.json` from a checkpoint folder (or the file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: pass a folder holding a Qwen3 config.json")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{file} is not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{file} must hold a JSON object")
        return cls.from_dict(raw)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json that the published checkpoints carry (transformers 4.51 dialect)."""
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.checkpoint_dtype,
            "use_sliding_window": False,
        }


# Published shapes, for benchmarks on random weights (`--random 0.6B`); real checkpoints use config.json.
PRESETS = {
    "0.6B": dict(vocab_size=151669, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    "4B": dict(vocab_size=151665, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    "8B": dict(vocab_size=151665, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128),
}


def preset(name: str, **overrides: Any) -> Qwen3Config:
    """A published model shape (see PRESETS) with optional overrides such as num_hidden_layers."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    fields = dict(PRESETS[name], rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768)
    fields.update(overrides)
    return Qwen3Config(**fields)
