"""What a training run computes: `qwen3-jax train`'s settings as one frozen dataclass, checked up front."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from qwen3_jax.arguments import setting
from qwen3_jax.backend import COMPUTE_DTYPES
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


def dimensions(text: str) -> tuple[int, ...]:
    """--matryoshka-dims "1024,512,256" as (1024, 512, 256)."""
    return tuple(int(part) for part in text.split(",") if part.strip())


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything `qwen3-jax train` takes, each field declared once as its flag (`setting`: its --help is
    the help below); `lora_rank=None` is full fine-tuning (--full); `hard_negatives=None` uses as many as
    the data's lines carry (fewer on a line are masked)."""

    model: str = setting(help="checkpoint folder or hub id to start from")
    data: str = setting(help="training .jsonl (docs/fine-tuning.md has the line formats)")
    output: str = setting(help="run folder: checkpoints, metrics.jsonl, final/, adapter/")
    loss: str = setting("infonce", choices=["infonce", "reranker"],
                        help="infonce: an embedding model, contrastive; reranker: a Qwen3-Reranker's yes/no")
    lora_rank: int | None = setting(8, exclusive="lora", help="LoRA rank (default 8)")
    lora_alpha: float = setting(32.0, help="LoRA scale numerator (alpha / rank)")
    lora_dropout: float = setting(0.05, help="dropout on the LoRA branch")
    lora_targets: str = setting("all-linear",
                                help="all-linear or some of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    temperature: float = setting(0.05, help="InfoNCE temperature")
    hard_negatives: int | None = setting(None, help="hard negatives per query (default: the most any line has; "
                                                    "fewer are masked)")
    use_batch: bool = setting(True, flag="--no-batch-negatives", action="store_false",
                              help="only each query's own documents as negatives (default: the whole batch's "
                                   "too; ms-swift's INFONCE_USE_BATCH=False)")
    include_qq: bool = setting(False, help="other queries as negatives too")
    include_dd: bool = setting(False, help="other documents as the positive's negatives")
    false_negative_margin: float | None = setting(
        None, help="leave out negatives more similar than the positive plus this (the report uses 0.1)")
    matryoshka_dims: tuple[int, ...] = setting((), type=dimensions,
                                               help="e.g. 1024,512,256,128: the loss summed over dims (default: "
                                                    "the full width only)")
    instruction: str | None = setting(None, help="task instruction for queries without their own")
    batch_size: int = setting(32, help="queries per step over all devices")
    mini_batch_size: int | None = setting(None, help="GradCache: embed the step's texts this many at a time "
                                                     "(exact gradients)")
    max_length: int = setting(512, help="tokens per text, <|endoftext|> included")
    row_length: int | None = setting(None, help="pad each step's packed rows to at least this many tokens: steps "
                                                "whose texts fit share one compiled program (each new row length "
                                                "compiles the step again)")
    learning_rate: float = setting(1e-4, flag="--lr", help="peak learning rate")
    warmup_steps: int = setting(0, flag="--warmup", help="warm-up steps")
    schedule: str = setting("cosine", choices=["cosine", "linear", "constant"],
                            help="learning-rate decay after the warm-up")
    weight_decay: float = setting(0.01, help="AdamW weight decay")
    max_grad_norm: float = setting(1.0, help="clip gradients to this global norm")
    steps: int | None = setting(None, exclusive="length",
                                help="optimizer steps (raised on a finished run: it continues)")
    epochs: float | None = setting(None, exclusive="length",
                                   help="passes over the data (raised on a finished run: it continues)")
    remat: str = setting("off", choices=["off", "full", "dots"],
                         help="recompute each layer in the backward pass (dots: keep the matrix products)")
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
