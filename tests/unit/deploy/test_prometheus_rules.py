"""deploy/prometheus and the Grafana dashboard's PromQL, checked with promtool.

- the scrape config and rule files are valid (``promtool check config`` / ``check rules``);
- the rules' unit tests in deploy/prometheus/tests pass (``promtool test rules``);
- every PromQL expression of the dashboard parses (written as recording rules into a
  temporary rule file that ``promtool check rules`` parses);
- every ``splitserve`` name the rules and the dashboard select is a series the code
  registers (cluster.metrics.registry.exported_names(), with histogram suffixes) or a recording rule.

promtool ships with the Debian ``prometheus`` package (``make test`` installs it through
scripts/install_system_deps.sh); without it the promtool tests skip (fail under CI=true, see
tests/prereq.py), the name checks still run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from cluster.metrics.registry import exported_names
from tests.prereq import requires

ROOT = Path(__file__).resolve().parents[3]
PROM = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM / "tests").glob("*.yml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "splitserve.json"

PROMTOOL = shutil.which("promtool")
needs_promtool = requires(
    PROMTOOL is not None,
    "promtool not on PATH (Debian package 'prometheus'; `make system-deps` installs it)",
)

# Grafana's built-in variables and the dashboard's own, replaced by what Prometheus would see.
GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$model": ".*",
}


def _promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    proc = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _rules() -> list[dict]:
    out = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            out += group["rules"]
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana variables substituted) for every dashboard query."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"panel {panel['title']!r}: unknown Grafana variable in {target['expr']!r}"
            out.append((panel["title"], expr))
    return out


def selected_names(expr: str) -> set[str]:
    """splitserve metric / recording-rule names an expression mentions (string literals,
    i.e. label values, removed first)."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return {t for t in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare) if "splitserve" in t}


def known_names() -> set[str]:
    return set(exported_names()) | {r["record"] for r in _rules() if "record" in r}


# ---------------------------------------------------------------- promtool


@needs_promtool
def test_scrape_config_and_its_rule_files_are_valid():
    proc = _promtool("check", "config", str(PROM / "prometheus.yml"))
    assert f"{len(RULE_FILES)} rule files found" in proc.stdout


@needs_promtool
def test_rule_files_are_valid():
    assert RULE_FILES, "no rule files under deploy/prometheus/rules"
    proc = _promtool("check", "rules", *map(str, RULE_FILES))
    assert proc.stdout.count("SUCCESS") == len(RULE_FILES)


@needs_promtool
def test_rule_unit_tests_pass():
    assert RULE_TESTS, "no promtool tests under deploy/prometheus/tests"
    _promtool("test", "rules", *map(str, RULE_TESTS))


@needs_promtool
def test_every_rule_is_covered_by_a_promtool_test():
    text = "\n".join(p.read_text() for p in RULE_TESTS)
    untested = [r.get("alert") for r in _rules() if "alert" in r and f"alertname: {r['alert']}" not in text]
    assert not untested, f"alerts without a promtool test: {untested}"
    used_records = {r["record"] for r in _rules() if "record" in r and r["record"] in text}
    assert used_records, "the promtool tests check no recording rule"


@needs_promtool
def test_every_dashboard_expression_parses(tmp_path):
    exprs = dashboard_exprs()
    assert exprs
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:expr_{i}", "expr": e} for i, (_, e) in enumerate(exprs)]}]}  # fmt: skip
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = _promtool("check", "rules", str(path))
    assert f"{len(exprs)} rules found" in proc.stdout


@needs_promtool
def test_an_invalid_expression_is_rejected(tmp_path):
    """The parse check above can fail: promtool rejects a broken expression."""
    path = tmp_path / "bad.yml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "x:y", "expr": "sum(rate(m[5m])"}]}]})
    )
    proc = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0


# ---------------------------------------------------------------- names


def test_rules_select_only_registered_series():
    known = known_names()
    for rule in _rules():
        unknown = selected_names(rule["expr"]) - known
        assert not unknown, f"rule {rule.get('record') or rule.get('alert')}: unknown series {sorted(unknown)}"


def test_dashboard_selects_only_registered_series():
    known = known_names()
    for title, expr in dashboard_exprs():
        unknown = selected_names(expr) - known
        assert not unknown, f"panel {title!r}: unknown series {sorted(unknown)} in {expr}"


def test_name_check_catches_a_typo_and_ignores_label_values():
    assert selected_names('rate(splitserve_request_total{worker="splitserve_x"}[5m])') == {"splitserve_request_total"}
    assert "splitserve_request_total" not in known_names()
    assert "splitserve_time_to_first_token_seconds_bucket" in known_names()
    assert "model:splitserve_time_to_first_token_seconds:p99_5m" in known_names()
