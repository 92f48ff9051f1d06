"""`qwen3-jax serve`: check the arguments and bind the port, load the models, compile every batch shape
(progress on stderr: programs loaded from the persistent cache and compiled), then listen until SIGTERM.

SIGTERM (or Ctrl-C) stops accepting connections, lets every accepted request finish (for at most
--graceful-timeout-s; a client that never finishes sending is not waited for), stops the schedulers and
exits 0.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import threading
import time

from qwen3_jax.checks import UsageError
from qwen3_jax.extras import require
from qwen3_jax.serve.settings import ServeSettings
from qwen3_jax.textio import counted

KEEP_ALIVE_S = 65
PROGRESS_EVERY_S = 10


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


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening (so that a second server is refused the port even while
    this one compiles; connections wait in its backlog until uvicorn takes it); a taken port or an unknown
    host is a UsageError, before any work."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise UsageError(f"--host {host}: {error.strerror}; give an address of this machine, e.g. 127.0.0.1 "
                         "or 0.0.0.0") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {host} is in use by another program: stop it, or give another "
                             "--port") from None
        raise UsageError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock.listen(2048)                               # uvicorn's default backlog
    return sock


class ProgramCounts:
    """The executables JAX obtains while counting, told apart: loaded from the persistent compilation
    cache, or compiled (every program JAX builds passes its backend-compile step, a cache hit included)."""

    def __init__(self):
        import jax

        self.obtained = self.loaded = 0
        self.counting = False
        jax.monitoring.register_event_listener(self._event)
        jax.monitoring.register_event_duration_secs_listener(self._duration)

    def _event(self, name: str, **_) -> None:
        if self.counting and name == "/jax/compilation_cache/cache_hits":
            self.loaded += 1

    def _duration(self, name: str, _seconds: float, **_) -> None:
        if self.counting and name == "/jax/core/compile/backend_compile_duration":
            self.obtained += 1

    @property
    def compiled(self) -> int:
        return self.obtained - self.loaded

    def summary(self) -> str:
        return f"{counted(self.compiled, 'program')} compiled, {self.loaded} loaded from the compilation cache"


def serve(settings: ServeSettings, *, mesh=None, out=print) -> int:
    """Runs the server in this process until it is told to stop; returns the exit status."""
    started = time.perf_counter()
    require("serve", "qwen3-jax serve")
    settings.check()
    sock = bind(settings.host, settings.port)
    models = " and ".join(name for name in (settings.model, settings.reranker) if name)
    out(f"port {settings.port} on {settings.host} held; loading {models}")
    service = build_service(settings, mesh=mesh)
    lengths = [engine.max_length for engine in service.engines().values()]
    out(f"loaded in {time.perf_counter() - started:.1f} s; compiling every batch shape "
        f"(batches of up to {service.batch_tokens} tokens, texts of up to {max(lengths)} tokens)")
    counts = ProgramCounts()
    counts.counting = True
    compiled = threading.Event()

    def progress() -> None:
        while not compiled.wait(PROGRESS_EVERY_S):
            out(f"compiling, {time.perf_counter() - started:.0f} s: {counts.summary()} so far")

    threading.Thread(target=progress, name="qwen3-jax-compile-progress", daemon=True).start()
    try:
        service.compile()
    finally:
        compiled.set()
        counts.counting = False
    ready_after = time.perf_counter() - started
    service.metrics.startup.set(ready_after)
    server = listener(service, on_ready=lambda: out(
        f"ready in {ready_after:.1f} s ({counts.summary()}): serving "
        f"{', '.join(f'{name} ({kind})' for name, kind in service.served())} on "
        f"http://{settings.host}:{settings.port}"))
    if not logging.getLogger("qwen3_jax.serve").handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # uvicorn catches SIGTERM, shuts down gracefully, then raises the signal again under the handler it
    # found: with this one the process ends normally, exit 0, after the last accepted request.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run(sockets=[sock])
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
