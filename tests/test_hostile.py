"""Broken and hostile checkpoint files: each gets a clear error, never a silent wrong model."""

import contextlib
import json
import os
import shutil
import struct

import numpy as np
import pytest

from qwen3_jax import load_model
from qwen3_jax.cli import main
from qwen3_jax.safetensors_file import CheckpointError, SafetensorsFile, write_safetensors


def _raw_file(path, header: dict, data: bytes = b""):
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def test_header_length_past_the_end(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(CheckpointError, match="header length 1000000 runs past the end"):
        SafetensorsFile(tmp_path / "x.safetensors")


def test_tiny_and_garbled_files(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsFile(tmp_path / "a.safetensors")
    (tmp_path / "b.safetensors").write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        SafetensorsFile(tmp_path / "b.safetensors")


def test_overlapping_offsets(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    with pytest.raises(CheckpointError, match="'a' and 'b' overlap"):
        SafetensorsFile(_raw_file(tmp_path / "x.safetensors", header, bytes(12)))


def test_offsets_past_the_data_and_wrong_sizes(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    with pytest.raises(CheckpointError, match="run past the data"):
        SafetensorsFile(_raw_file(tmp_path / "x.safetensors", header, bytes(8)))
    header = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}
    with pytest.raises(CheckpointError, match="do not match shape"):
        SafetensorsFile(_raw_file(tmp_path / "y.safetensors", header, bytes(16)))


@pytest.mark.parametrize("dtype", ["I64", "F8_E4M3", "complex"])
def test_unsupported_dtype(tmp_path, dtype):
    header = {"a": {"dtype": dtype, "shape": [2], "data_offsets": [0, 16]}}
    with pytest.raises(CheckpointError, match=f"unsupported dtype '{dtype}'"):
        SafetensorsFile(_raw_file(tmp_path / "x.safetensors", header, bytes(16)))


def test_gaps_trailing_bytes_and_header_bombs_are_refused(tmp_path):
    """What the safetensors package refuses and our own reader once let through (a gap between tensors,
    bytes after the last one) or caught itself (a header over the size limit), each named in one line."""
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}
    with pytest.raises(CheckpointError, match=r"tensor 'b' offsets \[12, 20\] leave a gap"):
        SafetensorsFile(_raw_file(tmp_path / "gap.safetensors", header, bytes(20)))
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    with pytest.raises(CheckpointError, match="leave some unused"):
        SafetensorsFile(_raw_file(tmp_path / "trailing.safetensors", header, bytes(16)))
    with open(tmp_path / "bomb.safetensors", "wb") as handle:
        handle.write(struct.pack("<Q", 200_000_000))
        handle.truncate(200_000_100)                      # sparse: the header length fits in the file
    with pytest.raises(CheckpointError, match="header length 200000000 is over the safetensors package's limit"):
        SafetensorsFile(tmp_path / "bomb.safetensors")


def test_any_corrupted_header_is_one_clear_error(tmp_path):
    """Random bytes of a valid file's header overwritten, 500 times: each file either still opens or fails
    with a one-line CheckpointError naming it, never another exception; what opens reads in its shapes."""
    path = tmp_path / "x.safetensors"
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)}
    write_safetensors(path, tensors.items(), metadata={"format": "pt"})
    good = path.read_bytes()
    end = 8 + struct.unpack("<Q", good[:8])[0]
    rng = np.random.default_rng(0)
    refused = 0
    for _ in range(500):
        data = bytearray(good)
        for position in rng.integers(0, end, size=rng.integers(1, 3)):
            data[position] = rng.choice(list(b'0123456789[]{}",:F')) if rng.random() < 0.5 else rng.integers(256)
        path.write_bytes(bytes(data))
        try:
            file = SafetensorsFile(path)
        except CheckpointError as err:
            assert str(err).startswith(f"{path}: ") and "\n" not in str(err), str(err)
            refused += 1
            continue
        for name in file.entries:
            assert file.array(name).shape == file.shape(name)
    assert refused > 400


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _point_index(folder, shard):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_absolute_shard_path_is_refused(checkpoint_bf16, tmp_path):
    folder = _copy(checkpoint_bf16, tmp_path / "abs")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(next(folder.glob("model-*.safetensors")), outside)
    _point_index(folder, str(outside))
    with pytest.raises(CheckpointError, match="outside the model folder"):
        load_model(folder)


def test_link_leaving_the_folder_is_refused(checkpoint_bf16, tmp_path):
    folder = _copy(checkpoint_bf16, tmp_path / "link")
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(next(folder.glob("model-*.safetensors")), outside)
    os.symlink(outside, folder / "model-link.safetensors")
    _point_index(folder, "model-link.safetensors")
    with pytest.raises(CheckpointError, match="outside the model folder"):
        load_model(folder)


def test_remote_code_is_never_run(checkpoint, tmp_path):
    """A checkpoint whose config points transformers at its own Python file: neither loading nor
    `verify` (which runs transformers on the folder) may import it. Loading with
    trust_remote_code=True anywhere would write the marker."""
    folder = _copy(checkpoint, tmp_path / "remote")
    marker = tmp_path / "executed"
    (folder / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import Qwen3Model as EvilModel\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    from transformers import AutoModel

    with contextlib.suppress(Exception):                    # the check can fail: trusting the folder runs it
        AutoModel.from_pretrained(str(folder), trust_remote_code=True)
    assert marker.exists()
    marker.unlink()
    load_model(folder)
    main(["embed", "--model", str(folder), "--text", "a"])
    main(["verify", "--model", str(folder)])
    assert not marker.exists()


def _with_nan(checkpoint, folder):
    _copy(checkpoint, folder)
    from qwen3_jax.weights import CheckpointFolder

    ckpt = CheckpointFolder(folder)
    tensors = {k: np.array(ckpt.array(k)) for k in ckpt.location}
    del ckpt
    tensors["layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    write_safetensors(folder / "model.safetensors", tensors.items())
    return folder


def test_non_finite_weights_warn_or_fail_under_strict(checkpoint, tmp_path):
    folder = _with_nan(checkpoint, tmp_path / "nan")
    with pytest.warns(UserWarning, match="up_proj.weight holds NaN or Inf"):
        load_model(folder)
    with pytest.raises(CheckpointError, match="up_proj.weight holds NaN or Inf"):
        load_model(folder, strict=True)
    assert main(["convert", str(folder), str(tmp_path / "out"), "--to", "hf", "--strict"]) == 1
    assert not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match="NaN"):
        assert main(["embed", "--model", str(folder), "--text", "a"]) == 0
    for command in (["embed", "--text", "a"], ["verify"]):
        assert main([command[0], "--model", str(folder), "--strict", *command[1:]]) == 1, command


def test_rerank_refuses_non_finite_weights_under_strict(reranker_checkpoint, tmp_path, capsys):
    folder = _with_nan(reranker_checkpoint, tmp_path / "nan")
    (tmp_path / "d.txt").write_text("a document\n")
    rerank = ["rerank", "--model", str(folder), "--query", "q", "--input", str(tmp_path / "d.txt")]
    with pytest.warns(UserWarning, match="NaN"):
        assert main(rerank) == 0
    assert main(rerank + ["--strict"]) == 1
    assert "holds NaN or Inf" in capsys.readouterr().err
