"""One grammar across the commands, typed as a user types them: blank lines, ids, inputs, exit codes,
--help and counted nouns."""

import argparse
import io
import json

import numpy as np
import pytest

from qwen3_jax.cli import build_parser, main


def _lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


@pytest.fixture
def texts_with_a_blank(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("the first text\n\n   \nthe fourth text\n", encoding="utf-8")
    return path


def test_embed_rerank_and_search_skip_blank_lines_and_name_them_as_embed_corpus_does(
        checkpoint, reranker_folder, embedder, texts_with_a_blank, tmp_path, capsys):
    """A .txt input's blank lines are skipped and its texts are NAME:LINE in every command."""
    wanted = ["in.txt:1", "in.txt:4"]
    assert main(["embed", "--model", str(checkpoint), "--input", str(texts_with_a_blank)]) == 0
    records = _lines(capsys.readouterr().out)
    assert [r["id"] for r in records] == wanted
    expected = embedder.encode(["the first text", "the fourth text"])
    assert np.abs(np.array([r["embedding"] for r in records]) - expected).max() <= 1e-6

    assert main(["rerank", "--model", str(reranker_folder), "--query", "which text?",
                 "--input", str(texts_with_a_blank)]) == 0
    assert sorted(r["id"] for r in _lines(capsys.readouterr().out)) == wanted

    assert main(["embed-corpus", "--model", str(checkpoint), "--input", str(texts_with_a_blank),
                 "--output", str(tmp_path / "corpus"), "--quiet"]) == 0
    assert main(["search", "--index", str(tmp_path / "corpus"), "--queries", str(texts_with_a_blank)]) == 0
    found = _lines(capsys.readouterr().out)
    assert [r["id"] for r in found] == wanted
    assert all(sorted(hit["id"] for hit in r["hits"]) == wanted for r in found)

    assert main(["search", "--index", str(tmp_path / "corpus"), "--query", "one", "two"]) == 0
    assert [r["id"] for r in _lines(capsys.readouterr().out)] == ["query:1", "query:2"]
    assert main(["embed", "--model", str(checkpoint), "--text", "one", "two"]) == 0
    assert [r["id"] for r in _lines(capsys.readouterr().out)] == ["text:1", "text:2"]


def test_a_blank_text_typed_out_is_refused(checkpoint, capsys):
    assert main(["embed", "--model", str(checkpoint), "--text", "one", " "]) == 2
    assert "--text number 2 is blank" in capsys.readouterr().err


def test_embed_reads_stdin(checkpoint, embedder, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"from a pipe\n\nsecond line\n")))
    assert main(["embed", "--model", str(checkpoint), "--input", "-"]) == 0
    records = _lines(capsys.readouterr().out)
    assert [r["id"] for r in records] == ["stdin:1", "stdin:3"]
    expected = embedder.encode(["from a pipe", "second line"])
    assert np.abs(np.array([r["embedding"] for r in records]) - expected).max() <= 1e-6


def test_embed_corpus_refuses_stdin_it_could_not_read_again(checkpoint, tmp_path, capsys):
    assert main(["embed-corpus", "--model", str(checkpoint), "--input", "-", "--output", str(tmp_path / "c")]) == 2
    assert "save it to a .txt file first" in capsys.readouterr().err


def test_embed_reads_a_text_field_and_parquet(checkpoint, embedder, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"body": "a body"}\n\n{"body": "another body", "key": 7}\n', encoding="utf-8")
    pq.write_table(pa.table({"body": ["a body", "another body"]}), tmp_path / "docs.parquet")
    expected = embedder.encode(["a body", "another body"])
    for path, ids in ((jsonl, None), (tmp_path / "docs.parquet", ["docs.parquet:1", "docs.parquet:2"])):
        assert main(["embed", "--model", str(checkpoint), "--input", str(path), "--text-field", "body"]) == 0
        records = _lines(capsys.readouterr().out)
        assert np.abs(np.array([r["embedding"] for r in records]) - expected).max() <= 1e-6
        if ids:
            assert [r["id"] for r in records] == ids
    assert main(["embed", "--model", str(checkpoint), "--input", str(jsonl), "--text-field", "body",
                 "--id-field", "key"]) == 0
    assert [r["id"] for r in _lines(capsys.readouterr().out)] == ["docs.jsonl:1", 7]


