"""The Ray containers' commands (raycluster.yaml), run for real: mostly the head's supervisor.

Stand-ins on PATH replace Ray and splitserve:
- ``$KUBERAY_GEN_RAY_START_CMD`` = fake-ray-head ARGS: records ARGS, creates a "GCS up" marker,
  then blocks like ``ray start --block`` until the test writes an exit status into ``ray-exit``.
  The test writes ARGS the way KubeRay does (``--resources="{\"x\": 1}"``,
  ``--redis-password=$REDIS_PASSWORD``), so a script that does not parse the generated command
  with a shell would pass them to Ray mangled;
- ``ray health-check`` succeeds once the marker exists (polling briefly, like a connect timeout);
- ``splitserve`` records its argv and whether it got SIGTERM.
Contract checked: Ray gets the generated arguments intact; splitserve starts only after the GCS answers, with the exact command of the
Dockerfile CMD; whichever of Ray / splitserve ends first ends the script (so the container, and
the kubelet restarts both); SIGTERM drains splitserve first; Ray dying early is a loud failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.unit.deploy.deploy_helpers import head_script, load_raycluster, ray_resources, serve_command

FAKES = {
    "fake-ray-head": """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_DIR/ray-args"
touch "$FAKE_DIR/gcs-up"
while [ ! -e "$FAKE_DIR/ray-exit" ]; do sleep 0.02; done
exit "$(cat "$FAKE_DIR/ray-exit")"
""",
    "fake-ray-crash": "#!/bin/bash\nexit 7\n",
    "fake-ray-worker": '#!/bin/bash\nprintf \'%s\\n\' "$@" > "$FAKE_DIR/ray-args"\n',
    "fake-ray-hang": "#!/bin/bash\nexec sleep 60\n",
    "ray": """#!/bin/bash
[ "$1" = health-check ] || { echo "fake ray: unexpected $*" >&2; exit 2; }
for _ in $(seq 25); do [ -e "$FAKE_DIR/gcs-up" ] && exit 0; sleep 0.02; done
exit 1
""",
    "splitserve": """#!/bin/bash
trap 'echo TERM > "$FAKE_DIR/serve-signal"; exit 0' TERM
printf '%s\\n' "$@" > "$FAKE_DIR/serve-args.tmp" && mv "$FAKE_DIR/serve-args.tmp" "$FAKE_DIR/serve-args"
[ -n "${FAKE_SERVE_RC:-}" ] && exit "$FAKE_SERVE_RC"
while true; do sleep 0.02; done
""",
}


class HeadRun:
    def __init__(self, tmp_path: Path, ray_cmd: str, **env: str) -> None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for name, text in FAKES.items():
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        self.dir = tmp_path
        script = head_script(load_raycluster())
        full_env = {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "FAKE_DIR": str(tmp_path),
            "KUBERAY_GEN_RAY_START_CMD": ray_cmd,
            **env,
        }
        # stderr to a file, not a pipe: the backgrounded fake Ray head keeps a pipe open after bash exits
        self.err_path = tmp_path / "stderr"
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                ["bash", "-c", script], env=full_env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
            )

    def wait_for_file(self, name: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while not (self.dir / name).exists():
            assert self.proc.poll() is None, (
                f"exited ({self.proc.returncode}) before {name}: {self.err_path.read_text()}"
            )
            assert time.monotonic() < deadline, f"{name} not written within {timeout}s"
            time.sleep(0.02)
        return (self.dir / name).read_text()

    def finish(self, timeout: float = 20.0) -> tuple[int, str]:
        try:
            return self.proc.wait(timeout=timeout), self.err_path.read_text()
        finally:
            try:  # the backgrounded fake Ray head outlives bash, as it would die with a container
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_head_script_is_valid_bash():
    result = subprocess.run(
        ["bash", "-n", "-c", head_script(load_raycluster())], capture_output=True, text=True, timeout=10
    )
    assert result.returncode == 0, result.stderr


# what KubeRay puts in $KUBERAY_GEN_RAY_START_CMD for the head with GCS fault tolerance (abridged)
GENERATED_HEAD = 'fake-ray-head --head --resources="{\\"x\\": 1}" --redis-password=$REDIS_PASSWORD --block'


def test_head_runs_splitserve_after_the_gcs_answers_and_exits_with_its_status(tmp_path):
    run = HeadRun(tmp_path, GENERATED_HEAD, FAKE_SERVE_RC="3", REDIS_PASSWORD="s3cret")
    rc_, err = run.finish()
    assert rc_ == 3, err
    ray_args = (tmp_path / "ray-args").read_text().splitlines()
    assert ray_args == ["--head", '--resources={"x": 1}', "--redis-password=s3cret", "--block"]
    assert (tmp_path / "serve-args").read_text().split() == serve_command(head_script(load_raycluster()))[1:]
    assert "splitserve exited (status 3)" in err


def test_head_stops_splitserve_when_ray_exits(tmp_path):
    run = HeadRun(tmp_path, "fake-ray-head")
    run.wait_for_file("serve-args")
    (tmp_path / "ray-exit").write_text("5")
    rc_, err = run.finish()
    assert rc_ == 5, err
    assert (tmp_path / "serve-signal").read_text().strip() == "TERM"


def test_head_forwards_sigterm_to_splitserve(tmp_path):
    run = HeadRun(tmp_path, "fake-ray-head")
    run.wait_for_file("serve-args")
    run.proc.send_signal(signal.SIGTERM)
    rc_, err = run.finish()
    assert rc_ == 143, err
    assert (tmp_path / "serve-signal").read_text().strip() == "TERM"


def test_head_fails_without_starting_splitserve_when_ray_dies_first(tmp_path):
    rc_, err = HeadRun(tmp_path, "fake-ray-crash").finish()
    assert rc_ == 1 and "exited before the GCS answered" in err
    assert not (tmp_path / "serve-args").exists()


def test_head_gives_up_when_the_gcs_never_answers(tmp_path):
    rc_, err = HeadRun(tmp_path, "fake-ray-hang", SPLITSERVE_GCS_WAIT_S="0").finish()
    assert rc_ == 1 and "GCS not answering after 0s" in err
    assert not (tmp_path / "serve-args").exists()


@pytest.mark.parametrize("group", ["prefill", "decode", "attention", "expert"])
def test_worker_command_passes_quoted_resources_to_ray_intact(tmp_path, group):
    spec = next(g for g in load_raycluster()["spec"]["workerGroupSpecs"] if g["groupName"] == group)
    container = spec["template"]["spec"]["containers"][0]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "fake-ray-worker").write_text(FAKES["fake-ray-worker"])
    (bin_dir / "fake-ray-worker").chmod(0o755)
    # KubeRay renders each rayStartParams entry as --key=value, the value verbatim
    generated = (
        f"fake-ray-worker --address=splitserve-head-svc:6379 --resources={spec['rayStartParams']['resources']} --block"
    )
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path), "KUBERAY_GEN_RAY_START_CMD": generated}
    command = ["-c" if c == "-lc" else c for c in container["command"]]  # no login shell: keep the test's PATH
    result = subprocess.run([*command, *container["args"]], env=env, capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "ray-args").read_text().splitlines()
    resources = next(a for a in args if a.startswith("--resources="))
    assert json.loads(resources.removeprefix("--resources=")) == ray_resources(spec["rayStartParams"]["resources"])
    assert args[-1] == "--block"
