"""Loading published checkpoints: layouts, dtypes, sharded files, strict key checks."""

import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from qwen3_jax import load_model
from qwen3_jax.safetensors_file import CheckpointError, SafetensorsFile, write_safetensors
from qwen3_jax.weights import WEIGHTS, CheckpointFolder, to_hf, to_ours


def _hf_tensors(folder):
    ckpt = CheckpointFolder(folder)
    return {key: np.array(ckpt.array(key)) for key in ckpt.location}


def test_table_layouts_invert():
    rng = np.random.default_rng(0)
    for layout, ours in [("same", (5, 3)), ("linear", (5, 3)), ("heads_out", (6, 2, 4)), ("heads_in", (2, 4, 6))]:
        y = rng.normal(size=ours)
        x = to_hf(layout, y)
        np.testing.assert_array_equal(to_ours(layout, x, ours), y)


def test_bf16_sharded_checkpoint_loads_bit_exactly(checkpoint_bf16):
    assert (checkpoint_bf16 / "model.safetensors.index.json").is_file()
    assert len(list(checkpoint_bf16.glob("*.safetensors"))) > 1
    model = load_model(checkpoint_bf16, dtype="bfloat16")
    hf = _hf_tensors(checkpoint_bf16)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in hf.values())
    # torch's q_proj.weight is [heads * head_dim, hidden]; ours [hidden, heads, head_dim]: same bits
    wq0 = np.asarray(model.layers.attn.wq[...][0])
    d, n, h = wq0.shape
    np.testing.assert_array_equal(wq0.reshape(d, n * h).T.view(np.uint16),
                                  hf["layers.0.self_attn.q_proj.weight"].view(np.uint16))
    down1 = np.asarray(model.layers.mlp.w_down[...][1])
    np.testing.assert_array_equal(down1.T.view(np.uint16), hf["layers.1.mlp.down_proj.weight"].view(np.uint16))
    assert model.embed[...].dtype == jnp.bfloat16


def test_every_weight_acts_as_transformers_uses_it(checkpoint):
    """Each of our parameters, applied the way our model applies it, against the transformers module
    that holds the same checkpoint tensor, on random inputs: the layouts are checked by behaviour."""
    import torch
    from transformers import AutoModel

    from qwen3_jax.backend import Backend
    from qwen3_jax.ops.projection import project

    ours = load_model(checkpoint)
    theirs = AutoModel.from_pretrained(str(checkpoint), dtype=torch.float32)
    cfg = ours.config
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, cfg.hidden_size)).astype(np.float32)
    heads = rng.standard_normal((2, 3, cfg.num_attention_heads, cfg.head_dim)).astype(np.float32)
    mlp = rng.standard_normal((2, 3, cfg.intermediate_size)).astype(np.float32)

    def torch_apply(module, value):
        with torch.no_grad():
            return module(torch.as_tensor(value)).numpy()

    cpu = Backend.resolve()
    for layer, block in enumerate(theirs.layers):
        attn, ff = ours.layers.attn, ours.layers.mlp
        pairs = [
            (project("BTD,DNH->BTNH", x, attn.wq[...][layer], cpu), block.self_attn.q_proj, x),
            (project("BTD,DKH->BTKH", x, attn.wk[...][layer], cpu), block.self_attn.k_proj, x),
            (project("BTD,DKH->BTKH", x, attn.wv[...][layer], cpu), block.self_attn.v_proj, x),
            (project("BTNH,NHD->BTD", heads, attn.wo[...][layer], cpu), block.self_attn.o_proj, heads.reshape(2, 3, -1)),
            (project("BTD,DF->BTF", x, ff.w_gate[...][layer], cpu), block.mlp.gate_proj, x),
            (project("BTD,DF->BTF", x, ff.w_up[...][layer], cpu), block.mlp.up_proj, x),
            (project("BTF,FD->BTD", mlp, ff.w_down[...][layer], cpu), block.mlp.down_proj, mlp),
        ]
        for got, module, value in pairs:
            want = torch_apply(module, value)
            assert np.abs(np.asarray(got).reshape(want.shape) - want).max() <= 1e-5
        for ours_norm, their_norm in [(ours.layers.input_norm, block.input_layernorm),
                                      (ours.layers.post_norm, block.post_attention_layernorm),
                                      (attn.q_norm, block.self_attn.q_norm), (attn.k_norm, block.self_attn.k_norm)]:
            assert np.array_equal(np.asarray(ours_norm[...][layer]), their_norm.weight.detach().numpy())
    ids = rng.integers(0, cfg.vocab_size, (2, 5))
    assert np.array_equal(np.asarray(ours.embed[...])[ids], torch_apply(theirs.embed_tokens, ids))
    assert np.array_equal(np.asarray(ours.final_norm[...]), theirs.norm.weight.detach().numpy())


