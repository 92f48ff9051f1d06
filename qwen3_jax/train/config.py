"""What a training run computes: `qwen3-jax train`'s settings as one frozen dataclass, checked up front."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from qwen3_jax.arguments import nested, setting
from qwen3_jax.backend import COMPUTE_DTYPES
from qwen3_jax.checks import UsageError, whole_number
from qwen3_jax.hub import model_identity, resolve_model, weights_fingerprint
from qwen3_jax.model import REMAT_POLICIES
from qwen3_jax.textio import file_identity
from qwen3_jax.train.lora import LoRAConfig
from qwen3_jax.train.step import Objective, OptimizerConfig

# Settings that do not change what a run computes, so a resumed run may differ in them.
# (--row-length only pads the rows.)
NOT_FINGERPRINTED = ("output", "overwrite", "quiet", "save_every", "keep", "log_every", "eval_every",
                     "row_length", "tensorboard")
# How long a run is: run.json records it, but a run that differs only in it is the same run, longer or
# shorter, so raising --steps (or --epochs) continues a finished run.
RUN_LENGTH = ("steps", "epochs")

# Learning rates above these are far past what LoRA and full fine-tuning use (ms-swift's defaults are 1e-4
# and 1e-5, sentence-transformers' 2e-5): such a run usually diverges.
HIGHEST_PLAUSIBLE_LR = {"lora": 1e-2, "full": 1e-3}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything `qwen3-jax train` takes, each field declared once as its flag (`setting`: its --help is
    the help below), the objective's, the optimizer's and LoRA's in their own dataclasses (`nested`);
    `lora=None` is full fine-tuning (--full); `hard_negatives=None` uses as many as the data's lines
    carry (fewer on a line are masked). `flat()` and `from_flat` give and read the one-level form that
    run.json records (lora_rank, learning_rate, temperature, ...)."""

    model: str = setting(help="checkpoint folder or hub id to start from")
    data: str = setting(help="training .jsonl (docs/fine-tuning.md has the line formats)")
    output: str = setting(help="run folder: checkpoints, metrics.jsonl, final/, adapter/")
    objective: Objective = nested(Objective)
    lora: LoRAConfig | None = nested(LoRAConfig, prefix="lora_", off="--full", exclusive="lora",
                                     off_help="full fine-tuning instead of LoRA", dropout=0.05)
    hard_negatives: int | None = setting(None, help="hard negatives per query (default: the most any line has; "
                                                    "fewer are masked)")
    instruction: str | None = setting(None, help="task instruction for queries without their own")
    batch_size: int = setting(32, help="queries per step over all devices")
    mini_batch_size: int | None = setting(None, help="GradCache: embed the step's texts this many at a time "
                                                     "(exact gradients)")
    max_length: int = setting(512, help="tokens per text, <|endoftext|> included")
    row_length: int | None = setting(None, help="pad each step's packed rows to at least this many tokens: steps "
                                                "whose texts fit share one compiled program (each new row length "
                                                "compiles the step again)")
    optimizer: OptimizerConfig = nested(OptimizerConfig)
    steps: int | None = setting(None, exclusive="length",
                                help="optimizer steps (raised on a finished run: it continues)")
    epochs: float | None = setting(None, exclusive="length",
                                   help="passes over the data (raised on a finished run: it continues)")
    remat: str = setting("off", choices=list(REMAT_POLICIES),
                         help="recompute each layer in the backward pass (dots: keep the matrix products; "
                              "dots_except_mlp: keep attention's, recompute the MLP's)")
    dtype: str = setting("float32", choices=COMPUTE_DTYPES,
                         help="compute dtype (auto: bfloat16 where its products are fast); weights and optimizer "
                              "stay float32")
    fsdp: bool = False                       # --fsdp, with --mesh (the flags every sharded command shares)
    eval_data: str | None = setting(None, flag="--eval",
                                    help="held-out .jsonl in the same format: recall@1/@10, nDCG@10")
    eval_every: int | None = setting(None, help="steps between evaluations (default: --save-every)")
    save_every: int = setting(100, help="steps between checkpoints")
    keep: int = setting(3, help="checkpoints kept")
    log_every: int = 1
    seed: int = setting(0)
    overwrite: bool = setting(False, help="delete the run in --output (its checkpoints included) and start again")
    quiet: bool = setting(False, help="no progress bar")
    tensorboard: str | None = setting(None, metavar="DIR", help="also write the metrics as TensorBoard events in "
                                                                "DIR (pip install \"qwen3-jax[tensorboard]\")")

    def __post_init__(self):
        if (self.steps is None) == (self.epochs is None):
            raise UsageError("give exactly one of --steps and --epochs")
        for name in ("batch_size", "max_length", "save_every", "keep", "log_every", "steps", "eval_every",
                     "mini_batch_size", "row_length"):
            if getattr(self, name) is not None:
                whole_number(getattr(self, name), f"--{name.replace('_', '-')}")
        if self.epochs is not None and not self.epochs > 0:
            raise UsageError(f"--epochs={self.epochs} must be positive")
        if self.hard_negatives is not None and self.hard_negatives < 0:
            raise UsageError(f"--hard-negatives={self.hard_negatives} must be 0 or more")
        if self.objective.loss == "reranker" and self.mini_batch_size:
            raise UsageError("--mini-batch-size (GradCache) serves the contrastive loss, not the reranker's")

    def implausible(self, total_steps: int) -> list[str]:
        """One line for each setting that is allowed but seldom what anyone means (a run of `total_steps`)."""
        kind = "lora" if self.lora else "full"
        objective, optimizer = self.objective, self.optimizer
        found = []
        if optimizer.learning_rate > HIGHEST_PLAUSIBLE_LR[kind]:
            found.append(f"--lr {optimizer.learning_rate:g} is far above what "
                         f"{'LoRA' if self.lora else 'full fine-tuning'} uses (ms-swift's default is {1e-4 if self.lora else 1e-5:g}; above "
                         f"{HIGHEST_PLAUSIBLE_LR[kind]:g} a run usually diverges)")
        if objective.loss == "infonce" and objective.temperature > 1:
            found.append(f"--temperature {objective.temperature:g} is above 1: the similarities barely separate "
                         "(sentence-transformers uses 0.05, ms-swift 0.1)")
        if optimizer.warmup_steps >= total_steps:
            found.append(f"--warmup {optimizer.warmup_steps} is not shorter than the run ({total_steps} steps): the "
                         "learning rate never reaches --lr (sentence-transformers warms up for 10% of a run)")
        if optimizer.weight_decay > 0.5:
            found.append(f"--weight-decay {optimizer.weight_decay:g} is above 0.5: it pulls the weights to zero faster "
                         "than the loss trains them (ms-swift uses 0.1, sentence-transformers 0.01)")
        if objective.loss == "infonce" and self.batch_size == 1 and self.hard_negatives == 0:
            found.append("--batch-size 1 with --hard-negatives 0: each query has only its positive, so the "
                         "contrastive loss is 0 and nothing trains")
        return found

    def flat(self) -> dict:
        """The settings as one level, the form run.json has always recorded: each nested part's flags under
        their destinations (temperature, lora_rank, learning_rate, ...; its other fields are not settings of
        a run), full fine-tuning as lora_rank None beside the default adapter's other fields, the LoRA
        targets as the flag spells them."""
        fields = {}
        for field, names in _flat_names(type(self)):
            part = getattr(self, field.name)
            if "nest" not in field.metadata:
                fields[field.name] = part
                continue
            part = field.default if part is None else part
            fields.update({flat: getattr(part, name) for flat, name in names.items()})
        if self.lora is None:
            fields["lora_rank"] = None
        fields["lora_targets"] = LoRAConfig(targets=fields["lora_targets"]).spelled_targets
        return fields

    @classmethod
    def from_flat(cls, fields: dict) -> "TrainConfig":
        """The config whose `flat()` holds `fields` (flat names: a nested part's settings not given keep its
        defaults here; lora_rank None is full fine-tuning); a name that is no setting is a TypeError."""
        known = _known_names(cls)
        if set(fields) - known:
            raise TypeError(f"TrainConfig has no setting {', '.join(sorted(set(fields) - known))}")
        values = {}
        for field, names in _flat_names(cls):
            if "nest" not in field.metadata:
                if field.name in fields:
                    values[field.name] = fields[field.name]
            elif field.name == "lora" and fields.get("lora_rank", 0) is None:
                values["lora"] = None                             # full fine-tuning
            else:
                given = {name: fields[flat] for flat, name in names.items() if flat in fields}
                values[field.name] = dataclasses.replace(field.default, **given)
        return cls(**values)

    def fingerprint(self) -> dict:
        """What the run computes, as run.json stores it (JSON types). Inputs are named by what they are,
        not how they were spelled: the model's resolved folder (or hub id) and its weights' fingerprint,
        the data file's resolved path, size and hash, so `--model ./emb` resumes a run started with
        `--model emb` from another folder, while other weights at the model's path, or a data file
        edited since, cannot resume (it would go on from other weights, or its examples would shift)."""
        fields = {k: v for k, v in self.flat().items() if k not in NOT_FINGERPRINTED}
        fields.update(model=model_identity(self.model), data=file_identity(self.data),
                      weights=weights_fingerprint(resolve_model(self.model)),
                      eval_data=self.eval_data and str(Path(self.eval_data).resolve()))
        return json.loads(json.dumps(fields))

    @classmethod
    def from_fingerprint(cls, fields: dict, **settings) -> "TrainConfig":
        """The config a run.json describes (with settings that are not fingerprinted)."""
        known = _known_names(cls)
        fields = {k: v for k, v in fields.items() if k in known}           # not weights, nor final_step
        return cls.from_flat({**fields, "data": fields["data"]["path"], **settings})


def _known_names(settings: type) -> set[str]:
    """Every flat name of the dataclass `settings` (see `_flat_names`)."""
    return {flat for field, names in _flat_names(settings) for flat in names or [field.name]}


def _flat_names(settings: type) -> list[tuple[dataclasses.Field, dict[str, str]]]:
    """Each field of the dataclass `settings` with, for a `nested` one, its flags' flat names (the
    destinations, e.g. lora_rank) -> the nested dataclass's field names (rank); {} for a plain field."""
    parts = []
    for field in dataclasses.fields(settings):
        nest = field.metadata.get("nest")
        names = {} if nest is None else {nest["prefix"] + inner.name: inner.name
                                         for inner in dataclasses.fields(nest["settings"])
                                         if "flag_of" in inner.metadata}
        parts.append((field, names))
    return parts
