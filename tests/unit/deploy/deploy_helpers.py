"""Shared helpers of the deploy tests: load deploy/kuberay/*.yaml and pick objects out of it.

Helpers raise ``ManifestError`` (an AssertionError) so the checks built on them can be tested
for failing on mutated manifests.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import yaml

from cluster.config import ServeConfig

ROOT = Path(__file__).resolve().parents[3]
DEPLOY_DIR = ROOT / "deploy"
KUBERAY_DIR = DEPLOY_DIR / "kuberay"
SERVE_CONFIG_FILE = DEPLOY_DIR / "serve-config.yaml"
RAYCLUSTER_FILE = KUBERAY_DIR / "raycluster.yaml"


class ManifestError(AssertionError):
    pass


def fail(msg: str) -> None:
    raise ManifestError(msg)


def load_raycluster() -> dict:
    return the(load_docs(), "RayCluster", "splitserve")


def load_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(KUBERAY_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append(doc)
    return docs


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def the(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(docs, kind, name)
    if len(found) != 1:
        fail(f"expected exactly one {kind}{' ' + name if name else ''}, found {len(found)}")
    return found[0]


def ray_templates(rc: dict) -> dict[str, dict]:
    """Pod templates by group name; the head is ``"head"``."""
    out = {"head": rc["spec"]["headGroupSpec"]["template"]}
    out.update({g["groupName"]: g["template"] for g in rc["spec"]["workerGroupSpecs"]})
    return out


def head_script(rc: dict) -> str:
    container = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    if container.get("command") != ["/bin/bash", "-lc", "--"] or len(container.get("args", [])) != 1:
        fail("head container must run one bash script: command ['/bin/bash', '-lc', '--'], args [script]")
    return container["args"][0]


def serve_command(script: str) -> list[str]:
    """Tokens of the single ``splitserve serve ...`` line of the head script (without a trailing &)."""
    lines = [ln.strip() for ln in script.splitlines() if ln.strip().startswith("splitserve ")]
    if len(lines) != 1:
        fail(f"head script must start splitserve exactly once, found {len(lines)} lines")
    tokens = shlex.split(lines[0])
    return tokens[:-1] if tokens[-1] == "&" else tokens


def ray_resources(value: str) -> dict[str, float]:
    """rayStartParams.resources as `ray start` receives it (KubeRay pastes it after `--resources=`)."""
    try:
        (arg,) = shlex.split(f"--resources={value}")
        data = json.loads(arg.removeprefix("--resources="))
    except ValueError as e:  # unbalanced quotes, several shell words, or not JSON
        raise ManifestError(f"rayStartParams.resources {value!r} is not a shell-quoted JSON object: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(v, int | float) for v in data.values()):
        fail(f"rayStartParams.resources {value!r} must be a JSON object of numbers")
    return {k: float(v) for k, v in data.items()}


def quantity(value: Any) -> float:
    """A Kubernetes CPU / count quantity: 8, "8", "500m"."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def config_from_configmap(docs: list[dict]) -> ServeConfig:
    cm = the(docs, "ConfigMap", "splitserve-config")
    return ServeConfig.from_dict(yaml.safe_load(cm["data"]["serve-config.yaml"]))
