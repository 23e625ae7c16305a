"""Soak: `splitserve serve --redis` under a steady mix of valid and invalid requests, cancels
and deadlines for a long while; are requests lost, and does memory grow?

    .venv/bin/python benchmarks/soak.py                     # 10 minutes, tiny model
    .venv/bin/python benchmarks/soak.py --minutes 2         # a shorter run
    .venv/bin/python benchmarks/soak.py --real              # SmolLM2-135M-Instruct

The serving process is the real CLI (a subprocess: 1 prefill + 1 decode worker on its own
local Ray, shm, the Redis state store on a local redis-server). ``--clients`` concurrent loops
in this process each send, one after the other, a request drawn from MIX:

    grpc          a gRPC stream (SDK), random prompt and max_tokens, greedy: must end with
                  finish_reason "length" and exactly max_tokens tokens
    http          an OpenAI /v1/completions call (half streamed): same check
    invalid       a request the server must refuse (token id outside the vocabulary, max_tokens
                  past the context, an empty prompt, temperature < 0): INVALID_ARGUMENT / 400
    cancel        a gRPC stream the client closes after a few tokens
    deadline      a gRPC stream with a deadline shorter than its generation: DEADLINE_EXCEEDED
                  (or a finish, if it was fast enough)
    resume        a gRPC stream closed after a few tokens, then Resumed from there: received +
                  resumed must be max_tokens tokens with finish_reason "length"

A request is "lost" when it gets no answer within ``--watchdog`` seconds, or when an answer
breaks its contract (a valid request without its tokens, an invalid one accepted). Lost must
be 0. RSS: the serving process tree (the driver, its Ray processes, the worker actors),
sampled after a warm-up minute and at the end; the growth per process is reported.

Writes ``benchmarks/results/soak.json`` (+ ``soak_rss.png``: RSS over time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MIX = {"grpc": 40, "http": 15, "invalid": 15, "cancel": 10, "deadline": 10, "resume": 10}


def session_pids(session: str) -> dict[int, str]:
    """{pid: name} of every process of a Ray session (command line or open files name it)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fds = [os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(f"/proc/{entry}/fd")]
        except OSError:
            continue
        if session in cmd or any(session in f for f in fds):
            found[int(entry)] = cmd.split()[0] if cmd.strip() else "?"
    return found


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.outcomes: Counter[str] = Counter()  # "<kind>:<result>"
        self.lost: list[str] = []
        self.served = 0

    async def one(self, kind: str, rng: random.Random, grpc_target: str, http_base: str, vocab: int) -> None:
        import grpc
        import httpx

        from cluster.client import AsyncClient, SplitServeError

        n = rng.randint(4, self.args.max_tokens)
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(3, self.args.max_prompt))]
        greedy = dict(temperature=0.0, ignore_eos=True)
        async with AsyncClient(grpc_target, max_retries=2) as c:
            try:
                if kind == "grpc":
                    out = await c.generate(prompt, max_tokens=n, **greedy)
                    self._check(kind, out.finish_reason == "length" and len(out.token_ids) == n, out)
                elif kind == "http":
                    stream = rng.random() < 0.5
                    body = {"prompt": prompt, "max_tokens": n, "stream": stream, "return_token_ids": True, **greedy}
                    async with httpx.AsyncClient(base_url=http_base, timeout=self.args.watchdog) as h:
                        r = await h.post("/v1/completions", json=body)
                    if stream:
                        # SSE lines end at \n only (str.splitlines would also split inside the JSON)
                        events = [json.loads(x[6:]) for x in r.text.split("\n") if x.startswith("data: {")]
                        ids = [t for e in events for ch in e["choices"] for t in ch.get("token_ids", [])]
                        fin = [ch["finish_reason"] for e in events for ch in e["choices"] if ch["finish_reason"]]
                        ok = r.status_code == 200 and len(ids) == n and fin == ["length"]
                    else:
                        ok = r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == n
                    self._check(kind, ok, r.status_code)
                elif kind == "invalid":
                    bad = rng.choice(("vocab", "max_tokens", "empty", "temperature"))
                    sampling = {"max_tokens": 4}
                    p: list[int] | str = prompt
                    if bad == "vocab":
                        p = prompt + [vocab + 5]
                    elif bad == "max_tokens":
                        sampling["max_tokens"] = 10**6
                    elif bad == "empty":
                        p = []
                    else:
                        sampling["temperature"] = -1.0
                    try:
                        await c.generate(p, **sampling)
                        self._check(kind, False, f"{bad} accepted")
                    except SplitServeError as e:
                        self._check(kind, e.code == grpc.StatusCode.INVALID_ARGUMENT, e)
                elif kind in ("cancel", "resume"):
                    rid = f"soak-{kind}-{rng.getrandbits(48):x}"
                    got: list[int] = []
                    stop_at = rng.randint(1, max(1, n - 1))
                    async for ch in c.stream(prompt, request_id=rid, max_tokens=n, **greedy):
                        got += ch.token_ids
                        if len(got) >= stop_at or ch.finish_reason:
                            break
                    if kind == "cancel":
                        self._check(kind, 0 < len(got) <= n, got)
                    else:
                        rest, last = [], None
                        async for ch in c.resume(rid, len(got)):
                            rest += ch.token_ids
                            last = ch
                        self._check(kind, len(got) + len(rest) == n and last.finish_reason == "length", last)
                elif kind == "deadline":
                    try:
                        out = await c.generate(prompt, max_tokens=n, timeout=rng.uniform(0.01, 0.3), **greedy)
                        self._check(kind, len(out.token_ids) == n, out)
                    except SplitServeError as e:
                        self._check(kind, e.code == grpc.StatusCode.DEADLINE_EXCEEDED, e)
            except SplitServeError as e:
                self.outcomes[f"{kind}:{e.code.name}"] += 1  # an explicit error: counted, not lost
            except Exception as e:  # a broken contract of the transport itself
                self._check(kind, False, f"{type(e).__name__}: {e}")

    def _check(self, kind: str, ok: bool, what: object) -> None:
        self.outcomes[f"{kind}:{'ok' if ok else 'BROKEN'}"] += 1
        if ok:
            self.served += 1
        else:
            self.lost.append(f"{kind}: {what!r}"[:300])

    async def client(self, k: int, until: float, grpc_target: str, http_base: str, vocab: int) -> None:
        rng = random.Random(1000 + k)
        kinds, weights = zip(*MIX.items())
        while time.monotonic() < until:
            kind = rng.choices(kinds, weights)[0]
            try:
                await asyncio.wait_for(self.one(kind, rng, grpc_target, http_base, vocab), self.args.watchdog)
            except TimeoutError:
                self.lost.append(f"{kind}: no answer within {self.args.watchdog}s")
                self.outcomes[f"{kind}:LOST"] += 1


