"""Offline validation of deploy/kuberay/*.yaml (no cluster, no network).

The checks live in kuberay_checks.py:
- core objects and every Ray pod template: strict Kubernetes schemas from ``kubernetes-validate``;
- RayCluster: deploy/schemas/raycluster.schema.json (jsonschema);
- the ConfigMap's serve config parses (ServeConfig.from_dict) and equals deploy/serve-config.yaml;
- every pool maps to one worker group whose rayStartParams.resources (and GPU / CPU limits) can
  hold its num_workers; GPU pools map to groups with nvidia.com/gpu limits;
- Service ports are the config's ports and reach the head pod only; the ServiceMonitor selects
  the metrics Service, the PodMonitor the Ray pods; Secret / Redis / ConfigMap / PVC references.

The head pod's supervisor script is exercised in test_head_supervisor.py.

Each check is a function raising ``ManifestError``; every check also has a test that feeds it a
mutated manifest and expects it to fail, so a check that cannot fail would be noticed.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import pytest
import yaml

from cluster.config import ConfigError, ServeConfig
from tests.unit.deploy.deploy_helpers import (
    ManifestError,
    config_from_configmap,
    find,
    load_docs,
    ray_resources,
    the,
)
from tests.unit.deploy.kuberay_checks import (
    ENDPOINT_LABEL,
    SCHEMA,
    check_container_commands,
    check_core_objects,
    check_monitors,
    check_pod_templates,
    check_pool_placement,
    check_raycluster_schema,
    check_references,
    check_serve_config,
    check_service_ports,
)

# ------------------------------------------------------------------------------ fixtures


@pytest.fixture
def docs() -> list[dict]:
    return copy.deepcopy(_DOCS)


@pytest.fixture
def rc(docs: list[dict]) -> dict:
    return the(docs, "RayCluster", "splitserve")


@pytest.fixture
def cfg(docs: list[dict]) -> ServeConfig:
    return config_from_configmap(docs)


_DOCS = load_docs()


# ------------------------------------------------------------------------------ positive tests


def test_manifests_hold_the_expected_objects(docs):
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    for expected in [
        ("RayCluster", "splitserve"),
        ("Deployment", "splitserve-redis"),
        ("Service", "splitserve-redis"),
        ("Secret", "splitserve-redis"),
        ("ConfigMap", "splitserve-config"),
        ("ServiceMonitor", "splitserve"),
        ("PodMonitor", "splitserve-ray"),
    ]:
        assert expected in kinds, f"{expected} missing from deploy/kuberay; have {kinds}"


def test_raycluster_schema_is_itself_valid():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_all_checks_pass_on_the_shipped_manifests(docs, rc):
    check_core_objects(docs)
    check_raycluster_schema(rc)
    check_pod_templates(rc)
    check_container_commands(rc)
    cfg = check_serve_config(docs)
    check_pool_placement(cfg, rc)
    check_service_ports(cfg, docs, rc)
    check_monitors(cfg, docs, rc)
    check_references(docs, rc)


def test_worker_groups_cover_prefill_decode_and_placeholders(rc, cfg):
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    assert {"prefill", "decode", "attention", "expert"} <= set(groups)
    assert groups["attention"]["replicas"] == 0 and groups["expert"]["replicas"] == 0
    assert ray_resources(groups["prefill"]["rayStartParams"]["resources"]) == {"prefill_node": 1.0}
    assert {p.name for p in cfg.pools} == {"prefill", "decode"}


def test_resources_param_is_parsed_like_the_shell_does():
    assert ray_resources('"{\\"decode_node\\": 1, \\"x\\": 2.5}"') == {"decode_node": 1.0, "x": 2.5}
    for bad in ['{"decode_node": 1}', '"{\\"decode_node\\": 1"', '"{\\"a\\": 1}" "x"', '"[1]"']:
        with pytest.raises(ManifestError):
            ray_resources(bad)  # unquoted (the shell eats the quotes), broken JSON, two words, no object


def test_engine_options_of_every_pool_are_accepted_by_the_engine(cfg, tmp_path):
    from engine.llm import build_engine_config

    # config.json shaped like the deployed model (Qwen3-0.6B); the options only need the config
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_0_6B_CONFIG))
    for pool in cfg.pools:
        engine_cfg = build_engine_config(str(tmp_path), device="cuda", **pool.engine)  # raises on unknown options
        assert engine_cfg.dtype == pool.engine["dtype"]
        for name, value in pool.engine.items():
            if name != "dtype":
                got = [
                    getattr(part, name)
                    for part in (engine_cfg, engine_cfg.cache, engine_cfg.scheduler)
                    if hasattr(part, name)
                ]
                assert got == [value], f"pool {pool.name}: engine option {name}={value!r} became {got}"


QWEN3_0_6B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}


# ------------------------------------------------------------------------------ negative tests
# Each case mutates a fresh copy of the shipped manifests and names the check that must fail.


def edit_config(edit):
    """Mutation: change the serve config inside the ConfigMap (``edit`` gets the parsed dict)."""

    def mutate(docs: list[dict], rc: dict) -> None:
        cm = the(docs, "ConfigMap", "splitserve-config")
        data = yaml.safe_load(cm["data"]["serve-config.yaml"])
        edit(data)
        cm["data"]["serve-config.yaml"] = yaml.safe_dump(data)

    return mutate


DELETE = object()


def put(target, path: str | list[str], value: Any):
    """Mutation: set (or DELETE) ``path`` (dotted, or a list of keys) under ``target(docs, rc)``."""

    def mutate(docs: list[dict], rc: dict) -> None:
        *parents, last = path.split(".") if isinstance(path, str) else path
        obj = target(docs, rc)
        for key in parents:
            obj = obj[int(key)] if isinstance(obj, list) else obj[key]
        if value is DELETE:
            del obj[last]
        else:
            obj[last] = value

    return mutate


# targets: functions (docs, rc) -> the object a mutation edits
RC = lambda d, rc: rc
FT = lambda d, rc: rc["spec"]["gcsFaultToleranceOptions"]
HEAD_SPEC = lambda d, rc: rc["spec"]["headGroupSpec"]
HEAD = lambda d, rc: rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
DOCS = lambda d, rc: d


def group(name: str):
    return lambda d, rc: next(g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == name)


def worker(name: str):
    return lambda d, rc: group(name)(d, rc)["template"]["spec"]["containers"][0]


def obj(kind: str):
    return lambda d, rc: the(d, kind)


def service(endpoint: str):
    return lambda d, rc: next(s for s in find(d, "Service") if s["metadata"]["labels"].get(ENDPOINT_LABEL) == endpoint)


def head_port(name: str):
    return lambda d, rc: next(p for p in HEAD(d, rc)["ports"] if p["name"] == name)


INGRESS = {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "x"}}
REDIS_CONTAINER = "spec.template.spec.containers.0"
SM_LABELS = ["spec", "selector", "matchLabels"]
CHECKS = {
    "core": lambda docs, rc: check_core_objects(docs),
    "schema": lambda docs, rc: check_raycluster_schema(rc),
    "templates": lambda docs, rc: check_pod_templates(rc),
    "commands": lambda docs, rc: check_container_commands(rc),
    "serve_config": lambda docs, rc: check_serve_config(docs),
    "placement": lambda docs, rc: check_pool_placement(config_from_configmap(docs), rc),
    "ports": lambda docs, rc: check_service_ports(config_from_configmap(docs), docs, rc),
    "monitors": lambda docs, rc: check_monitors(config_from_configmap(docs), docs, rc),
    "references": lambda docs, rc: check_references(docs, rc),
}
# (check that must fail, regex its message must match, mutation)
NEGATIVE_CASES = [
    # core objects against strict Kubernetes schemas
    ("core", "Additional properties", put(service("grpc"), "spec.ports.0.targetport", 1)),
    ("core", "Additional properties", put(obj("Deployment"), f"{REDIS_CONTAINER}.imagePullPolice", "Always")),
    ("core", "is not of type 'string'", put(obj("Secret"), "stringData.password", 12345)),
    ("core", "neither a core kind", lambda d, rc: d.append(INGRESS)),
    # RayCluster against deploy/schemas/raycluster.schema.json
    ("schema", "'replica' was unexpected", put(group("prefill"), "replica", 2)),
    ("schema", "is not of type 'string'", put(HEAD_SPEC, "rayStartParams.num-cpus", 0)),
    ("schema", "'redisPassword' is a required property", put(FT, "redisPassword", DELETE)),
    ("schema", "should not be valid", put(HEAD_SPEC, "rayStartParams.redis-password", "x")),
    ("schema", "'ray.io/v1' was expected", put(RC, "apiVersion", "ray.io/v1alpha1")),
    ("schema", "'groupName' is a required property", put(group("decode"), "groupName", DELETE)),
    ("schema", r"minReplicas <= replicas <= maxReplicas", put(group("decode"), "replicas", 9)),
    # Ray pod templates against strict Kubernetes schemas
    ("templates", "Additional properties", put(worker("decode"), "imagePullPolice", "Always")),
    ("templates", "Additional properties", put(HEAD, "resources.limit", {"cpu": "1"})),
    # container commands under ray.io/overwrite-container-cmd
    ("commands", "overwrite-container-cmd", put(RC, "metadata.annotations", {})),
    ("commands", "KUBERAY_GEN_RAY_START_CMD", put(worker("prefill"), "args", DELETE)),
    ("commands", "must run `bash -c", put(worker("decode"), "args", ["ulimit -n 65536; $KUBERAY_GEN_RAY_START_CMD"])),
    ("commands", "exactly once", put(HEAD, "args", ['exec /bin/bash -c "$KUBERAY_GEN_RAY_START_CMD"'])),
    # the ConfigMap's serve config
    ("serve_config", "differs from deploy/serve-config.yaml", edit_config(lambda c: c.update(max_queue=7))),
    # pools -> worker groups
    ("placement", "exactly one group", put(group("prefill"), "rayStartParams.resources", '"{\\"prefil_node\\": 1}"')),
    ("placement", "exactly one group", put(group("attention"), "rayStartParams.resources", '"{\\"decode_node\\": 1}"')),
    ("placement", "GPU", put(worker("decode"), "resources", {"limits": {"cpu": "8"}})),
    ("placement", "raise replicas", put(group("prefill"), "replicas", 1)),
    ("placement", "raise replicas", edit_config(lambda c: c["pools"][1].update(num_workers=3))),
    ("placement", "raise replicas", edit_config(lambda c: c["pools"][0].update(num_cpus=16))),
    ("placement", "the head provides", put(HEAD_SPEC, "rayStartParams.resources", '"{\\"decode_node\\": 1}"')),
    ("placement", "nothing pins it", edit_config(lambda c: c["pools"][0].update(resources={}))),
    # Services <-> serve config ports <-> head pod
    (
        "ports",
        "exactly one port",
        lambda d, rc: service("http")(d, rc)["spec"]["ports"].append({"port": 1, "name": "x"}),
    ),
    ("ports", "config says 50051", put(service("grpc"), "spec.ports.0.port", 50052)),
    ("ports", "config says 8000", put(head_port("http"), "containerPort", 8001)),
    ("ports", "config says 9091", edit_config(lambda c: c.update(metrics_port=9091))),
    (
        "ports",
        "does not select the head",
        put(service("http"), "spec.selector", {"app.kubernetes.io/component": "worker"}),
    ),
    (
        "ports",
        "also selects worker pods",
        put(service("http"), "spec.selector", {"app.kubernetes.io/name": "splitserve"}),
    ),
    ("ports", "Ray's metrics export port", put(head_port("metrics"), "containerPort", 9090)),
    # ServiceMonitor / PodMonitor
    ("monitors", "exactly the metrics Service", put(obj("ServiceMonitor"), [*SM_LABELS, ENDPOINT_LABEL], "http")),
    ("monitors", "expect job 'splitserve'", put(obj("ServiceMonitor"), "spec.jobLabel", DELETE)),
    ("monitors", "scrape /metrics", put(obj("ServiceMonitor"), "spec.endpoints.0.port", "grpc")),
    ("monitors", "scrape /metrics", put(obj("ServiceMonitor"), "spec.endpoints.0.path", "/stats")),
    ("monitors", "not a container port", put(obj("PodMonitor"), "spec.podMetricsEndpoints.0.port", "ray-metrics")),
    (
        "monitors",
        "not select the prefill pods",
        put(obj("PodMonitor"), SM_LABELS, {"app.kubernetes.io/component": "head"}),
    ),
    (
        "monitors",
        "also selects Deployment",
        put(obj("PodMonitor"), SM_LABELS, {"app.kubernetes.io/part-of": "splitserve"}),
    ),
    # references between objects
    ("references", "with key 'pass'", put(FT, "redisPassword.valueFrom.secretKeyRef.key", "pass")),
    ("references", "6380 is not a port", put(FT, "redisAddress", "splitserve-redis:6380")),
    ("references", "exactly one Service redis", put(FT, "redisAddress", "redis:6379")),
    (
        "references",
        "PersistentVolumeClaim",
        put(group("decode"), "template.spec.volumes.0.persistentVolumeClaim.claimName", "m"),
    ),
    ("references", "no ConfigMap with key", put(HEAD, "volumeMounts.0.mountPath", "/etc/config")),
    (
        "references",
        "Secret splitserve-redis",
        put(obj("Deployment"), f"{REDIS_CONTAINER}.env.0.valueFrom.secretKeyRef.key", "pw"),
    ),
]


@pytest.mark.parametrize(("check", "match", "mutate"), NEGATIVE_CASES)
def test_a_mutated_manifest_fails_its_check(docs, rc, check, match, mutate):
    CHECKS[check](docs, rc)  # passes before the mutation ...
    mutate(docs, rc)
    with pytest.raises(ManifestError, match=match):
        CHECKS[check](docs, rc)  # ... and fails after it


def test_an_invalid_serve_config_in_the_configmap_is_a_config_error(docs, rc):
    edit_config(lambda c: c["pools"][0].update(num_workers=-1))(docs, rc)
    with pytest.raises(ConfigError, match=r"pools\[0\]\.num_workers"):
        config_from_configmap(docs)


def _commented_pool(heading: str) -> dict:
    """The pool example commented out in deploy/serve-config.yaml under the comment starting
    ``heading``, as a pool dict: the first run of ``  #   `` lines after it."""
    from tests.unit.deploy.deploy_helpers import SERVE_CONFIG_FILE

    lines = SERVE_CONFIG_FILE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  # {heading}"))
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("  #   "))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("  #   ")), len(lines))
    (pool,) = yaml.safe_load("\n".join(line[len("  #   ") :] for line in lines[first:end]))
    return pool


