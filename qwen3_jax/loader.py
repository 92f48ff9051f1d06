"""Building a Qwen3Model from a checkpoint folder (Hugging Face safetensors or our Orbax layout):
abstract parameters, then streamed weights. Writing checkpoints lives in convert.py, above this."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from qwen3_jax.backend import resolve_dtype
from qwen3_jax.checks import UsageError
from qwen3_jax.config import Qwen3Config
from qwen3_jax.model import Qwen3Model
from qwen3_jax.sharding import FSDP, TENSOR_PARALLEL, partition_spec
from qwen3_jax.weights import RULES_BY_PATH, CheckpointFolder, load_arrays

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# An Orbax checkpoint written by `qwen3-jax convert --to orbax`: this file and the parameters folder.
ORBAX_META = "qwen3_jax.json"
ORBAX_PARAMS = "params"


def parse_dtype(dtype) -> jnp.dtype:
    """"float32" | "bfloat16" | "float16" | "auto" (see backend.resolve_dtype), or a jnp dtype -> jnp.dtype,
    with a clear error otherwise."""
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype)
        if dtype not in DTYPES:
            raise UsageError(f"dtype={dtype!r} is not supported; choose one of {', '.join(DTYPES)}, auto")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


def abstract_model(cfg: Qwen3Config, *, param_dtype, dtype, attention: str, with_lm_head: bool,
                   mesh: Mesh | None = None, platform: str | None = None) -> Qwen3Model:
    """The model with shapes and dtypes only: no parameter memory is allocated."""
    vocab_multiple = mesh.shape["model"] if mesh is not None else 1
    return nnx.eval_shape(lambda: Qwen3Model(cfg, param_dtype=param_dtype, dtype=dtype, attention_impl=attention,
                                             platform=platform, with_lm_head=with_lm_head, vocab_multiple=vocab_multiple,
                                             rngs=nnx.Rngs(0)))


def parameter_shardings(model: Qwen3Model, mesh: Mesh | None, *, fsdp: bool = False):
    """A function from parameter path to its sharding, derived from the weight table's logical axes."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return lambda path: device
    shapes = {path: var.shape for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    rules = FSDP if fsdp else TENSOR_PARALLEL

    def sharding(path: tuple[str, ...]) -> NamedSharding:
        rule = RULES_BY_PATH[path]
        axes = (("layers",) if rule.per_layer else ()) + rule.axes
        return NamedSharding(mesh, partition_spec(axes, shapes[path], mesh, rules, name=".".join(path)))

    return sharding


def load_model(folder: str | Path, *, dtype="float32", param_dtype=None, attention: str = "auto",
               mesh: Mesh | None = None, fsdp: bool = False, with_lm_head: bool | None = False,
               strict: bool = False, platform: str | None = None) -> Qwen3Model:
    """Reads config.json and the safetensors weights of `folder` (or an Orbax checkpoint made by
    `qwen3-jax convert`) into a ready Qwen3Model.

    `dtype` is the compute dtype; parameters are stored in `param_dtype` (default: same as dtype).
    `with_lm_head`: True requires an output head (a reranker), None loads one if present, False skips it.
    `platform` builds the model's programs for another platform than JAX's backend (see `Backend`).
    """
    if is_orbax_folder(folder):
        return load_orbax(folder, dtype=dtype, attention=attention, mesh=mesh, fsdp=fsdp,
                          with_lm_head=with_lm_head is not False, platform=platform)
    cfg = Qwen3Config.from_hf(folder)
    compute = parse_dtype(dtype)
    stored = parse_dtype(param_dtype) if param_dtype is not None else compute
    ckpt = CheckpointFolder(folder)
    has_head = "lm_head.weight" in ckpt.location
    model = abstract_model(cfg, param_dtype=stored, dtype=compute, attention=attention,
                           with_lm_head=has_head and with_lm_head is not False, mesh=mesh, platform=platform)
    if with_lm_head and not cfg.tie_word_embeddings and not has_head:
        raise ValueError(f"{folder}: config.json says tie_word_embeddings=false but there is no "
                         "lm_head.weight; is this an embedding checkpoint rather than a reranker?")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat = list(nnx.to_flat_state(params))
    abstract = {path: var.get_value() for path, var in flat}
    loaded = dict(load_arrays(ckpt, abstract, parameter_shardings(model, mesh, fsdp=fsdp),
                              cfg, strict=strict))
    params = nnx.from_flat_state([(path, var.replace(loaded[path])) for path, var in flat])
    return nnx.merge(graphdef, params, rest)


def is_orbax_folder(folder: str | Path) -> bool:
    return (Path(folder) / ORBAX_META).is_file() and (Path(folder) / ORBAX_PARAMS).is_dir()


def load_orbax(folder: str | Path, *, dtype="float32", attention: str = "auto", mesh: Mesh | None = None,
               fsdp: bool = False, with_lm_head: bool = False, platform: str | None = None) -> Qwen3Model:
    """Restores an Orbax checkpoint straight into the shardings of `mesh` (or one device)."""
    import orbax.checkpoint as ocp

    folder = Path(folder)
    meta = json.loads((folder / ORBAX_META).read_text())
    cfg = Qwen3Config.from_hf(folder)
    model = abstract_model(cfg, param_dtype=parse_dtype(meta["param_dtype"]), dtype=parse_dtype(dtype),
                           attention=attention, with_lm_head=with_lm_head and meta["has_lm_head"], mesh=mesh,
                           platform=platform)
    if model.embed.shape[0] != meta["vocab_rows"]:
        raise ValueError(f"{folder}: saved with {meta['vocab_rows']} vocabulary rows, the mesh needs "
                         f"{model.embed.shape[0]}; restore with the mesh it was saved for, or re-convert")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    sharding = parameter_shardings(model, mesh, fsdp=fsdp)
    target = nnx.from_flat_state([
        (path, var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding(path))))
        for path, var in nnx.to_flat_state(params)]).to_pure_dict()
    restored = ocp.StandardCheckpointer().restore((folder / ORBAX_PARAMS).absolute(), target)
    nnx.replace_by_pure_dict(params, restored)
    return nnx.merge(graphdef, params, rest)
