"""What the HTTP surface serves, with no HTTP in it: the models' engines, one scheduler each, their limits,
and what every endpoint shares (checking the model a request names, bounding and tokenizing its texts off
the event loop, queueing its rows, dropping them once its caller stops waiting). Every refusal is a typed
error (qwen3_jax/engine/errors.py, ClientGone) that the routes map to their API family's status and body
through serve/errors.py."""

from __future__ import annotations

import asyncio
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, NamedTuple

import numpy as np

from qwen3_jax.checks import check_dim
from qwen3_jax.embedder import Qwen3Embedder
from qwen3_jax.engine import EmbeddingEngine, RerankingEngine
from qwen3_jax.engine.errors import Invalid, NotServed, TooManyCharacters
from qwen3_jax.quantize import calibration_ranges
from qwen3_jax.reranker import Qwen3Reranker
from qwen3_jax.serve.metrics import Metrics
from qwen3_jax.serve.scheduler import Scheduler
from qwen3_jax.serve.settings import ServeSettings

CALIBRATION_TOKENS_PER_TEXT = 512        # the calibration texts run `batch tokens / this` texts a batch


class ClientGone(Exception):
    """The caller stopped waiting (its client closed the connection) before its answer was ready; its
    queued work was dropped."""


async def _never() -> None:
    await asyncio.Event().wait()


class Caller(NamedTuple):
    """Whom a request's work is for: `request_id` names it in the log; `gone()` returns once the caller
    stops waiting (the routes watch the client's connection for it)."""

    request_id: str = "-"
    gone: Callable[[], Awaitable[None]] = _never


