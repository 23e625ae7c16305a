"""The Prometheus exposition as an ASGI endpoint, optionally behind the API key, and the
server of the separate metrics port (ServeConfig.metrics_port).

The HTTP frontend mounts ``MetricsEndpoint`` at /metrics; ``MetricsFrontend`` serves it on a
port of its own with the same TLS as the other frontends.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from cluster.frontends.asgi_server import AsgiServer
from cluster.frontends.auth import TLSFiles, api_key_from_headers, check_api_key
from cluster.frontends.openai_api import UNAUTHORIZED, error_response
from cluster.metrics.registry import Metrics, metrics_asgi_app


class MetricsEndpoint:
    """ASGI app answering with the Prometheus exposition of ``metrics``. With ``api_key`` set,
    a scrape without it (``Authorization: Bearer <key>`` or ``x-api-key``) gets 401.

    An app object rather than a function, so Starlette routes it as an app, not an endpoint."""

    def __init__(self, metrics: Metrics, api_key: str | None = None):
        self._exposition = metrics_asgi_app(metrics)
        self._api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._api_key and not check_api_key(self._api_key, api_key_from_headers(Headers(scope=scope).items())):
            await error_response(UNAUTHORIZED, {"www-authenticate": "Bearer"})(scope, receive, send)
            return
        await self._exposition(scope, receive, send)


class MetricsFrontend(AsgiServer):
    """The separate metrics port (ServeConfig.metrics_port): ``MetricsEndpoint(metrics,
    api_key)`` at every path, with the same TLS as the other frontends."""

    def __init__(
        self,
        metrics: Metrics,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: TLSFiles | None = None,
        api_key: str | None = None,
    ):
        super().__init__(
            MetricsEndpoint(metrics, api_key), host, port, tls, graceful_shutdown_s=1.0, name="metrics endpoint"
        )
