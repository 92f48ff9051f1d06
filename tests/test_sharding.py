"""The same embeddings on a device mesh: 8 simulated CPU devices, several layouts, two processes."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import qwen3_jax.weights
from qwen3_jax import Qwen3Embedder, make_mesh
from qwen3_jax.config import preset
from qwen3_jax.loader import abstract_model, parameter_shardings
from qwen3_jax.sharding import batch_sharding
from tests.conftest import CORPUS, long_text

TEXTS = ["", long_text(120), *CORPUS]


def _mesh(data, model, fsdp=False):
    return make_mesh(data=data, model=model, devices=jax.devices()[: data * model])


@pytest.fixture(scope="module")
def single_device(embedder):
    return embedder.encode(TEXTS, batch_size=4)


LAYOUTS = {"data=8": (8, 1, False), "data=4,model=2": (4, 2, False), "model=2": (1, 2, False),
           "fsdp data=4,model=2": (4, 2, True), "data=2,model=4": (2, 4, False)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mesh_layouts_match_one_device(checkpoint, single_device, layout):
    assert len(jax.devices()) >= 8, "conftest asks XLA for 8 CPU devices"
    data, model, fsdp = LAYOUTS[layout]
    embedder = Qwen3Embedder.from_pretrained(checkpoint, mesh=_mesh(data, model), fsdp=fsdp)
    assert np.abs(embedder.encode(TEXTS, batch_size=4) - single_device).max() <= 1e-5


def test_data_parallel_attention_stays_on_each_device(checkpoint):
    """Under the mesh, the CPU's row-by-row attention loops over each device's own rows: a purely
    data-parallel forward pass then exchanges nothing between devices."""
    mesh = _mesh(8, 1)
    runner = Qwen3Embedder.from_pretrained(checkpoint, mesh=mesh).runner
    rows = jax.ShapeDtypeStruct((16, 64), np.int32, sharding=batch_sharding(mesh))
    ends = jax.ShapeDtypeStruct((16, 4), np.int32, sharding=batch_sharding(mesh))
    with jax.set_mesh(mesh):
        program = runner._forward.lower(runner._state, rows, rows, ends).compile().as_text()
    assert "all-gather" not in program and "all-to-all" not in program


def _shard_shape(param):
    return param[...].addressable_shards[0].data.shape


def test_parameters_are_really_split(checkpoint):
    tp = Qwen3Embedder.from_pretrained(checkpoint, mesh=_mesh(4, 2)).model
    layers, d, n, h = tp.layers.attn.wq[...].shape
    assert _shard_shape(tp.layers.attn.wq) == (layers, d, n // 2, h)
    assert _shard_shape(tp.layers.attn.wk) == (layers, d, 1, h)          # 2 kv heads over model=2
    assert _shard_shape(tp.layers.mlp.w_down)[1] == tp.config.intermediate_size // 2
    assert tp.embed[...].shape[0] % 2 == 0 and _shard_shape(tp.embed)[0] == tp.embed[...].shape[0] // 2
    wide = Qwen3Embedder.from_pretrained(checkpoint, mesh=_mesh(2, 4)).model
    assert _shard_shape(wide.layers.attn.wq)[2] == 1                     # 4 query heads over model=4
    assert _shard_shape(wide.layers.attn.wk)[2] == 2                     # 2 kv heads: replicated
    fsdp = Qwen3Embedder.from_pretrained(checkpoint, mesh=_mesh(4, 2), fsdp=True).model
    assert _shard_shape(fsdp.layers.mlp.w_gate) == (layers, d // 4, tp.config.intermediate_size // 2)


def test_loading_reads_only_each_devices_shard(checkpoint, monkeypatch):
    reads = []
    original = qwen3_jax.weights._read_shard

    def recording(ckpt, rule, spec, index, strict):
        shard = original(ckpt, rule, spec, index, strict)
        reads.append((rule.path, spec.shape, shard.shape))
        return shard

    monkeypatch.setattr(qwen3_jax.weights, "_read_shard", recording)
    Qwen3Embedder.from_pretrained(checkpoint, mesh=_mesh(4, 2))
    wq = [(full, part) for path, full, part in reads if path == ("layers", "attn", "wq")]
    assert len(wq) == 2 and all(part[2] == full[2] // 2 for full, part in wq)   # two halves, read once each


def test_a_mesh_that_cannot_split_the_heads_is_refused_by_name(checkpoint):
    """4 query heads over model=3: an error naming the parameter (kv heads alone may stay whole)."""
    with pytest.raises(ValueError, match=r"layers\.attn\.w[qo]: its 4 heads do not split evenly over the mesh's model "
                                         r"axis of 3 devices"):
        Qwen3Embedder.from_pretrained(checkpoint, mesh=_mesh(1, 3))


def test_8b_shape_splits_evenly_without_memory():
    """The 8B shape's 30 GB of float32 parameters are planned abstractly: no leaf holds memory."""
    import resource

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = preset("8B")
    mesh = make_mesh(data=1, model=8, devices=jax.devices()[:8])
    model = abstract_model(cfg, param_dtype=np.dtype("float32"), dtype=np.dtype("float32"), attention="auto",
                           with_lm_head=False, mesh=mesh)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 2**20     # under 1 GiB (KiB units)
    sharding = parameter_shardings(model, mesh)
    split_total = per_device = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = var.get_value().shape
        spec = sharding(path).spec
        if "model" in spec:
            split_total += int(np.prod(shape))
            per_device += int(np.prod(sharding(path).shard_shape(shape)))
        else:
            assert int(np.prod(shape)) <= cfg.hidden_size * 36, f"{path} should be split"
    assert per_device * 8 == split_total
    assert split_total > 0.99 * cfg.num_parameters


def test_two_processes_on_loopback_give_the_single_process_result(checkpoint, tmp_path, single_device, one_device_env,
                                                                  free_port):
    texts = [t for t in TEXTS if "\n" not in t and t]          # one a line; a blank line is no text to embed
    (tmp_path / "in.txt").write_text("\n".join(texts))
    procs = [subprocess.Popen(
        [sys.executable, "-m", "qwen3_jax.cli", "embed", "--model", str(checkpoint), "--input",
         str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.npy"), "--mesh", "data=2",
         "--batch-size", "4", "--coordinator", f"127.0.0.1:{free_port}", "--num-processes", "2",
         "--process-id", str(rank)], env=one_device_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    expected = single_device[[TEXTS.index(t) for t in texts]]
    assert np.abs(np.load(tmp_path / "out.npy") - expected).max() <= 1e-5
