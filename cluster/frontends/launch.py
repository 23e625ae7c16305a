"""Starting a served cluster's frontends: gRPC, OpenAI-compatible HTTP and the metrics endpoint.

``add_frontend_flags`` / ``apply_frontend_flags`` are the ``splitserve serve`` flags that
configure them (they override the config file's fields, one field at a time: ``--tls-ca``
alone adds mutual TLS to the config's certificate); ``start_frontends`` binds every port of a
ServeConfig over a started controller's router, with its ``security`` settings;
``Frontends.stop()`` closes them.

What listens where (every port 0 = pick a free one):
- ``grpc_port``: the SplitServe service (+ health, reflection);
- ``http_port``: the OpenAI API, ``/health`` and ``/metrics``;
- ``metrics_port`` (None = not opened): ``/metrics`` alone, for scrapers that should not
  reach the API port. It has the same TLS (and client-certificate requirement) as the
  others: with ``security.tls`` set there is no plaintext port left.

The API key is never a flag: it comes from ``security.api_key_file`` (``--api-key-file``)
or $SPLITSERVE_API_KEY (cluster.config.SecurityConfig), and is never printed or logged.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from cluster.argtypes import port
from cluster.config import API_KEY_ENV, ConfigError, ServeConfig


class _RefuseKeyOnCommandLine(argparse.Action):
    """``--api-key``: refused with a pointer to the ways that keep the key out of ``ps`` and
    shell history. Declared so that argparse's prefix matching cannot take ``--api-key KEY``
    for ``--api-key-file KEY`` (which would then print the key as a missing file name)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None) -> None:
        parser.error(f"--api-key: the key is not taken on the command line; use --api-key-file FILE or ${API_KEY_ENV}")


def add_frontend_flags(p: argparse.ArgumentParser) -> None:
    """The serve flags of the frontends (each overrides the config field it names)."""
    g = p.add_argument_group("frontends")
    g.add_argument("--host", help="address the frontends bind (default: the config's, else 0.0.0.0)")
    g.add_argument("--grpc-port", type=port, metavar="PORT", help="gRPC port (0: pick a free one)")
    g.add_argument(
        "--http-port", type=port, metavar="PORT", help="OpenAI-compatible HTTP port, also /metrics (0: pick one)"
    )
    m = g.add_mutually_exclusive_group()
    m.add_argument("--metrics-port", type=port, metavar="PORT", help="separate Prometheus metrics port (0: pick one)")
    m.add_argument(
        "--no-metrics-port",
        action="store_true",
        help="open no separate metrics port (metrics_port: null); /metrics stays on the HTTP port",
    )
    s = p.add_argument_group(
        "security",
        f"TLS for gRPC, HTTP and the metrics port; the API key comes from --api-key-file or ${API_KEY_ENV}",
    )
    s.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain the servers present (security.tls.cert)")
    s.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert (security.tls.key)")
    s.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="PEM CA bundle: require client certificates signed by it, i.e. mutual TLS (security.tls.ca)",
    )
    s.add_argument(
        "--api-key-file",
        metavar="FILE",
        help=f"file holding the API key, e.g. a mounted secret (security.api_key_file; else ${API_KEY_ENV})",
    )
    s.add_argument("--api-key", nargs="?", action=_RefuseKeyOnCommandLine, help=argparse.SUPPRESS)
    s.add_argument(
        "--protect-metrics",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="require the API key on /metrics too (security.protect_metrics; default: open, as Prometheus expects)",
    )


