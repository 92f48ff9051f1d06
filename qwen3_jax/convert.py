"""Checkpoint conversion: Hugging Face safetensors <-> Orbax, through the one weight table.

Every output is written to a temporary folder beside the destination and renamed into place at the
end, so an interrupted conversion never leaves a folder that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qwen3_jax.checks import UsageError
from qwen3_jax.config import Qwen3Config
from qwen3_jax.loader import ORBAX_META, ORBAX_PARAMS, is_orbax_folder, load_model, load_orbax, parse_dtype
from qwen3_jax.model import Qwen3Model
from qwen3_jax.safetensors_file import write_safetensors
from qwen3_jax.textio import OutputTaken, plain_mode
from qwen3_jax.weights import INDEX_FILE, SINGLE_FILE, CheckpointFolder, iter_hf_tensors

# Files that travel with the weights: tokenizer, sentence-transformers modules, generation settings.
COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "generation_config.json", "modules.json",
                   "config_sentence_transformers.json", "sentence_bert_config.json")
COMPANION_DIRS = ("1_Pooling", "2_Normalize")
DEFAULT_SHARD_BYTES = 5 * 2**30


def parse_size(text: str | int) -> int:
    """"5GB" / "500MB" / "40KB" / 1234 -> bytes."""
    if isinstance(text, int):
        return text
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "B": 1}
    for unit, factor in units.items():
        if text.upper().endswith(unit) and text[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * factor)
    if text.isdigit():
        return int(text)
    raise UsageError(f"size {text!r}: expected e.g. 5GB, 500MB or a number of bytes")


@contextlib.contextmanager
def staged_folder(destination: str | Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder that becomes `destination` only if the block finishes."""
    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise OutputTaken(f"{destination} already exists; pass --overwrite to replace it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent))
    os.chmod(staging, plain_mode(destination, folder=True))
    try:
        yield staging
        if destination.exists():
            shutil.rmtree(destination)
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def copy_companions(source: Path, destination: Path) -> None:
    for name in COMPANION_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)
    for name in COMPANION_DIRS:
        if (source / name).is_dir():
            shutil.copytree(source / name, destination / name)


def export_config(cfg: Qwen3Config, source: str | Path | None, dtype_name: str) -> dict:
    """The source's own config.json (every field kept) with the stored dtype, else one built from cfg."""
    file = Path(source) / "config.json" if source is not None else None
    raw = json.loads(file.read_text()) if file is not None and file.is_file() else cfg.to_hf_dict()
    raw["dtype" if "dtype" in raw else "torch_dtype"] = dtype_name
    return raw


def _host_params(model: Qwen3Model) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Each parameter gathered to the host, one at a time."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        yield path, np.asarray(jax.device_get(var.get_value()))


def write_weight_files(folder: Path, tensors: Iterable[tuple[str, np.ndarray]], *,
                       max_shard_bytes: int | str = DEFAULT_SHARD_BYTES) -> np.dtype:
    """Writes (published name, array) tensors as safetensors files in `folder`: one model.safetensors,
    or above `max_shard_bytes` model-0000i-of-0000n.safetensors shards and model.safetensors.index.json.
    Each shard is written once full, so memory stays near one shard. Returns the last tensor's dtype."""
    limit = parse_size(max_shard_bytes)
    written: list[tuple[Path, list[str]]] = []
    pending: list[tuple[str, np.ndarray]] = []
    size, total, stored_dtype = 0, 0, None

    def flush() -> None:
        nonlocal total
        file = folder / f"shard-{len(written):05d}.partial"
        total += write_safetensors(file, pending, metadata={"format": "pt"})
        written.append((file, [name for name, _ in pending]))
        pending.clear()

    for name, tensor in tensors:
        stored_dtype = tensor.dtype
        if pending and size + tensor.nbytes > limit:
            flush()
            size = 0
        pending.append((name, tensor))
        size += tensor.nbytes
    flush()
    weight_map = {}
    for i, (file, names) in enumerate(written):
        final = SINGLE_FILE if len(written) == 1 else f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        file.rename(folder / final)
        weight_map.update({name: final for name in names})
    if len(written) > 1:
        (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2))
    return stored_dtype


