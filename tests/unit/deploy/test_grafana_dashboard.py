"""deploy/grafana/splitserve.json: an importable dashboard bound to a templated datasource.

Its PromQL is parsed and name-checked in test_prometheus_rules.py; here: structure.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DASHBOARD = Path(__file__).resolve().parents[3] / "deploy" / "grafana" / "splitserve.json"
DS_REF = "${datasource}"


@pytest.fixture(scope="module")
def dash() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dash: dict) -> list[dict]:
    return [p for p in dash["panels"] if p["type"] != "row"]


def test_datasource_is_a_prometheus_template_variable(dash):
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    model = variables["model"]
    assert model["datasource"]["uid"] == DS_REF
    assert "splitserve_" in model["definition"]


def test_every_query_uses_the_datasource_variable(dash):
    panels = _panels(dash)
    assert panels
    for p in panels:
        assert p["datasource"]["uid"] == DS_REF, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == DS_REF, p["title"]
            assert 'model=~"$model"' in t["expr"], f"panel {p['title']!r} ignores the model selector: {t['expr']}"
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), p["title"]


def test_ids_unique_and_panels_do_not_overlap(dash):
    ids = [p["id"] for p in dash["panels"]]
    assert len(set(ids)) == len(ids)
    cells: dict[tuple[int, int], str] = {}
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


@pytest.mark.parametrize(
    "topic, series",
    [
        ("latency percentiles", "splitserve_time_to_first_token_seconds_bucket"),
        ("TPOT", "splitserve_time_per_output_token_seconds_bucket"),
        ("inter-token latency", "splitserve_inter_token_latency_seconds_bucket"),
        ("throughput", "splitserve_generation_tokens_total"),
        ("goodput", "splitserve_requests_slo_met_total"),
        ("queue", "splitserve_num_requests_waiting"),
        ("KV usage", "splitserve_kv_cache_usage_ratio"),
        ("transfer bandwidth", "splitserve_kv_transfer_bytes_total"),
        ("pool roles", "splitserve_worker_role"),
        ("worker health", "splitserve_worker_healthy"),
    ],
)
def test_dashboard_covers(dash, topic, series):
    exprs = [t["expr"] for p in _panels(dash) for t in p["targets"]]
    assert any(series in e for e in exprs), f"no panel shows {topic} ({series})"


def test_role_panel_maps_every_role(dash):
    [panel] = [p for p in _panels(dash) if "splitserve_worker_role" in p["targets"][0]["expr"]]
    [mapping] = panel["fieldConfig"]["defaults"]["mappings"]
    assert {o["text"] for o in mapping["options"].values()} == {"prefill", "decode", "mixed"}
