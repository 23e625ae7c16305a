"""The deployment's state store wiring: the serve config keeps its journal in the Redis of
redis.yaml, the head pod hands splitserve that Redis's password from the same Secret (never
in the config or on a command line), and the reliability series are on the dashboard and
behind an alert."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import yaml

from cluster.config import REDIS_PASSWORD_ENV
from tests.unit.deploy.deploy_helpers import DEPLOY_DIR, config_from_configmap, load_docs, ray_templates, the


def _head_container(docs: list[dict]) -> dict:
    rc = the(docs, "RayCluster", "splitserve")
    [container] = [c for c in ray_templates(rc)["head"]["spec"]["containers"] if c["name"] == "ray-head"]
    return container


def test_serve_config_journals_in_the_redis_service_with_the_secrets_password():
    docs = load_docs()
    cfg = config_from_configmap(docs)
    url = urlsplit(cfg.state.redis_url or "")
    service = the(docs, "Service", "splitserve-redis")
    assert url.hostname == service["metadata"]["name"]
    assert url.port == service["spec"]["ports"][0]["port"]
    assert url.path == "/1", "database 0 is the GCS's: the state store keeps its keys in another one"
    assert url.password is None and cfg.state.password_file is None  # the password comes from the env
    env = {e["name"]: e for e in _head_container(docs).get("env", [])}
    ref = env[REDIS_PASSWORD_ENV]["valueFrom"]["secretKeyRef"]
    redis = the(docs, "Deployment", "splitserve-redis")
    [redis_env] = [
        e for e in redis["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"] == "REDIS_PASSWORD"
    ]
    assert ref == redis_env["valueFrom"]["secretKeyRef"], "splitserve and Redis read different passwords"


def test_reliability_is_on_the_dashboard_and_alerted():
    dash = json.loads((DEPLOY_DIR / "grafana" / "splitserve.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] if p["type"] != "row" for t in p["targets"])
    for series in (
        "splitserve_request_failovers_total",
        "splitserve_request_failover_exhausted_total",
        "splitserve_failover_recovery_seconds_bucket",
        "splitserve_state_store_up",
        "splitserve_requests_resumed_total",
    ):
        assert series in exprs, f"no dashboard panel shows {series}"
    rules = yaml.safe_load((DEPLOY_DIR / "prometheus" / "rules" / "splitserve_alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert "splitserve_state_store_up" in alerts["SplitserveStateStoreDegraded"]["expr"]
    assert "splitserve_request_failover_exhausted_total" in alerts["SplitserveFailoverRetriesExhausted"]["expr"]
