"""The qwen3-jax command line, run as a user would run it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from qwen3_jax.cli import main
from tests.conftest import CORPUS

TASK = "Given a web search query, retrieve relevant passages that answer the query"


def test_embed_txt_to_npy_matches_the_library(checkpoint, embedder, tmp_path):
    texts = [t for t in CORPUS if "\n" not in t]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "out.npy"
    assert main(["embed", "--model", str(checkpoint), "--input", str(tmp_path / "in.txt"),
                 "--output", str(out), "--instruction", TASK, "--dim", "32"]) == 0
    expected = embedder.encode(texts, instruction=TASK, dim=32)
    assert np.abs(np.load(out) - expected).max() <= 1e-6
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_embed_jsonl_keeps_ids(checkpoint, embedder, tmp_path):
    lines = [json.dumps({"id": f"doc-{i}", "text": t}) for i, t in enumerate(CORPUS[:3])]
    (tmp_path / "in.jsonl").write_text("\n".join(lines))
    out = tmp_path / "out.jsonl"
    assert main(["embed", "--model", str(checkpoint), "--input", str(tmp_path / "in.jsonl"),
                 "--output", str(out), "--prompt-name", "query"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["doc-0", "doc-1", "doc-2"]
    expected = embedder.encode(CORPUS[:3], prompt_name="query")
    assert np.abs(np.array([r["embedding"] for r in records]) - expected).max() <= 1e-6


def test_failures_print_one_line_and_leave_no_file(checkpoint, tmp_path, capsys):
    out = tmp_path / "out.npy"
    assert main(["embed", "--model", str(checkpoint), "--text", "a", "--dim", "7", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["qwen3-jax: error: dim=7 is outside 32..64 supported by this model"]
    assert list(tmp_path.iterdir()) == []
    assert main(["embed", "--model", str(tmp_path / "missing"), "--text", "a"]) == 1
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    assert main(["embed", "--model", str(checkpoint), "--input", str(tmp_path / "bad.jsonl")]) == 1
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_stdout_keeps_full_precision_and_a_closed_pipe_ends_quietly(checkpoint, embedder, tmp_path):
    """JSON lines on stdout hold each float32 exactly; a reader that stops early (`| head`) ends the
    command quietly (exit 141, as `yes | head`), not with a traceback or "Broken pipe"."""
    texts = [f"{t} {i}" for i in range(40) for t in CORPUS if "\n" not in t]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    command = [sys.executable, "-m", "qwen3_jax.cli", "embed", "--model", str(checkpoint), "--input",
               str(tmp_path / "in.txt")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = json.loads(process.stdout.readline())
    process.stdout.close()                                    # as `head -1` does after its line
    assert process.wait(timeout=300) == 141 and process.stderr.read() == ""
    assert np.array_equal(np.asarray(first["embedding"], np.float32), embedder.encode(texts)[0])


def test_usage_errors_exit_2_through_the_console_script(checkpoint):
    env = dict(os.environ)
    run = subprocess.run([sys.executable, "-m", "qwen3_jax.cli", "embed", "--text", "a"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "--model" in run.stderr
    run = subprocess.run([sys.executable, "-m", "qwen3_jax.cli", "embed", "--model", str(checkpoint),
                          "--text", "hello", "--dim", "32"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout.splitlines()[0])
    assert record["id"] == "text:1" and len(record["embedding"]) == 32          # ids as NAME:LINE, --text too


def test_version_is_the_installed_package_s():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    run = subprocess.run([sys.executable, "-m", "qwen3_jax.cli", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout == f"qwen3-jax {project['version']}\n"


def test_the_package_and_the_command_line_s_settings_import_without_jax():
    """`import qwen3_jax` and the modules the command line reads before any work (its parser's settings,
    the backend's names, the compile cache's switch) leave JAX unimported, so a command's first line comes
    at once; the public names still import on first use, and the cache's choice reaches JAX when it loads."""
    code = ("import os, sys, qwen3_jax, qwen3_jax.arguments, qwen3_jax.backend, qwen3_jax.compile_cache as c\n"
            "assert 'jax' not in sys.modules, 'jax imported'\n"
            "c.enable_compilation_cache(sys.argv[1])\n"
            "from qwen3_jax import Qwen3Embedder\n"
            "import jax\n"
            "print(jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)")
    run = subprocess.run([sys.executable, "-c", code, "/tmp/qwen3-jax-test-cache"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.split() == ["/tmp/qwen3-jax-test-cache", "0.0"], run.stderr


def test_a_command_line_builds_only_its_own_sub_command_and_serve_imports_no_jax_before_its_first_line():
    """main parses with the parser of the sub-command it names, so `qwen3-jax serve` imports neither JAX
    nor the training and study code that other sub-commands' settings live beside; every sub-command is
    still there for --help, and a parser built for all of them is unchanged."""
    code = ("import sys\n"
            "from qwen3_jax.cli import build_parser\n"
            "args = build_parser('serve').parse_args(['serve', '--port', '8001', '--max-texts-per-request', '4'])\n"
            "assert (args.port, args.max_client_batch_size) == (8001, 4)\n"
            "loaded = [m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax')\n"
            "          or m.startswith(('qwen3_jax.train', 'qwen3_jax.study'))]\n"
            "assert not loaded, loaded")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    from qwen3_jax.cli import PARSERS, build_parser

    whole = build_parser()
    commands = next(a for a in whole._actions if a.dest == "command").choices
    assert set(commands) == {*PARSERS, "study"} and all(len(p._actions) > 2 for p in commands.values())


def test_one_embedding_is_counted_in_the_singular(checkpoint, tmp_path, capsys):
    assert main(["embed", "--model", str(checkpoint), "--text", "a", "--output", str(tmp_path / "one.npy")]) == 0
    assert f"wrote 1 embedding of dimension 64 to {tmp_path / 'one.npy'}" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["embed", "--model", str(tmp_path / "missing"), "--text", "a", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".csv", ".npz"])
def test_unknown_output_format(checkpoint, tmp_path, suffix, capsys):
    assert main(["embed", "--model", str(checkpoint), "--text", "a", "--output", str(tmp_path / f"o{suffix}")]) == 2
    assert "must end in .npy or .jsonl" in capsys.readouterr().err


def test_the_compile_cache_is_on_by_default_and_a_second_run_compiles_nothing(checkpoint, tmp_path):
    """With no setting, programs go to ~/.cache/qwen3-jax/xla (here under XDG_CACHE_HOME); the same
    command again adds nothing to it (every program was found there); `--compile-cache off` writes none."""
    from qwen3_jax.compile_cache import ENVIRONMENT

    env = {k: v for k, v in os.environ.items() if k != ENVIRONMENT}
    env["XDG_CACHE_HOME"] = str(tmp_path / "home-cache")
    command = [sys.executable, "-m", "qwen3_jax.cli", "embed", "--model", str(checkpoint), "--text", "hi", "there"]
    cache = tmp_path / "home-cache" / "qwen3-jax" / "xla"

    def entries():
        return sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []

    for expect_new in (True, False):
        before = entries()
        run = subprocess.run(command, capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
        assert (entries() != before) == expect_new and entries()
    other = tmp_path / "elsewhere"
    run = subprocess.run(command + ["--compile-cache", "off"], capture_output=True, text=True,
                         env={**env, "XDG_CACHE_HOME": str(other)})
    assert run.returncode == 0 and not other.exists()


def test_bench_prints_figures_for_both_sides(checkpoint, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "encode", "--model", str(checkpoint), "--texts", "6", "--tokens", "5-40", "--repeats", "1",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ["ours_tokens_per_s", "reference_tokens_per_s", "ratio", "compiled_programs", "peak_rss_gib",
                 "fraction_of_matmul", "real_tokens", "computed_tokens", "computed_per_real"]:
        assert name in printed
    figures = json.loads(out.read_text())
    assert figures["max_abs_diff"] <= 1e-4 and figures["texts"] == 6
    assert 5 <= figures["min_tokens"] <= figures["max_tokens"] <= 40
    assert figures["compiled_programs"] >= 1
    assert figures["real_tokens"] <= figures["computed_tokens"] <= 1.5 * figures["real_tokens"]


def test_bench_times_a_users_own_file(checkpoint, tmp_path, capsys):
    texts = [t for t in CORPUS if "\n" not in t]
    (tmp_path / "mine.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "bench.json"
    assert main(["bench", "encode", "--model", str(checkpoint), "--input", str(tmp_path / "mine.txt"), "--repeats",
                 "1", "--no-reference", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["texts"] == len(texts) and "ratio" not in figures
    assert figures["computed_tokens"] >= figures["real_tokens"] > len(texts)


def test_datasheet_peak_is_matched_by_device_kind():
    from qwen3_jax.bench.common import datasheet_tflops

    assert datasheet_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert datasheet_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert datasheet_tflops("NVIDIA H200", "bfloat16") == 989.4
    assert datasheet_tflops("NVIDIA H100 80GB HBM3", "float32") is None
    assert datasheet_tflops("cpu", "bfloat16") is None


def _tokenizer_option() -> list[str]:
    """The real Qwen3 tokenizer where QWEN3_TOKENIZER_DIR names it; else init-random's small one."""
    folder = os.environ.get("QWEN3_TOKENIZER_DIR")
    return ["--tokenizer", folder] if folder else []


def test_gpu_suite_runs_end_to_end_on_a_small_stand_in(monkeypatch, capsys):
    """The accelerator suite's code path, shrunk to a 1-layer 0.6B shape and short texts the CPU can run."""
    import qwen3_jax.bench.encode

    monkeypatch.setattr(qwen3_jax.bench.encode, "GPU_SUITE", {"0.6B": (2, 3)})
    monkeypatch.setattr(qwen3_jax.bench.encode, "SUITE_TOKENS", 64)
    assert main(["bench", "encode", "--suite", "gpu", "--layers", "1", "--repeats", "1", *_tokenizer_option()]) == 0
    printed = capsys.readouterr().out
    assert printed.count("checkpoint (1 layers) written") == 1          # one checkpoint for both batch sizes
    for line, batch in zip(printed.splitlines()[-2:], ["2", "3"]):
        row = line.split()
        assert row[:2] == ["0.6B", batch] and float(row[-1]) >= 0.99    # bf16 by cosine against torch


def test_length_mix_suite_prints_a_row_per_mix(monkeypatch, capsys):
    """`bench encode --suite mixes`, shrunk to one layer, three texts and two mixes: fp32 rows match torch."""
    import qwen3_jax.bench.encode

    monkeypatch.setattr(qwen3_jax.bench.encode, "LENGTH_MIXES", (("5-30", False), ("10-200", True)))
    assert main(["bench", "encode", "--suite", "mixes", "--layers", "1", "--texts", "3", "--repeats", "1",
                 *_tokenizer_option()]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[-2:]]
    assert [row[0] for row in rows] == ["5-30", "10-200"] and rows[1][1:3] == ["long", "tail"]
    assert all(float(row[-2]) <= 1e-4 and int(row[-3]) >= 1 for row in rows)     # max abs diff, programs


@pytest.mark.parametrize("texts", [None, 8])
def test_the_device_suite_sizes_every_part_by_texts(monkeypatch, tmp_path, texts):
    """`bench device --texts N` (the CPU rehearsal) sizes the mixes, the suite, training and the server
    by N and cuts every text short; without it, the device run's sizes. Each shape's checkpoint is written
    once for every part. Each part is replaced by a recorder of what it is asked."""
    import contextlib
    import json

    import qwen3_jax.bench.device as device

    asked, written = {}, []

    def recorder(name):
        return lambda *args, **kwargs: asked.setdefault(name, []).append(kwargs) or {"ran": name}

    def checkpoint(random, **_):
        written.append(random)
        return contextlib.nullcontext(tmp_path / random)

    for name in ("run_mixes", "run_suite", "run_benchmark", "run_train_benchmark", "check_packed_kernel"):
        monkeypatch.setattr(device, name, recorder(name))
    monkeypatch.setattr(device, "run_serve_benchmark", lambda folder, **kwargs: recorder("serve")(folder=folder,
                                                                                                  **kwargs))
    monkeypatch.setattr(device, "bench_checkpoint", checkpoint)
    sized = ["--texts", str(texts)] if texts else []
    assert main(["bench", "device", "--repeats", "1", *sized, "--json", str(tmp_path / "d.json")]) == 0
    assert written == (["0.6B"] if texts else ["0.6B", "4B"])           # a rehearsal writes no 4B checkpoint
    assert [call["texts"] for call in asked["run_mixes"]] == [texts or 512, min(texts or 512, 32)]
    assert {call["model"] for call in asked["run_mixes"]} == {str(tmp_path / "0.6B")}
    assert [(call["model"], call["queries"], call["configs"]) for call in asked["run_train_benchmark"]] == \
        [(str(tmp_path / "0.6B"), 2 if texts else 8, ["full", "full, remat", "LoRA r=16"]),
         (str(tmp_path / ("0.6B" if texts else "4B")), 2 if texts else 8, ["LoRA r=16, remat"])]
    assert [call["tokens"] for call in asked["check_packed_kernel"]] == [256 if texts else 1024]
    serve = asked["serve"][0]
    assert serve["folder"] == tmp_path / "0.6B"
    if texts:
        assert "run_suite" not in asked and [(c["model"], c["texts"], c["batch_size"], c["tokens"]) for c in
                                             asked["run_benchmark"]] == [(str(tmp_path / "0.6B"), 8, 8, "128")]
        assert {call["longest"] for call in asked["run_mixes"]} == {128}
        assert [[tokens for tokens, _ in call["mixes"]] for call in asked["run_mixes"]] == [["5-30", "10-4000"]] * 2
        assert [call["tokens"] for call in asked["run_train_benchmark"]] == [128, 128]
        assert serve["levels"] == [8] and serve["max_requests"] == 8 and serve["max_batch_tokens"] == 1024
    else:
        assert len(asked["run_suite"]) == 1 and "run_benchmark" not in asked
        assert {call["longest"] for call in asked["run_mixes"]} == {None}
        assert {call["mixes"] for call in asked["run_mixes"]} == {None}          # all of LENGTH_MIXES
        assert all("tokens" not in call for call in asked["run_train_benchmark"])
        assert serve["levels"] == [16, 64] and serve["max_requests"] == 200 and serve["max_batch_tokens"] is None
    assert set(json.loads((tmp_path / "d.json").read_text())["seconds"]) >= {"kernel", "suite", "serve"}


def test_a_missing_optional_stack_names_the_extra_that_installs_it(checkpoint, monkeypatch, capsys):
    """In the base install `verify` (and bench's torch side, mteb_encoder, serve) stop at once with the
    command that installs what they need, not with a bare "No module named 'torch'"."""
    monkeypatch.setitem(sys.modules, "torch", None)             # as if torch were not installed
    assert main(["verify", "--model", str(checkpoint)]) == 1
    assert capsys.readouterr().err.strip() == ("qwen3-jax: error: qwen3-jax verify (transformers on the same "
                                                 "checkpoint) needs torch, which is not installed: pip install "
                                                 "\"qwen3-jax[reference]\"")
    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert main(["serve", "--model", str(checkpoint)]) == 1
    assert 'pip install "qwen3-jax[serve]"' in capsys.readouterr().err
