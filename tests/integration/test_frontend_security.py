"""The served frontends' security and metrics endpoints, through ``start_frontends`` over a
LocalCluster and real localhost sockets: TLS and mutual TLS on gRPC, HTTP and the metrics port,
the API key from a file or $SPLITSERVE_API_KEY, and /metrics on the HTTP port (open by
default, behind the key with ``security.protect_metrics``).

Certificates are generated per test (tests/pki.py). One event loop thread hosts the cluster
and the frontends; the tests are synchronous clients (httpx, the gRPC SDK).
"""

from __future__ import annotations

import argparse
import dataclasses
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from cluster.client import Client, TLSConfig, Unauthenticated, Unavailable
from cluster.config import API_KEY_ENV, ConfigError, PoolConfig, SecurityConfig, ServeConfig, TLSFiles, TransferConfig
from cluster.control.local import LocalCluster
from cluster.frontends.launch import Frontends, add_frontend_flags, apply_frontend_flags, start_frontends
from tests.loop_thread import LoopThread
from tests.pki import Pki, write_pki

pytestmark = pytest.mark.integration

ENGINE = {"block_size": 4, "num_blocks": 128, "max_num_batched_tokens": 32}
KEY = "sk-from-a-file-0123456789"
REQUESTS_SERIES = "splitserve_requests_total"


class Served:
    """A started LocalCluster (the ``controller`` of start_frontends) and its base config."""

    def __init__(self, model: str):
        self.lp = LoopThread("security-test-loop")
        self.config = ServeConfig(
            model,
            pools=(
                PoolConfig("prefill", "prefill", 1, engine=ENGINE),
                PoolConfig("decode", "decode", 1, engine=ENGINE),
            ),
            transfer=TransferConfig(kind="loopback"),
            host="127.0.0.1",
            grpc_port=0,
            http_port=0,
            metrics_port=0,
        )
        self.cluster: LocalCluster = self.lp.run(LocalCluster(self.config).start())

    @contextmanager
    def frontends(self, cfg: ServeConfig) -> Iterator[tuple[Frontends, list[str]]]:
        said: list[str] = []
        fe = self.lp.run(start_frontends(cfg, self.cluster, say=said.append))
        try:
            yield fe, said
        finally:
            self.lp.run(fe.stop())

    def close(self) -> None:
        self.cluster.shutdown()
        self.lp.close()


@pytest.fixture(scope="module")
def served(tiny_checkpoint) -> Iterator[Served]:
    s = Served(tiny_checkpoint("llama"))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(autouse=True)
def _no_key_in_environment(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)


@pytest.fixture
def pki(tmp_path) -> Pki:
    return write_pki(tmp_path)


@pytest.fixture
def key_file(tmp_path) -> str:
    path = tmp_path / "api-key"
    path.write_text(KEY + "\n")  # as `kubectl create secret --from-file` or `echo` leave it
    return str(path)


def with_security(served: Served, **security: Any) -> ServeConfig:
    return dataclasses.replace(served.config, security=SecurityConfig(**security))


def https(pki: Pki, client_cert: tuple[str, str] | None = None) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=pki.ca)
    if client_cert is not None:
        ctx.load_cert_chain(*client_cert)
    return httpx.Client(verify=ctx, timeout=30)


