"""The server's settings: one object the command line fills, every limit checked before anything loads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qwen3_jax.arguments import setting
from qwen3_jax.backend import COMPUTE_DTYPES, DTYPE_HELP, IMPLEMENTATIONS
from qwen3_jax.checks import UsageError, whole_number

CPU_BATCH_TOKENS = 2048                  # a CPU batch of more tokens adds latency, hardly throughput
ACCELERATOR_BATCH_TOKENS = 16384
PAYLOAD_LIMIT = 2_000_000                # bytes of one request body, as TEI's --payload-limit
CHARS_PER_TOKEN = 16                     # --max-input-chars by default: max length x this (far above any text's)


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What `qwen3-jax serve` takes, each field declared once as its flag (`setting`: its --help is the help
    below)."""

    model: str | None = setting(None, help="embedding checkpoint folder or hub id")
    reranker: str | None = setting(None, help="Qwen3-Reranker folder or hub id (also, or instead)")
    host: str = setting("127.0.0.1", help="address to listen on (default: loopback only)")
    port: int = setting(8000, help="TCP port to listen on")
    dtype: str = setting("float32", choices=COMPUTE_DTYPES, help=DTYPE_HELP)
    dim: int | None = setting(None, help="MRL dimension of embeddings a request does not size")
    attention: str = setting("auto", choices=IMPLEMENTATIONS)
    mesh: str | None = setting(None, help="device mesh, e.g. data=4,model=2")
    fsdp: bool = setting(False, help="also split parameters over the data axis")
    max_batch_tokens: int | None = setting(None, help=f"token budget of one batch (default {CPU_BATCH_TOKENS} on "
                                                      f"the CPU, {ACCELERATOR_BATCH_TOKENS} on accelerators)")
    share_prefixes: bool = setting(True, flag="--no-share-prefixes", action="store_false",
                                   help="compute every text whole (default: texts that begin with the same token "
                                        "ids compute that prefix once, docs/design/prefixes.md)")
    max_wait_ms: float = setting(2.0, help="how long a short queue waits for company before its batch starts")
    max_queue_tokens: int | None = setting(None, help="tokens waiting at most; beyond, requests get 429 (default: "
                                                      "16 batches)")
    max_client_batch_size: int = setting(512, flag=("--max-client-batch-size", "--max-texts-per-request"),
                                         help="texts one request may hold")
    max_length: int | None = setting(None, help="tokens per text (default: the model's)")
    max_input_chars: int | None = setting(None, help="characters per text before tokenizing; longer ones are cut "
                                                     "there (truncate) or refused (default: 16 x the max length)")
    payload_limit: int = setting(PAYLOAD_LIMIT, help="bytes of one request body; larger ones get 413 unread "
                                                     "(default 2,000,000, as TEI)")
    read_timeout_s: float = setting(30.0, help="seconds a client may take to send its whole request body (then 408)")
    graceful_timeout_s: float = setting(30.0, help="on SIGTERM, seconds to finish the requests in flight before "
                                                   "exiting")
    calibration: str | None = setting(None, help=".txt / .jsonl of texts whose embeddings calibrate int8 and uint8 "
                                                 "(default: built-in texts)")
    api_key: str | None = setting(None, env="QWEN3_JAX_API_KEY",
                                  help="require Authorization: Bearer KEY (default: env QWEN3_JAX_API_KEY; "
                                       "none: no key)")
    served_model_name: str | None = setting(None, help="the embedding model's name in requests")
    served_reranker_name: str | None = setting(None, help="the reranker's name in requests")

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
