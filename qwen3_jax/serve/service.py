"""What the HTTP surface serves: the models, one scheduler each, their limits, and the plumbing every
endpoint shares (checking the model a request names, queueing its rows, watching its client)."""

from __future__ import annotations

import asyncio
import warnings

import jax
import numpy as np
from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from qwen3_jax.checks import check_dim
from qwen3_jax.embedder import Qwen3Embedder, normalize_rows
from qwen3_jax.reranker import Qwen3Reranker
from qwen3_jax.serve.errors import APIError
from qwen3_jax.serve.metrics import Metrics
from qwen3_jax.serve.scheduler import Overloaded, Scheduler, ShuttingDown
from qwen3_jax.serve.settings import ServeSettings
from qwen3_jax.tokenize import TooLong


class ClientGone(Exception):
    """The client closed its connection before its answer was ready; its queued work was dropped."""


class Service:
    """The embedding model and/or the reranker behind the server, with their schedulers and limits."""

    def __init__(self, settings: ServeSettings, embedder: Qwen3Embedder | None, reranker: Qwen3Reranker | None):
        backend = jax.default_backend()
        self.settings, self.embedder, self.reranker = settings, embedder, reranker
        self.metrics = Metrics()
        self.batch_tokens = settings.batch_tokens(backend)
        self.queue_tokens = settings.queue_tokens(backend)
        self.ready = False
        self.embedding_name = settings.served_model_name or (settings.name_of(settings.model) if embedder else None)
        self.reranker_name = settings.served_reranker_name or (settings.name_of(settings.reranker) if reranker else None)
        self.schedulers: dict[str, Scheduler] = {}
        if embedder is not None:
            self.dim = embedder.check_dim(settings.dim)
            self.schedulers["embedding"] = self._scheduler(embedder.runner, self.embedding_name)
        if reranker is not None:
            self.schedulers["rerank"] = self._scheduler(reranker.runner, self.reranker_name)

    def _scheduler(self, runner, name: str) -> Scheduler:
        scheduler = Scheduler(runner, max_batch_tokens=self.batch_tokens, max_queue_tokens=self.queue_tokens,
                              max_wait_ms=self.settings.max_wait_ms, report=self.metrics.reporter(name))
        self.metrics.queue_tokens.labels(name).set_function(lambda: scheduler.queued_tokens)
        return scheduler

    def compile(self) -> int:
        """Compiles every shape a batch of each model can take (nothing compiles once serving);
        returns how many programs that made."""
        for kind, scheduler in self.schedulers.items():
            runner = scheduler.runner
            model, name, _ = self._model(kind)
            runner.compile(runner.shapes(self.batch_tokens, model.max_length))
            self.metrics.compiled.labels(name).set(runner.compiled_programs)
        return sum(scheduler.runner.compiled_programs for scheduler in self.schedulers.values())

    def _model(self, kind: str) -> tuple:
        """(the model of `kind`, the name it is served by, the name it was loaded by); None when absent."""
        if kind == "embedding":
            return self.embedder, self.embedding_name, self.settings.model
        return self.reranker, self.reranker_name, self.settings.reranker

    def start(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.start()
        self.ready = True

    def stop(self) -> None:
        """Finishes every accepted request, then stops the schedulers."""
        self.ready = False
        for scheduler in self.schedulers.values():
            scheduler.close()

    # --- shared by the endpoints ------------------------------------------------------------------------

    def served(self) -> list[tuple[str, str]]:
        """(name, kind) of each model served."""
        return [(name, kind) for name, kind in ((self.embedding_name, "embedding"), (self.reranker_name, "rerank"))
                if name]

    def require(self, kind: str, named: str | None = None) -> None:
        """Raises 404 unless this server has a model of `kind` (and it is the one `named`, if named)."""
        _, name, given = self._model(kind)
        if name is None:
            other = "--reranker" if kind == "rerank" else "--model"
            raise APIError(404, f"this server has no {kind} model; start it with {other}", code="model_not_found")
        if named is not None and named not in {given, name}:
            raise APIError(404, f"model {named!r} is not served here; this server's {kind} model is {name!r}",
                           code="model_not_found", param="model")

    def check_count(self, count: int, param: str) -> None:
        if count == 0:
            raise APIError(400, f"{param} is empty: give at least one text", code="empty_input", param=param)
        if count > self.settings.max_texts_per_request:
            raise APIError(400, f"{param} holds {count} texts; this server takes at most "
                           f"{self.settings.max_texts_per_request} a request (--max-texts-per-request): send fewer "
                           "at a time", code="too_many_inputs", param=param)

    def check_dim(self, dimensions: int | None) -> int:
        if dimensions is None:
            return self.dim
        try:
            return check_dim(dimensions, self.embedder.dimension, name="dimensions=")
        except ValueError as error:
            raise APIError(400, str(error), code="invalid_dimensions", param="dimensions") from None

    def embedding_rows(self, texts: list[str], *, prompt_name: str | None, instruction: str | None,
                       truncate: bool, status: int) -> list[list[int]]:
        """Token rows of texts as `encode` makes them (prompt or instruction first, one <|endoftext|>
        last); a text over the length limit is cut (`truncate`) or refused with `status`."""
        embedder = self.embedder
        try:
            prefix = embedder.resolve_prefix(prompt_name, None, instruction)
        except ValueError as error:
            raise APIError(400, str(error), code="invalid_prompt", param="prompt_name") from None
        return self._rows(lambda: embedder.tokenizer.encode([prefix + t for t in texts], embedder.max_length,
                                                            truncate=truncate), status)

    def token_rows(self, ids: list[list[int]], *, truncate: bool, status: int) -> list[list[int]]:
        """Rows of a client's own token ids, each given its <|endoftext|> as texts get theirs."""
        vocabulary = self.embedder.config.vocab_size
        for i, row in enumerate(ids):
            if any(not 0 <= token < vocabulary for token in row):
                raise APIError(400, f"input[{i}] holds token ids outside 0..{vocabulary - 1}", code="invalid_tokens",
                               param="input")
        return self._rows(lambda: self.embedder.tokenizer.finish(ids, self.embedder.max_length, truncate=truncate),
                          status)

    def rerank_rows(self, query: str, documents: list[str], *, instruction: str | None, truncate: bool,
                    status: int) -> list[list[int]]:
        """The official reranker prompt of each (query, document); too long: the document is cut
        (`truncate`), or the request refused with `status`."""
        pairs = [(query, document) for document in documents]
        return self._rows(lambda: self.reranker.prompts.ids(pairs, instruction, truncate=truncate), status)

    @staticmethod
    def _rows(make, status: int) -> list[list[int]]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")           # truncation was asked for; no log line per request
                return make()
        except TooLong as error:
            raise APIError(status, f"{error.what}: shorten them, or send truncate=true to cut them to the limit",
                           code="context_length_exceeded", param="input") from None

    async def rerank_margins(self, request: Request, query: str, documents: list[str], *, instruction: str | None,
                             truncate: bool, status: int) -> tuple[np.ndarray, int]:
        """(the yes-no logit margin of each document, the prompts' tokens) through the reranker's queue."""
        self.check_count(len(documents), "documents")
        rows = await run_in_threadpool(self.rerank_rows, query, documents, instruction=instruction, truncate=truncate,
                                       status=status)
        hidden = await self.run("rerank", request, rows)
        return self.reranker.answer_logits(hidden), sum(len(row) for row in rows)

    def vectors(self, hidden: np.ndarray, dim: int, normalize: bool = True) -> np.ndarray:
        """Embeddings from last hidden states: the first `dim` values (MRL), then L2-normalised."""
        out = hidden[:, :dim]
        return normalize_rows(out) if normalize else out

    async def run(self, kind: str, request: Request, rows: list[list[int]]) -> np.ndarray:
        """The last hidden states [n, D] of these token rows, through `kind`'s scheduler. Refuses at once
        what the queue cannot take (429 with Retry-After; 413 for a request larger than the whole queue);
        a client that disconnects has its waiting rows dropped."""
        tokens = sum(len(row) for row in rows)
        if tokens > self.queue_tokens:
            raise APIError(413, f"the request holds {tokens} tokens, more than this server queues at once "
                           f"({self.queue_tokens}, --max-queue-tokens): split it", code="request_too_large")
        scheduler = self.schedulers[kind]
        try:
            ticket = scheduler.submit(rows)
        except Overloaded as busy:
            raise APIError(429, str(busy), code="queue_full", headers={"Retry-After": str(busy.retry_after)}) from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down; send the request elsewhere or later",
                           code="shutting_down") from None
        result = asyncio.wrap_future(ticket.future)
        gone = asyncio.ensure_future(_disconnected(request))
        done, _ = await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        if result in done:
            gone.cancel()
            return result.result()
        scheduler.cancel(ticket)
        raise ClientGone()


def ranked(scores: np.ndarray) -> list[int]:
    """Indices best first; equal scores keep their order (the lower index first)."""
    return [int(i) for i in np.argsort(-scores, kind="stable")]


def service_of(request: Request) -> Service:
    """The Service of the app handling `request` (a FastAPI dependency of every endpoint)."""
    return request.app.state.service


async def _disconnected(request: Request) -> None:
    """Returns when the client closes its connection (the body has been read; only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass

