"""The server's scheduler without a socket: token-budget batches merged from concurrent requests, results
split back per request, a full queue refused, a cancelled request's texts never computed, close() drains."""

import threading

import numpy as np
import pytest

from qwen3_jax.serve.scheduler import DrainRate, Overloaded, Scheduler, ShuttingDown
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
    assert all(r.real_tokens <= r.computed_tokens for r in reports)
    assert all(r.real_tokens <= 512 or r.texts == 1 for r in reports)    # the budget, but for a lone long text


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
