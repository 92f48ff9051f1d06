"""The accelerator programs, lowered here for CUDA and TPU (`jax.export` runs Pallas' Triton and Mosaic
lowering, its block-shape checks, sharding propagation and the custom calls without a device): the
embedder's forward pass on packed rows in bf16 and float32 (and continuing a shared prefix), the
reranker's scoring, the training step (loss and gradients, full and LoRA, with remat) and the data x
model sharded programs; each lowered text must hold its kernel's custom call, never a silent fallback."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import NamedSharding, PartitionSpec

from qwen3_jax.attention import attention
from qwen3_jax.backend import KERNEL_PLATFORMS, Backend, resolve_implementation
from qwen3_jax.config import Qwen3Config
from qwen3_jax.init_random import write_random_checkpoint
from qwen3_jax.loader import load_model
from qwen3_jax.runner import LastTokenRunner
from qwen3_jax.sharding import make_mesh
from qwen3_jax.train import LoRAConfig, Objective, OptimizerConfig, TrainStep, add_lora
from qwen3_jax.train.batch import ContrastiveExample, contrastive_batch

# What each kernel leaves in the lowered module (its custom call's target).
KERNEL_CALLS = {"pallas": "__gpu$xla.gpu.triton", "splash": "tpu_custom_call"}
PLATFORMS = {"pallas": "cuda", "splash": "tpu"}


def lowered(function, *args, platform: str) -> str:
    """The StableHLO text of `function(*args)` lowered for `platform`, custom calls allowed."""
    unchecked = [export.DisabledSafetyCheck.custom_call(target) for target in KERNEL_CALLS.values()]
    exported = export.export(jax.jit(function, keep_unused=True), platforms=[platform], disabled_checks=unchecked)(*args)
    return exported.mlir_module()


def custom_calls(text: str) -> set[str]:
    return set(re.findall(r"stablehlo\.custom_call @([\w$.]+)", text)) | set(re.findall(r'call_target_name = "([^"]+)"', text))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 2-layer checkpoint of the real head layout (16 query heads, 8 kv heads of 128) at a small width."""
    cfg = Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
                      max_position_embeddings=4096)
    return write_random_checkpoint(tmp_path_factory.mktemp("lowering"), cfg, reranker=True, dtype="float32",
                                   overwrite=True)


