"""Checks of the KubeRay manifests (deploy/kuberay/*.yaml), each raising ``ManifestError``.

Used by test_kuberay_manifests.py, which runs every check on the shipped manifests and on
mutated copies (so that each check is shown to be able to fail).

- core objects (Deployment, Service, Secret, ConfigMap, PersistentVolumeClaim) and every Ray pod
  template: strict schemas shipped by ``kubernetes-validate`` (unknown fields are errors), for the
  oldest Kubernetes we support and the newest the package knows;
- RayCluster: deploy/schemas/raycluster.schema.json (jsonschema draft 2020-12);
- cross-object contracts: serve config <-> worker groups, Services <-> ports <-> head pod,
  monitors <-> Services / pods, Secret / Redis / ConfigMap / PVC references.
"""

from __future__ import annotations

import functools
import json
import posixpath
import re

import jsonschema
import kubernetes_validate
import yaml

from cluster.config import ServeConfig
from tests.unit.deploy.deploy_helpers import (
    DEPLOY_DIR,
    SERVE_CONFIG_FILE,
    fail,
    find,
    head_script,
    labels_match,
    quantity,
    ray_resources,
    ray_templates,
    serve_command,
    the,
)

SCHEMA = json.loads((DEPLOY_DIR / "schemas" / "raycluster.schema.json").read_text())
# Oldest Kubernetes minor we claim to support, and the newest the installed schemas cover.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
CORE_KINDS = {("v1", "Service"), ("v1", "Secret"), ("v1", "ConfigMap"), ("v1", "PersistentVolumeClaim")}
CORE_KINDS |= {("apps/v1", "Deployment")}
CRD_KINDS = {("ray.io/v1", "RayCluster"), ("monitoring.coreos.com/v1", "ServiceMonitor")}
CRD_KINDS |= {("monitoring.coreos.com/v1", "PodMonitor")}
ENDPOINT_LABEL = "splitserve.io/endpoint"  # Service label: grpc | http | metrics
GEN_CMD_RUN = re.compile(r'(\beval|/bin/bash -c|\bbash -c) "\$KUBERAY_GEN_RAY_START_CMD"')
SPLITSERVE_JOB = "splitserve"  # Prometheus job of splitserve's metrics (deploy/prometheus rules use it)


# ------------------------------------------------------------------------------ checks


