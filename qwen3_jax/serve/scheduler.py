"""One queue, a token budget, batches formed from whatever is waiting: the server's scheduler, no HTTP in it.

Requests (lists of token-id rows) wait in one first-come-first-served queue, counted in tokens. A
scheduling thread takes texts from its head until the next would pass the batch's token budget, lays
them out with the runner's fixed shapes and starts the forward pass. A text longer than the budget is
long: it goes alone, one at a time, in a lane of its own (a thread that starts its pass and waits for it),
and short texts queued behind it overtake it: the long pass's layers and the short batches reach the device
in turn, so a short request waits for a few of the long text's layers, not for all of it; a collecting thread waits for each batch's result and hands every request its rows once
all of them are done. While the device computes one batch, the next one is formed and laid out: at most
`in_flight` batches are started and not yet collected, so texts arriving meanwhile merge into the next.

A request that would push the queue past `max_queue_tokens` is refused at once (Overloaded), a
cancelled request's waiting texts are dropped (and a long text's pass, run a layer at a time on a CPU,
stops at the end of the layer during which its client went away), and `close()` stops taking requests but finishes every
accepted one. A batch whose forward pass raises fails its own requests (BatchFailed, logged once with
their ids) and nothing else; after FAILURES_UNHEALTHY such batches in a row, or if either thread ever
dies, `healthy` is False (the server's /health says 503) and a dead scheduler refuses new requests.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from concurrent.futures import Future
from typing import Callable, Sequence

import numpy as np

from qwen3_jax.layer_by_layer import Dropped
from qwen3_jax.prefixes import Sharing, table_length, unshared
from qwen3_jax.runner import Dispatched, LastTokenRunner

log = logging.getLogger("qwen3_jax.serve")
FAILURES_UNHEALTHY = 3                        # batches failing in a row: the device is taken to be gone


class Overloaded(Exception):
    """The queue holds too many tokens to take this request now; `retry_after` seconds is a fair wait."""

    def __init__(self, waiting: int, limit: int, retry_after: int):
        self.waiting, self.limit, self.retry_after = waiting, limit, retry_after
        super().__init__(f"the server is busy: {waiting} tokens are queued (the limit is {limit}); "
                         f"retry in {retry_after} s")


class ShuttingDown(Exception):
    """The server is stopping (or its scheduler died): it takes nothing new."""


class BatchFailed(Exception):
    """The forward pass of the batch holding this request raised; the log has the error."""


class DrainRate:
    """Tokens a second the device gets through, averaged over recent batches. Batches in flight together
    share the device, so a batch's time counts from its start or the previous batch's results, whichever
    came later (counting from its start alone would halve the rate with two batches in flight)."""

    def __init__(self):
        self.tokens_per_s = 0.0
        self._last_done = float("-inf")

    def observe(self, tokens: int, began: float, done: float) -> None:
        rate = tokens / max(done - max(began, self._last_done), 1e-6)
        self._last_done = done
        self.tokens_per_s = 0.8 * self.tokens_per_s + 0.2 * rate if self.tokens_per_s else rate


@dataclasses.dataclass(eq=False)
class Ticket:
    """One request in the scheduler: its rows, their results as they come, and a future of all of them."""

    rows: Sequence[Sequence[int]]
    future: Future
    submitted: float
    request_id: str = "-"
    results: list = dataclasses.field(default_factory=list)
    remaining: int = 0

    @property
    def tokens(self) -> int:
        return sum(len(row) for row in self.rows)


@dataclasses.dataclass
class BatchReport:
    """What one batch held, for the metrics: texts, requests, real and computed tokens, and the seconds
    from its start to its results."""

    texts: int
    requests: int
    real_tokens: int
    computed_tokens: int
    seconds: float


class Scheduler:
    """Batches the texts of concurrent requests for one runner by a token budget (see module docstring).
    `report(BatchReport)` is called from the collecting thread after each batch."""

    def __init__(self, runner: LastTokenRunner, *, max_batch_tokens: int, max_queue_tokens: int,
                 max_wait_ms: float = 2.0, in_flight: int = 2, report: Callable[[BatchReport], None] | None = None):
        self.runner = runner
        self.max_batch_tokens, self.max_queue_tokens = max_batch_tokens, max_queue_tokens
        self.max_wait = max_wait_ms / 1000
        self.report = report or (lambda _: None)
        self._waiting: collections.deque[tuple[Ticket, int]] = collections.deque()   # (request, row index)
        self._queued_tokens = 0
        self._lock = threading.Condition()
        self._slots = threading.Semaphore(in_flight)
        self._started: collections.deque = collections.deque()
        self._started_ready = threading.Condition()
        self._closing = False
        self._in_flight = 0                        # batches started and not yet collected
        self._drain = DrainRate()
        self.failures_in_a_row = 0
        self.died: BaseException | None = None
        self._compiling: set[tuple] = set()       # programs for shared prefixes being compiled in the background
        self._not_compiled: set[tuple] = set()    # and those that failed to (their texts run whole)
        self._threads = [threading.Thread(target=self._guarded, args=(loop,), name=f"qwen3-jax-{name}", daemon=True)
                         for loop, name in ((self._schedule, "scheduler"), (self._collect, "collector"),
                                            (self._long_lane, "long-lane"))]

    # --- the request side ---------------------------------------------------------------------------

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def healthy(self) -> bool:
        """Both threads running (or not yet started) and the last batches not all failing."""
        return self.died is None and self.failures_in_a_row < FAILURES_UNHEALTHY

    def start(self) -> "Scheduler":
        for thread in self._threads:
            thread.start()
        return self

    def check_room(self, tokens: int) -> None:
        """Raises Overloaded (or ShuttingDown) now if a request of `tokens` could not be queued: asked
        before a request is tokenized, with the fewest tokens its texts can make."""
        with self._lock:
            self._refuse_unless_room(tokens)

    def _refuse_unless_room(self, tokens: int) -> None:
        if self._closing or self.died is not None:
            raise ShuttingDown("the server is shutting down" if self._closing else "the server's scheduler stopped")
        if self._queued_tokens and self._queued_tokens + tokens > self.max_queue_tokens:
            raise Overloaded(self._queued_tokens, self.max_queue_tokens, self._retry_after(tokens))

    def submit(self, rows: Sequence[Sequence[int]], request_id: str = "-") -> Ticket:
        """Queues a request's rows; its ticket's future gets their last hidden states [n, D] in order.
        Raises Overloaded when the queue cannot take them now, ShuttingDown once closing."""
        ticket = Ticket(rows, Future(), time.perf_counter(), request_id, [None] * len(rows), len(rows))
        with self._lock:
            self._refuse_unless_room(ticket.tokens)
            self._waiting.extend((ticket, i) for i in range(len(rows)))
            self._queued_tokens += ticket.tokens
            self._lock.notify_all()
        if not rows:
            ticket.future.set_result(np.zeros((0, self.runner.model.config.hidden_size), np.float32))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Drops a request's texts that have not started (its client went away)."""
        with self._lock:
            if ticket.future.done():                 # answered, failed or cancelled already
                return
            kept = collections.deque(item for item in self._waiting if item[0] is not ticket)
            self._queued_tokens -= sum(len(ticket.rows[i]) for t, i in self._waiting if t is ticket)
            self._waiting = kept
            ticket.future.cancel()               # under the lock: no result can be set meanwhile

    def close(self, timeout: float | None = None) -> None:
        """Takes no new request, finishes every accepted one, then stops the threads."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self.died is None:                        # a dead scheduler failed what it held already
            for thread in self._threads:
                thread.join(timeout)

    def _retry_after(self, tokens: int) -> int:
        """Seconds until the queue, draining at the recent rate, has room for `tokens` more (at least 1)."""
        rate = self._drain.tokens_per_s or self.max_batch_tokens
        return max(1, int(np.ceil((self._queued_tokens + tokens - self.max_queue_tokens) / rate)))

    # --- the device side ----------------------------------------------------------------------------

    def _long(self, item: tuple[Ticket, int]) -> bool:
        return len(item[0].rows[item[1]]) > self.max_batch_tokens

    def _computed(self, item: tuple[Ticket, int]) -> int:
        """The tokens a short text will compute: its own, after a prefix known to be shared."""
        row = item[0].rows[item[1]]
        prefixes = self.runner.prefixes
        return len(row) - (prefixes.shared_length(row) if prefixes is not None else 0)

    def _batches(self, rows: list[Sequence[int]]) -> tuple[Sharing, object, list]:
        """The rows' sharing of prefixes, its table and the batches of their own ids, once the programs
        they need are compiled; until then (they compile in the background, one thread at a time) the
        rows are computed whole."""
        plan = lambda texts: self.runner.plan([len(t) for t in texts], token_budget=self.max_batch_tokens, fixed=True)
        sharing = unshared(rows) if self.runner.prefixes is None else \
            self.runner.share(rows, compute=False, remember=True)
        if sharing.prefixes:
            batches = plan(sharing.own)
            length = table_length(sharing.table_tokens, fixed=True)
            shapes = {(b.num_rows, b.length, b.slots) for b in batches}
            missing = self.runner.missing_programs(shapes, length, [p for p in sharing.prefixes if p.keys is None])
            if not missing:
                self.runner.prefixes.fill(sharing.prefixes)
                return sharing, self.runner.table(sharing, length), batches
            self._compile_in_background(missing)
            sharing = unshared(rows)
        return sharing, None, plan(rows)

    @property
    def compiling(self) -> int:
        """How many sets of programs for shared prefixes are being compiled in the background now."""
        return len(self._compiling)

    def _compile_in_background(self, programs: tuple) -> None:
        """Compiles `programs` (runner.missing_programs') in a thread, unless they are being compiled or
        failed to."""
        with self._lock:
            if programs in self._compiling or programs in self._not_compiled:
                return
            self._compiling.add(programs)

        def compile_them():
            try:
                self.runner.compile_missing(programs)
            except Exception:  # noqa: BLE001 - the texts then run whole, as before
                log.exception("compiling the programs for shared prefixes failed")
                self._not_compiled.add(programs)
            finally:
                with self._lock:
                    self._compiling.discard(programs)

        threading.Thread(target=compile_them, name="qwen3-jax-prefix-programs", daemon=True).start()

    def _next_batch(self) -> list[tuple[Ticket, int]] | None:
        """The short texts of the next batch, first come first served within the token budget (past any
        long text queued before them); None once closing with no short text left. While another batch is
        computing, a short queue waits up to max_wait for company; an idle device starts at once (a lone
        query waits for nothing)."""
        with self._lock:
            while not any(not self._long(item) for item in self._waiting):
                if self._closing:
                    return None
                self._lock.wait()
            deadline = time.perf_counter() + self.max_wait
            while self._in_flight and self._queued_tokens < self.max_batch_tokens and not self._closing:
                left = deadline - time.perf_counter()
                if left <= 0 or not self._lock.wait(left):
                    break
            taken, kept, tokens, computed = [], collections.deque(), 0, 0
            for item in self._waiting:
                size = self._computed(item) if not self._long(item) else 0
                if self._long(item) or computed + size > self.max_batch_tokens:
                    kept.append(item)
                else:
                    taken.append(item)
                    computed += size
                    tokens += len(item[0].rows[item[1]])
            self._waiting = kept
            self._queued_tokens -= tokens
            self._in_flight += 1
            return taken

    def _long_lane(self) -> None:
        """Long texts, one at a time, each pass started and waited for here (beside the short batches)."""
        while True:
            with self._lock:
                while not any(self._long(item) for item in self._waiting):
                    if self._closing:
                        return
                    self._lock.wait()
                item = next(item for item in self._waiting if self._long(item))
                self._waiting.remove(item)
                self._queued_tokens -= len(item[0].rows[item[1]])
            row = item[0].rows[item[1]]
            try:
                began = time.perf_counter()
                gone = item[0].future.cancelled            # its client went away: stop at a layer's end
                started = [self.runner.dispatch(batch, [row], stop=gone)
                           for batch in self.runner.plan([len(row)], token_budget=self.max_batch_tokens, fixed=True)]
                self._deliver([item], started, began)
            except Dropped as dropped:
                log.info("request %s: its client went away; %s", item[0].request_id, dropped)
            except Exception as error:  # noqa: BLE001 - the request gets the error, the server goes on
                self._fail([item], error)

    def _schedule(self) -> None:
        while True:
            self._slots.acquire()                     # at most `in_flight` batches started, not collected
            items = self._next_batch()
            if items is None:
                with self._started_ready:
                    self._started.append(None)
                    self._started_ready.notify()
                return
            rows = [ticket.rows[i] for ticket, i in items]
            try:
                sharing, table, batches = self._batches(rows)
                started = [self.runner.dispatch(batch, sharing.own, sharing, table) for batch in batches]
            except Exception as error:  # noqa: BLE001 - the requests get the error, the server goes on
                self._fail(items, error)
                self._finished()
                continue
            with self._started_ready:
                self._started.append((items, started, time.perf_counter()))
                self._started_ready.notify()

    def _collect(self) -> None:
        while True:
            with self._started_ready:
                while not self._started:
                    self._started_ready.wait()
                entry = self._started.popleft()
            if entry is None:
                return
            items, started, began = entry
            try:
                self._deliver(items, started, began)
            except Exception as error:  # noqa: BLE001
                self._fail(items, error)
            finally:
                self._finished()

    def _finished(self) -> None:
        """A batch was collected (or failed to start): its slot is free."""
        with self._lock:
            self._in_flight -= 1
        self._slots.release()

    def _deliver(self, items: list[tuple[Ticket, int]], started: list[Dispatched], began: float) -> None:
        done = [result for dispatched in started for result in self.runner.collect(dispatched)]
        finished = time.perf_counter()
        self._drain.observe(sum(len(items[k][0].rows[items[k][1]]) for k, _ in done), began, finished)
        with self._lock:                              # a request cancelled meanwhile gets nothing
            self.failures_in_a_row = 0
            for k, state in done:
                ticket, i = items[k]
                ticket.results[i] = state
                ticket.remaining -= 1
                if ticket.remaining == 0 and not ticket.future.done():
                    ticket.future.set_result(np.stack(ticket.results))
        try:
            for dispatched in started:                # one report a device batch
                held = [items[k] for row in dispatched.batch.rows for k in row]
                self.report(BatchReport(len(held), len({id(ticket) for ticket, _ in held}),
                                        sum(len(ticket.rows[i]) for ticket, i in held),
                                        dispatched.batch.computed_tokens, finished - began))
        except Exception:  # noqa: BLE001 - a metrics failure is no reason to stop serving
            log.exception("reporting a batch to the metrics failed")

    def _fail(self, items: list[tuple[Ticket, int]], error: BaseException) -> None:
        """Every request of a failed batch gets BatchFailed; the error is logged once, with their ids."""
        tickets = list({id(ticket): ticket for ticket, _ in items}.values())
        log.error("a batch of %d texts failed (requests %s): %r", len(items),
                  ", ".join(ticket.request_id for ticket in tickets), error, exc_info=error)
        with self._lock:
            self.failures_in_a_row += 1
            for ticket in tickets:
                if not ticket.future.done():
                    ticket.future.set_exception(BatchFailed(f"the batch holding request {ticket.request_id} failed"))

    def _guarded(self, loop) -> None:
        """Runs a thread's loop; if it ever raises, the scheduler is dead: every request it holds fails
        and new ones are refused (a hung request would be worse)."""
        try:
            loop()
        except BaseException as error:  # noqa: BLE001
            log.critical("the scheduler's %s thread died", threading.current_thread().name, exc_info=error)
            self.died = error
            with self._lock:
                waiting, self._waiting = list(self._waiting), collections.deque()
                self._queued_tokens = 0
            with self._started_ready:
                started = [item for entry in self._started if entry for item in entry[0]]
            self._fail(waiting + started, error)
