"""bfloat16 on CPUs: `dtype="auto"` follows the CPU's features, and `bench profile` puts a layer's time
in the stages of the model's named scopes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax import Qwen3Embedder
from qwen3_jax.backend import _say_once, cpu_flags, resolve_dtype
from qwen3_jax.bench.profile import stage_of, stages_of_program
from qwen3_jax.cli import main
from qwen3_jax.model import LAYER_STAGES


@pytest.fixture(autouse=True)
def said_afresh():
    _say_once.cache_clear()
    yield
    _say_once.cache_clear()


def test_auto_picks_bfloat16_where_its_products_are_fast_and_says_so_once(capsys):
    assert resolve_dtype("auto", "cpu", frozenset({"avx2", "avx512_bf16"})) == "bfloat16"
    assert resolve_dtype("auto", "cpu", frozenset({"avx2", "amx_bf16", "amx_tile"})) == "bfloat16"
    assert resolve_dtype("auto", "cpu", frozenset({"avx2", "avx512f"})) == "float32"
    assert resolve_dtype("auto", "gpu", frozenset()) == "bfloat16" and resolve_dtype("auto", "tpu") == "bfloat16"
    assert resolve_dtype("float32", "gpu") == "float32" and resolve_dtype("bfloat16", "cpu", frozenset()) == "bfloat16"
    resolve_dtype("auto", "cpu", frozenset({"avx512_bf16"}))          # the same choice again: said once
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["qwen3-jax: dtype auto: bfloat16, this CPU multiplies it fast (avx512_bf16); --dtype float32 "
                     "gives results equal to transformers' float32",
                     "qwen3-jax: dtype auto: bfloat16, this CPU multiplies it fast (amx_bf16); --dtype float32 "
                     "gives results equal to transformers' float32",
                     "qwen3-jax: dtype auto: float32, this CPU has no fast bfloat16 products (AMX or AVX-512 BF16)",
                     "qwen3-jax: dtype auto: bfloat16, on gpu; --dtype float32 gives results equal to transformers' "
                     "float32",
                     "qwen3-jax: dtype auto: bfloat16, on tpu; --dtype float32 gives results equal to transformers' "
                     "float32"]


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512_bf16 avx512f\n\n"
                       "processor\t: 1\nflags\t\t: fpu avx2 avx512_bf16 avx512f\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16", "avx512f"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_auto_from_python_and_the_command_line(checkpoint, tmp_path, capsys):
    chosen = resolve_dtype("auto")
    _say_once.cache_clear()
    capsys.readouterr()
    text = ["Where does Ada live?"]
    assert main(["embed", "--model", str(checkpoint), "--text", *text, "--dtype", "auto", "--output",
                 str(tmp_path / "auto.npy")]) == 0
    assert Qwen3Embedder.from_pretrained(checkpoint, dtype="auto").model.dtype == jnp.dtype(chosen)
    assert main(["embed", "--model", str(checkpoint), "--text", *text, "--dtype", chosen, "--output",
                 str(tmp_path / "chosen.npy")]) == 0
    assert np.array_equal(np.load(tmp_path / "auto.npy"), np.load(tmp_path / "chosen.npy"))
    assert capsys.readouterr().err.count("dtype auto") == 1


def test_an_operation_is_put_in_the_stage_of_its_named_scope():
    assert stage_of("jit(f)/mlp/gate_up/BTD,DF->BTF/dot_general") == "mlp/gate_up"
    assert stage_of("jit(f)/while/body/attention/kernel/cond/branch_2_fun/exp") == "attention/kernel"
    assert stage_of("jit(f)/input_norm/rsqrt") == "input_norm" and stage_of("jit(f)/copy") == "other"

    def layer_like(x, w):
        with jax.named_scope("mlp"):
            with jax.named_scope("gate_up"):
                gate = jnp.einsum("TD,DF->TF", x, w)
            with jax.named_scope("activation"):
                return jax.nn.silu(gate) * jnp.tanh(gate)

    hlo = jax.jit(layer_like).lower(jnp.ones((64, 32)), jnp.ones((32, 48))).compile().as_text()
    stages = set(stages_of_program(hlo).values())
    assert "mlp/gate_up" in stages and stages <= {"mlp/gate_up", "mlp/activation", "other"}


def test_bench_profile_times_every_stage_of_a_layer(tmp_path, capsys):
    figures = tmp_path / "profile.json"
    assert main(["bench", "profile", "--random", "tiny", "--tokens", "20-60", "--texts", "8", "--repeats", "2",
                 "--json", str(figures)]) == 0
    result = json.loads(figures.read_text())
    assert set(result["stages"]) == {*LAYER_STAGES, "other"}
    for stage in ("attention/qkv", "attention/kernel", "attention/out", "mlp/gate_up", "mlp/down"):
        assert result["stages"][stage]["ms"] > 0, stage
    assert result["stages"]["mlp/down"]["gflops"] > 0
    assert abs(sum(s["share"] for s in result["stages"].values()) - 1) < 1e-6
    assert "mlp/gate_up" in capsys.readouterr().out
