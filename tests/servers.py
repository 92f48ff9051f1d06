"""A real `qwen3-jax serve` for the tests: a subprocess on a free loopback port."""

import contextlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`qwen3-jax serve ...` in a subprocess, ready once /health answers 200."""

    def __init__(self, *args: str, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.process = subprocess.Popen([sys.executable, "-m", "qwen3_jax.cli", "serve", "--port", str(self.port), *args],
                                        stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        deadline = time.time() + 600
        while time.time() < deadline:
            assert self.process.poll() is None, log.read_text()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(log.read_text())

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)

    def kill(self) -> None:
        """Ends the process whatever happened (a failed test leaves no server behind)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def rss_mib(self) -> float:
        """The server process's resident memory now."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024


@contextlib.contextmanager
def serving(*args: str, log: Path):
    """A Server for the length of a with block (a module fixture's), which must stop with exit 0."""
    running = Server(*args, log=log)
    try:
        yield running
        assert running.stop() == 0
    finally:
        running.kill()
