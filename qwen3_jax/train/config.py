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
        fields = {k: v for k, v in fields.items() if k != "weights"}
        return cls(**{**fields, "data": fields["data"]["path"], "matryoshka_dims": tuple(fields["matryoshka_dims"]),
                      **settings})
