"""The committed protos/*_pb2*.py(i) files are exactly what the pinned grpcio-tools makes of protos/*.proto.

Each .proto is regenerated into a temporary directory with the command the repo uses (``make
protos``; run from the repo root, so modules import as ``protos.X_pb2``):

    .venv/bin/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. protos/X.proto

and every generated ``_pb2.py`` / ``_pb2_grpc.py`` / ``_pb2.pyi`` must be committed and
byte-equal. The generated code names the grpcio-tools version that made it, so the comparison
only means something with the version requirements.lock pins: that is checked first.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
PROTOS = sorted((REPO / "protos").glob("*.proto"))
LOCK = REPO / "requirements.lock"
REGENERATE = (
    "`make protos`, or {python} -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. protos/{name}"
)


def _locked_version(package: str) -> str:
    pins = re.findall(rf"^{re.escape(package)}==(\S+)$", LOCK.read_text(), flags=re.MULTILINE | re.IGNORECASE)
    assert len(pins) == 1, f"{LOCK.name} should pin {package} exactly once, found {pins}"
    return pins[0]


def test_there_are_protos():
    assert {p.name for p in PROTOS} >= {"kv_transfer.proto", "splitserve.proto"}


def test_grpcio_tools_is_the_locked_version():
    installed = importlib.metadata.version("grpcio-tools")
    locked = _locked_version("grpcio-tools")
    assert installed == locked, (
        f"grpcio-tools {installed} is installed but {LOCK.name} pins {locked}: `make install` applies the lock"
    )


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_generated_code_matches_the_proto(proto: Path, tmp_path: Path):
    out = tmp_path / "gen"
    out.mkdir()
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={out}", f"--grpc_python_out={out}"]
    cmd += [f"--pyi_out={out}", f"protos/{proto.name}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    generated = sorted((out / "protos").iterdir())
    stem = proto.stem
    assert {g.name for g in generated} == {f"{stem}_pb2.py", f"{stem}_pb2_grpc.py", f"{stem}_pb2.pyi"}
    fix = REGENERATE.format(python=".venv/bin/python", name=proto.name)
    for g in generated:
        committed = REPO / "protos" / g.name
        assert committed.exists(), (
            f"{committed.relative_to(REPO)} is not committed; regenerate from the repo root: {fix}"
        )
        assert committed.read_bytes() == g.read_bytes(), (
            f"{committed.relative_to(REPO)} is stale or hand-edited; regenerate from the repo root: {fix}"
        )
