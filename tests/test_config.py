import json

import pytest

from qwen3_jax.config import ConfigError, Qwen3Config, preset


def test_both_config_dialects_give_the_same_config(checkpoint, checkpoint_bf16):
    hub = json.loads((checkpoint / "config.json").read_text())
    v5 = json.loads((checkpoint_bf16 / "config.json").read_text())
    assert "rope_theta" in hub and "torch_dtype" in hub
    assert "rope_parameters" in v5 and "dtype" in v5 and "rope_theta" not in v5
    a, b = Qwen3Config.from_hf(checkpoint), Qwen3Config.from_hf(checkpoint_bf16)
    assert a.rope_theta == b.rope_theta == 1e6
    assert (a.head_dim, a.num_attention_heads, a.num_key_value_heads, a.hidden_size) == (32, 4, 2, 64)
    assert a.checkpoint_dtype == "float32" and b.checkpoint_dtype == "bfloat16"
    assert a.vocab_size == hub["vocab_size"]


def test_published_shapes_are_valid_configs():
    assert preset("0.6B").num_attention_heads * preset("0.6B").head_dim == 2048
    assert 590e6 < preset("0.6B").num_parameters < 600e6
    assert 4.0e9 < preset("4B").num_parameters < 4.1e9


def test_missing_field_is_named(tmp_path):
    raw = preset("0.6B").to_hf_dict()
    del raw["hidden_size"], raw["rope_theta"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="hidden_size.*rope_theta"):
        Qwen3Config.from_hf(tmp_path)


def test_absurd_sizes_are_rejected_before_allocation(tmp_path):
    raw = preset("0.6B").to_hf_dict() | {"num_hidden_layers": 10**9}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="num_hidden_layers=1000000000"):
        Qwen3Config.from_hf(tmp_path)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Qwen3Config.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Qwen3Config.from_hf(tmp_path)


def test_round_trip_through_hf_dict():
    cfg = preset("4B", num_hidden_layers=2)
    assert Qwen3Config.from_dict(cfg.to_hf_dict()) == cfg
