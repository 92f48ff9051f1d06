"""The server's scheduler without a socket: token-budget batches merged from concurrent requests, results
split back per request, a full queue refused, a cancelled request's texts never computed, close() drains."""

import threading
import time

import numpy as np
import pytest

from qwen3_jax.serve.scheduler import BatchFailed, DrainRate, Overloaded, Scheduler, ShuttingDown
from tests.conftest import CORPUS, long_text


def _requests(embedder, count: int, seed: int = 0) -> list[list[list[int]]]:
    rng = np.random.default_rng(seed)
    return [embedder.tokenizer.encode([f"{CORPUS[(r + i) % len(CORPUS)]} {long_text(int(rng.integers(1, 30)))}"
                                       for i in range(int(rng.integers(1, 6)))], 256) for r in range(count)]


@pytest.fixture
def scheduler(embedder):
    reports = []
    running = Scheduler(embedder.runner, max_batch_tokens=512, max_queue_tokens=100_000, max_wait_ms=20,
                        report=reports.append)
    running.reports = reports
    yield running
    running.close(timeout=60)


def test_concurrent_requests_share_batches_and_get_their_own_rows(embedder, scheduler):
    requests = _requests(embedder, 24)
    tickets = [None] * len(requests)

    def submit(i):
        tickets[i] = scheduler.submit(requests[i])

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    scheduler.start()
    for rows, ticket in zip(requests, tickets):
        expected = embedder.runner(rows, batch_size=1)
        assert np.abs(ticket.future.result(timeout=120) - expected).max() <= 1e-5
    reports = scheduler.reports
    assert sum(r.texts for r in reports) == sum(len(rows) for rows in requests)
    assert max(r.requests for r in reports) > 1                          # batches merged requests
    assert all(r.computed_tokens <= 512 or r.texts == 1 for r in reports)    # the budget, but for a lone long text


def test_a_full_queue_refuses_and_a_cancelled_request_is_never_computed(embedder):
    reports = []
    scheduler = Scheduler(embedder.runner, max_batch_tokens=512, max_queue_tokens=600, report=reports.append)
    first = scheduler.submit([[5] * 300])
    with pytest.raises(Overloaded, match="300 tokens are queued .*the limit is 600.*retry in") as refused:
        scheduler.submit([[5] * 200, [6] * 200])
    assert refused.value.retry_after >= 1
    cancelled = scheduler.submit([[7] * 250])
    scheduler.cancel(cancelled)
    assert scheduler.queued_tokens == 300 and cancelled.future.cancelled()
    scheduler.start()
    assert first.future.result(timeout=120).shape == (1, embedder.dimension)
    scheduler.close(timeout=60)
    assert sum(r.real_tokens for r in reports) == 300                    # the cancelled rows never ran
    with pytest.raises(ShuttingDown):
        scheduler.submit([[5] * 10])


def test_retry_after_is_the_wait_until_the_request_fits(embedder):
    """Retry-After: the time until the queue has room for the refused request (not until it is empty), at
    the device's rate; before any batch has run, a batch's budget a second."""
    scheduler = Scheduler(embedder.runner, max_batch_tokens=64, max_queue_tokens=600)
    scheduler.submit([[5] * 500])
    with pytest.raises(Overloaded) as refused:
        scheduler.submit([[6] * 230])
    assert refused.value.retry_after == 3                                # 130 tokens over, at 64 a second


def test_batches_in_flight_together_share_the_device_in_its_rate():
    rate = DrainRate()
    rate.observe(100, began=0.0, done=1.0)
    rate.observe(100, began=0.1, done=2.0)         # started while the first computed: one second of its own
    rate.observe(300, began=2.5, done=4.0)         # the device idle from 2.0 to 2.5
    assert rate.tokens_per_s == pytest.approx(100 + 0.2 * (200 - 100))


def test_close_finishes_every_accepted_request(embedder):
    scheduler = Scheduler(embedder.runner, max_batch_tokens=256, max_queue_tokens=100_000).start()
    tickets = [scheduler.submit(rows) for rows in _requests(embedder, 12, seed=1)]
    scheduler.close(timeout=120)
    assert all(ticket.future.done() and ticket.future.exception() is None for ticket in tickets)


