"""The server's Prometheus metrics, in a registry of its own (GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from qwen3_jax.serve.scheduler import BatchReport

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    """Requests by endpoint and status, their latency, real and computed tokens, what batches held, the
    queue's depth in tokens, and the programs compiled at start-up."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("qwen3_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.in_flight = Gauge("qwen3_requests_in_flight", "requests received and not yet answered", registry=r)
        self.latency = Histogram("qwen3_request_seconds", "request latency by endpoint", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("qwen3_tokens", "tokens by model and kind (real: the texts', computed: with padding)",
                              ["model", "kind"], registry=r)
        self.batch_texts = Histogram("qwen3_batch_texts", "texts in a batch", ["model"], buckets=COUNT_BUCKETS,
                                     registry=r)
        self.batch_requests = Histogram("qwen3_batch_requests", "requests merged in a batch", ["model"],
                                        buckets=COUNT_BUCKETS, registry=r)
        self.batch_tokens = Histogram("qwen3_batch_tokens", "real tokens in a batch", ["model"],
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.batch_seconds = Histogram("qwen3_batch_seconds", "a batch from its start to its results", ["model"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_tokens = Gauge("qwen3_queue_tokens", "tokens waiting in the queue", ["model"], registry=r)
        self.compiled = Gauge("qwen3_compiled_programs", "programs compiled (at start-up, and in the background "
                              "for a new shape of shared prefixes)",
                              ["model"], registry=r)
        self.compiling = Gauge("qwen3_programs_compiling", "sets of programs for a new shape of shared prefixes being "
                               "compiled in the background (their texts run whole meanwhile)", ["model"], registry=r)
        self.startup = Gauge("qwen3_startup_seconds", "seconds from start to ready (loading and compiling)",
                             registry=r)

    def reporter(self, model: str):
        """The callback a model's scheduler reports each batch to."""
        def report(batch: BatchReport) -> None:
            self.tokens.labels(model, "real").inc(batch.real_tokens)
            self.tokens.labels(model, "computed").inc(batch.computed_tokens)
            self.batch_texts.labels(model).observe(batch.texts)
            self.batch_requests.labels(model).observe(batch.requests)
            self.batch_tokens.labels(model).observe(batch.real_tokens)
            self.batch_seconds.labels(model).observe(batch.seconds)
        return report

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
