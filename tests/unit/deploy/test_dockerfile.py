"""Static checks of deploy/Dockerfile and .dockerignore (Docker cannot run on this machine).

The Dockerfile is parsed into instructions (continuations joined, comments dropped) and checked
against the rest of the deployment:
- the final base image is a GPU image with Python >= 3.11, and its Ray version is the
  RayCluster's ``spec.rayVersion``;
- the package is installed with ``pip install .`` and never with the CPU constraints file;
- the last USER before CMD is not root, and is the uid the Ray pods run as;
- EXPOSE lists exactly the serve config's gRPC / HTTP / metrics ports;
- CMD (no ENTRYPOINT) is token for token the ``splitserve serve`` command of the KubeRay head, and
  its ``--config`` path is where the Dockerfile copies deploy/serve-config.yaml;
- every Ray container runs the image ``splitserve:<pyproject version>``;
- the default model is baked in: ``SPLITSERVE_CACHE`` is an absolute path, owned by the image's
  user, and a RUN after ``pip install .`` fetches the GGUF and converts it there (so no pod
  fetches or converts at run time);
- .dockerignore keeps the package sources in the build context and .venv / .git / tests out.
Each check has a negative test on a mutated Dockerfile / .dockerignore.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib

import pytest

from cluster.config import ServeConfig
from tests.unit.deploy.deploy_helpers import (
    DEPLOY_DIR,
    ROOT,
    SERVE_CONFIG_FILE,
    ManifestError,
    fail,
    head_script,
    load_raycluster,
    ray_templates,
    serve_command,
)

DOCKERFILE = DEPLOY_DIR / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
GPU_IMAGES = (
    # rayproject/ray:<ray>-py<3XX>-gpu (or -cuXXX)
    re.compile(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)-(gpu|cu\d+)"),
    # nvidia/cuda:<cuda>-[cudnn-]runtime|devel-ubuntu<xx.yy> (Python must then be installed by a RUN)
    re.compile(r"nvidia/cuda:[\d.]+-(cudnn\d*-)?(runtime|devel)-ubuntu\d+\.\d+"),
)


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)], continuation lines joined, comment lines dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # also inside a continuation, as Docker does
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    if pending:
        fail("Dockerfile ends inside a line continuation")
    return out


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def check_dockerfile(text: str, cfg: ServeConfig, rc: dict, pyproject: dict) -> None:
    instrs = parse_dockerfile(text)
    kinds = [k for k, _ in instrs]
    if "FROM" not in kinds:
        fail("no FROM instruction")
    global_args = dict(a.split("=", 1) for k, a in instrs[: kinds.index("FROM")] if k == "ARG" and "=" in a)
    base = _expand([a for k, a in instrs if k == "FROM"][-1].split()[0], global_args)
    match = next((m for m in (p.fullmatch(base) for p in GPU_IMAGES) if m), None)
    if match is None:
        fail(f"base image {base!r} is not a CUDA/GPU image")
    if "py" in match.groupdict():
        if int(match["py"][1:]) < 11:
            fail(f"base image {base!r} has Python 3.{match['py'][1:]}; splitserve needs >= 3.11")
        if match["ray"] != rc["spec"]["rayVersion"]:
            fail(f"base image Ray {match['ray']} != RayCluster spec.rayVersion {rc['spec']['rayVersion']}")
    elif not any(k == "RUN" and re.search(r"python3\.1[1-9]", a) for k, a in instrs):
        fail(f"base image {base!r} has no Python >= 3.11; install one in a RUN")

    runs = [a for k, a in instrs if k == "RUN"]
    if not any(
        "." in shlex.split(cmd)[shlex.split(cmd).index("install") :]
        for run in runs
        for cmd in run.split("&&")
        if re.search(r"\bpip install\b", cmd)
    ):
        fail("no `pip install .` of the package")
    if any("constraints.txt" in a for _, a in instrs):
        fail("the image must not use constraints.txt (it pins the CPU torch wheel)")

    if "ENTRYPOINT" in kinds:
        fail("ENTRYPOINT would prefix the CMD that the KubeRay head command mirrors")
    if "CMD" not in kinds:
        fail("no CMD")
    cmd_at = len(kinds) - 1 - kinds[::-1].index("CMD")
    users = [a for k, a in instrs[:cmd_at] if k == "USER"]
    user = users[-1] if users else "root"
    if user.split(":")[0] in ("root", "0"):
        fail(f"the image runs as {user!r}; the last USER before CMD must not be root")
    for group, template in ray_templates(rc).items():
        run_as = template["spec"].get("securityContext", {}).get("runAsUser")
        if str(run_as) != user.split(":")[0]:
            fail(f"group {group} runs as uid {run_as}, the image as {user!r}")

    exposed = {int(p.split("/")[0]) for k, a in instrs if k == "EXPOSE" for p in a.split()}
    if exposed != {cfg.grpc_port, cfg.http_port, cfg.metrics_port}:
        fail(f"EXPOSE {sorted(exposed)} != serve config ports {[cfg.grpc_port, cfg.http_port, cfg.metrics_port]}")

    try:
        cmd = json.loads(instrs[cmd_at][1])
    except json.JSONDecodeError:
        fail(f"CMD {instrs[cmd_at][1]!r} must be in exec form (a JSON list): no shell between PID 1 and splitserve")
    if cmd != serve_command(head_script(rc)):
        fail(f"CMD {cmd} differs from the KubeRay head command {serve_command(head_script(rc))}")
    config_path = cmd[cmd.index("--config") + 1] if "--config" in cmd else None
    copies = [a.split() for k, a in instrs if k == "COPY"]
    if not any(c[-2:] == ["deploy/serve-config.yaml", config_path] for c in copies):
        fail(f"deploy/serve-config.yaml is not copied to the CMD's --config path {config_path}")

    check_baked_model(instrs, runs, user)

    image = f"splitserve:{pyproject['project']['version']}"
    for group, template in ray_templates(rc).items():
        if template["spec"]["containers"][0]["image"] != image:
            fail(f"group {group} runs {template['spec']['containers'][0]['image']!r}, expected {image!r}")


def check_baked_model(instrs: list[tuple[str, str]], runs: list[str], user: str) -> None:
    """SPLITSERVE_CACHE is a fixed absolute path the image's user owns, and the default model
    is fetched and converted into it after the package is installed."""
    env: dict[str, str] = {}
    for kind, args in instrs:
        if kind == "ENV":
            env.update(tok.split("=", 1) for tok in shlex.split(args) if "=" in tok)
    cache = env.get("SPLITSERVE_CACHE")
    if not cache or not cache.startswith("/"):
        fail(f"ENV SPLITSERVE_CACHE must be an absolute path in the image, got {cache!r}")
    owner = user.split(":")[0]
    if not any(
        re.search(rf"\bchown {owner}\S* .*(\$SPLITSERVE_CACHE|\$\{{SPLITSERVE_CACHE\}}|{re.escape(cache)})", r)
        for r in runs
    ):
        fail(f"no RUN gives the model cache {cache} to the image user {owner} (chown)")
    install = next(i for i, r in enumerate(runs) if re.search(r"\bpip install\b.* \.( |$)", r))
    if not any("fetch_model(" in r and "resolve_model_path(" in r for r in runs[install + 1 :]):
        fail("no RUN after `pip install .` bakes the default model (fetch_model + resolve_model_path)")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, approximately: the last matching pattern wins, ``!`` re-includes, and a
    pattern matching a parent directory matches everything under it."""
    ignored = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.removeprefix("!").strip("/")
        tails = [pat, pat[3:]] if pat.startswith("**/") else [pat]
        prefixes = ["/".join(parts[j:i]) for i in range(1, len(parts) + 1) for j in range(i)]
        if any(fnmatch.fnmatchcase(prefix, tail) for prefix in prefixes for tail in tails if tail):
            ignored = not negate
    return ignored