@pytest.mark.parametrize("command", [
    ["embed", "--model", "{model}", "--input", "{missing}"],
    ["embed", "--model", "{model}", "--text", "a", "--output", "{missing}/out.npy"],
    ["rerank", "--model", "{model}", "--query", "q", "--input", "{missing}"],
    ["embed-corpus", "--model", "{model}", "--input", "{missing}", "--output", "{tmp}/out"],
    ["search", "--index", "{missing}", "--query", "q"],
    ["search", "--index", "{corpus}", "--queries", "{missing}"],
])
def test_a_missing_input_exits_2(checkpoint, tmp_path, capsys, command):
    (tmp_path / "corpus").mkdir()
    typed = [word.format(model=checkpoint, missing=tmp_path / "nowhere.txt", tmp=tmp_path, corpus=tmp_path / "corpus")
             for word in command]
    assert main(typed) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen3-jax: error: ") and err.count("\n") == 1


def test_an_existing_output_folder_exits_2(checkpoint, texts_with_a_blank, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.md").write_text("mine")
    for model in (checkpoint, tmp_path / "no-model"):           # refused before the model loads (or is missing)
        assert main(["embed-corpus", "--model", str(model), "--input", str(texts_with_a_blank),
                     "--output", str(tmp_path / "taken"), "--quiet"]) == 2
        assert "did not write (notes.md)" in capsys.readouterr().err


def test_a_mistyped_flag_is_named_not_a_missing_one(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["embed", "--model", "m", "--inptu", "in.txt"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized argument: --inptu (did you mean --input?)" in err and "required" not in err


def _subcommands(parser=None):
    parser = parser or build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


BENCHMARKS = ["encode", "train", "serve", "corpus", "search", "device", "profile", "prefixes"]


@pytest.mark.parametrize("name", ["embed", "embed-corpus", "rerank", "search", "build-ann", "eval", "train",
                                  "export", "serve", "convert", "init-random", "doctor", "verify",
                                  *(f"bench {benchmark}" for benchmark in BENCHMARKS)])
def test_every_flag_has_help_and_help_shows_defaults(name):
    command = None
    for word in name.split():
        command = _subcommands(command)[word]
    missing = [a.option_strings[0] for a in command._actions if a.option_strings and not a.help]
    assert missing == []
    shown = command.format_help()
    for action in command._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                and "default" not in action.help.lower():
            assert f"(default: {action.default})" in " ".join(shown.split())


def test_counts_read_as_counts(checkpoint, tmp_path, capsys):
    path = tmp_path / "docs.txt"
    path.write_text("one\ntwo\nthree\n", encoding="utf-8")
    typed = ["embed-corpus", "--model", str(checkpoint), "--input", str(path), "--output", str(tmp_path / "c"),
             "--shard-size", "2", "--quiet"]
    assert main(typed) == 0
    assert "3 embeddings in 2 shards" in capsys.readouterr().err
    path.write_text("one\ntwo\nthree\nfour\nfive\n", encoding="utf-8")
    assert main([*typed, "--update"]) == 0
    err = capsys.readouterr().err
    assert "1 shard changed (1); 1 shard added (2); 5 records now" in err


def test_search_shows_each_hit_s_text_and_refuses_once_the_input_changed(checkpoint, tmp_path, capsys):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("apples are red\n\npears are green\n", encoding="utf-8")
    (folder / "b.jsonl").write_text('{"id": "k", "text": "kiwis are brown"}\n', encoding="utf-8")
    assert main(["embed-corpus", "--model", str(checkpoint), "--input", str(folder),
                 "--output", str(tmp_path / "corpus"), "--quiet"]) == 0
    typed = ["search", "--index", str(tmp_path / "corpus"), "--query", "fruit", "--top-k", "3", "--show-text"]
    capsys.readouterr()
    assert main(typed) == 0
    hits = _lines(capsys.readouterr().out)[0]["hits"]
    assert {hit["id"]: hit["text"] for hit in hits} == {"a.txt:1": "apples are red", "a.txt:3": "pears are green",
                                                        "k": "kiwis are brown"}
    (folder / "a.txt").write_text("apples are red\n\npears are yellow\n", encoding="utf-8")
    assert main(typed) == 2
    assert "changed since" in capsys.readouterr().err
    assert main(typed[:-1]) == 0                               # without --show-text the vectors still serve
    assert all("text" not in hit for hit in _lines(capsys.readouterr().out)[0]["hits"])


def test_a_repeated_id_is_refused_with_both_lines(checkpoint, tmp_path, capsys):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": 1, "text": "one"}\n{"text": "two"}\n{"id": 1, "text": "three"}\n', encoding="utf-8")
    assert main(["embed", "--model", str(checkpoint), "--input", str(path)]) == 1
    assert "docs.jsonl:3: id 1 repeats docs.jsonl:1; ids must be unique" in capsys.readouterr().err


def test_one_of_a_thing_is_said_in_the_singular(checkpoint, tmp_path, capsys):
    path = tmp_path / "one.txt"
    path.write_text("a single text\n", encoding="utf-8")
    typed = ["embed-corpus", "--model", str(checkpoint), "--input", str(path), "--output", str(tmp_path / "c"),
             "--quiet"]
    assert main(typed) == 0
    assert "1 embedding in 1 shard " in capsys.readouterr().err
    path.touch()                                  # touched, not changed: nothing to embed
    assert main([*typed, "--update"]) == 0
    assert "(1 record)" in capsys.readouterr().err


def test_show_text_refuses_an_id_that_stands_for_two_texts(checkpoint, tmp_path, capsys):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": "x", "text": "one"}\n{"id": "x", "text": "two"}\n', encoding="utf-8")
    assert main(["embed-corpus", "--model", str(checkpoint), "--input", str(path), "--output", str(tmp_path / "c"),
                 "--quiet"]) == 0
    assert main(["search", "--index", str(tmp_path / "c"), "--query", "q", "--show-text"]) == 1   # found at the end
    assert "id 'x' stands for more than one text" in capsys.readouterr().err


def test_an_existing_output_of_init_random_or_convert_exits_2(checkpoint, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    assert main(["init-random", str(taken), "--quiet"]) == 2
    assert main(["convert", str(checkpoint), str(taken), "--to", "orbax"]) == 2
    assert capsys.readouterr().err.count("already exists; pass --overwrite") == 2


def test_train_and_serve_flags_are_their_settings_fields_declared_once(monkeypatch):
    """`train` and `serve` take a flag for each field their settings dataclass declares with `setting`
    (train's nested objective, optimizer and LoRA settings included), the flag's default is the field's
    own, and the parsed flags make the dataclass a library user gets."""
    from qwen3_jax.arguments import flags_of, settings_from
    from qwen3_jax.serve.settings import ServeSettings
    from qwen3_jax.train.config import TrainConfig
    from qwen3_jax.train.lora import PROJECTIONS

    monkeypatch.delenv("QWEN3_JAX_API_KEY", raising=False)
    train = build_parser().parse_args(["train", "--model", "m", "--data", "d.jsonl", "--output", "o", "--steps", "3"])
    assert settings_from(TrainConfig, train) == TrainConfig(model="m", data="d.jsonl", output="o", steps=3)
    assert settings_from(ServeSettings, build_parser().parse_args(["serve"])) == ServeSettings()
    for settings, command in ((TrainConfig, "train"), (ServeSettings, "serve")):
        shown = " ".join(_subcommands()[command].format_help().split())
        for dest, field, _ in flags_of(settings):
            declared = field.metadata["flag_of"]
            flag = declared["flag"] or f"--{dest.replace('_', '-')}"
            assert (flag if isinstance(flag, str) else flag[0]) in shown, dest
    changed = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--output", "o", "--epochs", "2",
                                         "--full", "--no-batch-negatives", "--matryoshka-dims", "64,32", "--lr", "3e-5"])
    config = settings_from(TrainConfig, changed)
    assert (config.epochs, config.lora, config.objective.use_batch, config.objective.matryoshka_dims,
            config.optimizer.learning_rate) == (2.0, None, False, (64, 32), 3e-5)
    lora = settings_from(TrainConfig, build_parser().parse_args(["train", "--model", "m", "--data", "d", "--output",
                                                                 "o", "--steps", "1", "--lora-rank", "4"])).lora
    assert (lora.rank, lora.alpha, lora.dropout, lora.targets) == (4, 32.0, 0.05, tuple(PROJECTIONS))
    monkeypatch.setenv("QWEN3_JAX_API_KEY", "secret")
    assert settings_from(ServeSettings, build_parser().parse_args(["serve"])).api_key == "secret"


@pytest.mark.parametrize("argv", [["embed"], ["train"], ["serve"], ["bench", "search"], ["bench", "device"],
                                  ["doctor"], ["init-random"]])
def test_every_command_takes_debug_from_one_declaration(argv):
    command = None
    for word in argv:
        command = _subcommands(command)[word]
    assert [a.help for a in command._actions if "--debug" in a.option_strings] == ["show the traceback of an error"]


@pytest.mark.parametrize("argv, now", [(["--random", "tiny"], "bench encode --random"),
                                       (["--suite", "device"], "bench encode --suite gpu|mixes, or bench device"), (["--serve"], "bench serve"),
                                       (["--search=1000"], "bench search --vectors N")])
def test_bench_s_former_flags_name_the_sub_command_that_replaced_them(argv, now, capsys):
    assert main(["bench", *argv]) == 2
    assert f"is now `qwen3-jax {now}" in capsys.readouterr().err
