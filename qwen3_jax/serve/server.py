"""`qwen3-jax serve`: load the models, compile every batch shape, then listen until SIGTERM.

SIGTERM (or Ctrl-C) stops accepting connections, lets every accepted request finish (for at most
--graceful-timeout-s; a client that never finishes sending is not waited for), stops the schedulers and
exits 0.
"""

from __future__ import annotations

import logging
import signal
import time

from qwen3_jax.extras import require
from qwen3_jax.serve.settings import ServeSettings

KEEP_ALIVE_S = 65


def build_service(settings: ServeSettings, *, mesh=None):
    """The Service of `settings`' models, loaded (not compiled)."""
    require("serve", "qwen3-jax serve")
    settings.check()
    from qwen3_jax.embedder import Qwen3Embedder
    from qwen3_jax.quantize import DEFAULT_CALIBRATION_TEXTS
    from qwen3_jax.reranker import Qwen3Reranker
    from qwen3_jax.serve.service import Service
    from qwen3_jax.textio import read_texts

    common = dict(dtype=settings.dtype, attention=settings.attention, mesh=mesh, fsdp=settings.fsdp)
    length = {"max_length": settings.max_length} if settings.max_length else {}
    embedder = Qwen3Embedder.from_pretrained(settings.model, **common, **length) if settings.model else None
    reranker = Qwen3Reranker.from_pretrained(settings.reranker, **common, **length) if settings.reranker else None
    calibration = read_texts(settings.calibration, skip_blank=True)[1] if settings.calibration else \
        DEFAULT_CALIBRATION_TEXTS
    return Service(settings, embedder, reranker, calibration_texts=calibration)


def serve(settings: ServeSettings, *, mesh=None, out=print) -> int:
    """Runs the server in this process until it is told to stop; returns the exit status."""
    started = time.perf_counter()
    service = build_service(settings, mesh=mesh)
    lengths = [model.max_length for model in (service.embedder, service.reranker) if model]
    out(f"loaded in {time.perf_counter() - started:.1f} s; compiling every batch shape "
        f"(batches of up to {service.batch_tokens} tokens, texts of up to {max(lengths)} tokens)")
    programs = service.compile()
    ready_after = time.perf_counter() - started
    service.metrics.startup.set(ready_after)
    server = listener(service, on_ready=lambda: out(
        f"ready in {ready_after:.1f} s ({programs} programs compiled): serving "
        f"{', '.join(f'{name} ({kind})' for name, kind in service.served())} on "
        f"http://{settings.host}:{settings.port}"))
    if not logging.getLogger("qwen3_jax.serve").handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # uvicorn catches SIGTERM, shuts down gracefully, then raises the signal again under the handler it
    # found: with this one the process ends normally, exit 0, after the last accepted request.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    out("stopped: every accepted request was answered")
    return 0


def listener(service, *, on_ready=lambda: None):
    """A uvicorn server of `service`'s app on its settings' host and port (run() it; in a thread too)."""
    import uvicorn

    from qwen3_jax.serve.app import create_app

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                on_ready()

    settings = service.settings
    # Keep-alive as load balancers expect (uvicorn's 5 s default closes the connections of clients that
    # wait out a Retry-After).
    return Server(uvicorn.Config(create_app(service), host=settings.host, port=settings.port, log_level="warning",
                                 timeout_keep_alive=KEEP_ALIVE_S,
                                 timeout_graceful_shutdown=settings.graceful_timeout_s))