def _packed_batch(rows: int = 2, length: int = 256, slots: int = 8):
    """ids, segments and last-token positions of rows packed with texts of mixed lengths."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 500, (rows, length), dtype=np.int32)
    cuts = np.sort(rng.choice(np.arange(8, length - 8), slots - 1, replace=False))
    segments = np.zeros((rows, length), np.int32)
    ends = np.zeros((rows, slots), np.int32)
    for r in range(rows):
        bounds = [0, *cuts, length - 5]                       # the row's end is padding
        for s, (start, stop) in enumerate(zip(bounds, bounds[1:])):
            segments[r, start:stop] = s + 1
            ends[r, s] = stop - 1
    return ids, segments, ends


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("impl", ["pallas", "splash"])
def test_the_embedders_forward_pass_on_packed_rows_lowers_with_its_kernel(folder, impl, dtype):
    model = load_model(folder, dtype=dtype, attention=impl, with_lm_head=True, platform=KERNEL_PLATFORMS[impl])
    runner = LastTokenRunner(model, pad_id=0)
    text = lowered(runner._forward, runner._state, *_packed_batch(), platform=PLATFORMS[impl])
    assert KERNEL_CALLS[impl] in custom_calls(text), custom_calls(text)


@pytest.mark.parametrize("impl", ["pallas", "splash"])
def test_texts_continuing_a_shared_prefix_lower_with_their_kernel(folder, impl):
    """The pass whose texts attend to a prefix table (its kernel's log-sum-exp merged with the table's)
    and the pass computing a prefix's keys and values, each with the kernel's custom call."""
    model = load_model(folder, dtype="bfloat16", attention=impl, with_lm_head=True, platform=KERNEL_PLATFORMS[impl])
    runner = LastTokenRunner(model, pad_id=0)
    ids, segments, ends = _packed_batch()
    table = runner._table_shapes(*ids.shape, 64)
    text = lowered(runner._forward_shared, runner._state, ids, segments, ends, table, platform=PLATFORMS[impl])
    assert KERNEL_CALLS[impl] in custom_calls(text), custom_calls(text)
    text = lowered(runner._keys_values, runner._state, ids, segments, platform=PLATFORMS[impl])
    assert KERNEL_CALLS[impl] in custom_calls(text), custom_calls(text)


def test_a_kernel_that_takes_one_text_a_row_is_refused_where_texts_are_packed(folder):
    """cuDNN's fused kernel sees one right-padded text a row (its lowering needs a GPU's cuDNN): the
    runner gives it one text a row, and training, which packs, refuses it instead of letting texts
    attend to each other."""
    model = load_model(folder, dtype="bfloat16", attention="cudnn", platform="gpu")
    assert not LastTokenRunner(model, pad_id=0).pack
    with pytest.raises(ValueError, match="--attention"):
        TrainStep(model, objective=Objective(temperature=0.05), optimizer=OptimizerConfig())


@pytest.mark.parametrize("impl", ["pallas", "splash"])
@pytest.mark.parametrize("setting", ["full", "full, remat", "LoRA", "LoRA, remat"])
def test_the_training_step_lowers_with_its_kernel_forward_and_backward(folder, impl, setting):
    model = load_model(folder, dtype="bfloat16", param_dtype="float32", attention=impl, platform=KERNEL_PLATFORMS[impl])
    if "LoRA" in setting:
        add_lora(model, LoRAConfig(rank=4))
    step = TrainStep(model, objective=Objective(temperature=0.05), optimizer=OptimizerConfig(),
                     remat="full" if "remat" in setting else "off")
    rng = np.random.default_rng(0)
    texts = lambda: list(rng.integers(3, 500, int(rng.integers(8, 40))))
    examples = [ContrastiveExample(texts(), texts(), [texts()]) for _ in range(4)]
    batch = contrastive_batch(examples, negatives=1, pad_id=0)
    text = lowered(step.loss_and_grads, step.init().trainable, step.frozen, step.place(batch), jax.random.PRNGKey(0),
                   platform=PLATFORMS[impl])
    calls = custom_calls(text)
    assert KERNEL_CALLS[impl] in calls
    if impl == "pallas":                  # the forward and both backward kernels
        assert all(name in text for name in ("packed_flash_forward", "packed_flash_dq", "packed_flash_dkv"))


def test_the_reranker_scores_through_the_kernel(folder):
    model = load_model(folder, dtype="bfloat16", attention="pallas", with_lm_head=True, platform="gpu")
    runner = LastTokenRunner(model, pad_id=0)
    text = lowered(runner._forward, runner._state, *_packed_batch(slots=4), platform="cuda")
    assert KERNEL_CALLS["pallas"] in custom_calls(text)


@pytest.mark.parametrize("impl", ["pallas", "splash"])
def test_attention_sharded_over_data_and_model_runs_the_kernel_per_shard(impl):
    """On a data=4 x model=2 mesh, the kernel runs inside a shard_map on each device's own rows and
    heads (q [2, 256, 8, 128] of [8, 256, 16, 128]): nothing is gathered for it, and Mosaic, which
    cannot be partitioned automatically, lowers at all."""
    mesh = make_mesh(4, 2)
    rows = NamedSharding(mesh, PartitionSpec("data", None, "model", None))
    q = jax.ShapeDtypeStruct((8, 256, 16, 128), jnp.bfloat16, sharding=rows)
    kv = jax.ShapeDtypeStruct((8, 256, 8, 128), jnp.bfloat16, sharding=rows)
    segments = jax.ShapeDtypeStruct((8, 256), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec("data", None)))

    def run(q, k, v, segments):
        return attention(q, k, v, segments, backend=Backend.resolve(impl, platform=KERNEL_PLATFORMS[impl]))

    with jax.set_mesh(mesh):
        text = lowered(run, q, kv, kv, segments, platform=PLATFORMS[impl])
    assert KERNEL_CALLS[impl] in custom_calls(text)
    assert "manual_computation" in text
    local = text[text.index("manual_computation"):]
    assert "tensor<2x256x8x128xbf16>" in local and "tensor<2x256x4x128xbf16>" in local


def test_auto_is_chosen_once_from_the_platform_alone(folder):
    """"auto" names a kernel by platform, the same inside a trace as outside it (no trial compile whose
    failure under tracing would be cached for the process), and a model holds the resolved name."""
    assert [resolve_implementation("auto", platform) for platform in ("gpu", "tpu", "cpu")] == \
        ["pallas", "splash", "blockwise"]
    traced = []
    jax.jit(lambda x: traced.append(resolve_implementation("auto", "gpu")) or x)(jnp.ones(2, jnp.bfloat16))
    assert traced == ["pallas"]
    assert load_model(folder).backend.attention == "blockwise"


def test_doctor_checks_each_kernel_here_and_names_attention_when_the_chosen_one_fails(monkeypatch):
    from qwen3_jax import doctor

    monkeypatch.setitem(doctor.KERNELS, "cpu", ("blockwise", "pallas"))
    lines = []
    assert doctor.doctor(out=lines.append) == 0
    report = "\n".join(lines)
    assert "auto picks: blockwise (in every dtype)" in report
    assert report.count(": ok: max difference from dense") == 4 and "compile cache" in report

    def broken(impl, dtype):
        if impl == "blockwise" and dtype == "bfloat16":
            raise RuntimeError("the kernel does not compile")
        return 0.0, 0.1

    monkeypatch.setattr(doctor, "check_kernel", broken)
    lines.clear()
    assert doctor.doctor(out=lines.append) == 1
    failed = [line for line in lines if "FAILED" in line]
    assert len(failed) == 1 and "--attention" in failed[0] and "does not compile" in failed[0]


def test_a_kernel_that_fails_on_this_device_is_an_error_naming_attention(checkpoint):
    """The GPU kernel asked for on the CPU (not interpreted) cannot be built: encode says which
    kernel failed and to choose another with --attention, instead of swapping kernels silently."""
    from qwen3_jax import Qwen3Embedder

    embedder = Qwen3Embedder.from_pretrained(checkpoint, attention="pallas")
    with pytest.raises(RuntimeError, match="the pallas attention kernel failed on this cpu device.*--attention"):
        embedder.encode(["What is the capital of China?"])