def _actor(title: str) -> str:
    return title.split(".", 1)[0] if title.startswith("ray::") else title


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-prompt", type=int, default=64)
    ap.add_argument("--watchdog", type=float, default=120.0)
    ap.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct instead of the tiny Llama")
    ap.add_argument("--tag", default="", help="results/soak<_tag>.json (e.g. a variant of the environment)")
    args = ap.parse_args()
    from benchmarks.common import RESULTS_DIR, machine_description

    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    if args.real:
        from cluster.model_store import fetch_model
        from engine.models.gguf import resolve_model_path

        model, engine = resolve_model_path(fetch_model()), {"num_blocks": 256}
    else:
        from engine.models.tiny import build_tiny_checkpoint

        model = build_tiny_checkpoint(tmp / "tiny", family="llama", max_position_embeddings=512)
        engine = {"block_size": 16, "num_blocks": 256}
    config = tmp / "serve.json"
    config.write_text(json.dumps({
        "model": str(model),
        "pools": [{"name": "prefill", "role": "prefill", "num_cpus": 0.5, "engine": engine},
                  {"name": "decode", "role": "decode", "num_cpus": 0.5, "engine": engine}],
        "router": {"short_prompt_threshold": 16}, "transfer": {"kind": "shm"}, "max_queue": 64,
    }))  # fmt: skip
    from tests.redis_server import RedisServer, benchmark_redis_binary

    redis = RedisServer(binary=benchmark_redis_binary())  # answers PING before serve starts
    argv = [sys.executable, "-m", "cluster", "serve", "--config", str(config), "--host", "127.0.0.1",
            "--grpc-port", "0", "--http-port", "0", "--no-metrics-port", "--num-cpus", "2",
            "--redis", redis.url, "--prompt", "hi", "--max-tokens", "2"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(tmp / "serve.log", "w")
    serve = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    session = grpc_target = http_base = None
    redis_ok = False  # the soak measures serving with the Redis journal, not a degraded store
    for line in serve.stdout:
        log.write(line)
        redis_ok = redis_ok or "state store: redis (ok" in line
        if line.startswith("Ray session "):
            session = line.split()[2]
        if line.startswith("gRPC on "):
            parts = line.split()
            grpc_target, http_base = parts[2].rstrip(","), parts[6].rstrip(",").removesuffix("/v1")
        if "Press Ctrl-C to stop" in line:
            break
    else:
        sys.exit(f"serve did not start; see {tmp / 'serve.log'}")
    if not redis_ok:
        serve.kill()
        sys.exit(f"serve did not report its Redis state store as ok; see {tmp / 'serve.log'}")
    from engine.config import ModelConfig

    vocab = ModelConfig.from_hf_dir(str(model)).vocab_size
    soak = Soak(args)
    samples: list[dict] = []
    load_before = os.getloadavg()

    def sample(t0: float) -> dict:
        procs = session_pids(session) | {serve.pid: "driver"}
        # a Ray worker's title names the task it runs ("ray::DecodeActor.start_transfer"):
        # keyed by the actor, so one process keeps one key across samples
        per = {f"{_actor(name)}:{pid}": rss_mib(pid) for pid, name in procs.items()}
        per = {k: v for k, v in per.items() if v is not None}
        return {"t": time.monotonic() - t0, "total_mib": sum(per.values()), "per_process": per}

    async def run() -> None:
        t0 = time.monotonic()
        until = t0 + args.minutes * 60
        clients = [
            asyncio.create_task(soak.client(k, until, grpc_target, http_base, vocab)) for k in range(args.clients)
        ]
        while not all(c.done() for c in clients):
            samples.append(sample(t0))
            await asyncio.sleep(10)
        await asyncio.gather(*clients)
        samples.append(sample(t0))

    try:
        asyncio.run(run())
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(90)
        except subprocess.TimeoutExpired:
            serve.kill()
        redis.close()
        log.close()
    warm = next((s for s in samples if s["t"] >= 60), samples[0])
    end = samples[-1]
    growth = {k: round(end["per_process"][k] - warm["per_process"][k], 1)
              for k in end["per_process"] if k in warm["per_process"]}  # fmt: skip
    errors = {k: v for k, v in soak.outcomes.items() if not k.endswith(":ok")}
    result = {
        "machine": machine_description(),
        "args": vars(args),
        "ray_env": {k: v for k, v in os.environ.items() if k.startswith("RAY_")},
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "requests": sum(soak.outcomes.values()),
        "served_ok": soak.served,
        "outcomes": dict(sorted(soak.outcomes.items())),
        "explicit_errors": errors,
        "lost": len(soak.lost),
        "lost_examples": soak.lost[:20],
        "rss_warm_mib": round(warm["total_mib"], 1),
        "rss_end_mib": round(end["total_mib"], 1),
        "rss_growth_mib": round(end["total_mib"] - warm["total_mib"], 1),
        "rss_growth_per_process_mib": growth,
        "samples": samples,
    }
    name = ("soak_real" if args.real else "soak") + (f"_{args.tag}" if args.tag else "")
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot([s["t"] / 60 for s in samples], [s["total_mib"] for s in samples])
        ax.set_xlabel("minutes")
        ax.set_ylabel("RSS of the serving process tree (MiB)")
        ax.set_title(f"soak: {result['requests']} requests, lost {result['lost']}")
        fig.tight_layout()
        fig.savefig(RESULTS_DIR / f"{name}_rss.png", dpi=100)
    except ImportError:
        pass
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "machine")}, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
