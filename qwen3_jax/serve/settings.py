"""The server's settings: one object the command line fills, every limit checked before anything loads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qwen3_jax.checks import UsageError, whole_number

CPU_BATCH_TOKENS = 2048                  # a CPU batch of more tokens adds latency, hardly throughput
ACCELERATOR_BATCH_TOKENS = 16384
PAYLOAD_LIMIT = 2_000_000                # bytes of one request body, as TEI's --payload-limit
CHARS_PER_TOKEN = 16                     # --max-input-chars by default: max length x this (far above any text's)


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What `qwen3-jax serve` takes (see its --help). `max_batch_tokens` None: 2,048 on the CPU, 16,384
    on accelerators; `max_queue_tokens` None: 16 batches; `max_length` None: the model's own;
    `max_input_chars` None: 16 characters a token of the longest text."""

    model: str | None = None
    reranker: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "float32"
    dim: int | None = None
    attention: str = "auto"
    mesh: str | None = None
    fsdp: bool = False
    max_batch_tokens: int | None = None
    max_wait_ms: float = 2.0
    max_queue_tokens: int | None = None
    max_client_batch_size: int = 512
    max_length: int | None = None
    max_input_chars: int | None = None
    payload_limit: int = PAYLOAD_LIMIT
    read_timeout_s: float = 30.0
    graceful_timeout_s: float = 30.0
    calibration: str | None = None
    api_key: str | None = None
    served_model_name: str | None = None
    served_reranker_name: str | None = None

    def check(self) -> None:
        if not self.model and not self.reranker:
            raise UsageError("give --model (an embedding model), --reranker, or both")
        whole_number(self.port, "--port")
        if self.port > 65535:
            raise UsageError(f"--port={self.port} is not a port: give one of 1..65535")
        for name in ("max_batch_tokens", "max_queue_tokens", "max_client_batch_size", "max_input_chars",
                     "payload_limit"):
            if getattr(self, name) is not None:
                whole_number(getattr(self, name), f"--{name.replace('_', '-')}")
        if self.max_length is not None:
            whole_number(self.max_length, "--max-length", minimum=2)
        for name in ("read_timeout_s", "graceful_timeout_s"):
            if not 0 < getattr(self, name) <= 3600:
                raise UsageError(f"--{name[:-2].replace('_', '-')}={getattr(self, name)} must be between 0 and 3600 "
                                 "seconds")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise UsageError(f"--max-wait-ms={self.max_wait_ms} must be between 0 and 10000")
        if self.max_queue_tokens and self.max_batch_tokens and self.max_queue_tokens < self.max_batch_tokens:
            raise UsageError(f"--max-queue-tokens={self.max_queue_tokens} must hold at least one batch "
                             f"(--max-batch-tokens={self.max_batch_tokens})")

    def batch_tokens(self, backend: str) -> int:
        if self.max_batch_tokens:
            return self.max_batch_tokens
        return CPU_BATCH_TOKENS if backend == "cpu" else ACCELERATOR_BATCH_TOKENS

    def queue_tokens(self, backend: str) -> int:
        return self.max_queue_tokens or 16 * self.batch_tokens(backend)

    def input_chars(self, max_length: int) -> int:
        """Characters a text may hold before tokenizing (longer ones are cut there, or refused)."""
        return self.max_input_chars or CHARS_PER_TOKEN * max_length

    @staticmethod
    def name_of(model: str) -> str:
        """How clients name a model by default: a hub id as it is, a folder by its last part."""
        path = Path(model)
        return path.name if path.is_dir() else model
