"""The one table between Hugging Face weight names and our parameters, and streaming I/O over it.

Loading and exporting both read WEIGHTS, so the two directions cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator

import jax
import numpy as np

from qwen3_jax.config import Qwen3Config
from qwen3_jax.safetensors_file import CheckpointError, SafetensorsFile

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Present in some published checkpoints, never needed: skipped without complaint.
IGNORED = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class WeightRule:
    """One Hugging Face tensor (per layer when `hf_name` holds "{layer}") and where it lives here."""

    hf_name: str
    path: tuple[str, ...]
    layout: str                 # how the torch tensor maps onto ours: see to_ours / to_hf
    axes: tuple[str, ...]       # logical axis names of one layer's parameter, for sharding

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.hf_name


_ATTN, _MLP = "layers.{layer}.self_attn.", "layers.{layer}.mlp."
WEIGHTS = (
    WeightRule("embed_tokens.weight", ("embed",), "same", ("vocab", "embed")),
    WeightRule("layers.{layer}.input_layernorm.weight", ("layers", "input_norm"), "same", ("norm",)),
    WeightRule(_ATTN + "q_proj.weight", ("layers", "attn", "wq"), "heads_out", ("embed", "heads", "head_dim")),
    WeightRule(_ATTN + "k_proj.weight", ("layers", "attn", "wk"), "heads_out", ("embed", "kv_heads", "head_dim")),
    WeightRule(_ATTN + "v_proj.weight", ("layers", "attn", "wv"), "heads_out", ("embed", "kv_heads", "head_dim")),
    WeightRule(_ATTN + "o_proj.weight", ("layers", "attn", "wo"), "heads_in", ("heads", "head_dim", "embed")),
    WeightRule(_ATTN + "q_norm.weight", ("layers", "attn", "q_norm"), "same", ("head_dim",)),
    WeightRule(_ATTN + "k_norm.weight", ("layers", "attn", "k_norm"), "same", ("head_dim",)),
    WeightRule("layers.{layer}.post_attention_layernorm.weight", ("layers", "post_norm"), "same", ("norm",)),
    WeightRule(_MLP + "gate_proj.weight", ("layers", "mlp", "w_gate"), "linear", ("embed", "mlp")),
    WeightRule(_MLP + "up_proj.weight", ("layers", "mlp", "w_up"), "linear", ("embed", "mlp")),
    WeightRule(_MLP + "down_proj.weight", ("layers", "mlp", "w_down"), "linear", ("mlp", "embed")),
    WeightRule("norm.weight", ("final_norm",), "same", ("norm",)),
    WeightRule("lm_head.weight", ("lm_head",), "same", ("vocab", "embed")),
)
RULES_BY_PATH = {rule.path: rule for rule in WEIGHTS}
# Tensors stored without the "model." prefix in base / reranker checkpoints.
_UNPREFIXED = {"lm_head.weight"}


def to_ours(layout: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A view of torch tensor x in our layout `shape` (torch Linear weights are [out, in])."""
    if layout == "same":
        return x
    if layout == "linear":
        return x.T
    if layout == "heads_out":                      # [N*H, D] -> [D, N, H]
        d, n, h = shape
        return x.reshape(n, h, d).transpose(2, 0, 1)
    if layout == "heads_in":                       # [D, N*H] -> [N, H, D]
        n, h, d = shape
        return x.reshape(d, n, h).transpose(1, 2, 0)
    raise ValueError(f"unknown layout {layout!r}")


def to_hf(layout: str, y: np.ndarray) -> np.ndarray:
    """Inverse of to_ours: our parameter back to the published torch layout."""
    if layout == "same":
        return y
    if layout == "linear":
        return y.T
    if layout == "heads_out":
        d, n, h = y.shape
        return y.transpose(1, 2, 0).reshape(n * h, d)
    if layout == "heads_in":
        n, h, d = y.shape
        return y.transpose(2, 0, 1).reshape(d, n * h)
    raise ValueError(f"unknown layout {layout!r}")


