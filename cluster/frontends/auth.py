"""API-key and TLS helpers shared by the frontends (gRPC and HTTP).

API keys: a client presents the key as ``authorization: Bearer <key>`` or ``x-api-key: <key>``
(gRPC metadata or HTTP headers; names are case-insensitive). ``check_api_key`` compares in
constant time; with no key configured every caller is let in.

TLS: ``TLSFiles(cert, key, ca=None)`` (cluster.config, the ``security.tls`` field of a
ServeConfig) names PEM files for a server; it checks at construction that they load. With
``ca`` set the server requires a client certificate signed by it (mutual TLS). Each server
reads the files again when it builds its credentials (``grpc_server_credentials`` for gRPC,
``uvicorn_ssl_options`` for HTTP and the metrics port).

Where the key and the TLS files come from (config, ``serve`` flags, $SPLITSERVE_API_KEY) is
cluster.config.SecurityConfig's and cluster/frontends/launch.py's business.
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc

from cluster.config import TLSFiles


def check_api_key(configured: str | None, presented: str | None) -> bool:
    """True when no key is configured, or ``presented`` equals it (constant-time compare)."""
    if not configured:
        return True
    if presented is None:
        return False
    return hmac.compare_digest(configured.encode(), presented.encode())


def api_key_from_headers(headers: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The key from ``authorization: Bearer <key>`` (preferred) or ``x-api-key``; None if absent."""
    bearer = plain = None
    for name, value in headers:
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        name = name.lower()
        if name == "authorization" and value[:7].lower() == "bearer ":
            bearer = value[7:].strip()
        elif name == "x-api-key":
            plain = value.strip()
    return bearer if bearer is not None else plain


def grpc_server_credentials(tls: TLSFiles) -> grpc.ServerCredentials:
    assert tls.cert is not None and tls.key is not None  # TLSFiles.__post_init__
    ca = Path(tls.ca).read_bytes() if tls.ca else None
    return grpc.ssl_server_credentials(
        [(Path(tls.key).read_bytes(), Path(tls.cert).read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def uvicorn_ssl_options(tls: TLSFiles | None) -> dict[str, Any]:
    """``uvicorn.Config`` keyword arguments serving ``tls`` (nothing for plaintext). With
    ``tls.ca`` the handshake requires a client certificate that verifies against it."""
    if tls is None:
        return {}
    return {
        "ssl_certfile": tls.cert,
        "ssl_keyfile": tls.key,
        "ssl_ca_certs": tls.ca,
        "ssl_cert_reqs": ssl.CERT_REQUIRED if tls.mutual else ssl.CERT_NONE,
    }


__all__ = ["TLSFiles", "api_key_from_headers", "check_api_key", "grpc_server_credentials", "uvicorn_ssl_options"]
