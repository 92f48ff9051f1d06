"""A training run: the loop around the step, with progress, checkpoints that survive kill -9, and resume.
`train(TrainConfig(...))` from Python; `qwen3-jax train` from the shell.

DIR (the output folder) holds run.json (what the run is, its base weights' fingerprint included; another
run's folder, or other weights at the model's path, is refused), .lock (held by the run from start to
end, so a second run on the folder is refused at once; the kernel drops it with a killed run), metrics.jsonl
(every logged step and evaluation), checkpoints/checkpoint_N (Orbax, each committed atomically: the
trained parameters, the optimizer state, the step, which is also the data position and the RNG key),
and at the end final/ (a merged Hugging Face folder) and, for LoRA, adapter/ (a peft folder).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import jax

from qwen3_jax.progress import progress_bar
from qwen3_jax.textio import atomic_output, hold_lock
from qwen3_jax.train.checkpoints import Checkpoints
from qwen3_jax.train.config import TrainConfig
from qwen3_jax.train.data import ExampleStream, JsonlSource
from qwen3_jax.train.trainer import Trainer

RUN_FILE = "run.json"
LOCK = ".lock"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS, FINAL, ADAPTER = "checkpoints", "final", "adapter"


def _all_processes_reach(point: str) -> None:
    """A barrier across the processes of a multi-process job (nothing on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(point)


def _refusal(output: Path, found: dict, wanted: dict) -> str:
    """Why `output` cannot hold this run, and what to do: an edited data file is named as such."""
    changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
    was, now = found.get("data") or {}, wanted["data"]
    if changed == ["data"] and isinstance(was, dict) and was.get("path") == now["path"]:
        reason = (f"{output} cannot resume: its data file {now['path']} changed since the run began ({was.get('bytes')} -> {now['bytes']} "
                  "bytes, another SHA-256), so a resumed run would read other examples; restore the file, or")
    elif changed == ["weights"]:
        reason = (f"{output} cannot resume: the weights at {wanted['model']} changed since the run began, so a "
                  "resumed run would go on from other weights; restore them, or")
    else:
        reason = f"{output} holds another run (it differs in {', '.join(changed)});"
    return (f"{reason} use another --output, or pass --overwrite to delete that run, its checkpoints included, "
            "and start again")


def _log(out, message: str) -> None:
    if jax.process_index() == 0:
        out(message)


class Run:
    """One training run, set up from a TrainConfig (and a mesh, or one device): indexes the data,
    builds the Trainer, claims the output folder, and runs or resumes the loop."""

    def __init__(self, config: TrainConfig, *, mesh=None, out=print):
        self.config, self.out = config, out
        self.output = Path(config.output)
        self._lock = None
        if self.output.is_dir():
            self._hold()              # a second run on the folder is refused before any work
        self.source = JsonlSource(config.data, config.loss)
        self.stream = ExampleStream(self.source, batch_size=config.batch_size, seed=config.seed)
        eval_source = JsonlSource(config.eval_data, config.loss) if config.eval_data else None
        self.eval_examples = [eval_source[i] for i in range(len(eval_source))] if eval_source else []
        self.total_steps = config.steps or max(1, math.ceil(config.epochs * self.stream.steps_per_epoch()))
        negatives = self.source.max_documents - 1 if config.hard_negatives is None else config.hard_negatives
        self.trainer = Trainer(config, total_steps=self.total_steps, negatives=max(negatives, 0), mesh=mesh)
        self._claim_output()          # after every setting is checked: a bad one leaves no folder behind
        self.checkpoints = Checkpoints(self.output / CHECKPOINTS, keep=config.keep)

    def _hold(self) -> None:
        """The run folder's lock, held until the run ends (process 0's: the processes share one folder)."""
        if self._lock is None and jax.process_index() == 0:
            self._lock = hold_lock(self.output / LOCK, f"qwen3-jax train (pid {os.getpid()})")

    def _check_output(self, wanted: dict) -> dict | None:
        """The run.json found in the folder; refuses a folder that holds another run (unless overwrite)
        or files of something else."""
        run_file = self.output / RUN_FILE
        found = json.loads(run_file.read_text()) if run_file.is_file() else None
        if found is not None and "weights" not in found:
            found["weights"] = wanted["weights"]           # a run begun before run.json kept them: not known
        if found is None and self.output.is_dir() and any(p.name != LOCK for p in self.output.iterdir()):
            raise FileExistsError(f"{self.output} is not empty and holds no training run; use another --output")
        if found is not None and found != wanted and not self.config.overwrite:
            raise FileExistsError(_refusal(self.output, found, wanted))
        return found

    def _claim_output(self) -> None:
        """Refuses a folder that holds another run, unless overwrite; records this run in run.json."""
        wanted = self.config.fingerprint()
        self._check_output(wanted)
        _all_processes_reach("checked the output folder")     # before any process writes to it
        if jax.process_index() == 0:
            self.output.mkdir(parents=True, exist_ok=True)
            self._hold()
            found = self._check_output(wanted)            # again, now that no other run can write the folder
            if found is not None and found != wanted:
                for path in self.output.iterdir():
                    if path.is_dir():
                        shutil.rmtree(path)
                    elif path.name != LOCK:
                        path.unlink()
            with atomic_output(self.output / RUN_FILE) as handle:
                json.dump(wanted, handle, indent=2)
        _all_processes_reach("claimed the output folder")

    def run(self) -> dict:
        config, step = self.config, self.trainer.step
        state = step.init()
        start = 0
        latest = self.checkpoints.latest()
        if latest is not None:
            state = self.checkpoints.restore(latest, state)
            start = int(state.step)
            _log(self.out, f"resuming from step {start} ({self.checkpoints.path(latest)})")
        _trim_metrics(self.output / METRICS_FILE, start)
        last_saved = latest
        progress = progress_bar(self.total_steps, "step", initial=start, enabled=not config.quiet and sys.stderr.isatty())
        tokens_done, started = 0, time.perf_counter()
        for step_index in range(start, self.total_steps):
            batch = self.trainer.batch(self.stream.batch(step_index))
            state, metrics = step(state, batch)
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                progress.close()
                kept = f"checkpoint {last_saved} is the last good one" if last_saved else "no checkpoint was saved"
                raise FloatingPointError(f"loss is {loss} at step {step_index + 1}; {kept} "
                                         "(lower --lr, or check the data)")
            tokens_done += int((batch["segments"] > 0).sum())
            done = step_index + 1
            record = {"step": done, "loss": loss, "learning_rate": float(metrics["learning_rate"]),
                      "grad_norm": float(metrics["grad_norm"]),
                      "tokens_per_s": tokens_done / max(time.perf_counter() - started, 1e-9)}
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{record['learning_rate']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}")
            if done % config.log_every == 0 or done == self.total_steps:
                self._append(record)
            if self.eval_examples and (done % (config.eval_every or config.save_every) == 0 or done == self.total_steps):
                metrics = self.trainer.evaluate(state, self.eval_examples)
                self._append({"step": done, **{f"eval_{k}": v for k, v in metrics.items()}})
            if done % config.save_every == 0 or done == self.total_steps:
                self.checkpoints.save(done, state)
                last_saved = done
        progress.close()
        written = self.trainer.export(state, self.output / FINAL, overwrite=True,
                                      adapter=self.output / ADAPTER if self.trainer.lora else None)
        for name, folder in written.items():
            _log(self.out, f"wrote {name}: {folder}")
        if self._lock is not None:
            self._lock.close()                            # the run is over: the folder is free
        return {"steps": self.total_steps, "output": str(self.output), **written}

    def _append(self, record: dict) -> None:
        if jax.process_index() == 0:
            with open(self.output / METRICS_FILE, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


def export_checkpoint(checkpoint: str | Path, destination: str | Path, *, adapter: str | Path | None = None,
                      overwrite: bool = False, mesh=None) -> dict:
    """A checkpoint of a run (OUTPUT/checkpoints/checkpoint_N) as a merged Hugging Face folder at
    `destination` and, for a LoRA run, a peft adapter folder at `adapter`."""
    checkpoint = Path(checkpoint)
    run_folder = checkpoint.parent.parent
    if not checkpoint.is_dir() or not (run_folder / RUN_FILE).is_file():
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint of a qwen3-jax training run "
                                f"(expected OUTPUT/{CHECKPOINTS}/checkpoint_N beside OUTPUT/{RUN_FILE})")
    step = checkpoint.name.rpartition("_")[2]
    if not step.isdigit():
        raise ValueError(f"{checkpoint}: expected a folder named checkpoint_N")
    config = TrainConfig.from_fingerprint(json.loads((run_folder / RUN_FILE).read_text()), output=str(run_folder))
    trainer = Trainer(config, total_steps=1, negatives=0, mesh=mesh)
    state = Checkpoints(checkpoint.parent, keep=config.keep).restore(int(step), trainer.step.init())
    return trainer.export(state, destination, adapter=adapter, overwrite=overwrite)


def _trim_metrics(path: Path, step: int) -> None:
    """Drops the metrics a killed run logged after its last checkpoint (they will be logged again)."""
    if jax.process_index() != 0 or not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    with atomic_output(path) as handle:
        handle.write("".join(line + "\n" for line in kept))


def train(config: TrainConfig, *, mesh=None, out=print) -> dict:
    """Runs (or resumes) a training run; returns where its outputs went."""
    return Run(config, mesh=mesh, out=out).run()
