"""A throwaway PKI for TLS tests: a CA, a server certificate for localhost/127.0.0.1 and a
client certificate, all signed by the CA, plus a second CA that signed nothing here (its
clients must be refused). Generated per test with ``cryptography`` (EC P-256, valid 1 day)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    ca: str  # PEM CA certificate that signed server and client
    server: str  # PEM server certificate (SAN localhost, 127.0.0.1)
    server_key: str
    client: str  # PEM client certificate (CN client), for mutual TLS
    client_key: str
    other_client: str  # a client certificate signed by another CA
    other_client_key: str


def write_pki(d: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject: str, key, issuer: str, issuer_key, ca: bool, san=None) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    ca_key, other_ca_key, server_key, client_key, other_key = key(), key(), key(), key(), key()
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    certs = {
        "ca": cert("splitserve test CA", ca_key, "splitserve test CA", ca_key, True),
        "server": cert("localhost", server_key, "splitserve test CA", ca_key, False, san),
        "client": cert("client", client_key, "splitserve test CA", ca_key, False),
        "other_client": cert("intruder", other_key, "another CA", other_ca_key, False),
    }
    keys = {"server_key": server_key, "client_key": client_key, "other_client_key": other_key}
    paths: dict[str, str] = {}
    for label, c in certs.items():
        paths[label] = str(d / f"{label}.pem")
        Path(paths[label]).write_bytes(c.public_bytes(serialization.Encoding.PEM))
    for label, k in keys.items():
        paths[label] = str(d / f"{label}.pem")
        pem = k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        Path(paths[label]).write_bytes(pem)
    return Pki(**paths)
