"""The claimed output folder that embed-corpus and train share (qwen3_jax.claims): one job at a time, a
folder of other files refused, another job's fingerprint refused with the fields that differ."""

import json

import pytest

from qwen3_jax.claims import LOCK, Claim, changed_fields
from qwen3_jax.textio import FolderBusy, OutputTaken


def _ours(path):
    return path.name in (LOCK, "record.json")


def test_a_second_claim_on_a_held_folder_is_refused_at_once_and_free_after_release(tmp_path):
    first, second = Claim(tmp_path, _ours), Claim(tmp_path, _ours)
    first.hold("job one")
    with pytest.raises(FolderBusy, match="in use by job one"):
        second.hold("job two")
    first.release()
    second.hold("job two")
    second.release()


def test_shared_holds_coexist_and_keep_out_an_exclusive_one(tmp_path):
    a, b, alone = Claim(tmp_path, _ours), Claim(tmp_path, _ours), Claim(tmp_path, _ours)
    a.hold("split job", shared=True)
    b.hold("split job", shared=True)
    with pytest.raises(FolderBusy, match="split job"):
        alone.hold("another job")
    a.release()
    b.release()


def test_strangers_are_refused_with_their_names_and_a_missing_folder_holds_none(tmp_path):
    Claim(tmp_path / "absent", _ours).refuse_strangers(lambda names: f"refused {names}")
    claim = Claim(tmp_path, _ours)
    claim.hold("job")
    (tmp_path / "record.json").write_text("{}")
    claim.refuse_strangers(lambda names: f"refused {names}")         # only its own files and its lock
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "b.bin").write_text("mine")
    with pytest.raises(OutputTaken, match=r"refused \['b.bin', 'notes.txt'\]"):
        claim.refuse_strangers(lambda names: f"refused {names}")
    claim.release()


def test_another_fingerprint_is_refused_with_the_fields_that_differ(tmp_path):
    wanted = {"model": "m", "dim": 64, "lr": 1e-4}
    Claim.refuse_other(dict(wanted), wanted, lambda fields: f"differs in {fields}")
    with pytest.raises(OutputTaken, match=r"differs in \['dim', 'extra'\]"):
        Claim.refuse_other({"model": "m", "dim": 32, "lr": 1e-4, "extra": 1}, wanted,
                           lambda fields: f"differs in {fields}")
    assert changed_fields({"a": 1}, {"a": 1, "b": 2}) == ["b"]


def test_the_record_is_replaced_whole_or_not_at_all(tmp_path):
    claim = Claim(tmp_path, _ours)
    claim.record("record.json", {"model": "m", "dim": 64}, indent=2)
    assert json.loads((tmp_path / "record.json").read_text()) == {"model": "m", "dim": 64}
    with pytest.raises(TypeError):
        claim.record("record.json", {"model": "m", "dim": object()}, indent=2)    # fails midway through writing
    assert json.loads((tmp_path / "record.json").read_text()) == {"model": "m", "dim": 64}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]      # no temporary file left behind