def check_dockerignore(text: str, pyproject: dict) -> None:
    patterns = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    packages = [p for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"] if "*" not in p]
    needed = ["pyproject.toml", "README.md", "deploy/serve-config.yaml", "protos/kv_transfer.proto"]
    needed += [f"{p}/__init__.py" for p in packages]
    for path in needed:
        if dockerignored(path, patterns):
            fail(f".dockerignore drops {path}, which the image build needs")
    for path in [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "constraints.txt",
        "splitserve.egg-info/PKG-INFO",
    ]:
        if not dockerignored(path, patterns):
            fail(f".dockerignore keeps {path} in the build context")


# ------------------------------------------------------------------------------ tests


@pytest.fixture
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture
def cfg() -> ServeConfig:
    return ServeConfig.from_file(SERVE_CONFIG_FILE)


def test_parser_joins_continuations_and_drops_comments():
    text = '# c\nARG X=1\nFROM a:${X}\nRUN echo a \\\n  # inner comment\n  && echo b\nCMD ["x"]\n'
    assert parse_dockerfile(text) == [
        ("ARG", "X=1"),
        ("FROM", "a:${X}"),
        ("RUN", "echo a  && echo b"),
        ("CMD", '["x"]'),
    ]


def test_shipped_dockerfile_passes(cfg, pyproject):
    check_dockerfile(DOCKERFILE.read_text(), cfg, load_raycluster(), pyproject)


def test_shipped_dockerignore_passes(pyproject):
    check_dockerignore(DOCKERIGNORE.read_text(), pyproject)


DOCKERFILE_MUTATIONS = [
    ("USER 1000:100", "USER 0", "must not be root"),
    ("USER 1000:100\n", "", "must not be root"),
    ("USER 1000:100", "USER 1001:100", "runs as uid 1000"),
    ("EXPOSE 50051 8000 9090", "EXPOSE 50051 8000", "serve config ports"),
    (', "--address", "auto"]', "]", "differs from the KubeRay head command"),
    (
        'CMD ["splitserve", "serve", "--config", "/etc/splitserve/serve-config.yaml", "--address", "auto"]',
        "CMD splitserve serve",
        "exec form",
    ),
    ("CMD [", 'ENTRYPOINT ["tini", "--"]\nCMD [', "ENTRYPOINT"),
    ("-py311-gpu", "-py311", "not a CUDA/GPU image"),
    ("-py311-gpu", "-py310-gpu", "needs >= 3.11"),
    ("ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.59.0", "spec.rayVersion"),
    ("-c /home/ray/ray-pin.txt . \\", "-c constraints.txt . \\", "constraints.txt"),
    ("-c /home/ray/ray-pin.txt . \\", "-c /home/ray/ray-pin.txt splitserve \\", "pip install ."),
    ("/etc/splitserve/serve-config.yaml\nRUN", "/etc/serve.yaml\nRUN", "--config path"),
    ("SPLITSERVE_CACHE=/opt/splitserve/cache", "SPLITSERVE_HOME=/opt/splitserve/cache", "absolute path"),
    ("SPLITSERVE_CACHE=/opt/splitserve/cache", "SPLITSERVE_CACHE=cache", "absolute path"),
    ('chown 1000:100 /home/ray/splitserve "$SPLITSERVE_CACHE"', "chown 1000:100 /home/ray/splitserve", "(chown)"),
    ("resolve_model_path(fetch_model())", "fetch_model()", "bakes the default model"),
]


@pytest.mark.parametrize(("old", "new", "match"), DOCKERFILE_MUTATIONS)
def test_a_mutated_dockerfile_fails(cfg, pyproject, old, new, match):
    text = DOCKERFILE.read_text()
    assert text.count(old) == 1, f"mutation anchor {old!r} must occur once in deploy/Dockerfile"
    with pytest.raises(ManifestError, match=re.escape(match)):
        check_dockerfile(text.replace(old, new), cfg, load_raycluster(), pyproject)


def test_image_and_uid_mismatches_with_the_raycluster_fail(cfg, pyproject):
    rc = load_raycluster()
    rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"] = "splitserve:latest"
    with pytest.raises(ManifestError, match=f"expected 'splitserve:{pyproject['project']['version']}'"):
        check_dockerfile(DOCKERFILE.read_text(), cfg, rc, pyproject)


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        ("constraints.txt\n", "constraints.txt\n*.toml\n", "drops pyproject.toml"),
        ("!deploy/serve-config.yaml\n", "", "drops deploy/serve-config.yaml"),
        ("\n.venv\n", "\n", "keeps .venv/bin/python"),
        ("\ntests\n", "\n", "keeps tests/conftest.py"),
        ("*.egg-info\n", "", "keeps splitserve.egg-info"),
    ],
)
def test_a_mutated_dockerignore_fails(pyproject, old, new, match):
    text = DOCKERIGNORE.read_text()
    assert text.count(old) == 1, f"mutation anchor {old!r} must occur once in .dockerignore"
    with pytest.raises(ManifestError, match=re.escape(match)):
        check_dockerignore(text.replace(old, new), pyproject)
