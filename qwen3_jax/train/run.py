"""A training run: the loop around the step, with progress, checkpoints that survive kill -9, and resume.
`train(TrainConfig(...))` from Python; `qwen3-jax train` from the shell.

DIR (the output folder) holds run.json (what the run is, its base weights' fingerprint included; another
run's folder, or other weights at the model's path, is refused), .lock (held by the run from start to
end, so a second run on the folder is refused at once; the kernel drops it with a killed run), metrics.jsonl
(every logged step and evaluation), checkpoints/checkpoint_N (Orbax, each committed atomically: the
trained parameters, the optimizer state, the step, which is also the data position and the RNG key),
and at the end final/ (a merged Hugging Face folder) and, for LoRA, adapter/ (a peft folder), with
run.json's final_step saying which step they hold. metrics.png plots the loss (and the evaluation's
recall) and is redrawn at every checkpoint; --tensorboard DIR also writes the metrics as TensorBoard events.

A run's length (--steps or --epochs) is not what it computes: the same command with more steps continues
a finished run from its last checkpoint, on the same data order; with the same steps it is already done.
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

from qwen3_jax.checks import UsageError
from qwen3_jax.claims import LOCK, Claim
from qwen3_jax.extras import require
from qwen3_jax.progress import progress_bar
from qwen3_jax.textio import atomic_output
from qwen3_jax.train.checkpoints import Checkpoints, last_committed
from qwen3_jax.train.config import RUN_LENGTH, TrainConfig
from qwen3_jax.train.data import ExampleStream, JsonlSource
from qwen3_jax.train.lora import LoRAConfig
from qwen3_jax.train.trainer import Trainer

RUN_FILE = "run.json"
METRICS_FILE, PLOT_FILE = "metrics.jsonl", "metrics.png"
FINAL_STEP = "final_step"          # run.json: the step final/ (and adapter/) were exported at
CHECKPOINTS, FINAL, ADAPTER = "checkpoints", "final", "adapter"


def _all_processes_reach(point: str) -> None:
    """A barrier across the processes of a multi-process job (nothing on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(point)


def _computed(fields: dict) -> dict:
    """What a run.json says the run computes: all but its length and how far it got, the LoRA targets by
    the projections they name ("all" and "all-linear" are all seven), and no adapter's settings in full
    fine-tuning (lora_rank None: a run.json written before the settings were nested records the --lora-*
    flags given beside --full)."""
    computed = {k: v for k, v in fields.items() if k not in (*RUN_LENGTH, FINAL_STEP)}
    if computed.get("lora_rank", 0) is None:
        return {k: v for k, v in computed.items() if k not in ("lora_alpha", "lora_dropout", "lora_targets")}
    if "lora_targets" in computed:
        computed["lora_targets"] = LoRAConfig(targets=computed["lora_targets"]).spelled_targets
    return computed


def _refusal(output: Path, found: dict, wanted: dict, changed: list[str]) -> str:
    """Why `output`, whose run.json says `found`, cannot hold this run, `wanted` (they differ in the
    fields `changed`), and what to do: an edited data file is named as such."""
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


def _warn(message: str) -> None:
    """One line on stderr (process 0's)."""
    _log(lambda line: print(line, file=sys.stderr, flush=True), message)


class Run:
    """One training run, set up from a TrainConfig (and a mesh, or one device): indexes the data,
    builds the Trainer, claims the output folder, and runs or resumes the loop."""

    def __init__(self, config: TrainConfig, *, mesh=None, out=print):
        self.config, self.out = config, out
        self.output = Path(config.output)
        self.claim = Claim(self.output, lambda path: path.name == LOCK)
        if self.output.is_dir():
            self._hold()              # a second run on the folder is refused before any work
        self.source = JsonlSource(config.data, config.objective.loss)
        self.stream = ExampleStream(self.source, batch_size=config.batch_size, seed=config.seed)
        eval_source = JsonlSource(config.eval_data, config.objective.loss) if config.eval_data else None
        self.eval_examples = [eval_source[i] for i in range(len(eval_source))] if eval_source else []
        self.total_steps = config.steps or max(1, math.ceil(config.epochs * self.stream.steps_per_epoch()))
        for line in config.implausible(self.total_steps):
            _warn(f"warning: {line}")
        if config.tensorboard:
            require("tensorboard", "--tensorboard")
        self.plots = self._plots_available()
        self.wanted = config.fingerprint()
        self.continues = None               # the step a finished run being continued ended at
        self.done = self._finished()
        if self.done:
            return                          # nothing to load: run() says so
        negatives = self.source.max_documents - 1 if config.hard_negatives is None else config.hard_negatives
        self.trainer = Trainer(config, total_steps=self.total_steps, negatives=max(negatives, 0), mesh=mesh)
        self._claim_output()          # after every setting is checked: a bad one leaves no folder behind
        self.checkpoints = Checkpoints(self.output / CHECKPOINTS, keep=config.keep)

    def _hold(self) -> None:
        """The run folder's lock, held until the run ends (process 0's: the processes share one folder)."""
        if not self.claim.locks and jax.process_index() == 0:
            self.claim.hold(f"qwen3-jax train (pid {os.getpid()})")

    def _plots_available(self) -> bool:
        """Whether metrics.png can be drawn (matplotlib, the study extra); a note on stderr if not."""
        try:
            require("study", "the loss plot (metrics.png)")
        except ImportError as missing:
            _warn(f"note: no {PLOT_FILE}: {missing}")
            return False
        return True

    def _finished(self) -> bool:
        """Whether the folder holds this run finished at this length (then there is nothing to do).
        Refuses a length shorter than the steps already trained; notes a finished run to continue."""
        found = None if self.config.overwrite else self._check_output(self.wanted)
        if found is None:
            return False
        trained = last_committed(self.output / CHECKPOINTS)
        if trained is not None and trained > self.total_steps:
            raise UsageError(f"{self.output} has trained {trained} steps, more than the {self.total_steps} asked "
                             f"for; to keep an earlier step, qwen3-jax export {self.output / CHECKPOINTS}/"
                             "checkpoint_N DESTINATION, or pass --overwrite to start again")
        exported = found.get(FINAL_STEP)
        if exported is not None and exported < self.total_steps:
            self.continues = exported
        return exported == self.total_steps and trained == exported and (self.output / FINAL).is_dir()

    def _check_output(self, wanted: dict) -> dict | None:
        """The run.json found in the folder; refuses a folder that holds another run (unless overwrite)
        or files of something else."""
        run_file = self.output / RUN_FILE
        found = json.loads(run_file.read_text()) if run_file.is_file() else None
        if found is not None and "weights" not in found:
            found["weights"] = wanted["weights"]           # a run begun before run.json kept them: not known
        if found is None:
            self.claim.refuse_strangers(lambda _: f"{self.output} is not empty and holds no training run; use "
                                                  "another --output")
        elif not self.config.overwrite:
            self.claim.refuse_other(_computed(found), _computed(wanted),
                                    lambda changed: _refusal(self.output, found, wanted, changed))
        return found

    def _claim_output(self) -> None:
        """Refuses a folder that holds another run, unless overwrite; records this run in run.json."""
        wanted = self.wanted
        self._check_output(wanted)
        _all_processes_reach("checked the output folder")     # before any process writes to it
        if jax.process_index() == 0:
            self.output.mkdir(parents=True, exist_ok=True)
            self._hold()
            found = self._check_output(wanted)            # again, now that no other run can write the folder
            if found is not None and self.config.overwrite:
                for path in self.output.iterdir():
                    if path.is_dir():
                        shutil.rmtree(path)
                    elif path.name != LOCK:
                        path.unlink()
            self.claim.record(RUN_FILE, wanted, indent=2)
        _all_processes_reach("claimed the output folder")

    def run(self) -> dict:
        if self.done:
            return self._already_done()
        config, step = self.config, self.trainer.step
        state = step.init()
        start = 0
        latest = self.checkpoints.latest()
        if latest is not None:
            state = self.checkpoints.restore(latest, state)
            start = int(state.step)
            _log(self.out, self._resuming(start, latest))
        _trim_metrics(self.output / METRICS_FILE, start)
        self.board = None
        if config.tensorboard and jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            # events a killed run wrote after its last checkpoint are dropped: they will be written again
            self.board = SummaryWriter(config.tensorboard, purge_step=start + 1 if start else None)
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
                self._plot()
                if self.board is not None:
                    self.board.flush()                    # what TensorBoard shows is as fresh as the plot
        progress.close()
        if self.board is not None:
            self.board.close()
        written = self.trainer.export(state, self.output / FINAL, overwrite=True,
                                      adapter=self.output / ADAPTER if self.trainer.lora else None)
        for name, folder in written.items():
            _log(self.out, f"wrote {name}: {folder}")
        if jax.process_index() == 0:
            self.claim.record(RUN_FILE, {**self.wanted, FINAL_STEP: self.total_steps}, indent=2)
        self.claim.release()                              # the run is over: the folder is free
        return {"steps": self.total_steps, "output": str(self.output), **written}

    def _resuming(self, start: int, latest: int) -> str:
        """What a run that goes on from a checkpoint says: continuing a finished run, or resuming."""
        if self.continues is None:
            return f"resuming from step {start} ({self.checkpoints.path(latest)})"
        schedule = self.config.optimizer.schedule
        replanned = "" if schedule == "constant" else (
            f"; the {schedule} learning-rate schedule is planned again over {self.total_steps} steps")
        return (f"continuing the finished run from step {start} to step {self.total_steps} ({FINAL}/ is "
                f"replaced at the end{replanned})")

    def _already_done(self) -> dict:
        """A finished run asked for again at its length: says so and leaves everything as it is."""
        written = {name: str(self.output / name) for name in (ADAPTER, FINAL) if (self.output / name).is_dir()}
        _log(self.out, f"{self.output} already finished its {self.total_steps} steps ({self.output / FINAL}); "
                       "nothing to do (raise --steps or --epochs to train it further)")
        self.claim.release()
        return {"steps": self.total_steps, "output": str(self.output), **written}

    def _append(self, record: dict) -> None:
        if jax.process_index() == 0:
            with open(self.output / METRICS_FILE, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            if self.board is not None:
                for name, value in record.items():
                    if name != "step":
                        self.board.add_scalar(_board_tag(name), value, record["step"])

    def _plot(self) -> None:
        """metrics.png beside metrics.jsonl: the loss by step and, when the run evaluates, its recall."""
        if not self.plots or jax.process_index() != 0:
            return
        from matplotlib.figure import Figure

        records = [json.loads(line) for line in (self.output / METRICS_FILE).read_text().splitlines() if line]
        losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
        if not losses:
            return                                        # nothing logged yet (--log-every)
        recalls = sorted({k for r in records for k in r if k.startswith("eval_recall@")})
        figure = Figure(figsize=(11 if recalls else 6, 4), layout="constrained")
        loss_axes, *recall_axes = figure.subplots(1, 2 if recalls else 1, squeeze=False)[0]
        loss_axes.plot(*zip(*losses))
        loss_axes.set(xlabel="step", ylabel="loss", title=f"{self.output.name}: loss")
        for name in recalls:
            recall_axes[0].plot(*zip(*[(r["step"], r[name]) for r in records if name in r]), marker="o",
                                label=name.removeprefix("eval_"))
        if recalls:
            recall_axes[0].set(xlabel="step", ylabel="recall", ylim=(0, 1.02), title="held-out evaluation")
            recall_axes[0].legend()
        with atomic_output(self.output / PLOT_FILE, "wb") as handle:
            figure.savefig(handle, format="png", dpi=100)


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


def _board_tag(name: str) -> str:
    """A metric's TensorBoard tag: train/loss, eval/recall_at_10 (TensorBoard's tags take no '@')."""
    section, evaluated, metric = name.partition("eval_")
    return f"eval/{metric.replace('@', '_at_')}" if evaluated and not section else f"train/{name}"


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
