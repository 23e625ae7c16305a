"""tests/prereq.py: a missing prerequisite skips locally and fails under CI=true; no test file
skips any other way (gpu tests are skipped by tests/conftest.py alone)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.prereq import in_ci, require, require_hardware, requires

TESTS = Path(__file__).resolve().parent
# Ways of skipping that bypass tests/prereq.py.
SKIP = re.compile(r"pytest\.skip\(|pytest\.mark\.skip|\bskipif\b|importorskip|unittest\.skip")
ALLOWED = {TESTS / "prereq.py", TESTS / "conftest.py", Path(__file__).resolve()}


@pytest.mark.parametrize("value", ["true", "TRUE", "1", " true "])
def test_ci_values(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    assert in_ci()


@pytest.mark.parametrize("value", ["", "false", "0", "no"])
def test_not_ci_values(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    assert not in_ci()


def test_met_prerequisite_passes_in_and_out_of_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    require(True, "never shown")
    monkeypatch.setenv("CI", "true")
    require("/usr/bin/promtool", "never shown")


def test_missing_prerequisite_skips_locally(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="promtool not on PATH"):
        require(None, "promtool not on PATH")


def test_missing_prerequisite_fails_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true.*promtool not on PATH"):
        require(None, "promtool not on PATH")


@pytest.mark.parametrize("ci", ["true", ""])
def test_hardware_condition_skips_in_and_out_of_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    require_hardware(True, "never shown")
    with pytest.raises(pytest.skip.Exception, match="hardware: needs two CUDA devices"):
        require_hardware(False, "needs two CUDA devices")


def test_requires_decorator(monkeypatch):
    calls = []

    def needs_compiler(x, y=2):
        calls.append((x, y))

    monkeypatch.delenv("CI", raising=False)
    assert requires(True, "never shown")(needs_compiler) is needs_compiler
    skipped = requires(False, "g++ missing")(needs_compiler)
    assert [(m.name, m.kwargs) for m in skipped.pytestmark] == [("skip", {"reason": "g++ missing"})]

    monkeypatch.setenv("CI", "true")
    assert requires(True, "never shown")(needs_compiler) is needs_compiler
    failing = requires(False, "g++ missing")(needs_compiler)
    with pytest.raises(pytest.fail.Exception, match="g\\+\\+ missing"):
        failing(1)
    assert calls == []


def test_no_test_file_skips_except_through_prereq():
    offenders = [
        f"{path.relative_to(TESTS.parent)}:{n}: {line.strip()}"
        for path in sorted(TESTS.rglob("*.py"))
        if path not in ALLOWED
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if SKIP.search(line)
    ]
    assert not offenders, (
        "skip through tests/prereq.py (require/requires: fails under CI=true; require_hardware for a"
        " condition on the accelerators) or mark the test gpu:\n" + "\n".join(offenders)
    )
