"""Training runs as users run them: `qwen3-jax train` killed with SIGKILL and resumed, learning on a
synthetic retrieval set, export that sentence-transformers, peft and transformers load, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from qwen3_jax import Qwen3Embedder
from qwen3_jax.reranker import Qwen3Reranker
from qwen3_jax.textio import InputError
from qwen3_jax.train.run import TrainConfig, Run, train
from tests.reference import card_scores

SYLLABLES = "ka lo mi ne ru sa ti vo pe zu".split()
PLACES = "river mountain city garden market school harbor forest".split()


def _names(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(SYLLABLES, 3))
        names += [] if name in names else [name]
    return names


def retrieval_lines(names: list[str]) -> list[dict]:
    """Who lives where: each query's positive names the person, its hard negative (on every other
    line; none on the rest) puts them elsewhere."""
    lines = []
    for i, name in enumerate(names):
        lines.append({"query": f"where does {name} live", "positive": f"{name} lives near the {PLACES[i % 8]}",
                      "negatives": [f"{name} lives near the {PLACES[(i + 3) % 8]}"][: i % 2]})
    return lines


def reranker_lines(names: list[str]) -> list[dict]:
    return [{"query": f"where does {name} live", "document": f"{other} lives near the {PLACES[i % 8]}",
             "label": int(other == name)}
            for i, name in enumerate(names) for other in (name, names[(i + 1) % len(names)])]


def write_jsonl(path, lines) -> str:
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    names = _names(96)
    return {"train": write_jsonl(folder / "train.jsonl", retrieval_lines(names[:64])),
            "eval": write_jsonl(folder / "eval.jsonl", retrieval_lines(names[64:])),
            "rerank": write_jsonl(folder / "rerank.jsonl", reranker_lines(names[:16])),
            "rerank_eval": write_jsonl(folder / "rerank_eval.jsonl", reranker_lines(names[64:72]))}


def _losses(folder) -> dict[int, float]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def _cli_args(checkpoint, data, output, cache, steps=6):
    return ["train", "--compile-cache", cache, "--model", str(checkpoint), "--data", data["train"], "--output", str(output), "--lora-rank", "4",
            "--lr", "5e-3", "--batch-size", "8", "--steps", str(steps), "--save-every", "2", "--max-length", "64",
            "--seed", "3", "--quiet"]


def test_run_killed_mid_way_resumes_with_the_same_losses(checkpoint, data, tmp_path, compile_cache, monkeypatch):
    """kill -9 after a checkpoint, then the same command from another folder with every path spelled
    another way (relative, with ./ and ..): it resumes, and every loss equals an uninterrupted run's."""
    from qwen3_jax.cli import main

    assert main(_cli_args(checkpoint, data, tmp_path / "whole", compile_cache)) == 0
    whole = _losses(tmp_path / "whole")
    assert sorted(whole) == [1, 2, 3, 4, 5, 6]

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "qwen3_jax.cli", *_cli_args(checkpoint, data, killed, compile_cache)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    # kill once the step-2 checkpoint is committed and step 3 is logged: work after the checkpoint is lost
    while time.time() < deadline and process.poll() is None:
        if (killed / "checkpoints" / "checkpoint_2").is_dir() and 3 in _losses(killed):
            break
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read()
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "final").exists()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    respelled = {"train": "./" + os.path.relpath(data["train"])}
    assert main(_cli_args(os.path.relpath(checkpoint) + "/", respelled, "../killed/.", compile_cache)) == 0
    resumed = _losses(killed)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]          # step 3 logged once, by the resumed run
    assert max(abs(resumed[s] - whole[s]) for s in whole) <= 1e-6
    # a finished run's last checkpoint exports to the same weights as its final/ folder
    assert main(["export", str(killed / "checkpoints" / "checkpoint_6"), str(tmp_path / "exported"),
                 "--adapter", str(tmp_path / "exported-adapter")]) == 0
    assert (tmp_path / "exported-adapter" / "adapter_model.safetensors").is_file()
    from safetensors.numpy import load_file

    a, b = load_file(tmp_path / "exported" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _trained(checkpoint, data, output, **overrides):
    settings = dict(model=str(checkpoint), data=data["train"], output=str(output), eval_data=data["eval"],
                    lora_rank=8, lora_alpha=16, lora_dropout=0.0, learning_rate=3e-3, warmup_steps=2,
                    batch_size=16, steps=24, save_every=12, eval_every=12, max_length=64, quiet=True)
    return train(TrainConfig.from_flat({**settings, **overrides}), out=lambda _: None)


def test_lora_run_learns_and_exports_for_sentence_transformers_and_peft(checkpoint, data, tmp_path):
    import torch
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    eval_lines = [json.loads(line) for line in open(data["eval"])]
    queries = [line["query"] for line in eval_lines]
    documents = [line["positive"] for line in eval_lines]

    def recall_at_1(embed) -> float:
        return float((np.argmax(embed(queries) @ embed(documents).T, axis=1) == np.arange(len(queries))).mean())

    untrained = Qwen3Embedder.from_pretrained(checkpoint, max_length=64)
    before = recall_at_1(untrained.encode)
    _trained(checkpoint, data, tmp_path / "run", row_length=320)    # its steps' rows take 288-320 tokens
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
    evals = [r for r in records if "eval_recall@1" in r]
    assert [r["step"] for r in evals] == [12, 24]
    assert all(0 <= r["eval_recall@10"] <= 1 and 0 <= r["eval_ndcg@10"] <= 1 for r in evals)

    ours = Qwen3Embedder.from_pretrained(tmp_path / "run" / "final", max_length=64)
    after = recall_at_1(ours.encode)
    assert after >= before + 0.2, (before, after)
    # the logged recall@1 is over the eval set's documents (positives and negatives), ours over positives
    assert evals[-1]["eval_recall@1"] >= before + 0.1

    expected = ours.encode(queries + documents)
    st = SentenceTransformer(str(tmp_path / "run" / "final"), device="cpu")
    assert np.abs(st.encode(queries + documents) - expected).max() <= 1e-4

    base = AutoModel.from_pretrained(str(checkpoint), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter")).eval()
    tokenizer = untrained.tokenizer
    with torch.no_grad():
        pooled = np.stack([peft_model(input_ids=torch.as_tensor([ids])).last_hidden_state[0, -1].numpy()
                           for ids in tokenizer.encode(queries + documents, 64)])
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    assert np.abs(pooled - expected).max() <= 1e-4


@pytest.mark.parametrize("reranker_checkpoint", ["tied"], indirect=True)
def test_reranker_run_exports_a_folder_both_score_alike(reranker_checkpoint, data, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _trained(reranker_checkpoint, {"train": data["rerank"], "eval": data["rerank_eval"]}, tmp_path / "run",
             loss="reranker", batch_size=8, steps=4, save_every=2, eval_every=2, max_length=128)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records if "eval_ndcg@10" in r] == [2, 4]
    pairs = [(line["query"], line["document"]) for line in map(json.loads, open(data["rerank_eval"]))]
    ours = Qwen3Reranker.from_pretrained(tmp_path / "run" / "final").score_pairs(pairs)
    tokenizer = AutoTokenizer.from_pretrained(str(reranker_checkpoint), padding_side="left")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "final"), dtype=torch.float32).eval()
    assert np.abs(card_scores(merged, tokenizer, pairs) - ours).max() <= 1e-4
    base = AutoModelForCausalLM.from_pretrained(str(reranker_checkpoint), dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter")).eval()
    assert np.abs(card_scores(adapted, tokenizer, pairs) - ours).max() <= 1e-4
    untrained = Qwen3Reranker.from_pretrained(reranker_checkpoint).score_pairs(pairs)
    assert np.abs(untrained - ours).max() > 1e-3          # the adapters changed the scores


# --- bad input: one clear error, nothing written that looks finished ---------------------------------

def test_run_json_records_the_settings_flat_as_before_they_were_nested():
    """The objective's, optimizer's and LoRA's settings live in their own dataclasses, but run.json
    records them on one level under the names it always had (a run begun before resumes), and that
    form reads back into the same config; full fine-tuning records lora_rank None."""
    from qwen3_jax.arguments import settings_from
    from qwen3_jax.cli import build_parser

    flags = ["train", "--model", "m", "--data", "d", "--output", "o", "--steps", "3"]
    config = settings_from(TrainConfig, build_parser("train").parse_args(
        [*flags, "--lora-targets", "q_proj,v_proj", "--lr", "3e-5", "--temperature", "0.1", "--warmup", "2"]))
    assert config.flat() == {
        "model": "m", "data": "d", "output": "o", "loss": "infonce", "lora_rank": 8, "lora_alpha": 32.0,
        "lora_dropout": 0.05, "lora_targets": "q_proj,v_proj", "temperature": 0.1, "hard_negatives": None,
        "use_batch": True, "include_qq": False, "include_dd": False, "false_negative_margin": None,
        "matryoshka_dims": (), "instruction": None, "batch_size": 32, "mini_batch_size": None, "max_length": 512,
        "row_length": None, "learning_rate": 3e-5, "warmup_steps": 2, "schedule": "cosine", "weight_decay": 0.01,
        "max_grad_norm": 1.0, "steps": 3, "epochs": None, "remat": "off", "dtype": "float32", "fsdp": False,
        "eval_data": None, "eval_every": None, "save_every": 100, "keep": 3, "log_every": 1, "seed": 0,
        "overwrite": False, "quiet": False, "tensorboard": None}
    assert TrainConfig.from_flat(config.flat()) == config
    full = settings_from(TrainConfig, build_parser("train").parse_args([*flags, "--full"]))
    assert full.lora is None and full.flat() == {**config.flat(), "lora_rank": None, "lora_targets": "all-linear",
                                                 "temperature": 0.05, "learning_rate": 1e-4, "warmup_steps": 0}
    assert TrainConfig.from_flat(full.flat()) == full
    with pytest.raises(TypeError, match="no setting lr"):
        TrainConfig.from_flat({**config.flat(), "lr": 1e-3})


def test_a_run_json_of_the_flat_settings_compares_by_what_it_computes():
    """A run.json written before the settings were nested may spell the LoRA targets "all" or name all
    seven, or record --lora-* flags given beside --full: the run it describes is the one a config now
    records, so it resumes; other targets, or another alpha for an adapter, are another run."""
    from qwen3_jax.train.lora import PROJECTIONS
    from qwen3_jax.train.run import _computed

    now = {"lora_rank": 8, "lora_alpha": 32.0, "lora_targets": "all-linear", "steps": 3}
    assert _computed({**now, "lora_targets": "all"}) == _computed({**now, "lora_targets": ",".join(PROJECTIONS)}) \
        == _computed({**now, "steps": 6}) == _computed(now)
    assert _computed({**now, "lora_targets": "q_proj"}) != _computed(now)
    assert _computed({**now, "lora_alpha": 16.0}) != _computed(now)
    full = {**now, "lora_rank": None}
    assert _computed({**full, "lora_alpha": 16.0, "lora_targets": "q_proj"}) == _computed(full)


def _config(checkpoint, data, output, **overrides):
    settings = dict(model=str(checkpoint), data=data["train"], output=str(output), batch_size=8, steps=2,
                    max_length=64, quiet=True)
    return TrainConfig.from_flat({**settings, **overrides})


@pytest.mark.parametrize("line, message", [
    ('{"query": "q", "positive": "p"', "not valid JSON"),
    ('{"query": "q", "negatives": []}', "missing string field 'positive'"),
    ('{"query": "q", "positive": "p", "negatives": "n"}', "'negatives' must be a list of strings"),
    ('["q", "p"]', "must be a JSON object"),
])
def test_a_bad_line_names_the_file_and_line(checkpoint, data, tmp_path, line, message):
    good = open(data["train"]).read().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([*good[:5], line, *good[5:]]) + "\n")
    with pytest.raises(InputError, match=f"bad.jsonl:6: .*{message}"):
        Run(_config(checkpoint, {"train": str(bad)}, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("reranker_checkpoint", ["tied"], indirect=True)
def test_row_length_gives_the_steps_one_shape(checkpoint, reranker_checkpoint, data, tmp_path):
    """Without --row-length this data's steps take several row lengths (each compiles the step again);
    with it every step has one shape, for the contrastive and the reranker batches."""
    def shapes(model, lines, name, **settings):
        run = Run(_config(model, {"train": lines}, tmp_path / name, steps=8, **settings))
        return {run.trainer.batch(run.stream.batch(i))["ids"].shape for i in range(8)}

    def one_shape_at_least(wanted: int, found: set) -> bool:
        (shape,) = found
        # rounded up as rows are: to a multiple of 1/16 of the power of two below, at least 16
        return shape[:2] == (1, 1) and wanted <= shape[2] < wanted + max(wanted / 16, 16)

    natural = shapes(checkpoint, data["train"], "default")
    assert len(natural) > 1
    wanted = max(length for *_, length in natural) + 1                 # every step fits, none is that long
    assert one_shape_at_least(wanted, shapes(checkpoint, data["train"], "fixed", row_length=wanted))
    natural = shapes(reranker_checkpoint, data["rerank"], "reranker", loss="reranker", batch_size=4)
    wanted = max(length for *_, length in natural) + 1
    assert one_shape_at_least(wanted, shapes(reranker_checkpoint, data["rerank"], "reranker-fixed", loss="reranker",
                                             batch_size=4, row_length=wanted))


def test_ms_swift_lines_and_empty_negatives_train(checkpoint, tmp_path):
    names = _names(8, seed=5)
    lines = [{"query": f"where does {n} live", "response": f"{n} lives here", "rejected_response": []}
             for n in names]
    data = {"train": write_jsonl(tmp_path / "swift.jsonl", lines)}
    summary = train(_config(checkpoint, data, tmp_path / "out"), out=lambda _: None)
    assert summary["steps"] == 2 and np.isfinite(list(_losses(tmp_path / "out").values())).all()


def test_another_runs_folder_is_refused_unless_overwrite(checkpoint, data, tmp_path):
    train(_config(checkpoint, data, tmp_path / "out", steps=1), out=lambda _: None)
    with pytest.raises(FileExistsError, match="holds another run .*learning_rate"):
        Run(_config(checkpoint, data, tmp_path / "out", steps=1, learning_rate=1e-3))
    Run(_config(checkpoint, data, tmp_path / "out", steps=1, learning_rate=1e-3, overwrite=True))
    assert not (tmp_path / "out" / "final").exists()      # the old run's outputs went with it
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no training run"):
        Run(_config(checkpoint, data, tmp_path / "mine", overwrite=True))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_an_edited_data_file_cannot_resume_and_the_refusal_says_what_overwrite_deletes(checkpoint, data, tmp_path):
    lines = tmp_path / "train.jsonl"
    lines.write_text(open(data["train"]).read())
    train(_config(checkpoint, {"train": str(lines)}, tmp_path / "out", steps=1), out=lambda _: None)
    lines.write_text(lines.read_text() + '{"query": "q", "positive": "p"}\n')     # edited after the run began
    with pytest.raises(FileExistsError, match=r"cannot resume: its data file .*train.jsonl changed since the run "
                                              r"began .*pass --overwrite to delete that run, its checkpoints included"):
        Run(_config(checkpoint, {"train": str(lines)}, tmp_path / "out", steps=1))
    assert (tmp_path / "out" / "checkpoints" / "checkpoint_1").is_dir()


def test_fewer_examples_than_a_batch_and_bad_settings(checkpoint, data, tmp_path):
    with pytest.raises(ValueError, match="holds 64 examples, fewer than one batch of 100"):
        Run(_config(checkpoint, data, tmp_path / "out", batch_size=100))
    for bad, message in [({"steps": None}, "exactly one of --steps and --epochs"),
                         ({"temperature": 0.0}, "temperature=0.0 must be positive"),
                         ({"matryoshka_dims": (16,)}, "matryoshka dim 16 is outside 32..64"),
                         ({"lora_targets": "q_proj,qkv"}, "LoRA targets qkv do not exist"),
                         ({"batch_size": 0}, "--batch-size=0 must be a whole number"),
                         ({"row_length": 0}, "--row-length=0 must be a whole number")]:
        with pytest.raises(ValueError, match=message):
            Run(_config(checkpoint, data, tmp_path / "out", **bad))


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(checkpoint, data, tmp_path, monkeypatch):
    from qwen3_jax.train.step import TrainState, TrainStep

    def step(self, state, batch):      # the loop's view of a step whose loss turns NaN at the third step
        loss = np.nan if int(state.step) >= 2 else 1.0
        return TrainState(state.step + 1, state.trainable, state.opt_state), \
            {"loss": loss, "learning_rate": 0.0, "grad_norm": 0.0}

    monkeypatch.setattr(TrainStep, "__call__", step)
    with pytest.raises(FloatingPointError, match="loss is nan at step 3; checkpoint 2 is the last good one"):
        train(_config(checkpoint, data, tmp_path / "out", steps=4, save_every=2), out=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["checkpoint_2"]
    assert not (tmp_path / "out" / "final").exists()


def test_two_processes_train_like_one(checkpoint, data, tmp_path, compile_cache, one_device_env, free_port):
    """The command as two local processes (one device each, a data=2 mesh over both), and the same run
    in one process on two devices: the same losses, and the exported model holds the same weights."""
    # one row length for every step: each process compiles one step program
    args = lambda output: [*_cli_args(checkpoint, data, output, compile_cache, steps=4), "--mesh", "data=2",
                           "--row-length", "256"]
    processes = [subprocess.Popen(
        [sys.executable, "-m", "qwen3_jax.cli", *args(tmp_path / "two"), "--coordinator", f"127.0.0.1:{free_port}",
         "--num-processes", "2", "--process-id", str(rank)], env=one_device_env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for rank in range(2)]
    results = [p.communicate(timeout=600) for p in processes]
    assert all(p.returncode == 0 for p in processes), results
    import jax

    from qwen3_jax import make_mesh

    config = TrainConfig.from_flat(dict(model=str(checkpoint), data=data["train"], output=str(tmp_path / "one"),
                                        lora_rank=4, learning_rate=5e-3, batch_size=8, steps=4, save_every=2,
                                        max_length=64, row_length=256, seed=3, quiet=True))
    train(config, mesh=make_mesh(data=2, devices=jax.devices()[:2]), out=lambda _: None)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    assert max(abs(one[s] - two[s]) for s in one) <= 1e-5
    from safetensors.numpy import load_file

    a, b = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("one", "two"))
    assert a.keys() == b.keys() and max(np.abs(a[k] - b[k]).max() for k in a) <= 1e-5


def test_other_weights_at_the_models_path_cannot_resume(checkpoint, data, tokenizers_pair, vocab_size, tmp_path):
    import shutil

    from tests.conftest import build_checkpoint

    model = shutil.copytree(checkpoint, tmp_path / "base")
    train(_config(model, data, tmp_path / "out", steps=1), out=lambda _: None)
    build_checkpoint(model, tokenizer=tokenizers_pair[1], vocab_size=vocab_size, seed=1)   # `init-random --overwrite`
    with pytest.raises(FileExistsError, match=rf"cannot resume: the weights at {model} changed since the run began"
                                              r".*--overwrite"):
        Run(_config(model, data, tmp_path / "out", steps=1))
    assert (tmp_path / "out" / "checkpoints" / "checkpoint_1").is_dir()


def test_a_second_run_on_a_folder_is_refused_at_once(checkpoint, data, tmp_path):
    from qwen3_jax.textio import FolderBusy

    first = Run(_config(checkpoint, data, tmp_path / "out", steps=1))
    for overwrite in (False, True):
        with pytest.raises(FolderBusy, match=r"out is in use by qwen3-jax train \(pid \d+\)"):
            Run(_config(checkpoint, data, tmp_path / "out", steps=1, overwrite=overwrite))
    first.run()                                       # the lock ends with the run
    assert Run(_config(checkpoint, data, tmp_path / "out", steps=1)).total_steps == 1


# --- a run you can watch and continue ------------------------------------------------------------------

def test_a_finished_run_continues_when_its_steps_are_raised(checkpoint, data, tmp_path, compile_cache, capsys):
    """The same command with more --steps goes on from the finished run's last checkpoint (no --overwrite)
    and its losses equal an uninterrupted longer run's; the same command again does nothing and says so;
    fewer steps than were trained is refused."""
    from qwen3_jax.cli import main

    args = lambda output, steps: [*_cli_args(checkpoint, data, output, compile_cache, steps=steps),
                                  "--schedule", "constant"]
    assert main(args(tmp_path / "whole", 6)) == 0
    watched = lambda steps: [*args(tmp_path / "run", steps), "--tensorboard", str(tmp_path / "board")]
    assert main(watched(4)) == 0
    final = tmp_path / "run" / "final" / "model.safetensors"
    exported = final.stat().st_mtime_ns
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    capsys.readouterr()

    assert main(watched(4)) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already finished its 4 steps" in err and "nothing to do" in err, err
    assert final.stat().st_mtime_ns == exported and (tmp_path / "run" / "metrics.jsonl").read_text() == metrics

    assert main(watched(6)) == 0
    assert "continuing the finished run from step 4 to step 6" in capsys.readouterr().err
    whole, continued = _losses(tmp_path / "whole"), _losses(tmp_path / "run")
    assert sorted(continued) == [1, 2, 3, 4, 5, 6]
    assert max(abs(continued[s] - whole[s]) for s in whole) <= 1e-6
    assert dict(_tensorboard_scalars(tmp_path / "board")["train/loss"]) == pytest.approx(continued, abs=1e-6)
    assert final.stat().st_mtime_ns != exported
    assert json.loads((tmp_path / "run" / "run.json").read_text())["final_step"] == 6

    assert main(args(tmp_path / "run", 5)) == 2
    assert "has trained 6 steps, more than the 5 asked for" in capsys.readouterr().err


def test_implausible_settings_warn_on_stderr_before_any_work(checkpoint, data, tmp_path, capsys):
    # a Matryoshka dim wider than the model is found once the model is loaded: the warnings come first
    unbuildable = {"matryoshka_dims": (16,)}
    with pytest.raises(ValueError, match="matryoshka dim 16 is outside"):
        Run(_config(checkpoint, data, tmp_path / "out", learning_rate=10.0, temperature=2.0, warmup_steps=2,
                    weight_decay=0.9, batch_size=1, hard_negatives=0, **unbuildable))
    out, err = capsys.readouterr()
    warnings = err.splitlines()
    assert out == "" and len(warnings) == 5 and all(line.startswith("warning: ") for line in warnings), err
    for found in ("--lr 10 is far above what LoRA uses", "--temperature 2 is above 1",
                  "--warmup 2 is not shorter than the run (2 steps)", "--weight-decay 0.9 is above 0.5",
                  "--batch-size 1 with --hard-negatives 0"):
        assert found in err
    with pytest.raises(ValueError, match="matryoshka dim 16"):
        Run(_config(checkpoint, data, tmp_path / "out", lora_rank=None, learning_rate=2e-3, **unbuildable))
    assert capsys.readouterr().err.splitlines() == [
        "warning: --lr 0.002 is far above what full fine-tuning uses (ms-swift's default is 1e-05; above 0.001 a "
        "run usually diverges)"]
    with pytest.raises(ValueError, match="matryoshka dim 16"):       # the defaults are plausible
        Run(_config(checkpoint, data, tmp_path / "out", **unbuildable))
    assert capsys.readouterr().err == ""


def _tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in `folder` as (step, value) in the order written, read
    with TensorBoard's own record format (length, CRC, an Event protobuf, CRC) and its purge rule: a
    session start at step s drops what was logged at s or later."""
    import struct

    from tensorboardX.proto.event_pb2 import Event, SessionLog

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                scalars = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in scalars.items()}
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_metrics_are_plotted_and_written_for_tensorboard(checkpoint, data, tmp_path):
    """The plot and the events of a run that evaluates; resumed after losing its last checkpoint, the
    run's TensorBoard events hold each step once."""
    import shutil

    from matplotlib.image import imread

    run = lambda: _trained(checkpoint, data, tmp_path / "run", steps=4, save_every=2, eval_every=2, batch_size=8,
                           tensorboard=str(tmp_path / "board"))
    run()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "checkpoint_4")     # as if killed before it was committed
    run()
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    picture = imread(tmp_path / "run" / "metrics.png")
    assert picture.shape[2] == 4 and picture.shape[1] > picture.shape[0]        # loss and recall side by side
    assert picture[..., :3].std() > 0.05                                       # something is drawn
    scalars = _tensorboard_scalars(tmp_path / "board")
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert dict(scalars["train/loss"]) == pytest.approx({r["step"]: r["loss"] for r in records if "loss" in r},
                                                        abs=1e-6)
    assert dict(scalars["eval/recall_at_1"]) == pytest.approx({r["step"]: r["eval_recall@1"] for r in records
                                                               if "eval_recall@1" in r}, abs=1e-6)
    assert [step for step, _ in scalars["eval/recall_at_1"]] == [2, 4]


def test_without_matplotlib_the_run_notes_it_and_draws_no_plot(checkpoint, data, tmp_path, monkeypatch, capsys):
    from qwen3_jax import extras

    monkeypatch.setitem(extras.EXTRAS, "study", ("matplotlib_is_not_installed",))
    train(_config(checkpoint, data, tmp_path / "out", steps=1), out=lambda _: None)
    assert capsys.readouterr().err.splitlines() == [
        "note: no metrics.png: the loss plot (metrics.png) needs matplotlib_is_not_installed, which is not "
        "installed: pip install \"qwen3-jax[study]\""]
    assert (tmp_path / "out" / "final").is_dir() and not (tmp_path / "out" / "metrics.png").exists()
