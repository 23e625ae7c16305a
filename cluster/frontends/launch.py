"""Starting a served cluster's frontends: gRPC, OpenAI-compatible HTTP and the metrics endpoint.

``add_frontend_flags`` / ``apply_frontend_flags`` are the ``splitserve serve`` flags that
configure them (they override the config file's fields); ``start_frontends`` binds every
port of a ServeConfig over a started controller's router; ``Frontends.stop()`` closes them.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from cluster.config import ServeConfig


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {value}")
    return value


def add_frontend_flags(p: argparse.ArgumentParser) -> None:
    """The serve flags of the frontends (each overrides the config field of the same name)."""
    g = p.add_argument_group("frontends")
    g.add_argument("--host", help="address the frontends bind (default: the config's, else 0.0.0.0)")
    g.add_argument("--grpc-port", type=_port, metavar="PORT", help="gRPC port (0: pick a free one)")
    g.add_argument("--http-port", type=_port, metavar="PORT", help="OpenAI-compatible HTTP port (0: pick one)")
    g.add_argument("--metrics-port", type=_port, metavar="PORT", help="Prometheus metrics port (0: pick one)")


def apply_frontend_flags(data: dict[str, Any], args: argparse.Namespace) -> None:
    """Write the frontend flags the user gave into the config dict ``data``."""
    for name in ("host", "grpc_port", "http_port", "metrics_port"):
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value


class Frontends:
    """The gRPC, OpenAI HTTP and metrics endpoints of one served cluster.

    Lifecycle: ``start_frontends`` binds every port (0 = pick one) -> ``stop()``."""

    def __init__(self, grpc: Any, http: Any, metrics_server: Any):
        self.grpc, self.http, self.metrics_server = grpc, http, metrics_server

    async def stop(self) -> None:
        await self.http.stop()
        await self.grpc.stop()
        self.metrics_server.close()


async def start_frontends(
    cfg: ServeConfig, controller: Any, api_key: str | None = None, say: Callable[[str], None] = print
) -> Frontends:
    """ServingBackend over the controller's router, with its frontends and metrics endpoint."""
    from cluster.frontends.grpc_server import GrpcFrontend
    from cluster.frontends.http_server import HttpFrontend
    from cluster.frontends.service import ServingBackend
    from cluster.metrics.registry import Metrics, start_metrics_server

    api_key = api_key or os.environ.get("SPLITSERVE_API_KEY") or None
    name = os.path.basename(os.path.normpath(cfg.model))
    metrics = Metrics(name)
    metrics.attach(controller.router, transport=cfg.transfer.kind)
    backend = ServingBackend.from_model_dir(
        controller.router,
        cfg.model,
        max_queue=cfg.max_queue,
        request_timeout_s=cfg.request_timeout_s,
        info=controller.info,
        metrics=metrics,
    )
    grpc = GrpcFrontend(backend, cfg.host, cfg.grpc_port, api_key=api_key)
    grpc_port = await grpc.start()
    http = HttpFrontend(backend, cfg.host, cfg.http_port, api_key=api_key)
    http_port = await http.start()
    metrics_server = start_metrics_server(metrics, cfg.metrics_port, cfg.host)
    say(
        f"\ngRPC on {cfg.host}:{grpc_port}, OpenAI-compatible HTTP on http://{cfg.host}:{http_port}/v1, "
        f"metrics on http://{cfg.host}:{metrics_server.port}/metrics"
    )
    return Frontends(grpc, http, metrics_server)
