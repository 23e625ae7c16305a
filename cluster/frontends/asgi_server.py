"""AsgiServer: one ASGI app served by uvicorn inside the caller's event loop, plaintext or TLS.

Used by the OpenAI HTTP frontend (http_server.py) and the separate metrics port
(metrics_endpoint.py). The embedding process keeps its own signal handling.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from contextlib import nullcontext
from typing import Any

import uvicorn

from cluster.frontends.auth import TLSFiles, uvicorn_ssl_options

log = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn.Server that leaves signal handling to the process that embeds it."""

    def capture_signals(self):  # type: ignore[override]
        return nullcontext()


class AsgiServer:
    """Serves one ASGI app with uvicorn inside the caller's event loop, plaintext or TLS.

    Lifecycle: ``port = await start()`` (binds first, so port 0 picks a free port and the
    bound one is returned) -> serving as a task of the running loop -> ``await stop()``
    (stops accepting, lets open responses finish for up to ``graceful_shutdown_s``, then
    cancels them, which aborts their requests). With ``tls``, every connection is TLS; with
    ``tls.ca`` too, the handshake requires a client certificate signed by that CA.
    """

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        tls: TLSFiles | None = None,
        graceful_shutdown_s: float = 5.0,
        name: str = "HTTP server",
    ):
        self.app = app
        self.host = host
        self.port = port
        self.tls = tls
        self.graceful_shutdown_s = graceful_shutdown_s
        self.name = name
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task | None = None

    @property
    def scheme(self) -> str:
        return "http" if self.tls is None else "https"

    async def start(self, startup_timeout_s: float = 30.0) -> int:
        if self._task is not None:
            raise RuntimeError(f"{self.name} already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=self.graceful_shutdown_s,
            **uvicorn_ssl_options(self.tls),
        )
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name=f"{self.name}-{self.port}")
        deadline = time.monotonic() + startup_timeout_s
        while not self._server.started:  # uvicorn sets `started` once its listener is up
            if self._task.done():
                self._task.result()  # re-raise the startup failure
                raise RuntimeError(f"{self.name}: uvicorn exited during startup")
            if time.monotonic() > deadline:
                await self.stop()
                raise TimeoutError(f"{self.name} did not start within {startup_timeout_s}s")
            await asyncio.sleep(0.01)
        tls = "plaintext" if self.tls is None else "mutual TLS" if self.tls.mutual else "TLS"
        log.info("%s listening on %s:%d (%s)", self.name, self.host, self.port, tls)
        return self.port

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await self._task
        except SystemExit as e:  # uvicorn exits this way on startup failure
            raise RuntimeError(f"{self.name} failed: exit code {e.code}") from None
        finally:
            self._server = self._task = None