@functools.cache
def _k8s_errors(doc_json: str, version: str) -> str | None:
    """Strict kubernetes-validate result for one object (memoised: the package re-reads its
    multi-megabyte schema files on every call, and most tests validate unchanged objects)."""
    try:
        kubernetes_validate.validate(json.loads(doc_json), version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{'.'.join(str(p) for p in e.path)}: {e.message}"
    return None


def k8s_validate(doc: dict, what: str) -> None:
    for version in K8S_VERSIONS:
        error = _k8s_errors(json.dumps(doc, sort_keys=True), version)
        if error is not None:
            fail(f"{what} (k8s {version}) {error}")


def check_core_objects(docs: list[dict]) -> None:
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in CRD_KINDS:
            continue
        if key not in CORE_KINDS:
            fail(f"{key} is neither a core kind validated here nor a known CRD")
        k8s_validate(doc, f"{doc['kind']}/{doc['metadata']['name']}")


def check_raycluster_schema(rc: dict) -> None:
    errors = sorted(jsonschema.Draft202012Validator(SCHEMA).iter_errors(rc), key=lambda e: list(e.path))
    if errors:
        fail("; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors))
    for group in rc["spec"]["workerGroupSpecs"]:
        if not group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]:
            fail(f"group {group['groupName']}: need minReplicas <= replicas <= maxReplicas")
    names = [g["groupName"] for g in rc["spec"]["workerGroupSpecs"]]
    if len(set(names)) != len(names):
        fail(f"duplicate worker group names: {names}")


def check_pod_templates(rc: dict) -> None:
    """Each group's template is a valid v1 PodTemplateSpec (strict: no unknown fields)."""
    for group, template in ray_templates(rc).items():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
        k8s_validate(wrapped, f"group {group}")


def check_container_commands(rc: dict) -> None:
    """With ray.io/overwrite-container-cmd every Ray container must start Ray itself."""
    if rc["metadata"].get("annotations", {}).get("ray.io/overwrite-container-cmd") != "true":
        fail("the head runs splitserve after ray start: needs ray.io/overwrite-container-cmd: 'true'")
    for group, template in ray_templates(rc).items():
        ray_container = template["spec"]["containers"][0]
        script = " ".join(ray_container.get("args", []))
        # The generated command is shell text (quoted JSON resources, $REDIS_PASSWORD): only a
        # shell that parses it again (bash -c / eval) passes it to `ray start` intact.
        if not ray_container.get("command") or not GEN_CMD_RUN.search(script):
            fail(f'group {group}: Ray container must run `bash -c "$KUBERAY_GEN_RAY_START_CMD"` (or eval) in args')
    if serve_command(head_script(rc))[:2] != ["splitserve", "serve"]:
        fail("the head script must run `splitserve serve`")


def check_serve_config(docs: list[dict]) -> ServeConfig:
    cm = the(docs, "ConfigMap", "splitserve-config")
    in_cluster = yaml.safe_load(cm["data"]["serve-config.yaml"])
    if in_cluster != yaml.safe_load(SERVE_CONFIG_FILE.read_text()):
        fail("ConfigMap splitserve-config differs from deploy/serve-config.yaml")
    return ServeConfig.from_dict(in_cluster)


def check_pool_placement(cfg: ServeConfig, rc: dict) -> None:
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    provided = {name: ray_resources(g["rayStartParams"].get("resources", '"{}"')) for name, g in groups.items()}
    on_head = ray_resources(rc["spec"]["headGroupSpec"]["rayStartParams"].get("resources", '"{}"'))
    for pool in cfg.pools:
        if set(pool.resources) & set(on_head):
            fail(
                f"pool {pool.name}: the head provides {sorted(set(pool.resources) & set(on_head))}; workers belong on GPU pods"
            )
        if not pool.resources:
            fail(f"pool {pool.name}: no custom resources, so nothing pins it to a worker group")
        matches = [name for name, res in provided.items() if all(k in res for k in pool.resources)]
        if len(matches) != 1:
            fail(f"pool {pool.name}: resources {pool.resources} must be provided by exactly one group, got {matches}")
        group = groups[matches[0]]
        limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        per_pod = [provided[group["groupName"]][k] // need for k, need in pool.resources.items() if need > 0]
        if pool.num_gpus > 0:
            gpus = quantity(limits.get("nvidia.com/gpu", 0))
            if gpus < pool.num_gpus:
                fail(f"pool {pool.name} needs {pool.num_gpus} GPU(s) per worker; group {matches[0]} has {gpus}")
            per_pod.append(gpus // pool.num_gpus)
        if pool.num_cpus > 0:
            per_pod.append(quantity(limits.get("cpu", 0)) // pool.num_cpus)
        capacity = int(min(per_pod, default=float("inf")) * group["replicas"]) if per_pod else 0
        actors = pool.num_workers * pool.tensor_parallel  # a TP worker is one actor per rank, each asking the above
        if capacity < actors:
            ranks = f" x {pool.tensor_parallel} TP ranks" if pool.tensor_parallel > 1 else ""
            fail(
                f"pool {pool.name}: {pool.num_workers} workers{ranks} but group {matches[0]} fits {capacity} "
                f"({group['replicas']} replicas); raise replicas before num_workers"
            )


def check_service_ports(cfg: ServeConfig, docs: list[dict], rc: dict) -> None:
    templates = ray_templates(rc)
    head = templates.pop("head")
    head_ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    wanted = {"grpc": cfg.grpc_port, "http": cfg.http_port, "metrics": cfg.metrics_port}
    for endpoint, port in wanted.items():
        services = [s for s in find(docs, "Service") if s["metadata"].get("labels", {}).get(ENDPOINT_LABEL) == endpoint]
        if len(services) != 1:
            fail(f"expected one Service labelled {ENDPOINT_LABEL}={endpoint}, found {len(services)}")
        svc = services[0]
        if len(svc["spec"]["ports"]) != 1:
            fail(f"Service {svc['metadata']['name']} must expose exactly one port")
        svc_port = svc["spec"]["ports"][0]
        target = svc_port["targetPort"]
        target_port = head_ports.get(target) if isinstance(target, str) else target
        if svc_port["port"] != port or target_port != port:
            fail(
                f"Service {svc['metadata']['name']}: port {svc_port['port']} -> head {target_port}, config says {port}"
            )
        selector = svc["spec"]["selector"]
        if not labels_match(selector, head["metadata"]["labels"]):
            fail(f"Service {svc['metadata']['name']} does not select the head pod")
        if any(labels_match(selector, t["metadata"]["labels"]) for t in templates.values()):
            fail(f"Service {svc['metadata']['name']} also selects worker pods")
    # KubeRay passes the container port named "metrics" to ray start as --metrics-export-port.
    if head_ports.get("metrics") in wanted.values():
        fail("head port 'metrics' is Ray's metrics export port; it must not be a splitserve port")


def check_monitors(cfg: ServeConfig, docs: list[dict], rc: dict) -> None:
    sm = the(docs, "ServiceMonitor")
    chosen = [
        s for s in find(docs, "Service") if labels_match(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    names = [s["metadata"]["name"] for s in chosen]
    if len(chosen) != 1 or chosen[0]["metadata"]["labels"].get(ENDPOINT_LABEL) != "metrics":
        fail(f"ServiceMonitor must select exactly the metrics Service, selects {names}")
    job = chosen[0]["metadata"]["labels"].get(sm["spec"].get("jobLabel", ""), chosen[0]["metadata"]["name"])
    if job != SPLITSERVE_JOB:
        fail(f"ServiceMonitor scrapes as job {job!r}; the Prometheus rules expect job {SPLITSERVE_JOB!r}")
    svc_ports = {p["name"]: p["port"] for p in chosen[0]["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        if svc_ports.get(ep["port"]) != cfg.metrics_port or ep.get("path", "/metrics") != "/metrics":
            fail(f"ServiceMonitor endpoint {ep} must scrape /metrics on the metrics_port ({cfg.metrics_port})")
    pm = the(docs, "PodMonitor")
    selector = pm["spec"]["selector"]["matchLabels"]
    for group, template in ray_templates(rc).items():
        if not labels_match(selector, template["metadata"]["labels"]):
            fail(f"PodMonitor does not select the {group} pods")
        ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        for ep in pm["spec"]["podMetricsEndpoints"]:
            if ep["port"] not in ports:
                fail(f"PodMonitor port {ep['port']!r} is not a container port of the {group} pods")
    for dep in find(docs, "Deployment"):
        if labels_match(selector, dep["spec"]["template"]["metadata"]["labels"]):
            fail(f"PodMonitor also selects Deployment {dep['metadata']['name']}")


def check_references(docs: list[dict], rc: dict) -> None:
    def secret_has(ref: dict, who: str) -> None:
        found = find(docs, "Secret", ref["name"])
        keys = set(found[0].get("data", {})) | set(found[0].get("stringData", {})) if found else set()
        if ref["key"] not in keys:
            fail(f"{who}: Secret {ref['name']} with key {ref['key']!r} is not defined")

    ft = rc["spec"]["gcsFaultToleranceOptions"]
    secret_has(ft["redisPassword"]["valueFrom"]["secretKeyRef"], "RayCluster redisPassword")
    host, port = ft["redisAddress"].split("://")[-1].rsplit(":", 1)
    redis_svc = the(docs, "Service", host)
    if int(port) not in [p["port"] for p in redis_svc["spec"]["ports"]]:
        fail(f"redisAddress port {port} is not a port of Service {host}")
    if not any(
        labels_match(redis_svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        for d in find(docs, "Deployment")
    ):
        fail(f"Service {host} selects no Deployment's pods")
    templates = [("Deployment " + d["metadata"]["name"], d["spec"]["template"]) for d in find(docs, "Deployment")]
    templates += [(f"group {g}", t) for g, t in ray_templates(rc).items()]
    for who, template in templates:
        for c in template["spec"]["containers"]:
            for env in c.get("env", []):
                if "secretKeyRef" in env.get("valueFrom", {}):
                    secret_has(env["valueFrom"]["secretKeyRef"], who)
        for vol in template["spec"].get("volumes", []):
            if "configMap" in vol:
                the(docs, "ConfigMap", vol["configMap"]["name"])
            if "persistentVolumeClaim" in vol:
                the(docs, "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"])
    # the --config path of the head command is a key of the ConfigMap mounted at its directory
    cmd = serve_command(head_script(rc))
    path = cmd[cmd.index("--config") + 1]
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head.get("volumes", [])}
    mounts = [m for m in head["containers"][0].get("volumeMounts", []) if m["mountPath"] == posixpath.dirname(path)]
    cms = [volumes[m["name"]].get("configMap", {}).get("name") for m in mounts if m["name"] in volumes]
    if len(cms) != 1 or cms[0] is None or posixpath.basename(path) not in the(docs, "ConfigMap", cms[0])["data"]:
        fail(
            f"--config {path}: no ConfigMap with key {posixpath.basename(path)!r} mounted at {posixpath.dirname(path)}"
        )