def hf_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the published tensor must have for our parameter `shape` (one layer)."""
    return to_hf(layout, np.broadcast_to(np.zeros((), np.int8), shape)).shape


def hf_layer_shape(rule: WeightRule, shape: tuple[int, ...], vocab_size: int) -> tuple[int, ...]:
    """The published shape of one tensor for our parameter `shape` (stacked, vocab-padded) ."""
    one = shape[1:] if rule.per_layer else shape
    if rule.axes[0] == "vocab":
        one = (vocab_size,) + one[1:]
    return hf_shape(rule.layout, one)


def hf_key(rule: WeightRule, layer: int | None = None) -> str:
    return rule.hf_name.format(layer=layer) if rule.per_layer else rule.hf_name


class CheckpointFolder:
    """The safetensors files of a Hugging Face checkpoint folder, sharded or not, keys normalised."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder} is not a folder: pass a checkpoint folder or a hub id")
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
            shard_names = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE_FILE).is_file():
            shard_names = [SINGLE_FILE]
        elif any(self.folder.glob("*.safetensors")):
            shard_names = sorted(p.name for p in self.folder.glob("*.safetensors"))
        elif any(self.folder.glob("pytorch_model*.bin")):
            raise CheckpointError(
                f"{self.folder} holds only pytorch_model.bin; pickle files are never loaded here. Convert it "
                "once with transformers: AutoModel.from_pretrained(path).save_pretrained(out, "
                "safe_serialization=True)")
        else:
            raise FileNotFoundError(f"{self.folder} holds no model.safetensors or {INDEX_FILE}")
        self.files = [SafetensorsFile(self._inside(name)) for name in shard_names]
        self.location: dict[str, tuple[SafetensorsFile, str]] = {}
        for file in self.files:
            for stored in file.entries:
                key = stored[len("model."):] if stored.startswith("model.") else stored
                if key in self.location:
                    raise CheckpointError(f"{self.folder}: tensor {key!r} is stored twice")
                self.location[key] = (file, stored)

    def _inside(self, name: str) -> Path:
        """A shard path that must stay inside the folder (no absolute paths, '..' or escaping links)."""
        root = self.folder.resolve()
        path = (self.folder / name).resolve()
        if Path(name).is_absolute() or not path.is_relative_to(root):
            raise CheckpointError(f"{self.folder / INDEX_FILE}: shard {name!r} lies outside the model folder")
        if not path.is_file():
            raise FileNotFoundError(f"{self.folder}: shard {name!r} named in {INDEX_FILE} is missing")
        return path

    @property
    def prefixed(self) -> bool:
        """Whether the checkpoint stores its backbone keys under "model." (base and reranker layout)."""
        return any(stored.startswith("model.") for _, stored in self.location.values())

    def array(self, key: str) -> np.ndarray:
        file, stored = self.location[key]
        return file.array(stored)

    def shape(self, key: str) -> tuple[int, ...]:
        file, stored = self.location[key]
        return file.shape(stored)


def check_keys(ckpt: CheckpointFolder, shapes: dict[tuple[str, ...], tuple[int, ...]], cfg: Qwen3Config) -> None:
    """Raises one error naming every missing, unexpected and mis-shaped tensor."""
    expected: dict[str, tuple[int, ...]] = {}
    for path, shape in shapes.items():
        rule = RULES_BY_PATH[path]
        layers = range(cfg.num_hidden_layers) if rule.per_layer else [None]
        for layer in layers:
            expected[hf_key(rule, layer)] = hf_layer_shape(rule, shape, cfg.vocab_size)
    known_unused = {"lm_head.weight"} | {key for key in ckpt.location if key.endswith(IGNORED)}
    missing = sorted(set(expected) - set(ckpt.location))
    unexpected = sorted(set(ckpt.location) - set(expected) - known_unused)
    wrong = [f"{key} {ckpt.shape(key)} (config.json implies {shape})"
             for key, shape in expected.items() if key in ckpt.location and ckpt.shape(key) != shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected)}")
    if wrong:
        problems.append(f"wrong shape {len(wrong)}: {'; '.join(wrong)}")
    if problems:
        raise CheckpointError(f"{ckpt.folder} does not match its config.json: " + " | ".join(problems))


