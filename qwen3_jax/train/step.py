"""One jitted training step: embeddings with gradients, the loss, GradCache, optax, over a mesh.

The step is a pure function `(state, batch) -> (state, metrics)`. The batch's texts are embedded with
the packed layout and last-token pooling of inference (the model's `at`); every device's rows
feed one loss over the global batch, so in-batch negatives span all devices and every device's
embeddings get their exact gradient (a DDP gather, as in ms-swift, drops the other ranks' share).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen3_jax.arguments import setting
from qwen3_jax.backend import kernel_named_on_failure
from qwen3_jax.checks import UsageError, check_dim
from qwen3_jax.model import Qwen3Model, check_remat
from qwen3_jax.numerics import einsum
from qwen3_jax.sharding import BATCH_AXIS, put_global
from qwen3_jax.train.losses import infonce, matryoshka, reranker_loss
from qwen3_jax.train.lora import LoRAParam

SCHEDULES = ("cosine", "linear", "constant")
LOSSES = ("infonce", "reranker")


def dimensions(text: str) -> tuple[int, ...]:
    """--matryoshka-dims "1024,512,256" as (1024, 512, 256)."""
    return tuple(int(part) for part in text.split(",") if part.strip())


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a step minimises: "infonce" (embeddings; see losses.infonce) or "reranker" (the yes/no
    cross-entropy of the answer rows `answer_ids` = (id of "no", id of "yes")); each field declared once
    as its `qwen3-jax train` flag (`setting`); `matryoshka_weights` and `answer_ids` are no flags."""

    loss: str = setting("infonce", choices=list(LOSSES),
                        help="infonce: an embedding model, contrastive; reranker: a Qwen3-Reranker's yes/no")
    temperature: float = setting(0.05, help="InfoNCE temperature")
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
    matryoshka_weights: tuple[float, ...] | None = None
    answer_ids: tuple[int, int] | None = None

    def __post_init__(self):
        """Raises a clear error for a setting that cannot work, before anything loads (the dims are checked
        against the model's width by `check`)."""
        object.__setattr__(self, "matryoshka_dims", tuple(self.matryoshka_dims))
        if self.loss not in LOSSES:
            raise UsageError(f"--loss {self.loss!r}: choose infonce or reranker")
        if not self.temperature > 0:
            raise UsageError(f"temperature={self.temperature} must be positive")
        if not self.use_batch and (self.include_qq or self.include_dd):
            raise UsageError("include_qq and include_dd compare across the batch; they need use_batch")
        if self.matryoshka_weights is not None and len(self.matryoshka_weights) != len(self.matryoshka_dims):
            raise UsageError(f"{len(self.matryoshka_dims)} matryoshka dims but {len(self.matryoshka_weights)} weights")

    def check(self, hidden_size: int) -> None:
        """Raises a clear error for a setting that cannot work with a model of width `hidden_size`."""
        if self.loss == "reranker" and self.answer_ids is None:
            raise ValueError("the reranker loss needs answer_ids (the tokens of 'no' and 'yes')")
        for dim in self.matryoshka_dims:
            check_dim(dim, hidden_size, name="matryoshka dim ")

    def __call__(self, model: Qwen3Model, embeddings: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
        """The loss of the pooled final states `embeddings` [texts, D] of a step's `batch` (`model`: for the
        reranker's answer rows)."""
        if self.loss == "reranker":
            logits = einsum("ND,AD->NA", embeddings, model.output_rows(self.answer_ids).astype(jnp.float32))
            return reranker_loss(logits, batch["labels"])
        loss = functools.partial(infonce, temperature=self.temperature, use_batch=self.use_batch,
                                 include_qq=self.include_qq, include_dd=self.include_dd,
                                 false_negative_margin=self.false_negative_margin)
        documents = batch["document_text"]
        args = (embeddings[batch["query_text"]], embeddings[jnp.maximum(documents, 0)], documents >= 0)
        if self.matryoshka_dims:
            return matryoshka(loss, *args, dims=self.matryoshka_dims, weights=self.matryoshka_weights)
        return loss(*args)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW after global-norm clipping, the learning rate warmed up linearly from 0 then decayed
    (cosine or linear to 0, or constant), as transformers' schedules do; `accumulate` micro-steps
    per update (each micro-step's negatives are its own, as in ms-swift; GradCache makes them global).
    The fields declared with `setting` are `qwen3-jax train`'s flags; a run sets `total_steps`."""

    learning_rate: float = setting(1e-4, flag="--lr", help="peak learning rate")
    total_steps: int = 1000
    warmup_steps: int = setting(0, flag="--warmup", help="warm-up steps")
    schedule: str = setting("cosine", choices=list(SCHEDULES), help="learning-rate decay after the warm-up")
    weight_decay: float = setting(0.01, help="AdamW weight decay")
    max_grad_norm: float | None = setting(1.0, help="clip gradients to this global norm")
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    accumulate: int = 1

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise UsageError(f"schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")

    def learning_rates(self) -> optax.Schedule:
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        decay = {"cosine": optax.cosine_decay_schedule(self.learning_rate, decay_steps),
                 "linear": optax.linear_schedule(self.learning_rate, 0.0, decay_steps),
                 "constant": optax.constant_schedule(self.learning_rate)}[self.schedule]
        if not self.warmup_steps:
            return decay
        warmup = optax.linear_schedule(0.0, self.learning_rate, self.warmup_steps)
        return optax.join_schedules([warmup, decay], [self.warmup_steps])

    def build(self) -> optax.GradientTransformation:
        adamw = optax.adamw(self.learning_rates(), b1=self.b1, b2=self.b2, eps=self.eps,
                            weight_decay=self.weight_decay)
        chain = optax.chain(optax.clip_by_global_norm(self.max_grad_norm), adamw) if self.max_grad_norm else adamw
        return optax.MultiSteps(chain, every_k_schedule=self.accumulate) if self.accumulate > 1 else chain


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a step changes: its count, the trained parameters and the optimizer's state."""

    step: jax.Array
    trainable: Any
    opt_state: Any


def trainable_filter(model: Qwen3Model):
    """LoRAParam when the model carries adapters (only they train), else every parameter."""
    return LoRAParam if jax.tree.leaves(nnx.state(model, LoRAParam)) else nnx.Param


class TrainStep:
    """The jitted step for a model: `state, metrics = step(state, batch)`; `init()` gives the first state.

    `remat` (a name of model.REMAT_POLICIES) rematerialises each decoder layer; `mini_batches` > 1 runs GradCache:
    all texts are embedded without activations in that many mini-batches, the loss gradient is taken
    with respect to the embeddings, then each mini-batch is run again with its share of that gradient,
    so a contrastive batch far larger than memory gets exactly the plain step's gradients.
    """

    def __init__(self, model: Qwen3Model, *, objective: Objective, optimizer: OptimizerConfig,
                 remat: str = "off", mini_batches: int = 1, mesh: Mesh | None = None, seed: int = 0):
        objective.check(model.config.hidden_size)
        if not model.backend.packs_rows:
            raise UsageError(f"attention={model.backend.attention!r} takes one text a row, and training packs several "
                             "texts into each: choose --attention pallas (GPU), splash (TPU) or blockwise")
        check_remat(remat)
        if mini_batches > 1 and objective.loss != "infonce":
            raise UsageError("GradCache (mini-batches) serves the contrastive loss; the reranker loss is per "
                             "example: use gradient accumulation instead")
        self.objective, self.optimizer, self.remat, self.mini_batches = objective, optimizer, remat, mini_batches
        self.backend = model.backend
        self.mesh = mesh
        self.graphdef, self.initial_trainable, self.frozen = nnx.split(model, trainable_filter(model), ...)
        self.tx = optimizer.build()
        self.schedule = optimizer.learning_rates()
        self.base_key = jax.random.PRNGKey(seed)
        self._step = jax.jit(self._apply, donate_argnums=(0,))

    def init(self) -> TrainState:
        """Step 0: a copy of the model's trained parameters (steps donate their buffers; the model you
        passed stays usable) and a fresh optimizer state, sharded like the parameters."""
        trainable = jax.tree.map(jnp.copy, self.initial_trainable)
        state = TrainState(jnp.zeros((), jnp.int32), trainable, self.tx.init(trainable))   # zeros_like keeps shardings
        # committed like the step's own outputs (else the second step compiles again); on a mesh what
        # is not placed on it yet (the counters, adapters created on one device) is replicated over it
        return jax.tree.map(self._commit, state)

    def _commit(self, x: jax.Array) -> jax.Array:
        if self.mesh is None:
            return jax.device_put(x, x.sharding)
        return x if _is_placed(x, self.mesh) else put_global(np.asarray(x), NamedSharding(self.mesh, PartitionSpec()))

    def model(self, trainable, frozen=None) -> Qwen3Model:
        """The model with these trained parameters (and the frozen ones)."""
        return nnx.merge(self.graphdef, trainable, self.frozen if frozen is None else frozen)

    def place(self, batch: dict) -> dict:
        """The batch's arrays on the devices: rows split over the mesh's data axis, the rest replicated.
        Every process holds the whole (small) batch of token ids and sends each device its share."""
        if self.mesh is None:
            return {name: jnp.asarray(value) for name, value in batch.items()}
        rows = NamedSharding(self.mesh, PartitionSpec(None, BATCH_AXIS))
        whole = NamedSharding(self.mesh, PartitionSpec())
        return {name: put_global(np.asarray(value), rows if name in ("ids", "segments", "ends") else whole)
                for name, value in batch.items()}

    def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        # under a mesh, attention loops over each device's own rows
        with jax.set_mesh(self.mesh), kernel_named_on_failure(self.backend):
            return self._step(state, self.frozen, self.place(batch))

    def compile(self, state: TrainState, batch: dict) -> "CompiledStep":
        """The step compiled once for this batch's shape, called like the step; with XLA's working memory
        of that one program."""
        with jax.set_mesh(self.mesh), kernel_named_on_failure(self.backend):
            return CompiledStep(self, self._step.lower(state, self.frozen, self.place(batch)).compile())

    def _embed(self, trainable, frozen, batch: dict, m, rng, remat: str) -> jax.Array:
        """Mini-batch m's pooled final states, flat [rows * slots, D] (the last layer at the pooled
        tokens alone, see Qwen3Model.__call__)."""
        model = self.model(trainable, frozen)
        pooled = model(batch["ids"][m], batch["segments"][m], at=batch["ends"][m], rng=jax.random.fold_in(rng, m),
                       remat=remat, prune_last=True).astype(jnp.float32)
        return pooled.reshape(-1, pooled.shape[-1])

    def _texts(self, pooled: jax.Array, batch: dict) -> jax.Array:
        """[M, rows * slots, D] -> each text's state [texts, D]."""
        return pooled.reshape(-1, pooled.shape[-1])[batch["text_slot"]]

    def loss_and_grads(self, trainable, frozen, batch: dict, rng) -> tuple[tuple[jax.Array, dict], Any]:
        """((loss, metrics), gradients with respect to the trainable parameters)."""
        count = batch["ids"].shape[0]
        if self.mini_batches == 1:
            def loss_of(trainable):
                pooled = jnp.stack([self._embed(trainable, frozen, batch, m, rng, self.remat) for m in range(count)])
                return self.objective(self.model(trainable, frozen), self._texts(pooled, batch), batch)
            return jax.value_and_grad(loss_of, has_aux=True)(trainable)
        # The last mini-batch keeps its activations from the first pass (its pullback), so only the
        # others run again: the peak is still one mini-batch's forward and backward pass.
        last = count - 1
        pooled = jax.lax.map(lambda m: self._embed(trainable, frozen, batch, m, rng, "off"), jnp.arange(last))
        last_pooled, last_pullback = jax.vjp(lambda t: self._embed(t, frozen, batch, last, rng, self.remat),
                                             trainable)
        model = self.model(trainable, frozen)
        (loss, metrics), cotangent = jax.value_and_grad(
            lambda p: self.objective(model, self._texts(p, batch), batch),
            has_aux=True)(jnp.concatenate([pooled, last_pooled[None]]))

        def rerun(grads, m):
            _, pullback = jax.vjp(lambda t: self._embed(t, frozen, batch, m, rng, self.remat), trainable)
            return jax.tree.map(jnp.add, grads, pullback(cotangent[m])[0]), None

        # the scan starts from the last mini-batch's gradients, so its activations are freed before it
        grads, _ = jax.lax.scan(rerun, last_pullback(cotangent[last])[0], jnp.arange(last))
        return (loss, metrics), grads

    def _apply(self, state: TrainState, frozen, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(self.base_key, state.step)
        (loss, metrics), grads = self.loss_and_grads(state.trainable, frozen, batch, rng)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads),
                   "learning_rate": self.schedule(state.step // self.optimizer.accumulate)}
        return TrainState(state.step + 1, trainable, opt_state), metrics


class CompiledStep:
    """A TrainStep's program for one batch shape (see TrainStep.compile)."""

    def __init__(self, step: TrainStep, executable: jax.stages.Compiled):
        self.step, self.executable = step, executable

    def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        with jax.set_mesh(self.step.mesh):
            return self.executable(state, self.step.frozen, self.step.place(batch))

    @property
    def working_memory_bytes(self) -> int:
        """XLA's temporary buffers: the activations and everything else the step holds at its peak."""
        return self.executable.memory_analysis().temp_size_in_bytes


def _is_placed(x: jax.Array, mesh: Mesh) -> bool:
    return isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
