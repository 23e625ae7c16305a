"""The committed protos/*_pb2*.py files are exactly what grpcio-tools makes of protos/*.proto.

Each .proto is regenerated into a temporary directory with the command the repo uses (run
from the repo root, so modules import as ``protos.X_pb2``):

    .venv/bin/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. protos/X.proto

and every generated ``_pb2.py`` / ``_pb2_grpc.py`` must be committed and byte-equal. The
``.pyi`` stub is compared when it is committed (older protos were generated without one).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
PROTOS = sorted((REPO / "protos").glob("*.proto"))
REGENERATE = "{python} -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. protos/{name}"


def test_there_are_protos():
    assert {p.name for p in PROTOS} >= {"kv_transfer.proto", "splitserve.proto"}


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
        if g.suffix == ".pyi" and not committed.exists():
            continue
        assert committed.exists(), f"{committed.relative_to(REPO)} is not committed; run from the repo root: {fix}"
        assert committed.read_bytes() == g.read_bytes(), (
            f"{committed.relative_to(REPO)} is stale or hand-edited; regenerate from the repo root: {fix}"
        )
