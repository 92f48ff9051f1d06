"""A training run: config, data, the jitted step, progress, checkpoints that survive kill -9, evaluation
and export. `train(TrainConfig(...))` from Python; `qwen3-jax train` from the shell.

DIR (the output folder) holds run.json (what the run is; another run's folder is refused), metrics.jsonl
(every logged step and evaluation), checkpoints/checkpoint_N (Orbax, each committed atomically: the
trained parameters, the optimizer state, the step, which is also the data position and the RNG key),
and at the end final/ (a merged Hugging Face folder) and, for LoRA, adapter/ (a peft folder).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3_jax.convert import export_hf, hf_key_prefix, staged_folder
from qwen3_jax.embedder import normalize_rows
from qwen3_jax.hub import resolve_model
from qwen3_jax.loader import load_model
from qwen3_jax.metrics import evaluate
from qwen3_jax.reranker import RerankerPrompts
from qwen3_jax.runner import LastTokenRunner
from qwen3_jax.sharding import fetch_global, shard_count
from qwen3_jax.textio import atomic_output
from qwen3_jax.tokenize import TextTokenizer, format_instruction
from qwen3_jax.train.batch import ContrastiveExample, contrastive_batch, pointwise_batch
from qwen3_jax.train.data import Example, ExampleStream, JsonlSource
from qwen3_jax.train.lora import LoRAConfig, add_lora, merge_lora, save_peft_adapter
from qwen3_jax.train.step import Objective, OptimizerConfig, TrainState, TrainStep

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS, FINAL, ADAPTER = "checkpoints", "final", "adapter"
EVAL_METRICS = ("recall@1", "recall@10", "ndcg@10")
# Settings that do not change what a run computes, so a resumed run may differ in them.
# (--row-length only pads the rows.)
NOT_FINGERPRINTED = ("output", "overwrite", "quiet", "save_every", "keep", "log_every", "eval_every",
                     "row_length")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything `qwen3-jax train` takes (see its --help); `lora_rank=None` is full fine-tuning;
    `hard_negatives=None` uses as many as the data's lines carry (fewer on a line are masked)."""

    model: str
    data: str
    output: str
    loss: str = "infonce"
    lora_rank: int | None = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"
    temperature: float = 0.05
    hard_negatives: int | None = None
    use_batch: bool = True
    include_qq: bool = False
    include_dd: bool = False
    false_negative_margin: float | None = None
    matryoshka_dims: tuple[int, ...] = ()
    instruction: str | None = None
    batch_size: int = 32
    mini_batch_size: int | None = None
    max_length: int = 512
    row_length: int | None = None
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    steps: int | None = None
    epochs: float | None = None
    remat: str = "off"
    dtype: str = "float32"
    fsdp: bool = False
    eval_data: str | None = None
    eval_every: int | None = None
    save_every: int = 100
    keep: int = 3
    log_every: int = 1
    seed: int = 0
    overwrite: bool = False
    quiet: bool = False

    def __post_init__(self):
        if self.loss not in ("infonce", "reranker"):
            raise ValueError(f"--loss {self.loss!r}: choose infonce or reranker")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of --steps and --epochs")
        for name in ("batch_size", "max_length", "save_every", "keep", "log_every", "steps", "eval_every",
                     "mini_batch_size", "lora_rank", "row_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name.replace('_', '-')}={value!r} must be a whole number of at least 1")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"--epochs={self.epochs} must be positive")
        if self.hard_negatives is not None and self.hard_negatives < 0:
            raise ValueError(f"--hard-negatives={self.hard_negatives} must be 0 or more")
        if self.loss == "reranker" and self.mini_batch_size:
            raise ValueError("--mini-batch-size (GradCache) serves the contrastive loss, not the reranker's")

    def fingerprint(self) -> dict:
        """What the run computes, as run.json stores it (JSON types)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_FINGERPRINTED}
        return json.loads(json.dumps(fields))


def _all_processes_reach(point: str) -> None:
    """A barrier across the processes of a multi-process job (nothing on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(point)


def _log(out, message: str) -> None:
    if jax.process_index() == 0:
        out(message)


class Trainer:
    """What a run trains: the model (with LoRA adapters, unless full fine-tuning), its tokenizer, the
    reranker prompts (reranker runs) and the jitted step; turns examples into batches, evaluates and
    exports. `negatives` is the hard negatives per query of every step (its texts count is fixed)."""

    def __init__(self, config: TrainConfig, *, total_steps: int, negatives: int, mesh=None):
        self.config, self.mesh, self.negatives = config, mesh, negatives
        self.folder = resolve_model(config.model)
        reranker = config.loss == "reranker"
        model = load_model(self.folder, dtype=config.dtype, param_dtype="float32", mesh=mesh, fsdp=config.fsdp,
                           with_lm_head=reranker)
        self.key_prefix = _key_prefix(self.folder)
        self.lora = None
        if config.lora_rank:
            self.lora = LoRAConfig(rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                                   targets=config.lora_targets)
            add_lora(model, self.lora, seed=config.seed)
        self.tokenizer = TextTokenizer.from_folder(self.folder)
        self.prompts = RerankerPrompts(self.tokenizer, config.max_length) if reranker else None
        objective = Objective(kind=config.loss, temperature=config.temperature, use_batch=config.use_batch,
                              include_qq=config.include_qq, include_dd=config.include_dd,
                              false_negative_margin=config.false_negative_margin,
                              matryoshka_dims=tuple(config.matryoshka_dims),
                              answer_ids=(self.prompts.no_id, self.prompts.yes_id) if reranker else None)
        optimizer = OptimizerConfig(learning_rate=config.learning_rate, total_steps=total_steps,
                                    warmup_steps=config.warmup_steps, schedule=config.schedule,
                                    weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm)
        texts = config.batch_size * (2 + negatives)
        self.mini_batches = math.ceil(texts / config.mini_batch_size) if config.mini_batch_size else 1
        self.step = TrainStep(model, objective=objective, optimizer=optimizer, remat=config.remat,
                              mini_batches=self.mini_batches, mesh=mesh, seed=config.seed)
        self.eval_runner = None

    # --- batches ------------------------------------------------------------------------------------

    def _query_text(self, example: Example) -> str:
        instruction = example.instruction if example.instruction is not None else self.config.instruction
        return format_instruction(instruction) + example.query if instruction else example.query

    def batch(self, examples: list[Example]) -> dict:
        """A step's packed batch: the queries (with their instruction, as `encode` formats them) and up
        to `negatives` hard negatives each, or the reranker prompts and labels."""
        layout = {"pad_id": self.tokenizer.end_of_text_id, "rows_multiple": shard_count(self.mesh),
                  "min_length": self.config.row_length or 1}
        if self.prompts is not None:
            return pointwise_batch(self._prompts(examples), [e.label for e in examples], **layout)
        queries = self.tokenizer.encode([self._query_text(e) for e in examples], self.config.max_length)
        kept = [e.documents[:1 + self.negatives] for e in examples]
        documents = iter(self.tokenizer.encode([d for texts in kept for d in texts], self.config.max_length))
        tokenized = []
        for query, texts in zip(queries, kept):
            positive, *negatives = [next(documents) for _ in texts]
            tokenized.append(ContrastiveExample(query, positive, negatives))
        return contrastive_batch(tokenized, negatives=self.negatives, mini_batches=self.mini_batches, **layout)

    def _prompts(self, examples: list[Example]) -> list[list[int]]:
        """The reranker prompt of each example, with its own instruction or the run's (None: the default)."""
        return [self.prompts.ids([(e.query, e.documents[0])], e.instruction if e.instruction is not None
                                 else self.config.instruction)[0] for e in examples]

    # --- evaluation and export ----------------------------------------------------------------------

    def evaluate(self, state: TrainState, examples: list[Example]) -> dict[str, float]:
        """recall@1, recall@10 and nDCG@10 of the examples' queries against all their documents
        (embeddings; each query's positive is its relevant document), or of each query's documents
        ranked by the reranker's score (labels are the relevance)."""
        model = self.step.model(state.trainable)
        if self.eval_runner is None:
            self.eval_runner = LastTokenRunner(model, pad_id=self.tokenizer.end_of_text_id, mesh=self.mesh)
        runner = self.eval_runner
        runner.use(model)
        if self.prompts is not None:
            hidden = runner(self._prompts(examples), batch_size=8)
            rows = fetch_global(model.output_rows([self.prompts.no_id, self.prompts.yes_id])).astype(np.float32)
            logits = hidden @ rows.T
            scores = logits[:, 1] - logits[:, 0]
            by_query: dict[str, list[int]] = {}
            for i, e in enumerate(examples):
                by_query.setdefault(e.query, []).append(i)
            rankings = {q: sorted(ids, key=lambda i: -scores[i]) for q, ids in by_query.items()}
            qrels = {q: {i: examples[i].label for i in ids} for q, ids in by_query.items()}
            return evaluate(rankings, qrels, EVAL_METRICS)
        corpus = sorted({d for e in examples for d in e.documents})
        position = {d: i for i, d in enumerate(corpus)}
        encode = lambda texts: normalize_rows(runner(self.tokenizer.encode(texts, self.config.max_length), batch_size=8))
        similarity = encode([self._query_text(e) for e in examples]) @ encode(corpus).T
        top = np.argsort(-similarity, axis=1, kind="stable")[:, :10]
        rankings = {i: [int(d) for d in top[i]] for i in range(len(examples))}
        qrels = {i: {position[e.documents[0]]: 1} for i, e in enumerate(examples)}
        return evaluate(rankings, qrels, EVAL_METRICS)

    def export(self, state: TrainState, destination: str | Path, *, adapter: str | Path | None = None,
               overwrite: bool = False) -> dict:
        """The trained model as a merged Hugging Face folder at `destination` and, for LoRA, the peft
        adapter folder at `adapter`. Every process gathers the parameters; the first one writes."""
        model = _on_host(self.step.model(state.trainable))
        written = {}
        if jax.process_index() != 0:
            return written
        if self.lora is not None and adapter is not None:
            with staged_folder(adapter, overwrite=overwrite) as staging:
                save_peft_adapter(model, staging, config=self.lora, base_model=self.config.model,
                                  key_prefix="model." if self.prompts is not None else "",
                                  task_type="CAUSAL_LM" if self.prompts is not None else "FEATURE_EXTRACTION")
            written["adapter"] = str(adapter)
        if self.lora is not None:
            model = merge_lora(model)
        export_hf(model, destination, source=self.folder, prefix=self.key_prefix, overwrite=overwrite)
        written["final"] = str(destination)
        return written


class Run:
    """One training run, set up from a TrainConfig (and a mesh, or one device): indexes the data,
    builds the Trainer, claims the output folder, and runs or resumes the loop."""

    def __init__(self, config: TrainConfig, *, mesh=None, out=print):
        self.config, self.out = config, out
        self.output = Path(config.output)
        self.source = JsonlSource(config.data, config.loss)
        self.stream = ExampleStream(self.source, batch_size=config.batch_size, seed=config.seed)
        eval_source = JsonlSource(config.eval_data, config.loss) if config.eval_data else None
        self.eval_examples = [eval_source[i] for i in range(len(eval_source))] if eval_source else []
        self.total_steps = config.steps or max(1, math.ceil(config.epochs * self.stream.steps_per_epoch()))
        negatives = self.source.max_documents - 1 if config.hard_negatives is None else config.hard_negatives
        self.trainer = Trainer(config, total_steps=self.total_steps, negatives=max(negatives, 0), mesh=mesh)
        self._claim_output()          # after every setting is checked: a bad one leaves no folder behind
        self.checkpoints = Checkpoints(self.output / CHECKPOINTS, keep=config.keep)

    def _claim_output(self) -> None:
        """Refuses a folder that holds another run, unless overwrite; records this run in run.json."""
        run_file = self.output / RUN_FILE
        wanted = self.config.fingerprint()
        found = json.loads(run_file.read_text()) if run_file.is_file() else None
        if found is None and self.output.is_dir() and any(self.output.iterdir()):
            raise FileExistsError(f"{self.output} is not empty and holds no training run; use another --output")
        if found is not None and found != wanted:
            if not self.config.overwrite:
                changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
                raise FileExistsError(f"{self.output} holds another run (it differs in {', '.join(changed)}); "
                                      "use another --output or pass --overwrite to replace it")
        _all_processes_reach("checked the output folder")     # before any process writes to it
        if jax.process_index() == 0:
            if found is not None and found != wanted:
                shutil.rmtree(self.output)
            self.output.mkdir(parents=True, exist_ok=True)
            with atomic_output(run_file) as handle:
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
        progress = _progress(self.total_steps, start, quiet=config.quiet)
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
    fields = json.loads((run_folder / RUN_FILE).read_text())
    config = TrainConfig(**{**fields, "matryoshka_dims": tuple(fields["matryoshka_dims"])}, output=str(run_folder))
    trainer = Trainer(config, total_steps=1, negatives=0, mesh=mesh)
    state = Checkpoints(checkpoint.parent, keep=config.keep).restore(int(step), trainer.step.init())
    return trainer.export(state, destination, adapter=adapter, overwrite=overwrite)


def _key_prefix(folder: Path) -> str:
    """The key prefix the base checkpoint stores its weights under ("model." for rerankers)."""
    from qwen3_jax.loader import ORBAX_META, is_orbax_folder

    if is_orbax_folder(folder):
        return json.loads((folder / ORBAX_META).read_text())["key_prefix"]
    return hf_key_prefix(folder)


def _on_host(model):
    """The model with every parameter whole on this process's first device (an all-gather across
    processes), for export."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    pure = jax.tree.map(lambda x: jnp.asarray(fetch_global(x)), nnx.to_pure_dict(params))
    nnx.replace_by_pure_dict(params, pure)
    return nnx.merge(graphdef, params, rest)


def _progress(total: int, start: int, *, quiet: bool):
    """tqdm's bar on a terminal (step, loss, learning rate, tokens/s, time left); silent otherwise."""
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                disable=quiet or not sys.stderr.isatty() or jax.process_index() != 0)


