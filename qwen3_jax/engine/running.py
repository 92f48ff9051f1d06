"""What both engines share: token rows to their last hidden states, run at once through the model's
LastTokenRunner (the library, training, corpus jobs) or submitted to a serve Scheduler over that runner
(the server, whose requests share batches)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Sequence

import numpy as np

from qwen3_jax.engine.errors import RequestTooLarge
from qwen3_jax.runner import LastTokenRunner

if TYPE_CHECKING:                          # the server's; the engine only calls what it is given
    from qwen3_jax.serve.scheduler import Scheduler, Ticket

MIN_TOKENS_PER_TEXT = 2                   # a text's own token and <|endoftext|>: the least a text can cost


class Engine:
    """Runs token rows through `runner`, or through `scheduler` (a Scheduler over the same runner) once
    `scheduled` has given it one."""

    def __init__(self, runner: LastTokenRunner):
        self.runner = runner
        self.scheduler: Scheduler | None = None

    def scheduled(self, scheduler: Scheduler):
        """A copy of this engine that `submit`s through `scheduler` (this one is left as it is)."""
        engine = copy.copy(self)
        engine.scheduler = scheduler
        return engine

    def keep_known_prefixes(self, tokenizer) -> None:
        """Registers each of `known_prefixes()` (strings, tokenized here by `tokenizer`) with the runner's
        prefix cache: texts that begin with one compute only their own tokens (prefixes.py)."""
        if self.runner.prefixes is not None:
            for text in self.known_prefixes():
                self.runner.prefixes.register(tokenizer.token_ids([text])[0])

    def known_prefixes(self) -> list[str]:
        """The strings put before many texts (none here; each engine lists its own)."""
        return []

    def run(self, rows: Sequence[Sequence[int]], *, batch_size: int, progress: bool = False) -> np.ndarray:
        """The last hidden state of each row, float32 [n, D], in order: `batch_size` x 512 tokens a forward
        pass; `progress` shows a bar on stderr."""
        return self.runner(rows, batch_size=batch_size, progress=progress)

    def check_room(self, count: int) -> None:
        """Raises Overloaded (or ShuttingDown) before any tokenizing when `count` texts could not be queued
        now even at the fewest tokens a text can make."""
        self.scheduler.check_room(MIN_TOKENS_PER_TEXT * count)

    def submit(self, rows: Sequence[Sequence[int]], request_id: str = "-") -> Ticket:
        """Queues the rows on the scheduler; the ticket's future gets their last hidden states [n, D] (or
        raises BatchFailed). Raises RequestTooLarge for more tokens than the queue holds at all, Overloaded
        when it cannot take them now, ShuttingDown once it is closing. `request_id` names the request in
        the log."""
        tokens = sum(len(row) for row in rows)
        if tokens > self.scheduler.max_queue_tokens:
            raise RequestTooLarge(tokens, self.scheduler.max_queue_tokens)
        return self.scheduler.submit(rows, request_id)

    def cancel(self, ticket: Ticket) -> None:
        """Drops the rows of a submitted request that have not started (its caller went away)."""
        self.scheduler.cancel(ticket)


class OnEngine:
    """What a public model API over an engine (`self.engine`) shares: its runner, replaceable (e.g. by a
    test's wrapper)."""

    engine: Engine

    @property
    def runner(self) -> LastTokenRunner:
        return self.engine.runner

    @runner.setter
    def runner(self, runner: LastTokenRunner) -> None:
        self.engine.runner = runner
