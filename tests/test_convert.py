"""Conversion both ways, the verify command, and bounded, atomic outputs."""

import json

import jax
import numpy as np
import pytest

import qwen3_jax.convert
from qwen3_jax import Qwen3Embedder, load_model, make_mesh
from qwen3_jax.cli import main
from qwen3_jax.convert import convert, export_hf
from qwen3_jax.safetensors_file import SafetensorsFile
from tests.conftest import CORPUS


def _stored(folder) -> dict[str, np.ndarray]:
    """Every tensor of a folder under the name it is stored with ("model." prefix and all)."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        file = SafetensorsFile(path)
        tensors.update({name: file.array(name) for name in file.entries})
    return tensors


def _assert_bit_exact(a_folder, b_folder):
    a, b = _stored(a_folder), _stored(b_folder)
    assert sorted(a) == sorted(b)
    for key, x in a.items():
        y = b[key]
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), key


def test_hf_to_orbax_to_hf_is_bit_exact_and_sharded(checkpoint_bf16, tmp_path):
    orbax, back = tmp_path / "orbax", tmp_path / "hf"
    assert main(["convert", str(checkpoint_bf16), str(orbax), "--to", "orbax"]) == 0
    assert main(["convert", str(orbax), str(back), "--to", "hf", "--max-shard-size", "40KB"]) == 0
    _assert_bit_exact(checkpoint_bf16, back)
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
    for name in ["tokenizer.json", "modules.json", "1_Pooling/config.json", "config_sentence_transformers.json"]:
        assert (back / name).is_file(), name


@pytest.mark.parametrize("script", ["hf_to_orbax.py", "orbax_to_hf.py"])
def test_the_convert_scripts_refuse_another_direction(checkpoint_bf16, tmp_path, script):
    """Each script's direction is its name: a --to of the user's is an error, never silently overridden."""
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "convert" / script
    for flag in (["--to", "hf"], ["--to=orbax"]):
        run = subprocess.run([sys.executable, str(path), str(checkpoint_bf16), str(tmp_path / "out"), *flag],
                             capture_output=True, text=True)
        assert run.returncode == 2 and "drop --to" in run.stderr and run.stderr.count("\n") == 1, run.stderr
    assert not (tmp_path / "out").exists()


def test_exported_folder_loads_in_transformers_and_sentence_transformers(checkpoint, tmp_path,
                                                                        sentence_transformer):
    from sentence_transformers import SentenceTransformer

    model = load_model(checkpoint)
    export_hf(model, tmp_path / "export", source=checkpoint)
    _assert_bit_exact(checkpoint, tmp_path / "export")
    exported = SentenceTransformer(str(tmp_path / "export"), device="cpu")
    ref = sentence_transformer.encode(CORPUS, prompt_name="query")
    assert np.array_equal(exported.encode(CORPUS, prompt_name="query"), ref)


def test_reranker_round_trip_keeps_prefix_and_head(reranker_checkpoint, tmp_path):
    convert(reranker_checkpoint, tmp_path / "o", to="orbax")
    convert(tmp_path / "o", tmp_path / "hf", to="hf")
    _assert_bit_exact(reranker_checkpoint, tmp_path / "hf")


def test_orbax_restores_straight_into_mesh_shardings(checkpoint, tmp_path, embedder, vocab_size):
    model_axis = next(m for m in (2, 4, 8) if vocab_size % m)      # a vocabulary the axis does not divide
    mesh = make_mesh(data=8 // model_axis, model=model_axis, devices=jax.devices()[:8])
    convert(checkpoint, tmp_path / "o", to="orbax", mesh=mesh)
    sharded = Qwen3Embedder.from_pretrained(tmp_path / "o", mesh=mesh)
    assert sharded.model.embed[...].shape[0] > vocab_size                 # padded rows
    wq = sharded.model.layers.attn.wq[...]
    assert wq.addressable_shards[0].data.shape[2] == wq.shape[2] // model_axis
    assert np.abs(sharded.encode(CORPUS) - embedder.encode(CORPUS)).max() <= 1e-5
    convert(tmp_path / "o", tmp_path / "hf", to="hf", mesh=mesh)          # the padding does not travel
    _assert_bit_exact(checkpoint, tmp_path / "hf")


def test_convert_dtype_rounds_to_bf16_once(checkpoint, tmp_path, sentence_transformer):
    import ml_dtypes
    from sentence_transformers import SentenceTransformer

    assert main(["convert", str(checkpoint), str(tmp_path / "bf16"), "--to", "hf", "--dtype", "bfloat16"]) == 0
    original, converted = _stored(checkpoint), _stored(tmp_path / "bf16")
    for key, x in original.items():
        assert converted[key].dtype == ml_dtypes.bfloat16, key
        assert np.array_equal(converted[key].view(np.uint16), x.astype(ml_dtypes.bfloat16).view(np.uint16)), key
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    exported = SentenceTransformer(str(tmp_path / "bf16"), device="cpu").encode(CORPUS)
    reference = sentence_transformer.encode(CORPUS)
    assert ((exported * reference).sum(-1) >= 0.99).all()


def test_export_of_changed_parameters_loads_as_the_changed_model(checkpoint, tmp_path):
    """What fine-tuning relies on: parameters changed in JAX come out where transformers reads them."""
    from sentence_transformers import SentenceTransformer

    model = load_model(checkpoint)
    rng = np.random.default_rng(0)
    for module, name in [(model.layers.attn, "wq"), (model.layers.attn, "wo"), (model.layers.mlp, "w_down"),
                         (model.layers, "post_norm"), (model, "embed")]:
        param = getattr(module, name)
        param[...] = param[...] + 0.05 * rng.standard_normal(param[...].shape).astype(np.float32)
    export_hf(model, tmp_path / "tuned", source=checkpoint)
    changed = Qwen3Embedder(model, Qwen3Embedder.from_pretrained(checkpoint).tokenizer, max_length=1024)
    exported = SentenceTransformer(str(tmp_path / "tuned"), device="cpu").encode(CORPUS)
    ours = changed.encode(CORPUS)
    assert np.abs(ours - exported).max() <= 1e-4
    assert np.abs(ours - Qwen3Embedder.from_pretrained(checkpoint).encode(CORPUS)).max() > 1e-2


def test_existing_destination_is_refused_unless_overwrite(checkpoint, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(["convert", str(checkpoint), str(tmp_path / "out"), "--to", "orbax"]) == 2    # refused before work
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(checkpoint), str(tmp_path / "out"), "--to", "hf", "--overwrite"]) == 0
    _assert_bit_exact(checkpoint, tmp_path / "out")


def test_interrupted_conversion_leaves_nothing_that_looks_complete(checkpoint, tmp_path, monkeypatch):
    calls = []

    def failing(path, tensors, metadata=None):
        calls.append(path)
        raise OSError("disk full")

    monkeypatch.setattr(qwen3_jax.convert, "write_safetensors", failing)
    with pytest.raises(OSError, match="disk full"):
        convert(checkpoint, tmp_path / "out", to="hf")
    assert calls and list(tmp_path.iterdir()) == []


def test_verify_passes_on_a_faithful_model(checkpoint, capsys):
    assert main(["verify", "--model", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "What is the capital of China?" in out and "final" in out
    assert main(["verify", "--model", str(checkpoint), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "ours: bfloat16" in out and "PASS: min cosine >= 0.99" in out


def test_verify_checks_a_reranker_by_its_scores_in_the_official_prompt(reranker_checkpoint, capsys, monkeypatch):
    import qwen3_jax.model

    assert main(["verify", "--model", str(reranker_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "P(yes) of 10 pairs in the official prompt" in out and "final" in out
    assert "PASS: P(yes) max |diff| <= 0.0001" in out
    monkeypatch.setattr(qwen3_jax.model, "apply_rotary", lambda x, sin, cos: x)
    assert main(["verify", "--model", str(reranker_checkpoint)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_verify_fails_when_our_model_is_wrong(checkpoint, capsys, monkeypatch):
    import qwen3_jax.model

    monkeypatch.setattr(qwen3_jax.model, "apply_rotary", lambda x, sin, cos: x)
    assert main(["verify", "--model", str(checkpoint)]) == 1
    assert "FAIL" in capsys.readouterr().out