def complete(client: httpx.Client, base: str, headers: dict[str, str] | None = None) -> httpx.Response:
    model = client.get(f"{base}/v1/models", headers=headers).json()["data"][0]["id"]
    body = {"model": model, "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    return client.post(f"{base}/v1/completions", json=body, headers=headers)


def requests_finished(metrics_text: str) -> float:
    """Sum of splitserve_requests_total over its label sets (0 when absent)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(REQUESTS_SERIES + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---------------------------------------------------------------- TLS and mutual TLS


def test_http_over_tls_and_a_plaintext_client_is_refused(served, pki):
    cfg = with_security(served, tls=TLSFiles(pki.server, pki.server_key))
    with served.frontends(cfg) as (fe, said), https(pki) as client:
        base = f"https://localhost:{fe.http.port}"
        out = complete(client, base)
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3
        assert client.get(f"{base}/health").status_code == 200
        for port in (fe.http.port, fe.metrics.port):  # /metrics over TLS on both ports, counting the request
            assert requests_finished(client.get(f"https://localhost:{port}/metrics").text) >= 1
        with httpx.Client(timeout=10) as plain, pytest.raises(httpx.TransportError):
            plain.get(f"http://127.0.0.1:{fe.http.port}/health")  # plaintext client, TLS server
        with Client(f"localhost:{fe.grpc.port}", tls=TLSConfig(ca=pki.ca)) as c:
            assert len(c.generate([5, 6, 7], max_tokens=3, ignore_eos=True).token_ids) == 3
        assert f"https://127.0.0.1:{fe.http.port}/v1" in said[0] and "security: TLS;" in said[0]


def test_flags_configure_mutual_tls_that_every_port_enforces(served, pki):
    """serve flags -> config -> started frontends: a client needs a certificate from the CA."""
    parser = argparse.ArgumentParser()
    add_frontend_flags(parser)
    args = parser.parse_args(
        ["--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0"]
        + ["--tls-cert", pki.server, "--tls-key", pki.server_key, "--tls-ca", pki.ca]
    )
    data: dict[str, Any] = {"model": served.config.model, "transfer": {"kind": "loopback"}}
    apply_frontend_flags(data, args)
    cfg = ServeConfig.from_dict(data)
    assert cfg.security.tls == TLSFiles(pki.server, pki.server_key, pki.ca)
    with served.frontends(cfg) as (fe, said):
        assert "mutual TLS" in said[0]
        with https(pki, (pki.client, pki.client_key)) as client:
            assert complete(client, f"https://localhost:{fe.http.port}").status_code == 200
            assert client.get(f"https://localhost:{fe.metrics.port}/metrics").status_code == 200
        for cert in (None, (pki.other_client, pki.other_client_key)):  # no certificate; one from another CA
            for port in (fe.http.port, fe.metrics.port):
                with https(pki, cert) as client, pytest.raises(httpx.TransportError):
                    client.get(f"https://localhost:{port}/metrics")
        full = TLSConfig(ca=pki.ca, cert=pki.client, key=pki.client_key)
        with Client(f"localhost:{fe.grpc.port}", tls=full) as c:
            assert len(c.generate([5, 6, 7], max_tokens=3, ignore_eos=True).token_ids) == 3
        with Client(f"localhost:{fe.grpc.port}", tls=TLSConfig(ca=pki.ca), max_retries=0, timeout=10) as c:
            with pytest.raises(Unavailable):  # no client certificate: the handshake fails
                c.generate([5, 6, 7], max_tokens=3)


# ---------------------------------------------------------------- API key and /metrics


def test_api_key_from_a_file_on_both_frontends_and_metrics_open_by_default(served, key_file):
    with served.frontends(with_security(served, api_key_file=key_file)) as (fe, said), httpx.Client() as client:
        base = f"http://127.0.0.1:{fe.http.port}"
        assert client.get(f"{base}/v1/models").status_code == 401
        assert client.get(f"{base}/v1/models", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert complete(client, base, {"authorization": f"Bearer {KEY}"}).status_code == 200
        assert client.get(f"{base}/health").status_code == 200  # probes need no key
        for port in (fe.http.port, fe.metrics.port):  # Prometheus scrapes without a key
            scrape = client.get(f"http://127.0.0.1:{port}/metrics")
            assert scrape.status_code == 200 and requests_finished(scrape.text) >= 1
        with Client(f"127.0.0.1:{fe.grpc.port}", max_retries=0) as c, pytest.raises(Unauthenticated):
            c.generate([5, 6, 7], max_tokens=3)
        with Client(f"127.0.0.1:{fe.grpc.port}", api_key=KEY) as c:
            assert len(c.generate([5, 6, 7], max_tokens=3, ignore_eos=True).token_ids) == 3
        assert f"from file {key_file}" in said[0] and "/metrics open" in said[0]
        assert KEY not in "\n".join(said)


def test_protect_metrics_puts_both_metrics_endpoints_behind_the_key(served, key_file):
    cfg = with_security(served, api_key_file=key_file, protect_metrics=True)
    with served.frontends(cfg) as (fe, said), httpx.Client() as client:
        for port in (fe.http.port, fe.metrics.port):
            url = f"http://127.0.0.1:{port}/metrics"
            refused = client.get(url)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
            assert client.get(url, headers={"x-api-key": "wrong"}).status_code == 401
            ok = client.get(url, headers={"authorization": f"Bearer {KEY}"})
            assert ok.status_code == 200 and "splitserve_requests_in_flight" in ok.text
        assert "/metrics requires the API key" in said[0]


def test_api_key_from_the_environment(served, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "sk-env-key")
    with served.frontends(served.config) as (fe, said), httpx.Client() as client:
        base = f"http://127.0.0.1:{fe.http.port}"
        assert client.get(f"{base}/v1/models").status_code == 401
        assert client.get(f"{base}/v1/models", headers={"x-api-key": "sk-env-key"}).status_code == 200
        assert f"${API_KEY_ENV}" in said[0] and "sk-env-key" not in "\n".join(said)


def test_key_sources_are_checked_before_anything_binds(served, key_file, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "sk-env-key")
    with pytest.raises(ConfigError, match=rf"^security\.api_key_file: is set and so is \${API_KEY_ENV}"):
        served.lp.run(start_frontends(with_security(served, api_key_file=key_file), served.cluster, say=print))
    monkeypatch.delenv(API_KEY_ENV)
    with pytest.raises(ConfigError, match=r"^security\.protect_metrics: needs an API key"):
        served.lp.run(start_frontends(with_security(served, protect_metrics=True), served.cluster, say=print))


def test_no_metrics_port_keeps_metrics_on_the_http_port(served):
    cfg = dataclasses.replace(served.config, metrics_port=None)
    with served.frontends(cfg) as (fe, said), httpx.Client() as client:
        assert fe.metrics is None
        assert client.get(f"http://127.0.0.1:{fe.http.port}/metrics").status_code == 200
        first_line = said[0].strip().splitlines()[0]
        assert first_line.endswith(f"metrics on http://127.0.0.1:{fe.http.port}/metrics")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_port_that_cannot_be_bound_stops_the_frontends_already_started(served):
    grpc_port = _free_port()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        cfg = dataclasses.replace(served.config, grpc_port=grpc_port, http_port=taken.getsockname()[1])
        with pytest.raises(OSError):
            served.lp.run(start_frontends(cfg, served.cluster, say=print))
    with socket.create_server(("127.0.0.1", grpc_port)):  # the gRPC frontend let its port go
        pass
