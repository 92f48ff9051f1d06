"""What the HTTP surface serves: the models, one scheduler each, their limits, and the plumbing every
endpoint shares (checking the model a request names, bounding and tokenizing its texts off the event
loop, queueing its rows, watching its client, mapping the scheduler's refusals to statuses)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from fastapi import Request
from flax import nnx

from qwen3_jax.checks import check_dim
from qwen3_jax.embedder import Qwen3Embedder, pooled_vectors
from qwen3_jax.quantize import calibration_ranges
from qwen3_jax.reranker import Qwen3Reranker
from qwen3_jax.serve.errors import APIError
from qwen3_jax.serve.metrics import Metrics
from qwen3_jax.serve.scheduler import BatchFailed, Overloaded, Scheduler, ShuttingDown
from qwen3_jax.serve.settings import ServeSettings
from qwen3_jax.tokenization import TooLong, pad_batch

MIN_TOKENS_PER_TEXT = 2                   # a text's own token and <|endoftext|>: the least a text can cost


class ClientGone(Exception):
    """The client closed its connection before its answer was ready; its queued work was dropped."""


class Service:
    """The embedding model and/or the reranker behind the server, with their schedulers and limits."""

    def __init__(self, settings: ServeSettings, embedder: Qwen3Embedder | None, reranker: Qwen3Reranker | None,
                 *, calibration_texts: list[str] | None = None):
        backend = jax.default_backend()
        self.settings, self.embedder, self.reranker = settings, embedder, reranker
        self.metrics = Metrics()
        self.batch_tokens = settings.batch_tokens(backend)
        self.queue_tokens = settings.queue_tokens(backend)
        self.ready = False
        self.embedding_name = settings.served_model_name or (settings.name_of(settings.model) if embedder else None)
        self.reranker_name = settings.served_reranker_name or (settings.name_of(settings.reranker) if reranker else None)
        # Tokenizing has threads of its own: a long request's tokens never hold up other responses' JSON.
        self.tokenizing = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="qwen3-jax-tokenize")
        self.calibration_texts = calibration_texts
        self._calibration_states: np.ndarray | None = None
        self._every_token = None                 # /embed_all's jitted forward pass and its weights, made on first use
        self.schedulers: dict[str, Scheduler] = {}
        if embedder is not None:
            self.dim = check_dim(settings.dim, embedder.dimension)
            self.schedulers["embedding"] = self._scheduler(embedder.runner, self.embedding_name)
        if reranker is not None:
            self.schedulers["rerank"] = self._scheduler(reranker.runner, self.reranker_name)

    def _scheduler(self, runner, name: str) -> Scheduler:
        scheduler = Scheduler(runner, max_batch_tokens=self.batch_tokens, max_queue_tokens=self.queue_tokens,
                              max_wait_ms=self.settings.max_wait_ms, report=self.metrics.reporter(name))
        self.metrics.queue_tokens.labels(name).set_function(lambda: scheduler.queued_tokens)
        return scheduler

    def compile(self) -> int:
        """Compiles every shape a batch of each model can take (nothing compiles once serving), and
        embeds the int8 calibration texts; returns how many programs that made."""
        for kind, scheduler in self.schedulers.items():
            runner = scheduler.runner
            model, name, _ = self._model(kind)
            runner.compile(runner.shapes(self.batch_tokens, model.max_length))
            self.metrics.compiled.labels(name).set(runner.compiled_programs)
        if self.embedder is not None and self.calibration_texts:
            rows = self.embedder.tokenizer.encode(self.calibration_texts, self.embedder.max_length)
            self._calibration_states = self.embedder.runner(rows, batch_size=max(1, self.batch_tokens // 512))
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
        """Raises 404 unless this server has a model of `kind` (and it is the one `named`, if named)."""
        _, name, given = self._model(kind)
        if name is None:
            other = "--reranker" if kind == "rerank" else "--model"
            raise APIError(404, f"this server has no {kind} model; start it with {other}", code="model_not_found")
        if named is not None and named not in {given, name}:
            raise APIError(404, f"model {named!r} is not served here; this server's {kind} model is {name!r}",
                           code="model_not_found", param="model")

    def check_count(self, count: int, param: str) -> None:
        """Refuses a request of no texts, or of more than --max-client-batch-size."""
        if count == 0:
            raise APIError(400, f"{param} is empty: give at least one text", code="empty_input", param=param)
        if count > self.settings.max_client_batch_size:
            raise APIError(400, f"{param} holds {count} texts; this server takes at most "
                           f"{self.settings.max_client_batch_size} a request (--max-client-batch-size): send fewer "
                           "at a time", code="too_many_inputs", param=param)

    def admit(self, kind: str, count: int, param: str) -> None:
        """Refuses, before any tokenizing, a request of `count` texts that check_count refuses, or that
        could not be queued now even at the fewest tokens its texts can make."""
        self.check_count(count, param)
        with _refusals():
            self.schedulers[kind].check_room(MIN_TOKENS_PER_TEXT * count)

    def check_dim(self, dimensions: int | None) -> int:
        if dimensions is None:
            return self.dim
        try:
            return check_dim(dimensions, self.embedder.dimension, name="dimensions=")
        except ValueError as error:
            raise APIError(400, str(error), code="invalid_dimensions", param="dimensions") from None

    def bounded(self, kind: str, texts: list[str], *, truncate: bool, side: str, status: int, param: str) -> list[str]:
        """Texts cut to --max-input-chars before tokenizing (the side `side`), or refused with `status`
        when not `truncate`: what one text can cost the tokenizer is bounded."""
        limit = self.settings.input_chars(self._model(kind)[0].max_length)
        over = [i for i, text in enumerate(texts) if len(text) > limit]
        if over and not truncate:
            raise APIError(status, f"{param}[{over[0]}] holds {len(texts[over[0]])} characters, over this server's "
                           f"limit of {limit} (--max-input-chars): shorten it, or send truncate=true to cut it",
                           code="context_length_exceeded", param=param)
        return [text if len(text) <= limit else text[:limit] if side == "right" else text[-limit:] for text in texts]

    async def host(self, work, *args, **kwargs):
        """`work(*args, **kwargs)` on the tokenizing threads, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, lambda: work(*args, **kwargs))

    def embedding_rows(self, texts: list[str], *, prompt_name: str | None, instruction: str | None,
                       truncate: bool, side: str, status: int) -> list[list[int]]:
        """Token rows of texts as `encode` makes them (prompt or instruction first, one <|endoftext|>
        last); a text over the length limit is cut (`truncate`, on `side`) or refused with `status`."""
        embedder = self.embedder
        prefix = self.prefix(prompt_name, instruction)
        return self._rows(lambda: embedder.tokenizer.encode([prefix + t for t in texts], embedder.max_length,
                                                            truncate=truncate, side=side), status)

    def prefix(self, prompt_name: str | None, instruction: str | None) -> str:
        """What goes before each text: the named prompt, the instruction, or the checkpoint's default."""
        try:
            return self.embedder.resolve_prefix(prompt_name, None, instruction)
        except ValueError as error:
            raise APIError(400, str(error), code="invalid_prompt", param="prompt_name") from None

    def token_rows(self, ids: list[list[int]], *, truncate: bool, side: str, status: int) -> list[list[int]]:
        """Rows of a client's own token ids, each given its <|endoftext|> as texts get theirs."""
        vocabulary = self.embedder.config.vocab_size
        for i, row in enumerate(ids):
            if not row:
                raise APIError(400, f"input[{i}] holds no token ids: send at least one", code="empty_input",
                               param="input")
            if any(not 0 <= token < vocabulary for token in row):
                raise APIError(400, f"input[{i}] holds token ids outside 0..{vocabulary - 1}", code="invalid_tokens",
                               param="input")
        return self._rows(lambda: self.embedder.tokenizer.finish(ids, self.embedder.max_length, truncate=truncate,
                                                                 side=side), status)

    def rerank_rows(self, pairs: list[tuple[str, str]], *, instruction: str | None, truncate: bool, side: str,
                    status: int) -> list[list[int]]:
        """The official reranker prompt of each (query, document); too long: the document is cut
        (`truncate`, its end or with side "left" its start), or the request refused with `status`."""
        return self._rows(lambda: self.reranker.prompts.ids(pairs, instruction, truncate=truncate, side=side), status)

    @staticmethod
    def _rows(make, status: int) -> list[list[int]]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")           # truncation was asked for; no log line per request
                return make()
        except TooLong as error:
            raise APIError(status, f"{error.what}: shorten them, or send truncate=true to cut them to the limit",
                           code="context_length_exceeded", param="input") from None

    async def embed(self, request: Request, texts: list[str], *, prompt_name: str | None, instruction: str | None,
                    truncate: bool, side: str = "right", status: int, param: str) -> tuple[np.ndarray, int]:
        """(the last hidden states of `texts` [n, D], their tokens): the embedding endpoints' one path."""
        self.admit("embedding", len(texts), param)
        if "" in texts:
            raise APIError(400, f"{param}[{texts.index('')}] is an empty string: send some text", code="empty_input",
                           param=param)
        texts = self.bounded("embedding", texts, truncate=truncate, side=side, status=status, param=param)
        rows = await self.host(self.embedding_rows, texts, prompt_name=prompt_name, instruction=instruction,
                               truncate=truncate, side=side, status=status)
        return await self.run("embedding", request, rows)

    async def embed_tokens(self, texts: list[str], *, prompt_name: str | None, instruction: str | None,
                           truncate: bool, side: str, status: int, param: str) -> list[np.ndarray]:
        """Every token's final hidden state of each text [tokens, D] (/embed_all), one text at a time on
        the host threads, beside the queue."""
        self.check_count(len(texts), param)
        texts = self.bounded("embedding", texts, truncate=truncate, side=side, status=status, param=param)
        rows = await self.host(self.embedding_rows, texts, prompt_name=prompt_name, instruction=instruction,
                               truncate=truncate, side=side, status=status)
        return await self.host(lambda: [self._token_states(row) for row in rows])

    def _token_states(self, row: list[int]) -> np.ndarray:
        """[len(row), D]: the row padded to a power of two (at least 16) tokens, one program per length."""
        if self._every_token is None:
            graphdef, state = nnx.split(self.embedder.model)
            self._every_token = jax.jit(lambda state, ids, segments: nnx.merge(graphdef, state)(ids, segments)), state
        forward, state = self._every_token
        length = max(16, 1 << (len(row) - 1).bit_length())
        ids, valid = pad_batch([row], length, 1, self.embedder.tokenizer.end_of_text_id)
        return np.asarray(forward(state, ids, valid.astype(np.int32))[0, :len(row)], np.float32)

    async def rerank_margins(self, request: Request, queries: list[str], documents: list[str], *,
                             instruction: str | None, truncate: bool, side: str = "right",
                             status: int) -> tuple[np.ndarray, int]:
        """(the yes-no logit margin of each (query, document) pair, the prompts' tokens) through the
        reranker's queue."""
        self.admit("rerank", len(documents), "documents")
        queries, documents = (self.bounded("rerank", texts, truncate=truncate, side=side, status=status, param=param)
                              for texts, param in ((queries, "query"), (documents, "documents")))
        rows = await self.host(self.rerank_rows, list(zip(queries, documents)), instruction=instruction,
                               truncate=truncate, side=side, status=status)
        hidden, tokens = await self.run("rerank", request, rows)
        return self.reranker.answer_logits(hidden), tokens

    def quantization_ranges(self, dim: int) -> np.ndarray:
        """The int8 / uint8 calibration ranges of `dim`-wide embeddings (the calibration texts' [min, max])."""
        if self._calibration_states is None:
            raise APIError(400, "int8 and uint8 embeddings need calibration texts: start the server with "
                           "--calibration FILE", code="invalid_embedding_types", param="embedding_types")
        return calibration_ranges(pooled_vectors(self._calibration_states, dim))

    async def run(self, kind: str, request: Request, rows: list[list[int]]) -> tuple[np.ndarray, int]:
        """(the last hidden states [n, D] of these token rows, their tokens) through `kind`'s scheduler.
        Refuses at once what the queue cannot take (429 with Retry-After; 413 for a request larger than the
        whole queue); a client that disconnects has its waiting rows dropped; a failed batch is a 500
        naming the request."""
        tokens = sum(len(row) for row in rows)
        if tokens > self.queue_tokens:
            raise APIError(413, f"the request holds {tokens} tokens, more than this server queues at once "
                           f"({self.queue_tokens}, --max-queue-tokens): split it", code="request_too_large")
        scheduler = self.schedulers[kind]
        request_id = request.scope.get("state", {}).get("request_id", "-")
        with _refusals():
            ticket = scheduler.submit(rows, request_id)
        result = asyncio.wrap_future(ticket.future)
        gone = asyncio.ensure_future(_disconnected(request))
        done, _ = await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        if result in done:
            gone.cancel()
            with _refusals():
                return result.result(), tokens
        scheduler.cancel(ticket)
        raise ClientGone()


@contextlib.contextmanager
def _refusals():
    """Maps what the scheduler refuses or fails with to HTTP: 429 + Retry-After, 503, and 500."""
    try:
        yield
    except Overloaded as busy:
        raise APIError(429, str(busy), code="queue_full", headers={"Retry-After": str(busy.retry_after)}) from None
    except ShuttingDown as stopping:
        raise APIError(503, f"{stopping}: send the request elsewhere or later", code="unavailable") from None
    except BatchFailed as failed:
        raise APIError(500, f"internal error: {failed}; the server's log has the details",
                       code="internal_error") from None


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