def _section(data: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    """A copy of the mapping ``data[key]`` (empty when absent or null), stored back into ``data``."""
    value = data.get(key)
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(path, f"must be a mapping, got {type(value).__name__}")
    data[key] = dict(value)
    return data[key]


def apply_frontend_flags(data: dict[str, Any], args: argparse.Namespace) -> None:
    """Write the frontend flags the user gave into the config dict ``data`` (flags left out
    keep the config's values). Raises ConfigError when a section to override is no mapping."""
    for name in ("host", "grpc_port", "http_port", "metrics_port"):
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    if getattr(args, "no_metrics_port", False):
        data["metrics_port"] = None
    tls_flags = {name: getattr(args, f"tls_{name}", None) for name in ("cert", "key", "ca")}
    security_flags = {
        "api_key_file": getattr(args, "api_key_file", None),
        "protect_metrics": getattr(args, "protect_metrics", None),
    }
    if all(v is None for v in (*tls_flags.values(), *security_flags.values())):
        return
    security = _section(data, "security", "security")
    for name, value in security_flags.items():
        if value is not None:
            security[name] = value
    if any(v is not None for v in tls_flags.values()):
        tls = _section(security, "tls", "security.tls")
        tls.update({name: value for name, value in tls_flags.items() if value is not None})


class Frontends:
    """The gRPC, OpenAI HTTP and (optional) metrics endpoints of one served cluster.

    Lifecycle: ``start_frontends`` binds every port (0 = pick one) -> ``stop()``."""

    def __init__(self, grpc: Any, http: Any, metrics: Any | None):
        self.grpc, self.http, self.metrics = grpc, http, metrics  # metrics: None without metrics_port

    async def stop(self) -> None:
        if self.metrics is not None:
            await self.metrics.stop()
        await self.http.stop()
        await self.grpc.stop()


def describe_security(cfg: ServeConfig, api_key: str | None) -> str:
    """One line on what protects the frontends (never the key itself)."""
    tls = cfg.security.tls
    transport = "plaintext" if tls is None else "mutual TLS (client certificates required)" if tls.mutual else "TLS"
    if api_key is None:
        auth = "no API key (open to every client)"
    else:
        source = f"file {cfg.security.api_key_file}" if cfg.security.api_key_file else f"${API_KEY_ENV}"
        auth = f"API key required on gRPC and /v1 (from {source})"
    metrics = "/metrics requires the API key" if cfg.security.protect_metrics else "/metrics open"
    return f"security: {transport}; {auth}; {metrics}"


async def start_frontends(cfg: ServeConfig, controller: Any, say: Callable[[str], None] = print) -> Frontends:
    """ServingBackend over the controller's router, with its frontends and metrics endpoints,
    secured as ``cfg.security`` says. Raises ConfigError (naming the field) before binding
    anything when the API key sources conflict. On a bind failure the frontends already
    started are stopped again before the error propagates."""
    from cluster.frontends.grpc_server import GrpcFrontend
    from cluster.frontends.http_server import HttpFrontend
    from cluster.frontends.metrics_endpoint import MetricsFrontend
    from cluster.frontends.service import ServingBackend
    from cluster.metrics.registry import Metrics

    api_key = cfg.api_key()
    security = cfg.security
    backend = ServingBackend.from_model_dir(
        controller.router,
        cfg.model,
        max_queue=cfg.max_queue,
        request_timeout_s=cfg.request_timeout_s,
        info=controller.info,
    )
    metrics = backend.metrics = Metrics(backend.model_name)  # series carry the served model's name
    metrics.attach(controller.router, transport=cfg.transfer.kind)
    metrics_key = api_key if security.protect_metrics else None
    grpc = GrpcFrontend(backend, cfg.host, cfg.grpc_port, api_key=api_key, tls=security.tls)
    http = HttpFrontend(
        backend,
        cfg.host,
        cfg.http_port,
        api_key=api_key,
        tls=security.tls,
        metrics=metrics,
        protect_metrics=security.protect_metrics,
    )
    scrape = (
        None
        if cfg.metrics_port is None
        else MetricsFrontend(metrics, cfg.host, cfg.metrics_port, security.tls, metrics_key)
    )
    started: list[Any] = []
    try:
        for frontend in (grpc, http, scrape):
            if frontend is not None:
                await frontend.start()
                started.append(frontend)
    except BaseException:
        for frontend in reversed(started):
            await frontend.stop()
        raise
    where = f"metrics on {http.scheme}://{cfg.host}:{http.port}/metrics"
    if scrape is not None:
        where += f" and {scrape.scheme}://{cfg.host}:{scrape.port}/metrics"
    say(
        f"\ngRPC on {cfg.host}:{grpc.port}, OpenAI-compatible HTTP on "
        f"{http.scheme}://{cfg.host}:{http.port}/v1, {where}\n{describe_security(cfg, api_key)}"
    )
    return Frontends(grpc, http, scrape)