def export_hf(model: Qwen3Model, destination: str | Path, *, source: str | Path | None = None,
              dtype: str | None = None, prefix: str = "", max_shard_bytes: int | str = DEFAULT_SHARD_BYTES,
              overwrite: bool = False) -> Path:
    """Writes `model` as a Hugging Face folder: published names, torch layouts, safetensors shards.

    Parameters are gathered to the host one at a time and each shard is written once full, so host
    memory stays near one shard. Above `max_shard_bytes` the weights are split into
    `model-0000i-of-0000n.safetensors` files with a `model.safetensors.index.json`. Tokenizer and
    sentence-transformers files are copied from `source`.
    """
    target = parse_dtype(dtype) if dtype else None
    tensors = iter_hf_tensors(_host_params(model), model.config, prefix=prefix)
    with staged_folder(destination, overwrite) as staging:
        stored_dtype = write_weight_files(staging, ((name, tensor if target is None else tensor.astype(target))
                                                    for name, tensor in tensors), max_shard_bytes=max_shard_bytes)
        (staging / "config.json").write_text(json.dumps(
            export_config(model.config, source, str(np.dtype(stored_dtype))), indent=2))
        if source is not None:
            copy_companions(Path(source), staging)
    return Path(destination)


def save_orbax(model: Qwen3Model, destination: str | Path, *, source: str | Path | None = None,
               prefix: str = "", overwrite: bool = False) -> Path:
    """Saves the parameters as an Orbax checkpoint with config.json and the companion files beside them."""
    import orbax.checkpoint as ocp

    with staged_folder(destination, overwrite) as staging:
        params = nnx.state(model, nnx.Param).to_pure_dict()
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save((staging / ORBAX_PARAMS).absolute(), params)
        checkpointer.wait_until_finished()
        (staging / "config.json").write_text(json.dumps(
            export_config(model.config, source, str(model.embed[...].dtype)), indent=2))
        (staging / ORBAX_META).write_text(json.dumps({
            "format": "qwen3-jax orbax", "key_prefix": prefix, "has_lm_head": hasattr(model, "lm_head"),
            "param_dtype": str(model.embed[...].dtype), "vocab_rows": int(model.embed[...].shape[0])}))
        if source is not None:
            copy_companions(Path(source), staging)
    return Path(destination)


def hf_key_prefix(folder: str | Path) -> str:
    """The key prefix a Hugging Face folder uses ("model." for base / reranker checkpoints)."""
    return "model." if CheckpointFolder(folder).prefixed else ""


def convert(source: str | Path, destination: str | Path, *, to: str, dtype: str | None = None,
            max_shard_bytes: int | str = DEFAULT_SHARD_BYTES, overwrite: bool = False,
            strict: bool = False, mesh: Mesh | None = None) -> Path:
    """One conversion step: an HF folder or Orbax folder `source` -> `to` ("orbax" or "hf")."""
    source = Path(source)
    if to not in ("orbax", "hf"):
        raise UsageError(f"--to {to!r}: choose orbax or hf")
    if Path(destination).exists() and not overwrite:
        raise OutputTaken(f"{destination} already exists; pass --overwrite to replace it")
    if is_orbax_folder(source):
        meta = json.loads((source / ORBAX_META).read_text())
        prefix = meta["key_prefix"]
        model = load_orbax(source, dtype=meta["param_dtype"], mesh=mesh, with_lm_head=True)
    else:
        cfg = Qwen3Config.from_hf(source)
        stored = dtype or cfg.checkpoint_dtype
        prefix = hf_key_prefix(source)
        model = load_model(source, dtype=stored, param_dtype=stored, mesh=mesh, with_lm_head=None, strict=strict)
    if to == "orbax":
        return save_orbax(model, destination, source=source, prefix=prefix, overwrite=overwrite)
    return export_hf(model, destination, source=source, dtype=dtype, prefix=prefix,
                     max_shard_bytes=max_shard_bytes, overwrite=overwrite)
