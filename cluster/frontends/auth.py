"""API-key and TLS helpers shared by the frontends (gRPC and HTTP).

API keys: a client presents the key as ``authorization: Bearer <key>`` or ``x-api-key: <key>``
(gRPC metadata or HTTP headers; names are case-insensitive). ``check_api_key`` compares in
constant time; with no key configured every caller is let in.

TLS: ``TLSFiles(cert, key, ca=None)`` names PEM files for a server. With ``ca`` set the server
requires a client certificate signed by it (mutual TLS). The files are read once, when the
server's credentials are built.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc


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


@dataclass(frozen=True)
class TLSFiles:
    cert: str  # PEM certificate chain presented by the server
    key: str  # PEM private key of ``cert``
    ca: str | None = None  # PEM CA bundle for client certificates; set = mutual TLS required

    def __post_init__(self) -> None:
        for name in ("cert", "key", "ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"tls.{name}: no such file {path!r}")


def grpc_server_credentials(tls: TLSFiles) -> grpc.ServerCredentials:
    ca = Path(tls.ca).read_bytes() if tls.ca else None
    return grpc.ssl_server_credentials(
        [(Path(tls.key).read_bytes(), Path(tls.cert).read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


__all__ = ["TLSFiles", "api_key_from_headers", "check_api_key", "grpc_server_credentials"]
