"""Conversion both ways, the verify command, and bounded, atomic outputs."""

import json

import jax
import numpy as np
import pytest

import qwen3_jax.convert
from qwen3_jax import Qwen3Embedder, load_model, make_mesh
from qwen3_jax.cli import main
from qwen3_jax.convert import convert, export_hf
from qwen3_jax.weights import CheckpointFolder
from tests.conftest import CORPUS


def _assert_bit_exact(a_folder, b_folder):
    a, b = CheckpointFolder(a_folder), CheckpointFolder(b_folder)
    assert set(a.location) == set(b.location)
    for key in a.location:
        x, y = a.array(key), b.array(key)
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


def test_orbax_restores_straight_into_mesh_shardings(checkpoint, tmp_path, embedder):
    mesh = make_mesh(data=4, model=2, devices=jax.devices()[:8])
    convert(checkpoint, tmp_path / "o", to="orbax", mesh=mesh)
    sharded = Qwen3Embedder.from_pretrained(tmp_path / "o", mesh=mesh)
    wq = sharded.model.layers.attn.wq[...]
    assert wq.addressable_shards[0].data.shape[2] == wq.shape[2] // 2
    assert np.abs(sharded.encode(CORPUS) - embedder.encode(CORPUS)).max() <= 1e-5


def test_existing_destination_is_refused_unless_overwrite(checkpoint, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(["convert", str(checkpoint), str(tmp_path / "out"), "--to", "orbax"]) == 1
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


def test_verify_fails_when_our_model_is_wrong(checkpoint, capsys, monkeypatch):
    import qwen3_jax.model

    monkeypatch.setattr(qwen3_jax.model, "apply_rotary", lambda x, sin, cos: x)
    assert main(["verify", "--model", str(checkpoint)]) == 1
    assert "FAIL" in capsys.readouterr().out
