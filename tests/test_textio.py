"""Input files read as users mean them; outputs written whole or not at all."""

import json
import os
import stat

import numpy as np
import pytest

import qwen3_jax.textio
from qwen3_jax.textio import InputError, check_output_path, read_texts, write_embeddings


def test_a_txt_line_ends_at_newline_only(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes("a\u2028b\nform\x0cfeed\nx\x85y\x0bz\x1cw\r\nlast\n".encode())
    ids, texts = read_texts(path)
    assert texts == ["a\u2028b", "form\x0cfeed", "x\x85y\x0bz\x1cw", "last"]
    assert ids == [0, 1, 2, 3]


def test_jsonl_keeps_raw_line_separators_inside_strings(tmp_path):
    path = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": "one\u2028two"}, ensure_ascii=False), json.dumps({"text": "three\x0c"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert read_texts(path) == ([0, 1], ["one\u2028two", "three\x0c"])
    path.write_text(lines[0] + "\n{broken\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"in.jsonl:2: not valid JSON"):
        read_texts(path)


@pytest.mark.parametrize("suffix,body", [(".txt", "hello\nworld\n"), (".jsonl", '{"text": "hello"}\n{"text": "world"}\n')])
def test_a_byte_order_mark_is_dropped(tmp_path, suffix, body):
    path = tmp_path / f"in{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert read_texts(path)[1] == ["hello", "world"]


def test_invalid_utf8_names_file_line_and_byte(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"fine\nbad \xff here\n")
    with pytest.raises(InputError, match=r"in.txt:2: invalid UTF-8 at byte 9"):
        read_texts(path)


def test_jsonl_ids_are_all_given_or_none_and_never_repeat(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert read_texts(path) == ([0, 1], ["a", "b"])
    path.write_text('{"id": 1, "text": "a"}\n{"text": "b"}\n')
    with pytest.raises(InputError, match=r"in.jsonl:2: no \"id\" while other lines have one"):
        read_texts(path)
    path.write_text('{"id": "x", "text": "a"}\n{"id": "y", "text": "b"}\n{"id": "x", "text": "c"}\n')
    with pytest.raises(InputError, match=r"in.jsonl:3: id 'x' repeats line 1"):
        read_texts(path)


def test_blank_txt_lines_are_kept_or_skipped_with_their_line_ids(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("first\n\n  \nfourth\n")
    assert read_texts(path) == ([0, 1, 2, 3], ["first", "", "  ", "fourth"])
    assert read_texts(path, skip_blank=True) == ([0, 3], ["first", "fourth"])


def test_output_paths_are_checked_before_any_work(tmp_path):
    (tmp_path / "x.npy").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        check_output_path(tmp_path / "x.npy")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "out.npy")
    with pytest.raises(ValueError, match="must end in .npy or .jsonl"):
        check_output_path(tmp_path / "out.csv")
    assert check_output_path(tmp_path / "out.jsonl") == tmp_path / "out.jsonl"


def test_outputs_get_the_permissions_a_plain_write_gives(tmp_path):
    old = os.umask(0o022)
    try:
        write_embeddings(tmp_path / "new.npy", [0], np.zeros((1, 2), np.float32))
        assert stat.S_IMODE((tmp_path / "new.npy").stat().st_mode) == 0o644
        (tmp_path / "shared.npy").write_bytes(b"")
        os.chmod(tmp_path / "shared.npy", 0o664)
        write_embeddings(tmp_path / "shared.npy", [0], np.zeros((1, 2), np.float32))
        assert stat.S_IMODE((tmp_path / "shared.npy").stat().st_mode) == 0o664
    finally:
        os.umask(old)


@pytest.mark.parametrize("suffix", [".npy", ".jsonl"])
def test_a_write_that_fails_part_way_leaves_the_old_file(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"out{suffix}"
    write_embeddings(path, [0, 1], np.ones((2, 3), np.float32))
    before = path.read_bytes()
    real_fdopen = os.fdopen

    class FailingHandle:
        """Writes the first chunk, then the disk is full."""

        def __init__(self, handle):
            self.handle, self.writes = handle, 0

        def write(self, data):
            self.writes += 1
            if self.writes > 1:
                raise OSError("No space left on device")
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(qwen3_jax.textio.os, "fdopen", lambda *a, **k: FailingHandle(real_fdopen(*a, **k)))
    with pytest.raises(OSError, match="No space left"):
        write_embeddings(path, [0, 1], np.zeros((2, 3), np.float32))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]      # no temporary file left