class FlakyRunner:
    """The embedder's runner, but dispatching batch number N (from 1) raises for N in `fail`; dispatch()
    waits for `hold` and collect() for `release` when given (a batch held on its way to the device, or on
    it), then collect() raises `lost` if set."""

    def __init__(self, runner, fail=(), release: threading.Event | None = None, hold: threading.Event | None = None):
        self.runner, self.fail, self.release, self.hold = runner, set(fail), release, hold
        self.dispatched = 0
        self.started = threading.Event()
        self.lost: Exception | None = None

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def dispatch(self, batch, texts, *sharing, **stop):
        self.dispatched += 1
        self.started.set()
        if self.hold is not None:
            assert self.hold.wait(60)
        if self.dispatched in self.fail:
            raise RuntimeError(f"injected failure of batch {self.dispatched}")
        return self.runner.dispatch(batch, texts, *sharing, **stop)

    def collect(self, dispatched):
        if self.release is not None:
            assert self.release.wait(60)
        if self.lost is not None:
            raise self.lost
        return self.runner.collect(dispatched)


class OrderedRunner(FlakyRunner):
    """FlakyRunner that records the token counts of each batch it dispatches, in order, and whose collect()
    of a batch longer than `budget` tokens waits for `release_long` (a long pass still on the device)."""

    def __init__(self, runner, budget: int, release_long: threading.Event):
        super().__init__(runner)
        self.budget, self.release_long = budget, release_long
        self.order: list[list[int]] = []

    def dispatch(self, batch, texts, *sharing, **stop):
        self.order.append(sorted(len(texts[i]) for row in batch.rows for i in row))
        return super().dispatch(batch, texts, *sharing, **stop)

    def collect(self, dispatched):
        if dispatched.batch.length > self.budget:
            assert self.release_long.wait(60)
        return super().collect(dispatched)


def _until(condition, seconds: float = 30) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline
        time.sleep(0.01)


def test_a_long_text_on_the_device_holds_no_short_request_and_long_texts_go_one_at_a_time(embedder):
    """A long text (over the batch budget) in its lane: short texts queued after it are computed and
    answered while its pass is still running, a second long text waits for the first; results unchanged."""
    release_long = threading.Event()
    runner = OrderedRunner(embedder.runner, 64, release_long)
    scheduler = Scheduler(runner, max_batch_tokens=64, max_queue_tokens=100_000).start()
    requests = [[[5] * 100], [[6] * 120], [[7] * 10, [8] * 12]]
    first = scheduler.submit(requests[0])
    _until(lambda: len(runner.order) == 1)
    second, short = (scheduler.submit(rows) for rows in requests[1:])
    answer = short.future.result(timeout=60)                  # while the first long pass is held
    assert np.abs(answer - embedder.runner(requests[2], batch_size=1)).max() <= 1e-5
    assert runner.order == [[100], [10, 12]] and not first.future.done()     # the second long text waits
    release_long.set()
    for rows, ticket in zip(requests[:2], [first, second]):
        assert np.abs(ticket.future.result(timeout=120) - embedder.runner(rows, batch_size=1)).max() <= 1e-5
    assert runner.order == [[100], [10, 12], [120]]
    scheduler.close(timeout=60)


def test_a_failing_batch_fails_its_requests_alone_and_repeated_failures_are_unhealthy(embedder, caplog):
    runner = FlakyRunner(embedder.runner, fail={1, 3, 4, 5})
    scheduler = Scheduler(runner, max_batch_tokens=4096, max_queue_tokens=100_000)
    rows = _requests(embedder, 3)
    doomed = [scheduler.submit(rows[0], "doomed-a"), scheduler.submit(rows[1], "doomed-b")]     # one batch
    scheduler.start()
    for ticket in doomed:
        with pytest.raises(BatchFailed, match=f"request {ticket.request_id} failed"):
            ticket.future.result(timeout=120)
    assert "doomed-a, doomed-b" in caplog.text and "injected failure of batch 1" in caplog.text
    after = scheduler.submit(rows[2], "after")
    assert np.abs(after.future.result(timeout=120) - embedder.runner(rows[2], batch_size=1)).max() <= 1e-5
    assert scheduler.healthy
    for number in range(3):                                  # batches 3, 4, 5 fail in a row
        with pytest.raises(BatchFailed):
            scheduler.submit(rows[0], f"again-{number}").future.result(timeout=120)
    assert not scheduler.healthy and scheduler.died is None
    assert scheduler.submit(rows[0]).future.result(timeout=120).shape[0] == len(rows[0])
    assert scheduler.healthy                                  # a batch that ran: the device is back
    scheduler.close(timeout=60)


