"""DESIGN.md's layer rules, enforced.

The import-linter contracts live in pyproject.toml. ``test_import_contracts_hold`` checks the
real tree; ``test_contracts_catch_violations`` builds a throwaway tree of the same packages with
deliberate violations and checks each one is reported (so a contract that silently matches
nothing cannot pass). ``test_engine_creates_no_process_groups`` covers the rule import-linter
cannot express: engine may use torch but never creates torch.distributed process groups, except
in engine/runtime/groups.py, the worker runtime's one place for it.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
CLUSTER_SUBPACKAGES = ("cluster.control", "cluster.frontends", "cluster.metrics", "cluster.tools")
PACKAGES = (
    "engine",
    "protos",
    "kv_transfer",
    "attention_offload",
    "expert_router",
    "prefill_worker",
    "decode_worker",
    "cluster",
)
# Creating groups is the caller's job; engine receives communicators by injection. The torch
# entry points that create a group, and the backend classes (constructing one is creating a group).
PROCESS_GROUP_FACTORIES = {
    "init_process_group",
    "new_group",
    "new_subgroups",
    "new_subgroups_by_enumeration",
    "init_device_mesh",
    "_new_process_group_helper",
    "ProcessGroupGloo",
    "ProcessGroupNCCL",
    "ProcessGroupMPI",
    "ProcessGroupUCC",
    "ProcessGroupXCCL",
}


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    assert LINT_IMPORTS.exists(), f"{LINT_IMPORTS} missing: install the dev extra (make install)"
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(cwd / "pyproject.toml"), "--no-cache", "--no-logo"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_contracts_hold() -> None:
    result = _lint_imports(REPO)
    assert result.returncode == 0, f"import contracts broken:\n{result.stdout}\n{result.stderr}"
    assert "0 broken" in result.stdout, result.stdout


def _write(root: Path, module: str, source: str) -> None:
    path = root / (module.replace(".", "/") + ".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)


def test_contracts_catch_violations(tmp_path: Path) -> None:
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    for package in (*PACKAGES, *CLUSTER_SUBPACKAGES):
        _write(tmp_path, f"{package}.__init__", "")
    _write(tmp_path, "cluster.config", "")
    _write(tmp_path, "cluster.serve", "")
    # allowed: actor shells and cluster may import ray; cluster may import everything below it
    _write(tmp_path, "prefill_worker.actor", "import ray\nimport prefill_worker.worker\n")
    _write(tmp_path, "prefill_worker.worker", "import engine.core\nimport kv_transfer.base\n")
    _write(tmp_path, "decode_worker.actor", "import ray.util\n")
    _write(
        tmp_path, "cluster.control.router", "import ray\nimport redis\nimport fastapi\nimport prefill_worker.actor\n"
    )
    _write(tmp_path, "engine.core", "import torch\n")
    _write(tmp_path, "kv_transfer.base", "import engine.core\nimport protos\n")
    _write(tmp_path, "cluster.client", "import grpc\nimport protos\n")  # the SDK: grpc + protos only
    _write(tmp_path, "cluster.tools.bench", "import cluster.control.router\n")  # tools use the control plane
    clean = _lint_imports(tmp_path)
    assert clean.returncode == 0, f"allowed imports were reported:\n{clean.stdout}\n{clean.stderr}"

    _write(tmp_path, "engine.bad_upward", "import kv_transfer.base\n")  # L0 -> L1
    _write(tmp_path, "kv_transfer.bad_sibling", "import expert_router\n")  # L1 sibling
    _write(tmp_path, "decode_worker.bad_ray", "import ray\n")  # ray outside actor.py
    _write(tmp_path, "expert_router.bad_metrics", "import prometheus_client\n")  # metrics outside cluster
    _write(tmp_path, "engine.bad_rpc", "import grpc\n")  # network in engine
    _write(tmp_path, "cluster.client", "import grpc\nimport engine.core\n")  # SDK pulling in the engine
    _write(tmp_path, "cluster.frontends.bad_tools", "import cluster.tools.bench\n")  # serving path -> tools
    _write(tmp_path, "engine.cycle_a", "import engine.cycle_b\n")  # a cycle between siblings
    _write(tmp_path, "engine.cycle_b", "import engine.cycle_a\n")
    broken = _lint_imports(tmp_path)
    report = broken.stdout + broken.stderr
    assert broken.returncode != 0, report
    for offender in (
        "engine.bad_upward",
        "kv_transfer.bad_sibling",
        "decode_worker.bad_ray",
        "expert_router.bad_metrics",
        "engine.bad_rpc",
        "cluster.client",
        "cluster.frontends.bad_tools",
        "cycle_a",
    ):
        assert offender in report, f"{offender} not reported:\n{report}"
    assert "7 broken" in report, report


def test_engine_creates_no_process_groups(tmp_path: Path) -> None:
    # engine/runtime/ is the worker-process runtime every worker kind shares; its groups.py joins
    # the worker's groups and hands communicators to the engine core. It is the ONE engine file
    # allowed to create groups: the core, models, attention and scheduler receive communicators.
    allowed = Path("engine/runtime/groups.py")

    def offenders(root: Path) -> list[str]:
        found = []
        for path in sorted((root / "engine").rglob("*.py")):
            if path.relative_to(root) == allowed:
                continue
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
                if isinstance(node, ast.alias):
                    name = node.name.rsplit(".", 1)[-1]
                if name in PROCESS_GROUP_FACTORIES:
                    found.append(f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')} {name}")
        return found

    real = offenders(REPO)
    assert not real, "engine must receive communicators, not create process groups:\n" + "\n".join(real)
    assert (REPO / allowed).exists(), f"{allowed} moved: update the exemption"

    # the check still catches every other engine file, the runtime's other files included
    _write(tmp_path, "engine.runtime.groups", "import torch.distributed as dist\ndist.init_process_group('gloo')\n")
    _write(tmp_path, "engine.runtime.loop", "from torch.distributed import ProcessGroupGloo\n")
    _write(tmp_path, "engine.models.llama", "import torch.distributed as dist\ng = dist.new_group([0, 1])\n")
    _write(tmp_path, "engine.parallel", "from torch import distributed\ndistributed.ProcessGroupNCCL(None, 0, 1)\n")
    assert offenders(tmp_path) == [
        "engine/models/llama.py:2 new_group",
        "engine/parallel.py:2 ProcessGroupNCCL",
        "engine/runtime/loop.py:1 ProcessGroupGloo",
    ]
