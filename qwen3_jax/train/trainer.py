"""What a run trains: the model with its adapters, tokenizer, prompts and jitted step; turning examples
into batches, evaluating on held-out examples, exporting the result."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3_jax.convert import export_hf, hf_key_prefix, staged_folder
from qwen3_jax.engine import EmbeddingEngine, RerankingEngine
from qwen3_jax.engine.reranking import RerankerPrompts
from qwen3_jax.hub import resolve_model
from qwen3_jax.loader import load_model
from qwen3_jax.retrieval_metrics import evaluate
from qwen3_jax.runner import LastTokenRunner
from qwen3_jax.sharding import fetch_global, shard_count
from qwen3_jax.tokenization import TextTokenizer, format_instruction
from qwen3_jax.train.batch import ContrastiveExample, contrastive_batch, pointwise_batch
from qwen3_jax.train.config import TrainConfig
from qwen3_jax.train.data import Example
from qwen3_jax.train.lora import add_lora, merge_lora, save_peft_adapter
from qwen3_jax.train.step import TrainState, TrainStep

EVAL_METRICS = ("recall@1", "recall@10", "ndcg@10")
DEEPEST = max(int(metric.partition("@")[2]) for metric in EVAL_METRICS)      # the ranking depth they read


class Trainer:
    """What a run trains: the model (with LoRA adapters, unless full fine-tuning), its tokenizer, the
    reranker prompts (reranker runs) and the jitted step; turns examples into batches, evaluates and
    exports. `negatives` is the hard negatives per query of every step (its texts count is fixed)."""

    def __init__(self, config: TrainConfig, *, total_steps: int, negatives: int, mesh=None):
        self.config, self.mesh, self.negatives = config, mesh, negatives
        self.folder = resolve_model(config.model)
        reranker = config.objective.loss == "reranker"
        model = load_model(self.folder, dtype=config.dtype, param_dtype="float32", mesh=mesh, fsdp=config.fsdp,
                           with_lm_head=reranker)
        self.key_prefix = _key_prefix(self.folder)
        self.lora = config.lora
        if self.lora:
            add_lora(model, self.lora, seed=config.seed)
        self.tokenizer = TextTokenizer.from_folder(self.folder)
        self.prompts = RerankerPrompts(self.tokenizer, config.max_length) if reranker else None
        objective = dataclasses.replace(config.objective, answer_ids=(self.prompts.no_id, self.prompts.yes_id)
                                        if reranker else None)
        optimizer = dataclasses.replace(config.optimizer, total_steps=total_steps)
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
            self.eval_runner = LastTokenRunner(model, pad_id=self.tokenizer.end_of_text_id, mesh=self.mesh,
                                               layer_by_layer=False)
        runner = self.eval_runner
        runner.use(model)
        batch_size = self.config.batch_size
        if self.prompts is not None:
            engine = RerankingEngine(model, self.tokenizer, runner, max_length=self.config.max_length)
            scores = engine.scores(engine.run(self._prompts(examples), batch_size=batch_size), raw=True)
            by_query: dict[str, list[int]] = {}
            for i, e in enumerate(examples):
                by_query.setdefault(e.query, []).append(i)
            rankings = {q: sorted(ids, key=lambda i: -scores[i]) for q, ids in by_query.items()}
            qrels = {q: {i: examples[i].label for i in ids} for q, ids in by_query.items()}
            return evaluate(rankings, qrels, EVAL_METRICS)
        engine = EmbeddingEngine(model, self.tokenizer, runner, max_length=self.config.max_length)
        corpus = sorted({d for e in examples for d in e.documents})
        position = {d: i for i, d in enumerate(corpus)}
        encode = lambda texts: engine.vectors(engine.run(engine.rows(texts), batch_size=batch_size))
        similarity = encode([self._query_text(e) for e in examples]) @ encode(corpus).T
        top = np.argsort(-similarity, axis=1, kind="stable")[:, :DEEPEST]
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
