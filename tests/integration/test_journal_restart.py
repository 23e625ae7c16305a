"""Journal test: the real ``splitserve serve --redis`` SIGKILLed with requests in flight, started
again on the same Redis, and the requests resumed through Resume.

1. A password-protected redis-server (the password in a file: ``--redis-password-file``).
2. ``serve`` (tiny model, 1 prefill + 1 decode worker) runs three long greedy streams with
   client-chosen ids, and one short request that completes. After a few tokens of each
   stream the serve process is SIGKILLed (no shutdown, no journal end written).
3. ``serve`` starts again on the same Redis (new Ray instance, new workers, new ports). A
   Generate with an id still in flight per the journal answers ALREADY_EXISTS; Resume of each
   stream from the tokens its client received continues it: received + resumed equals the
   uninterrupted greedy output of engine.LLM (no token repeated or missing). Resume of the
   completed request replays it (the journal says how it ended; nothing is generated).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import yaml

from cluster.client import AlreadyExists, Client
from engine import LLM, SamplingParams
from tests.integration.test_serve_cli import SERVE, Output, kill_all
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENGINE = {"block_size": 4, "num_blocks": 256, "max_num_batched_tokens": 32}
STARTUP_S = 180.0
LONG = 400  # long enough that no stream can finish before the kill, on any machine
PROMPTS = [[(11 * i + 7 * j) % 400 + 3 for j in range(n)] for i, n in enumerate((20, 27, 6))]


class Serve:
    """One ``splitserve serve`` process; ``grpc`` is its bound gRPC address."""

    def __init__(self, config: str, redis_url: str, password_file: str, tmp_path, tag: str):
        argv = [*SERVE, "serve", "--config", config, "--host", "127.0.0.1"]
        argv += ["--grpc-port", "0", "--http-port", "0", "--no-metrics-port", "--num-cpus", "4"]
        argv += ["--redis", redis_url, "--redis-password-file", password_file, "--prompt", "hi", "--max-tokens", "2"]
        env = {k: v for k, v in os.environ.items() if k not in ("SPLITSERVE_API_KEY", "SPLITSERVE_REDIS_PASSWORD")}
        env["PYTHONUNBUFFERED"] = "1"
        self.stderr = tmp_path / f"serve-{tag}.stderr"
        with open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        self.out = Output(self.proc.stdout)
        deadline = time.monotonic() + STARTUP_S
        self.session = self.out.wait_for(r"^Ray session (session_\S+)", deadline).group(1)
        m = self.out.wait_for(r"gRPC on 127\.0\.0\.1:(\d+)", deadline)
        self.out.wait_for(r"Press Ctrl-C to stop", deadline)
        assert "state store: redis (ok" in self.out.text, self.out.text
        self.grpc = f"127.0.0.1:{m.group(1)}"

    def kill(self) -> None:
        """SIGKILL the serve process, then clean up its Ray instance (orphaned by the kill)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        kill_all(self.session)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        kill_all(self.session)


def test_in_flight_requests_resume_after_the_serving_process_is_killed(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llama", max_position_embeddings=512)
    config = tmp_path / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": model,
                "pools": [
                    {"name": "prefill", "role": "prefill", "num_cpus": 0.5, "engine": ENGINE},
                    {"name": "decode", "role": "decode", "num_cpus": 0.5, "engine": ENGINE},
                ],
                "router": {"short_prompt_threshold": 8},
                "transfer": {"kind": "shm"},
            }
        )
    )
    password_file = tmp_path / "redis-password"
    password_file.write_text("journal-test-pw\n")
    greedy = dict(temperature=0.0, ignore_eos=True)
    llm = LLM(model, **ENGINE)
    expected = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=LONG, **greedy))]
    short_expected = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=5, **greedy))[0].token_ids
    del llm

    redis = RedisServer(password="journal-test-pw")
    first = second = None
    try:
        first = Serve(str(config), redis.url, str(password_file), tmp_path, "1")
        received: list[list[int]] = []
        with Client(first.grpc, timeout=120) as c:
            done = c.generate(PROMPTS[0], request_id="done-1", max_tokens=5, **greedy)
            assert done.token_ids == short_expected
            streams = [c.stream(p, request_id=f"live-{i}", max_tokens=LONG, **greedy) for i, p in enumerate(PROMPTS)]
            for i, s in enumerate(streams):
                got: list[int] = []
                for chunk in s:
                    got += chunk.token_ids
                    if len(got) >= 3 + 2 * i:
                        break  # the call stays open: the kill interrupts it
                received.append(got)
            first.kill()  # the whole serving process, with the three requests in flight
            for s in streams:
                s.close()
        assert all(0 < len(r) < LONG for r in received), [len(r) for r in received]

        second = Serve(str(config), redis.url, str(password_file), tmp_path, "2")
        with Client(second.grpc, timeout=120) as c:
            for i, p in enumerate(PROMPTS):  # every one of them was in flight: none is a replay
                with pytest.raises(AlreadyExists, match="continue it with Resume"):
                    list(c.stream(p, request_id=f"live-{i}", max_tokens=4))
            resumed = []
            for i, got in enumerate(received):
                chunks = list(c.resume(f"live-{i}", len(got)))
                assert chunks[0].index == len(got)
                assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == LONG
                resumed.append([t for ch in chunks for t in ch.token_ids])
            replay = list(c.resume("done-1", 2))
            info = c.server_info()
        assert [g + r for g, r in zip(received, resumed)] == expected
        assert [t for ch in replay for t in ch.token_ids] == short_expected[2:]
        assert replay[-1].finish_reason == "length"
        assert (info.state_store, info.state_store_status) == ("redis", "ok")
    finally:
        for s in (first, second):
            if s is not None:
                s.stop()
        redis.close()
