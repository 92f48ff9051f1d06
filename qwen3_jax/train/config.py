"""What a training run computes: `qwen3-jax train`'s settings as one frozen dataclass, checked up front."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from qwen3_jax.checks import UsageError, whole_number
from qwen3_jax.hub import model_identity, resolve_model, weights_fingerprint
from qwen3_jax.textio import file_identity

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
    tensorboard: str | None = None

    def __post_init__(self):
        if self.loss not in ("infonce", "reranker"):
            raise UsageError(f"--loss {self.loss!r}: choose infonce or reranker")
        if (self.steps is None) == (self.epochs is None):
            raise UsageError("give exactly one of --steps and --epochs")
        for name in ("batch_size", "max_length", "save_every", "keep", "log_every", "steps", "eval_every",
                     "mini_batch_size", "lora_rank", "row_length"):
            if getattr(self, name) is not None:
                whole_number(getattr(self, name), f"--{name.replace('_', '-')}")
        if self.epochs is not None and not self.epochs > 0:
            raise UsageError(f"--epochs={self.epochs} must be positive")
        if self.hard_negatives is not None and self.hard_negatives < 0:
            raise UsageError(f"--hard-negatives={self.hard_negatives} must be 0 or more")
        if self.loss == "reranker" and self.mini_batch_size:
            raise UsageError("--mini-batch-size (GradCache) serves the contrastive loss, not the reranker's")

    def implausible(self, total_steps: int) -> list[str]:
        """One line for each setting that is allowed but seldom what anyone means (a run of `total_steps`)."""
        kind = "lora" if self.lora_rank else "full"
        found = []
        if self.learning_rate > HIGHEST_PLAUSIBLE_LR[kind]:
            found.append(f"--lr {self.learning_rate:g} is far above what {'LoRA' if self.lora_rank else 'full fine-tuning'} "
                         f"uses (ms-swift's default is {1e-4 if self.lora_rank else 1e-5:g}; above "
                         f"{HIGHEST_PLAUSIBLE_LR[kind]:g} a run usually diverges)")
        if self.loss == "infonce" and self.temperature > 1:
            found.append(f"--temperature {self.temperature:g} is above 1: the similarities barely separate "
                         "(sentence-transformers uses 0.05, ms-swift 0.1)")
        if self.warmup_steps >= total_steps:
            found.append(f"--warmup {self.warmup_steps} is not shorter than the run ({total_steps} steps): the "
                         "learning rate never reaches --lr (sentence-transformers warms up for 10% of a run)")
        if self.weight_decay > 0.5:
            found.append(f"--weight-decay {self.weight_decay:g} is above 0.5: it pulls the weights to zero faster "
                         "than the loss trains them (ms-swift uses 0.1, sentence-transformers 0.01)")
        if self.loss == "infonce" and self.batch_size == 1 and self.hard_negatives == 0:
            found.append("--batch-size 1 with --hard-negatives 0: each query has only its positive, so the "
                         "contrastive loss is 0 and nothing trains")
        return found

    def fingerprint(self) -> dict:
        """What the run computes, as run.json stores it (JSON types). Inputs are named by what they are,
        not how they were spelled: the model's resolved folder (or hub id) and its weights' fingerprint,
        the data file's resolved path, size and hash, so `--model ./emb` resumes a run started with
        `--model emb` from another folder, while other weights at the model's path, or a data file
        edited since, cannot resume (it would go on from other weights, or its examples would shift)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_FINGERPRINTED}
        fields.update(model=model_identity(self.model), data=file_identity(self.data),
                      weights=weights_fingerprint(resolve_model(self.model)),
                      eval_data=self.eval_data and str(Path(self.eval_data).resolve()))
        return json.loads(json.dumps(fields))

    @classmethod
    def from_fingerprint(cls, fields: dict, **settings) -> "TrainConfig":
        """The config a run.json describes (with settings that are not fingerprinted)."""
        known = {field.name for field in dataclasses.fields(cls)}        # not weights, nor final_step
        fields = {k: v for k, v in fields.items() if k in known}
        return cls(**{**fields, "data": fields["data"]["path"], "matryoshka_dims": tuple(fields["matryoshka_dims"]),
                      **settings})
