"""uvicorn serving the Starlette app on a thread of the service process.

The socket is bound when the server is built (in the service's constructor), so a busy http.port
stops start-up with a message naming the key, before the model is loaded; uvicorn only serves it.
"""

from __future__ import annotations

import logging
import socket
import threading

import uvicorn

from ..errors import SettingsError
from ..settings import Settings

log = logging.getLogger("cxr_worker.http")


class HTTPServer:
    def __init__(self, app, settings: Settings) -> None:
        h = settings.http
        self.settings = settings
        family = socket.AF_INET6 if ":" in h.bind_address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((h.bind_address, h.port))
        except OSError as exc:
            sock.close()
            raise SettingsError(f"http.port: cannot listen on {h.bind_address}:{h.port}: {exc.strerror or exc}") from None
        sock.listen(128)
        sock.set_inheritable(True)
        self.socket = sock
        self.port: int = sock.getsockname()[1]
        tls = dict(ssl_certfile=settings.tls.certificate, ssl_keyfile=settings.tls.private_key) if h.tls else {}
        self.scheme = "https" if h.tls else "http"
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", server_header=False,
                                timeout_graceful_shutdown=2, **tls)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.settings.http.local_address}:{self.port}"

    def start(self) -> int:
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, name="http",
                                        daemon=True)
        self._thread.start()
        log.info("HTTP on %s://%s:%d (/healthz /readyz /metrics, pages at /)%s", self.scheme,
                 self.settings.http.bind_address, self.port,
                 ", bearer token required" if self.settings.http.bearer_token else "")
        return self.port

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self.socket.close()