def test_a_batch_failing_while_its_client_leaves_and_a_failing_report_leave_the_threads_running(embedder):
    release = threading.Event()
    runner = FlakyRunner(embedder.runner, release=release)

    def report(batch):
        raise ValueError("the metrics are broken")

    scheduler = Scheduler(runner, max_batch_tokens=4096, max_queue_tokens=100_000, report=report)
    rows = _requests(embedder, 2, seed=3)
    leaving, staying = scheduler.submit(rows[0]), scheduler.submit(rows[1])
    scheduler.start()
    assert runner.started.wait(60)
    scheduler.cancel(leaving)                      # its client leaves while the batch computes,
    runner.lost = RuntimeError("device lost")      # and the batch's results never arrive
    release.set()
    with pytest.raises(BatchFailed):
        staying.future.result(timeout=120)
    assert leaving.future.cancelled()
    scheduler.cancel(staying)                      # cancelling a failed request changes nothing
    runner.lost = None
    later = scheduler.submit(rows[1])              # the next batch runs (and its report fails)
    assert np.abs(later.future.result(timeout=120) - embedder.runner(rows[1], batch_size=1)).max() <= 1e-5
    assert scheduler.died is None and all(thread.is_alive() for thread in scheduler._threads)
    assert scheduler.failures_in_a_row == 0                  # a failing report is not a failing batch
    scheduler.close(timeout=60)


def test_a_scheduler_thread_that_dies_fails_what_it_held_and_refuses_the_rest(embedder):
    scheduler = Scheduler(embedder.runner, max_batch_tokens=4096, max_queue_tokens=100_000)
    waiting = scheduler.submit(_requests(embedder, 1)[0])

    def broken():
        raise RuntimeError("a bug in batch formation")

    scheduler._next_batch = broken
    scheduler.start()
    with pytest.raises(BatchFailed):
        waiting.future.result(timeout=60)
    assert not scheduler.healthy and isinstance(scheduler.died, RuntimeError)
    with pytest.raises(ShuttingDown, match="scheduler stopped"):
        scheduler.submit([[5, 6]])
    scheduler.close(timeout=5)


def test_a_long_pass_whose_client_went_away_stops_at_the_end_of_a_layer(embedder, caplog):
    """The long lane's pass runs a layer at a time on the CPU: a request cancelled (its client gone) before
    or during it stops at the next layer's end, and the lane goes on to the next long text."""
    from qwen3_jax.layer_by_layer import Dropped

    batch = embedder.runner.plan([100], token_budget=64, fixed=True)[0]
    with pytest.raises(Dropped, match="after layer 1 of 2"):
        embedder.runner.dispatch(batch, [[5] * 100], stop=lambda: True)
    hold = threading.Event()
    runner = FlakyRunner(embedder.runner, hold=hold)
    scheduler = Scheduler(runner, max_batch_tokens=64, max_queue_tokens=100_000).start()
    gone = scheduler.submit([[5] * 100], request_id="gone")
    assert runner.started.wait(60)                       # its pass is on its way to the device
    scheduler.cancel(gone)
    kept = scheduler.submit([[6] * 120])
    with caplog.at_level("INFO", logger="qwen3_jax.serve"):
        hold.set()
        answer = kept.future.result(timeout=120)
    assert gone.future.cancelled()
    assert any("request gone: its client went away; the pass was dropped after layer 1" in r.message
               for r in caplog.records)
    assert np.abs(answer - embedder.runner([[6] * 120], batch_size=1)).max() <= 1e-5
    scheduler.close(timeout=60)
