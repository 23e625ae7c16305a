"""A real ``redis-server`` for tests, on a free port of 127.0.0.1 (never a fake).

``RedisServer(password=...)`` starts one (no persistence, no config file: nothing of the
machine's Redis is touched), ``stop()`` kills it (an outage), ``start()`` brings it back on
the same port (a recovery), ``close()`` ends it for good. ``redis-server`` comes from
``make system-deps`` (scripts/install_system_deps.sh); without it the test skips locally and
fails under CI=true (tests/prereq.py). Benchmarks use the same harness, passing the binary
(``benchmark_redis_binary``: a missing one ends the script with a message).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

from tests.prereq import require


def redis_server_binary() -> str:
    __tracebackhide__ = True
    path = shutil.which("redis-server")
    require(path, "redis-server not on PATH (Debian package 'redis-server'; `make system-deps` installs it)")
    return path


def benchmark_redis_binary() -> str:
    """redis-server for a benchmark script (outside pytest): its path, or exit with how to get it."""
    path = shutil.which("redis-server")
    if path is None:
        raise SystemExit("redis-server not on PATH (scripts/install_system_deps.sh installs it)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, password: str | None = None, port: int | None = None, binary: str | None = None):
        self.binary = binary or redis_server_binary()
        self.password = password
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        """The URL without the password (pass it separately, as serve does)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        assert self.proc is None, "already running"
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    reply = s.recv(64)
                if reply.startswith((b"+PONG", b"-NOAUTH")):
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.proc.stderr.read().decode(errors='replace')}")
            assert time.monotonic() < deadline, f"redis-server not answering on port {self.port} after {timeout_s}s"
            time.sleep(0.05)  # poll interval while the server starts

    def stop(self) -> None:
        """Kill it (SIGKILL: an outage, not a shutdown)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc.stderr.close()
            self.proc = None

    def close(self) -> None:
        self.stop()
