"""The real ``splitserve serve`` as a subprocess on the real model, with another Ray cluster running.

One run, in the order a user meets it:

1. A "foreign" Ray cluster is started with ``ray start --head`` (its own temp dir and port) and
   ``RAY_ADDRESS`` points at it, as after a user's own ``ray start`` or a killed test run.
   ``serve`` without ``--address`` must start its own local instance anyway.
2. ``serve --model <SmolLM2 .gguf>`` on ports 0; the bound ports and the Ray session are read
   from its output. The demo prompt is answered (Paris).
3. The gRPC SDK (cluster.client) generates, and GetServerInfo shows the workers' real KV block
   counts (what the engine's default 1 GiB pool holds of this model, also printed at startup).
4. The official ``openai`` client: a chat completion goes through the model's chat template
   (chat_template.jinja of the converted GGUF) and names Paris.
5. SIGINT: exit status 130, "stopped.", no traceback, and none of that serve's Ray processes
   is left (identified by its session name in their command lines or open files), while the
   foreign cluster's processes are untouched.

The real model comes from tests/real_model.py: skipped locally when it cannot be fetched, a
failure under CI=true.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.real_model import real_model_dir, real_model_gguf

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
STARTUP_S = 180.0  # the serve process: Ray, two workers loading 135M parameters, the frontends
QUESTION = "What is the capital of France?"


def session_processes(needle: str) -> dict[int, str]:
    """{pid: command line} of every process whose command line or open files name ``needle``
    (a Ray session name or temp dir). Ray's worker processes rename themselves
    (``ray::DecodeActor``) but keep their session's log files open."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited meanwhile
        try:
            files = [os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(f"/proc/{entry}/fd")]
        except OSError:
            files = []
        if needle in cmd or any(needle in f for f in files):
            found[int(entry)] = cmd.strip()
    return found


def wait_until_gone(needle: str, timeout_s: float) -> dict[int, str]:
    """Poll until no process names ``needle`` (or the deadline); the processes left."""
    deadline = time.monotonic() + timeout_s
    while (left := session_processes(needle)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def kill_all(needle: str) -> None:
    """SIGTERM, then SIGKILL after 10 s, every process naming ``needle`` (cleanup only)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_processes(needle):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if not wait_until_gone(needle, 10.0):
            return


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Output:
    """A subprocess's stdout, read line by line on a thread; ``wait_for`` blocks on the lines."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, deadline: float) -> re.Match[str]:
        regex = re.compile(pattern)
        for line in self.lines:
            if m := regex.search(line):
                return m
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} in time; output:\n{self.text}") from None
            if line is None:
                raise AssertionError(f"output ended without {pattern!r}:\n{self.text}")
            self.lines.append(line)
            if m := regex.search(line):
                return m

    def rest(self, timeout_s: float) -> str:
        """All the output, once the stream has ended (or ``timeout_s`` passed)."""
        self._thread.join(timeout_s)
        while not self._queue.empty():
            if (line := self._queue.get_nowait()) is not None:
                self.lines.append(line)
        return self.text

    @property
    def text(self) -> str:
        return "".join(self.lines)


# ``python -m cluster`` as a terminal starts it: Ctrl-C (SIGINT) raises KeyboardInterrupt.
# A process started in the background by a shell without job control inherits SIGINT ignored
# (POSIX), and Python then installs no handler: serve would never see the tests' Ctrl-C (the
# shutdown "hang" of fresh-clone runs launched in the background). The prelude restores it.
SERVE = [
    sys.executable,
    "-c",
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('cluster', run_name='__main__', alter_sys=True)",
]


