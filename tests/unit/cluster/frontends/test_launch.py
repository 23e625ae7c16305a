"""The serve flags of the frontends: parsed by add_frontend_flags, written into the config dict
by apply_frontend_flags (overriding the config file field by field), validated by ServeConfig.
(That start_frontends serves what the config says: tests/integration/test_frontend_security.py.)"""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from cluster.config import API_KEY_ENV, ConfigError, ServeConfig, TLSFiles
from cluster.frontends.launch import add_frontend_flags, apply_frontend_flags, describe_security
from tests.pki import write_pki

KEY = "sk-unit-key"


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="splitserve serve")
    add_frontend_flags(p)
    return p.parse_args(list(argv))


def config(data: dict[str, Any], *argv: str) -> ServeConfig:
    data = {"model": "m", **data}
    apply_frontend_flags(data, parse(*argv))
    return ServeConfig.from_dict(data)


@pytest.fixture
def pki(tmp_path):
    return write_pki(tmp_path)


@pytest.fixture
def key_file(tmp_path) -> str:
    path = tmp_path / "key"
    path.write_text(KEY)
    return str(path)


def test_no_flags_leave_the_config_as_it_is():
    data = {"model": "m", "http_port": 8080, "security": {"protect_metrics": False}}
    apply_frontend_flags(data, parse())
    assert data == {"model": "m", "http_port": 8080, "security": {"protect_metrics": False}}
    bare: dict[str, Any] = {"model": "m"}
    apply_frontend_flags(bare, parse())
    assert bare == {"model": "m"}  # no empty security section appears


def test_every_flag_lands_in_its_field(pki, key_file):
    cfg = config(
        {},
        *("--host", "127.0.0.1", "--grpc-port", "1", "--http-port", "2", "--metrics-port", "3"),
        *("--tls-cert", pki.server, "--tls-key", pki.server_key, "--tls-ca", pki.ca),
        *("--api-key-file", key_file, "--protect-metrics"),
    )
    assert (cfg.host, cfg.grpc_port, cfg.http_port, cfg.metrics_port) == ("127.0.0.1", 1, 2, 3)
    assert cfg.security.tls == TLSFiles(pki.server, pki.server_key, pki.ca) and cfg.security.tls.mutual
    assert cfg.security.api_key_file == key_file and cfg.security.protect_metrics is True
    assert cfg.api_key(environ={}) == KEY


def test_flags_override_the_config_one_field_at_a_time(pki, key_file):
    data = {
        "metrics_port": 9100,
        "security": {
            "tls": {"cert": pki.server, "key": pki.server_key},
            "protect_metrics": True,
            "api_key_file": key_file,
        },
    }
    cfg = config(data, "--tls-ca", pki.ca, "--no-protect-metrics", "--no-metrics-port")
    assert cfg.security.tls == TLSFiles(pki.server, pki.server_key, pki.ca)  # the config's cert + the flag's CA
    assert cfg.security.protect_metrics is False and cfg.security.api_key_file == key_file
    assert cfg.metrics_port is None
    assert data["security"]["tls"] == {"cert": pki.server, "key": pki.server_key}  # the caller's dict is not edited
    assert config({"security": None}, "--tls-cert", pki.server, "--tls-key", pki.server_key).security.tls is not None


def test_a_tls_key_without_a_certificate_names_the_field(pki):
    with pytest.raises(ConfigError, match=r"^security\.tls\.cert: required"):
        config({}, "--tls-key", pki.server_key)
    with pytest.raises(ConfigError, match=r"^security\.tls\.key: required"):
        config({}, "--tls-cert", pki.server)
    with pytest.raises(ConfigError, match=r"^security\.tls\.ca: no such file '/nonexistent/ca.pem'"):
        config({}, "--tls-cert", pki.server, "--tls-key", pki.server_key, "--tls-ca", "/nonexistent/ca.pem")
    with pytest.raises(ConfigError, match=r"^security: must be a mapping, got list"):
        config({"security": []}, "--protect-metrics")
    with pytest.raises(ConfigError, match=r"^security\.tls: must be a mapping, got str"):
        config({"security": {"tls": "on"}}, "--tls-ca", pki.ca)


def test_the_key_itself_is_never_a_flag(capsys):
    for argv in (["--api-key", "sk-secret"], ["--api-key=sk-secret"]):  # not even as a prefix of --api-key-file
        with pytest.raises(SystemExit) as e:
            parse(*argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--api-key-file FILE or $SPLITSERVE_API_KEY" in err and "sk-secret" not in err


def test_metrics_port_flags_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        parse("--metrics-port", "9100", "--no-metrics-port")
    assert "not allowed with argument" in capsys.readouterr().err
    assert config({}, "--metrics-port", "0").metrics_port == 0
    with pytest.raises(SystemExit):
        parse("--metrics-port", "70000")


def test_describe_security_names_the_source_never_the_key(pki, key_file):
    cfg = config({}, "--tls-cert", pki.server, "--tls-key", pki.server_key, "--api-key-file", key_file)
    line = describe_security(cfg, cfg.api_key(environ={}))
    assert line == f"security: TLS; API key required on gRPC and /v1 (from file {key_file}); /metrics open"
    plain = ServeConfig("m")
    assert describe_security(plain, "sk-env") == (
        f"security: plaintext; API key required on gRPC and /v1 (from ${API_KEY_ENV}); /metrics open"
    )
    assert "no API key" in describe_security(plain, None)
