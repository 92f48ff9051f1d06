"""`qwen3-jax serve`: load the models, compile every batch shape, then listen until SIGTERM.

SIGTERM (or Ctrl-C) stops accepting connections, lets every accepted request finish, stops the
schedulers and exits 0.
"""

from __future__ import annotations

import signal
import time

from qwen3_jax.extras import require
from qwen3_jax.serve.settings import ServeSettings

KEEP_ALIVE_S = 65


def serve(settings: ServeSettings, *, mesh=None, out=print) -> int:
    """Runs the server in this process until it is told to stop; returns the exit status."""
    require("serve", "qwen3-jax serve")
    settings.check()
    import uvicorn

    from qwen3_jax.embedder import Qwen3Embedder
    from qwen3_jax.reranker import Qwen3Reranker
    from qwen3_jax.serve.app import create_app
    from qwen3_jax.serve.service import Service

    started = time.perf_counter()
    common = dict(dtype=settings.dtype, attention=settings.attention, mesh=mesh, fsdp=settings.fsdp)
    length = {"max_length": settings.max_length} if settings.max_length else {}
    embedder = Qwen3Embedder.from_pretrained(settings.model, **common, **length) if settings.model else None
    reranker = Qwen3Reranker.from_pretrained(settings.reranker, **common, **length) if settings.reranker else None
    service = Service(settings, embedder, reranker)
    out(f"loaded in {time.perf_counter() - started:.1f} s; compiling every batch shape "
        f"(batches of up to {service.batch_tokens} tokens, texts of up to "
        f"{max(m.max_length for m in (embedder, reranker) if m)} tokens)")
    programs = service.compile()
    ready_after = time.perf_counter() - started
    service.metrics.startup.set(ready_after)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                names = ", ".join(f"{name} ({kind})" for name, kind in service.served())
                out(f"ready in {ready_after:.1f} s ({programs} programs compiled): serving {names} on "
                    f"http://{settings.host}:{settings.port}")

    # Keep-alive as load balancers expect (uvicorn's 5 s default closes the connections of clients that
    # wait out a Retry-After).
    server = Server(uvicorn.Config(create_app(service), host=settings.host, port=settings.port, log_level="warning",
                                   timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=None))
    # uvicorn catches SIGTERM, shuts down gracefully, then raises the signal again under the handler it
    # found: with this one the process ends normally, exit 0, after the last accepted request.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    out("stopped: every accepted request was answered")
    return 0