class Service:
    """The embedding model and/or the reranker behind the server: their engines, each submitting through a
    scheduler of its own, and the server's limits."""

    def __init__(self, settings: ServeSettings, embedder: Qwen3Embedder | None, reranker: Qwen3Reranker | None,
                 *, calibration_texts: list[str] | None = None):
        platform = (embedder or reranker).model.backend.platform
        self.settings = settings
        self.metrics = Metrics()
        self.batch_tokens = settings.batch_tokens(platform)
        self.queue_tokens = settings.queue_tokens(platform)
        self.ready = False
        self.embedding_name = settings.served_model_name or (settings.name_of(settings.model) if embedder else None)
        self.reranker_name = settings.served_reranker_name or (settings.name_of(settings.reranker) if reranker
                                                               else None)
        # Tokenizing has threads of its own: a long request's tokens never hold up other responses' JSON.
        self.tokenizing = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="qwen3-jax-tokenize")
        self.calibration_texts = calibration_texts
        self._calibration_states: np.ndarray | None = None
        self.schedulers: dict[str, Scheduler] = {}
        self.embedding: EmbeddingEngine | None = None
        self.reranking: RerankingEngine | None = None
        if embedder is not None:
            self.dim = check_dim(settings.dim, embedder.dimension)
            self.embedding = embedder.engine.scheduled(self._scheduler("embedding", embedder.runner,
                                                                       self.embedding_name))
        if reranker is not None:
            self.reranking = reranker.engine.scheduled(self._scheduler("rerank", reranker.runner, self.reranker_name))

    def _scheduler(self, kind: str, runner, name: str) -> Scheduler:
        if not self.settings.share_prefixes:
            runner.prefixes = None
        scheduler = Scheduler(runner, max_batch_tokens=self.batch_tokens, max_queue_tokens=self.queue_tokens,
                              max_wait_ms=self.settings.max_wait_ms, report=self.metrics.reporter(name))
        self.metrics.queue_tokens.labels(name).set_function(lambda: scheduler.queued_tokens)
        self.metrics.compiling.labels(name).set_function(lambda: scheduler.compiling)
        self.schedulers[kind] = scheduler
        return scheduler

    def engines(self) -> dict[str, EmbeddingEngine | RerankingEngine]:
        """The engine of each kind served ("embedding", "rerank")."""
        return {kind: engine for kind, engine in (("embedding", self.embedding), ("rerank", self.reranking))
                if engine is not None}

    def compile(self) -> int:
        """Compiles every shape a batch of each model can take, and a lone text's after each known prefix
        (the programs for other prefix tables compile in the background when first needed), and embeds the
        int8 calibration texts; returns how many programs that made."""
        for kind, engine in self.engines().items():
            runner = engine.runner
            runner.compile(runner.shapes(self.batch_tokens, engine.max_length))
            runner.compile_lone_texts(self.batch_tokens)
            self.metrics.compiled.labels(self._names(kind)[0]).set_function(
                lambda runner=runner: runner.compiled_programs)
        if self.embedding is not None and self.calibration_texts:
            rows = self.embedding.rows(self.calibration_texts, prompt="")
            self._calibration_states = self.embedding.run(
                rows, batch_size=max(1, self.batch_tokens // CALIBRATION_TOKENS_PER_TEXT))
        return sum(engine.runner.compiled_programs for engine in self.engines().values())

    def _names(self, kind: str) -> tuple[str | None, str | None]:
        """(the name the model of `kind` is served by, the name it was loaded by); None when absent."""
        if kind == "embedding":
            return self.embedding_name, self.settings.model
        return self.reranker_name, self.settings.reranker

    def start(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.start()
        self.ready = True

    def stop(self) -> None:
        """Finishes every accepted request, then stops the schedulers."""
        self.ready = False
        for scheduler in self.schedulers.values():
            scheduler.close()
        self.tokenizing.shutdown(wait=False)

    def health(self) -> str | None:
        """None when every model can serve, else why not (the server says 503)."""
        if not self.ready:
            return "not ready: the server is starting or stopping"
        for kind, scheduler in self.schedulers.items():
            if scheduler.died is not None:
                return f"the {kind} model's scheduler stopped; restart the server"
            if not scheduler.healthy:
                return f"the {kind} model's last {scheduler.failures_in_a_row} batches failed; see the server's log"
        return None

    # --- shared by the endpoints ------------------------------------------------------------------------

    def served(self) -> list[tuple[str, str]]:
        """(name, kind) of each model served."""
        return [(name, kind) for name, kind in ((self.embedding_name, "embedding"), (self.reranker_name, "rerank"))
                if name]

    def require(self, kind: str, named: str | None = None) -> None:
        """Raises NotServed unless this server has a model of `kind` (and it is the one `named`, if named)."""
        name, given = self._names(kind)
        if name is None:
            other = "--reranker" if kind == "rerank" else "--model"
            raise NotServed(f"this server has no {kind} model; start it with {other}")
        if named is not None and named not in {given, name}:
            raise NotServed(f"model {named!r} is not served here; this server's {kind} model is {name!r}",
                            param="model")

    def check_count(self, count: int, param: str) -> None:
        """Refuses (Invalid) a request of no texts, or of more than --max-client-batch-size; `param` names
        the request's field of texts."""
        if count == 0:
            raise Invalid(f"{param} is empty: give at least one text", reason="empty_input", param=param)
        if count > self.settings.max_client_batch_size:
            raise Invalid(f"{param} holds {count} texts; this server takes at most "
                          f"{self.settings.max_client_batch_size} a request (--max-client-batch-size): send fewer "
                          "at a time", reason="too_many_inputs", param=param)

    def admit(self, kind: str, count: int, param: str) -> None:
        """Refuses, before any tokenizing, a request of `count` texts that check_count refuses, or that
        could not be queued now even at the fewest tokens its texts can make (Overloaded)."""
        self.check_count(count, param)
        self.engines()[kind].check_room(count)

    def check_dim(self, dimensions: int | None) -> int:
        """The width asked for (None: the server's --dim), Invalid outside the model's MRL range."""
        return self.dim if dimensions is None else self.embedding.check_dim(dimensions, "dimensions")

    def bounded(self, kind: str, texts: list[str], *, truncate: bool, side: str, param: str) -> list[str]:
        """Texts cut to --max-input-chars before tokenizing (the side `side`), or refused with
        TooManyCharacters when not `truncate`: what one text can cost the tokenizer is bounded."""
        limit = self.settings.input_chars(self.engines()[kind].max_length)
        over = [i for i, text in enumerate(texts) if len(text) > limit]
        if over and not truncate:
            raise TooManyCharacters(f"{param}[{over[0]}] holds {len(texts[over[0]])} characters, over this server's "
                                    f"limit of {limit} (--max-input-chars): shorten it, or send truncate=true to cut "
                                    "it", param=param)
        return [text if len(text) <= limit else text[:limit] if side == "right" else text[-limit:] for text in texts]

    async def off_loop(self, work, *args, **kwargs):
        """`work(*args, **kwargs)` on the tokenizing threads, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, lambda: work(*args, **kwargs))

    async def rows_off_loop(self, make: Callable[[], list[list[int]]]) -> list[list[int]]:
        """The token rows `make()` builds, on the tokenizing threads; truncation was asked for, so it
        writes no warning to the log for each request."""
        def quietly():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return make()
        return await self.off_loop(quietly)

    async def embed(self, texts: list[str], *, prompt_name: str | None, instruction: str | None, truncate: bool,
                    side: str = "right", param: str, caller: Caller = Caller()) -> tuple[np.ndarray, int]:
        """(the last hidden states of `texts` [n, D], their tokens): the embedding endpoints' one path;
        `param` names the request's field of texts."""
        self.admit("embedding", len(texts), param)
        if "" in texts:
            raise Invalid(f"{param}[{texts.index('')}] is an empty string: send some text", reason="empty_input",
                          param=param)
        texts = self.bounded("embedding", texts, truncate=truncate, side=side, param=param)
        engine = self.embedding
        rows = await self.rows_off_loop(lambda: engine.rows(texts, prompt_name=prompt_name, instruction=instruction,
                                                            truncate=truncate, side=side))
        return await self.run("embedding", rows, caller)

    async def embed_ids(self, ids: list[list[int]], *, truncate: bool, param: str,
                        caller: Caller = Caller()) -> tuple[np.ndarray, int]:
        """(the last hidden states [n, D], their tokens) of texts given as a client's own token ids."""
        self.admit("embedding", len(ids), param)
        rows = await self.rows_off_loop(lambda: self.embedding.token_rows(ids, truncate=truncate, param=param))
        return await self.run("embedding", rows, caller)

    async def embed_tokens(self, texts: list[str], *, prompt_name: str | None, instruction: str | None,
                           truncate: bool, side: str, param: str) -> list[np.ndarray]:
        """Every token's final hidden state of each text [tokens, D] (/embed_all), one text at a time on
        the host threads, beside the queue."""
        self.check_count(len(texts), param)
        texts = self.bounded("embedding", texts, truncate=truncate, side=side, param=param)
        engine = self.embedding
        rows = await self.rows_off_loop(lambda: engine.rows(texts, prompt_name=prompt_name, instruction=instruction,
                                                            truncate=truncate, side=side))
        return await self.off_loop(lambda: [engine.every_token(row) for row in rows])

    async def rerank(self, queries: list[str], documents: list[str], *, instruction: str | None, truncate: bool,
                     side: str = "right", caller: Caller = Caller()) -> tuple[np.ndarray, int]:
        """(the last hidden states [n, D] of each (query, document) pair's prompt, the prompts' tokens)
        through the reranker's queue."""
        self.admit("rerank", len(documents), "documents")
        queries, documents = (self.bounded("rerank", texts, truncate=truncate, side=side, param=param)
                              for texts, param in ((queries, "query"), (documents, "documents")))
        engine = self.reranking
        rows = await self.rows_off_loop(lambda: engine.rows(list(zip(queries, documents)), instruction=instruction,
                                                            truncate=truncate, side=side))
        return await self.run("rerank", rows, caller)

    def quantization_ranges(self, dim: int) -> np.ndarray:
        """The int8 / uint8 calibration ranges of `dim`-wide embeddings (the calibration texts' [min, max])."""
        if self._calibration_states is None:
            raise Invalid("int8 and uint8 embeddings need calibration texts: start the server with "
                          "--calibration FILE", reason="invalid_embedding_types", param="embedding_types")
        return calibration_ranges(self.embedding.vectors(self._calibration_states, dim))

    async def run(self, kind: str, rows: list[list[int]], caller: Caller = Caller()) -> tuple[np.ndarray, int]:
        """(the last hidden states [n, D] of these token rows, their tokens) through `kind`'s engine and
        scheduler. What the queue cannot take is refused at once (RequestTooLarge, Overloaded,
        ShuttingDown); once the caller is gone its waiting rows are dropped (ClientGone); a failed batch
        raises BatchFailed."""
        engine = self.engines()[kind]
        ticket = engine.submit(rows, caller.request_id)
        result = asyncio.wrap_future(ticket.future)
        gone = asyncio.ensure_future(caller.gone())
        done, _ = await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        if result in done:
            gone.cancel()
            return result.result(), sum(len(row) for row in rows)
        engine.cancel(ticket)
        raise ClientGone()