def wait_or_explain(proc: subprocess.Popen, timeout_s: float, out: Output, stderr_file) -> int:
    """proc's exit status once it exits within ``timeout_s``; else a failure that carries its
    threads' Python stacks (serve dumps them on SIGUSR1, see cmd_serve) and its output tails."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10.0
        while "most recent call first" not in stderr_file.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)  # poll interval: the dump is written by the process, no event to wait on
        proc.kill()
        raise AssertionError(
            f"no exit {timeout_s:.0f}s after the signal; stacks and stderr:\n{stderr_file.read_text()[-12000:]}"
            f"\nstdout:\n{out.rest(5)[-4000:]}"
        ) from None


@pytest.fixture(scope="module")
def smollm2() -> tuple[str, str]:
    """(.gguf path, converted directory) of SmolLM2-135M-Instruct (skip locally / fail in CI)."""
    return real_model_gguf(), real_model_dir()


@pytest.fixture
def foreign_ray():
    """Another Ray cluster on this machine (``ray start --head``, own temp dir); its address."""
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    ray_cli = Path(sys.executable).parent / "ray"
    cmd = [str(ray_cli), "start", "--head", f"--port={port}", f"--temp-dir={temp}", "--num-cpus=1"]
    cmd += ["--include-dashboard=false", "--disable-usage-stats"]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
        assert session_processes(temp), "ray start left no process behind"
        yield f"127.0.0.1:{port}", temp
    finally:
        kill_all(temp)


def test_serve_on_the_real_model_beside_another_ray_cluster(smollm2, foreign_ray, tmp_path):
    import openai

    from cluster.client import Client

    gguf, converted = smollm2
    foreign_address, foreign_temp = foreign_ray
    foreign_before = set(session_processes(foreign_temp))
    env = {k: v for k, v in os.environ.items() if k != "SPLITSERVE_API_KEY"}
    env.update(RAY_ADDRESS=foreign_address, PYTHONUNBUFFERED="1")
    argv = [*SERVE, "serve", "--model", gguf, "--host", "127.0.0.1"]
    argv += ["--grpc-port", "0", "--http-port", "0", "--metrics-port", "0", "--prompt", QUESTION, "--max-tokens", "16"]
    stderr_file = tmp_path / "serve.stderr"
    t0 = time.monotonic()
    with open(stderr_file, "w") as stderr:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    out = Output(proc.stdout)
    session = None
    try:
        deadline = time.monotonic() + STARTUP_S
        session = out.wait_for(r"^Ray session (session_\S+)", deadline).group(1)
        ports = out.wait_for(
            r"gRPC on 127\.0\.0\.1:(\d+), OpenAI-compatible HTTP on http://127\.0\.0\.1:(\d+)/v1", deadline
        )
        grpc_port, http_port = int(ports.group(1)), int(ports.group(2))
        out.wait_for(r"Press Ctrl-C to stop", deadline)
        startup_s = time.monotonic() - t0
        # the driver resolved the .gguf once, the workers run its converted directory
        assert f"model {converted}, KV transport shm" in out.text
        assert re.search(r"\[0\] What is the capital of France\?\n\s+-> .*Paris", out.text), out.text
        assert "through the chat template" in out.text

        # serve's own Ray instance: its processes, the two worker actors among them
        mine = session_processes(session)
        assert any("raylet" in c for c in mine.values()) and any("gcs_server" in c for c in mine.values())
        assert any(c.startswith("ray::PrefillActor") for c in mine.values()), mine
        assert any(c.startswith("ray::DecodeActor") for c in mine.values()), mine
        assert not set(mine) & set(session_processes(foreign_temp)), "serve joined the foreign cluster"

        with Client(f"127.0.0.1:{grpc_port}", timeout=60) as client:
            done = client.generate(QUESTION, max_tokens=8, temperature=0.0)
            assert done.finish_reason in ("length", "stop") and 0 < len(done.token_ids) <= 8
            info = client.server_info()
            assert sorted(w.role for w in info.workers) == ["decode", "prefill"]
            # --model keeps the engine's default KV pool: 1 GiB of fp32 blocks of 16 tokens, each
            # token 30 layers x (K, V) x 3 KV heads x 64 dims x 4 bytes
            blocks = (1 << 30) // (16 * 30 * 2 * 3 * 64 * 4)
            assert blocks == 1456 and re.search(rf"prefill-0 .* KV blocks {blocks}/{blocks}", out.text)
            for w in info.workers:
                assert w.total_kv_blocks == blocks and 0 < w.free_kv_blocks <= blocks, info
            assert client.model_info().vocab_size == 49152

        api = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", timeout=60)
        model = api.models.list().data[0].id
        assert model == "SmolLM2-135M-Instruct.Q4_1"
        chat = api.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=32
        )
        answer = chat.choices[0].message.content
        assert "Paris" in answer, answer
        assert chat.choices[0].finish_reason == "stop"  # EOS (<|im_end|>) ended it, not max_tokens
        # the prompt was the chat template's: system turn + user turn + assistant header
        assert chat.usage.prompt_tokens > 20

        t_stop = time.monotonic()
        proc.send_signal(signal.SIGINT)
        status = wait_or_explain(proc, 90.0, out, stderr_file)
        stop_s = time.monotonic() - t_stop
        text = out.rest(10)
        stderr_text = stderr_file.read_text()
        assert status == 130, (status, text, stderr_text)
        assert text.rstrip().endswith("stopped.") and "shutting the workers down" in text
        assert "Traceback" not in stderr_text + text, stderr_text
        left = wait_until_gone(session, 30.0)
        assert not left, f"processes of serve's Ray session {session} left: {left}"
        assert foreign_before <= set(session_processes(foreign_temp)), "serve stopped the foreign cluster"
        print(f"serve startup {startup_s:.1f}s, shutdown {stop_s:.1f}s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        if session is not None:
            kill_all(session)
