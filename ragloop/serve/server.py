"""Running the app: ``serve`` (blocking, for ``ragloop serve``) and ``ServerThread`` (a real uvicorn server
on a loopback port in a background thread, for tests, benchmarks and notebooks).

Both bind the socket first (port 0 = any free port) and hand it to uvicorn, so the caller knows the port
before the server accepts and no other process can take it in between.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from ragloop.core.errors import UsageError

log = logging.getLogger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port``; a clear UsageError when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                         hint="choose another --port (or stop the process using it)") from None
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app: Any, log_level: str) -> Any:
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=log_level == "debug", timeout_graceful_shutdown=5,
                            lifespan="on")
    return uvicorn.Server(config)


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "warning",
          announce: Callable[[str], None] | None = None) -> None:
    """Serve ``app`` until interrupted (Ctrl-C / SIGTERM stop it gracefully); ``announce`` gets the base URL
    once the port is bound (port 0 picks a free one)."""
    sock = bind_socket(host, port)
    if announce is not None:
        shown = f"[{host}]" if ":" in host else host
        announce(f"http://{shown}:{sock.getsockname()[1]}/v1")
    _uvicorn_server(app, log_level).run(sockets=[sock])


class ServerThread:
    """``with ServerThread(app) as srv: openai.OpenAI(base_url=srv.base_url, ...)`` — a real HTTP server on
    127.0.0.1 that starts in a thread and stops (gracefully) on exit."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning") -> None:
        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = _uvicorn_server(app, log_level)
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                        name="ragloop-serve")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