def test_every_table_entry_is_used(checkpoint):
    """Every parameter of the model comes from exactly one checkpoint tensor (per layer)."""
    model = load_model(checkpoint)
    paths = {path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert paths == {rule.path for rule in WEIGHTS if rule.hf_name != "lm_head.weight"}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(folder, edit):
    """Re-writes model.safetensors after `edit(tensors)` changes the dict of tensors."""
    tensors = _hf_tensors(folder)
    edit(tensors)
    write_safetensors(folder / "model.safetensors", tensors.items())


def test_model_prefix_is_accepted(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path / "prefixed")
    _rewrite(folder, lambda t: t.update({f"model.{k}": t.pop(k) for k in list(t)}))
    a, b = load_model(checkpoint), load_model(folder)
    np.testing.assert_array_equal(np.asarray(a.layers.attn.wk[...]), np.asarray(b.layers.attn.wk[...]))


def test_missing_unexpected_and_misshaped_keys_are_all_listed(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path / "broken")

    def edit(t):
        del t["layers.0.mlp.up_proj.weight"], t["norm.weight"]
        t["layers.7.self_attn.q_proj.weight"] = t["layers.0.self_attn.q_proj.weight"]
        t["layers.1.self_attn.k_norm.weight"] = np.ones(7, np.float32)

    _rewrite(folder, edit)
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    text = str(err.value)
    for name in ["missing 2", "layers.0.mlp.up_proj.weight", "norm.weight", "unexpected 1",
                 "layers.7.self_attn.q_proj.weight", "wrong shape 1", "layers.1.self_attn.k_norm.weight (7,)"]:
        assert name in text


def test_only_pytorch_bin_is_refused_without_unpickling(checkpoint, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(checkpoint / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="pickle files are never loaded"):
        load_model(folder)


def test_missing_folder_and_missing_weights(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nothing")
    shutil.copy(checkpoint / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(tmp_path)


def test_truncated_file_is_reported(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path / "truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        SafetensorsFile(folder / "model.safetensors")


def test_shard_outside_the_folder_is_refused(checkpoint_bf16, tmp_path):
    folder = _copy(checkpoint_bf16, tmp_path / "escape")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../outside.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the model folder"):
        load_model(folder)


def test_our_safetensors_writer_and_reader_agree_with_the_reference_library(tmp_path):
    """Our reader and writer (the safetensors package's numpy side, bf16 included, with our checks)
    against its torch side, as transformers reads and writes checkpoints, both ways, bit for bit."""
    import torch
    from safetensors.torch import load_file, save_file

    rng = np.random.default_rng(0)
    ours = {"a.f32": rng.standard_normal((3, 5)).astype(np.float32),
            "b.bf16": rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16),
            "c.f16": rng.standard_normal((7,)).astype(np.float16), "d.empty": np.zeros((0, 3), np.float32)}
    write_safetensors(tmp_path / "ours.safetensors", ours.items(), metadata={"format": "pt"})
    loaded = load_file(tmp_path / "ours.safetensors")
    assert sorted(loaded) == sorted(ours)
    for name, array in ours.items():
        as_int = {2: (torch.int16, np.int16), 4: (torch.int32, np.int32)}[array.dtype.itemsize]
        assert tuple(loaded[name].shape) == array.shape
        assert np.array_equal(loaded[name].view(as_int[0]).numpy(), array.view(as_int[1]))
    save_file({name: t.clone() for name, t in loaded.items()}, tmp_path / "theirs.safetensors")
    theirs = SafetensorsFile(tmp_path / "theirs.safetensors")
    for name, array in ours.items():
        assert theirs.array(name).dtype == array.dtype
        assert np.array_equal(theirs.array(name).view(np.uint8), array.view(np.uint8))