def _commented_ep_pool() -> dict:
    return _commented_pool("Expert parallelism")


def test_the_commented_ep_pool_fits_the_expert_group_once_its_replicas_are_raised(rc):
    from tests.unit.deploy.deploy_helpers import SERVE_CONFIG_FILE

    raw = yaml.safe_load(SERVE_CONFIG_FILE.read_text())
    pool = _commented_ep_pool()
    assert pool["experts"] == pool["num_workers"] == 2 and pool["resources"] == {"expert_node": 1}
    pool.pop("expert_routing_log")  # a file on the models volume, absent here (PoolConfig checks it exists)
    raw["pools"] = [p for p in raw["pools"] if p["name"] != "decode"] + [pool]
    cfg = ServeConfig.from_dict(raw)
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    with pytest.raises(ManifestError, match="raise replicas"):  # shipped at 0 pods
        check_pool_placement(cfg, rc)
    groups["expert"]["replicas"] = 1  # one pod per rank: 1 pod cannot hold 2 ranks
    with pytest.raises(ManifestError, match="fits 1"):
        check_pool_placement(cfg, rc)
    groups["expert"]["replicas"] = 2
    check_pool_placement(cfg, rc)
    check_raycluster_schema(rc)
    # the EP pods replace the container's 64 MiB /dev/shm with a memory-backed volume (NCCL)
    spec = groups["expert"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def test_the_commented_tp_pool_needs_a_pod_per_rank(rc):
    """The tensor-parallel example in deploy/serve-config.yaml: each rank is an actor asking for
    the pool's resources, so one TP=2 worker needs two decode pods' worth."""
    from tests.unit.deploy.deploy_helpers import SERVE_CONFIG_FILE

    raw = yaml.safe_load(SERVE_CONFIG_FILE.read_text())
    pool = _commented_pool("Tensor parallelism")
    assert pool["tensor_parallel"] == 2 and pool["num_workers"] == 1 and pool["resources"] == {"decode_node": 1}
    raw["pools"] = [p for p in raw["pools"] if p["name"] != "decode"] + [pool]
    cfg = ServeConfig.from_dict(raw)
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    groups["decode"]["replicas"] = 1  # one pod: room for one rank, not two
    with pytest.raises(ManifestError, match=r"1 workers x 2 TP ranks but group decode fits 1"):
        check_pool_placement(cfg, rc)
    groups["decode"]["replicas"] = 2
    check_pool_placement(cfg, rc)