def _trim_metrics(path: Path, step: int) -> None:
    """Drops the metrics a killed run logged after its last checkpoint (they will be logged again)."""
    if jax.process_index() != 0 or not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    with atomic_output(path) as handle:
        handle.write("".join(line + "\n" for line in kept))


class Checkpoints:
    """Orbax checkpoints of the TrainState, one folder per step, the last `keep` kept; Orbax writes
    each to a temporary folder and renames it when complete, so a kill leaves no half checkpoint."""

    def __init__(self, directory: Path, *, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, step_prefix="checkpoint", create=True))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def path(self, step: int) -> Path:
        return Path(self.manager.directory) / f"checkpoint_{step}"

    def save(self, step: int, state: TrainState) -> None:
        self.manager.save(step, args=self.ocp.args.StandardSave(_pure(state)))
        self.manager.wait_until_finished()

    def restore(self, step: int, like: TrainState) -> TrainState:
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _pure(like))
        restored = self.manager.restore(step, args=self.ocp.args.StandardRestore(target))
        return _unpure(restored, like)


def _pure(state: TrainState) -> dict:
    """The state as nested dicts and lists of arrays (what Orbax stores)."""
    return {"step": state.step, "trainable": nnx.to_pure_dict(state.trainable),
            "opt_state": jax.tree.leaves(state.opt_state)}


def _unpure(pure: dict, like: TrainState) -> TrainState:
    trainable = like.trainable
    nnx.replace_by_pure_dict(trainable, pure["trainable"])
    opt_state = jax.tree.unflatten(jax.tree.structure(like.opt_state), pure["opt_state"])
    return TrainState(pure["step"], trainable, opt_state)


def train(config: TrainConfig, *, mesh=None, out=print) -> dict:
    """Runs (or resumes) a training run; returns where its outputs went."""
    return Run(config, mesh=mesh, out=out).run()