def load_arrays(ckpt: CheckpointFolder, abstract: dict[tuple[str, ...], jax.ShapeDtypeStruct],
                shardings: Callable[[tuple[str, ...]], jax.sharding.Sharding], cfg: Qwen3Config, *,
                strict: bool = False) -> Iterator[tuple[tuple[str, ...], jax.Array]]:
    """Streams each parameter from disk straight into its dtype and sharding.

    Each device's shard is cut from one published tensor (one layer's, for stacked parameters) read
    on its own, so a host holds its parameters plus about one published tensor at a time, never the
    whole checkpoint. Non-finite weights warn (error if strict).
    """
    check_keys(ckpt, {path: spec.shape for path, spec in abstract.items()}, cfg)
    for path, spec in abstract.items():
        rule, sharding = RULES_BY_PATH[path], shardings(path)
        # A replicated shard is read once and dropped after its last device took it.
        wanted = Counter(_index_key(index) for index in
                         sharding.addressable_devices_indices_map(spec.shape).values())
        shards: dict[tuple, np.ndarray] = {}

        def read(index: tuple[slice, ...], rule=rule, spec=spec, wanted=wanted, shards=shards) -> np.ndarray:
            key = _index_key(index)
            if key not in shards:
                shards[key] = _read_shard(ckpt, rule, spec, index, strict)
            wanted[key] -= 1
            return shards.pop(key) if wanted[key] <= 0 else shards[key]

        yield path, jax.make_array_from_callback(spec.shape, sharding, read)


def _index_key(index: tuple[slice, ...]) -> tuple:
    return tuple((s.start, s.stop) for s in index)


def _read_shard(ckpt: CheckpointFolder, rule: WeightRule, spec, index: tuple[slice, ...],
                strict: bool) -> np.ndarray:
    # ckpt.array is a copy of one tensor whose file is mapped only while it is read, so host memory
    # stays near one tensor beyond the shard.
    if rule.per_layer:
        keys = [hf_key(rule, layer) for layer in range(spec.shape[0])[index[0]]]
        for i, key in enumerate(keys):
            layer = to_ours(rule.layout, ckpt.array(key), spec.shape[1:])[index[1:]]
            if i == 0:
                shard = np.empty((len(keys),) + layer.shape, spec.dtype)
            shard[i] = layer
    else:
        shard = np.array(to_ours(rule.layout, ckpt.array(rule.hf_name), spec.shape)[index], dtype=spec.dtype)
    wanted = tuple(len(range(n)[s]) for s, n in zip(index, spec.shape))
    if shard.shape != wanted:  # rows of a padded vocabulary beyond the checkpoint's: zeros
        shard = np.pad(shard, [(0, w - n) for w, n in zip(wanted, shard.shape)])
    if not np.isfinite(shard).all():
        message = f"{ckpt.folder}: weight {rule.hf_name} holds NaN or Inf values"
        if strict:
            raise CheckpointError(message)
        warnings.warn(message, stacklevel=4)
    return shard


def iter_hf_tensors(arrays: Iterable[tuple[tuple[str, ...], np.ndarray]], cfg: Qwen3Config,
                    prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
    """Our parameters (path, array) back as (published name, torch-layout array), one tensor at a time."""
    for path, array in arrays:
        rule = RULES_BY_PATH[path]
        name_prefix = "" if rule.hf_name in _UNPREFIXED else prefix
        if rule.axes[0] == "vocab":
            array = array[: cfg.vocab_size]
        if rule.per_layer:
            for layer in range(cfg.num_hidden_layers):
                yield name_prefix + hf_key(rule, layer), np.ascontiguousarray(to_hf(rule.layout, array[layer]))
        else:
            yield name_prefix + rule.hf_name, np.ascontiguousarray(to_hf(rule.layout, array))
