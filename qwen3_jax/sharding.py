"""Device meshes and the logical-axis rules that turn parameter axes into PartitionSpecs."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen3_jax.checks import UsageError

BATCH_AXIS = "data"   # rows of a batch split over it; the other axis splits the model
MODEL_AXIS = "model"
MESH_AXES = (BATCH_AXIS, MODEL_AXIS)
# Tensor parallelism: heads, MLP width and vocabulary split over "model".
TENSOR_PARALLEL = {"vocab": "model", "heads": "model", "kv_heads": "model", "mlp": "model"}
# FSDP additionally splits the model width of every matrix over "data".
FSDP = {**TENSOR_PARALLEL, "embed": "data"}
# Logical axes kept whole where the mesh axis does not divide them (see partition_spec).
REPLICATED_WHEN_UNEVEN = {"kv_heads"}


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A ("data", "model") mesh over all (or the given) devices; `data` defaults to the rest."""
    devices = list(devices if devices is not None else jax.devices())
    if data is None:
        data = len(devices) // model
    if data < 1 or model < 1 or data * model != len(devices):
        raise UsageError(f"mesh data={data} x model={model} needs {data * model} devices; "
                         f"{len(devices)} are available")
    return Mesh(np.array(devices).reshape(data, model), MESH_AXES)


def parse_mesh(spec: str) -> dict[str, int]:
    """"data=4,model=2" -> {"data": 4, "model": 2} (the CLI's --mesh)."""
    sizes = {}
    for part in filter(None, spec.split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in MESH_AXES or not value.strip().isdigit():
            raise UsageError(f"--mesh {spec!r}: expected e.g. data=4,model=2")
        sizes[name.strip()] = int(value)
    return sizes


def mesh_of(spec: str | None, devices=None) -> Mesh | None:
    """The mesh of a --mesh spec ("data=4,model=2") over all devices (or `devices`); None without a spec."""
    return make_mesh(**parse_mesh(spec), devices=devices) if spec else None


def partition_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
                   rules: dict[str, str], name: str = "a parameter") -> PartitionSpec:
    """Maps logical axes to mesh axes. Only kv heads may stay whole when the mesh axis does not divide
    them (fewer kv heads than tensor-parallel devices is common: they are replicated); any other axis
    the mesh cannot split evenly is an error that names the parameter, never a silent copy."""
    spec, used = [], set()
    for axis, size in zip(axes, shape):
        mesh_axis = rules.get(axis) if axis else None
        if not mesh_axis or mesh_axis in used or mesh.shape[mesh_axis] == 1:
            spec.append(None)
        elif size % mesh.shape[mesh_axis] == 0:
            spec.append(mesh_axis)
            used.add(mesh_axis)
        elif axis in REPLICATED_WHEN_UNEVEN:
            spec.append(None)
        else:
            raise UsageError(f"{name}: its {size} {axis} do not split evenly over the mesh's {mesh_axis} axis of "
                             f"{mesh.shape[mesh_axis]} devices; choose a {mesh_axis} size that divides {size}")
    return PartitionSpec(*spec)


def batch_sharding(mesh: Mesh | None) -> jax.sharding.Sharding:
    """Inputs and outputs: the batch split over "data", replicated over "model"."""
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def replicated(mesh: Mesh | None) -> jax.sharding.Sharding | None:
    """A whole copy on every device of `mesh` (None without a mesh: where jit puts it)."""
    return None if mesh is None else NamedSharding(mesh, PartitionSpec())


def shard_count(mesh: Mesh | None) -> int:
    """How many ways a batch is split; batches are padded to a multiple of it."""
    return 1 if mesh is None else mesh.shape[BATCH_AXIS]


def put_global(array: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array from host data that every process holds: each process sends only its shards."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def fetch_global(array: jax.Array) -> np.ndarray:
    """The whole array on every process's host (an all-gather when it spans several processes)."""
    if array.is_fully_addressable:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, cpu_collectives: str = "gloo") -> None:
    """Joins a multi-process JAX job. Without arguments JAX reads its environment (TPU pods, SLURM,
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID); CPU processes talk through gloo."""
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
