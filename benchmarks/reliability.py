"""Fault injection on the real model: what each fault costs the clients in flight.

    .venv/bin/python benchmarks/reliability.py                       # every scenario, ~6 min
    .venv/bin/python benchmarks/reliability.py --scenario decode-kill-1d decode-kill-2d

SmolLM2-135M-Instruct (fetched once, cluster/model_store.py), greedy with ``ignore_eos``. Every
completed output is checked token by token against transformers' full forward (each
generated token the argmax of the no-cache forward over prompt + tokens before it, within
1e-3 logits: a tie), so "completed correctly" means no token lost, repeated or wrong.

Scenarios (FAULTS; each a function returning one table row):

    decode-kill-1d   Ray, 1 prefill + 1 decode (shm); 4 streams of 150 tokens; the decode
                     worker's process SIGKILLed once every stream has ~10 tokens: the streams
                     wait for the replacement and continue there (the issue's scenario)
    decode-kill-2d   the same with 2 decode workers: the streams of the killed one move to
                     the other at once
    prefill-kill     Ray, 2 prefill + 1 decode; 4 requests with 600-token prompts; one prefill
                     worker SIGKILLed while prefilling: its requests go to the other
    kv-corruption    in process (LocalCluster, shm); every 3rd KV transfer corrupted (a flipped
                     byte): the checksum fails, the transfer is retried fresh
    redis-outage     in process with the Redis store; redis-server SIGKILLed mid-stream for
                     3 s, then started again: serving goes on, the store reconnects and
                     rewrites the live journals (each complete afterwards)
    serve-restart    `splitserve serve --redis` SIGKILLed with 4 streams in flight, started
                     again; the clients Resume from the tokens they received

Recovery time: from the fault to the first token any affected stream received after it
(serve-restart: to the first resumed token, the new process's start included; redis-outage:
from Redis answering again to the store being ok). "Lost" counts requests that ended neither
complete nor with an explicit error: it must be 0.

Writes ``benchmarks/results/reliability.json`` and prints the markdown table.
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
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.redis_server import RedisServer, benchmark_redis_binary  # noqa: E402

MAX_TOKENS = 150
ENGINE = {"num_blocks": 256, "max_num_batched_tokens": 256}
QUESTIONS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 plus 30?",
    "Explain in one sentence what a CPU does.",
    "Give me a synonym for happy.",
    "Why is the sky blue?",
    "List two prime numbers.",
)


@dataclass
class Row:
    scenario: str
    faults: str
    affected: int  # requests in flight on what the fault hit
    completed_correctly: int  # of all requests, complete and argmax-consistent
    requests: int
    explicit_errors: int
    lost: int
    recovery_s: float | None
    detail: str
    # per request: seconds from the start of the scenario to each token's arrival, and the fault's time
    traces: list[list[float]] | None = None
    fault_s: float | None = None


# ---------------------------------------------------------------- model and reference
class Model:
    def __init__(self) -> None:
        import torch
        import transformers

        from cluster.model_store import fetch_model
        from engine.models.gguf import resolve_model_path
        from engine.tokenizer import Tokenizer

        self.gguf = fetch_model(progress=True)
        self.dir = resolve_model_path(self.gguf)
        transformers.logging.set_verbosity_error()
        self.hf = transformers.AutoModelForCausalLM.from_pretrained(self.dir, dtype=torch.float32).eval()
        tok = transformers.AutoTokenizer.from_pretrained(self.dir)
        self.chats = []
        for q in QUESTIONS:
            text = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
            self.chats.append(tok(text, add_special_tokens=False).input_ids)
        self.tokenizer = Tokenizer(self.dir)

    def correct(self, prompt: list[int], generated: list[int], tie: float = 1e-3) -> bool:
        """Every generated token is the argmax of the full forward (or within ``tie`` of it)."""
        import torch

        if not generated:
            return False
        with torch.inference_mode():
            logits = self.hf(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1 : -1]
        best = logits.argmax(-1)
        for pos, t in enumerate(generated):
            if t != best[pos].item() and (logits[pos, best[pos]] - logits[pos, t]).item() > tie:
                return False
        return True

    def long_prompts(self, n: int, length: int) -> list[list[int]]:
        rng = random.Random(7)
        text = " ".join(
            rng.choice(("the", "river", "stone", "light", "across", "slowly", "city")) for _ in range(length)
        )
        ids = self.tokenizer.encode(text)[:length]
        return [ids[i:] + ids[:i] for i in range(n)]  # distinct prompts, no shared prefix cache hits


# ---------------------------------------------------------------- Ray scenarios
def _ray_config(model_dir: str, prefill: int, decode: int):
    from cluster.config import FailoverConfig, PoolConfig, RouterConfig, ServeConfig, TransferConfig

    return ServeConfig(
        model=model_dir,
        pools=(
            PoolConfig("prefill", "prefill", prefill, num_cpus=0.5, engine=ENGINE),
            PoolConfig("decode", "decode", decode, num_cpus=0.5, engine=ENGINE),
        ),
        router=RouterConfig(short_prompt_threshold=1, decode_policy="jsq"),
        transfer=TransferConfig(kind="shm"),
        failover=FailoverConfig(wait_for_worker_s=300.0),
    )


def _index(request_id: str) -> int:
    """The prompt index of a request id "<scenario>-<index>"."""
    return int(request_id.rsplit("-", 1)[1])


async def _kill_actor(controller, wid: str) -> float:
    pid = await controller.workers[wid].actor.__ray_call__.remote(lambda self: os.getpid())
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


def ray_scenario(
    model: Model, name: str, prefill: int, decode: int, prompts: list[list[int]], max_tokens: int, kill
) -> Row:
    import ray

    from cluster.control.controller import Controller, ControllerOptions
    from engine.request import SamplingParams
    from engine.types import RequestSpec

    options = ControllerOptions(health_interval_s=0.5, ping_timeout_s=10.0, restart_backoff_s=1.0, read_timeout_s=0.5)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)

    async def run():
        c = await Controller(_ray_config(model.dir, prefill, decode), options).start()
        try:
            t0 = time.monotonic()
            outs = [[] for _ in prompts]
            arrivals = [[] for _ in prompts]
            ends: list = [None] * len(prompts)

            async def one(i: int) -> None:
                async for chunk in c.router.generate(RequestSpec(f"{name}-{i}", prompts[i], params)):
                    outs[i] += chunk.token_ids
                    arrivals[i].append(time.monotonic())
                    if chunk.finished:
                        ends[i] = chunk

            tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
            killed_at, affected = await kill(c, outs)
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 900)
            raised = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
            after = [next((t for t in ts if t > killed_at), None) for ts in arrivals]
            hit = list(affected)
            recovery = max((after[i] - killed_at for i in hit if after[i] is not None), default=None)
            traces = [[t - t0 for t in ts] for ts in arrivals]
            return outs, ends, hit, recovery, dict(c.router.stats.failovers), traces, killed_at - t0, raised
        finally:
            await c.shutdown()

    try:
        outs, ends, hit, recovery, failovers, traces, fault_s, raised = asyncio.run(run())
    finally:
        ray.shutdown()
    correct = sum(
        1
        for p, o, e in zip(prompts, outs, ends)
        if e is not None and e.finish_reason == "length" and len(o) == max_tokens and model.correct(p, o)
    )
    errors = sum(1 for e in ends if e is not None and e.error is not None)
    detail = f"failovers {failovers}" + (f"; raised: {raised}" if raised else "")  # each also counted lost
    return Row(name, "", len(hit), correct, len(prompts), errors, _lost(ends), recovery, detail, traces, fault_s)


def decode_kill(model: Model, decoders: int) -> Row:
    async def kill(c, outs):
        while not all(len(o) >= 10 for o in outs):
            await asyncio.sleep(0.01)
        victim = "decode-0"
        on_victim = [_index(rid) for rid, led in c.router.requests.items() if led.routes[-1].decode_worker == victim]
        return await _kill_actor(c, victim), on_victim

    name = f"decode-kill-{decoders}d"
    row = ray_scenario(model, name, 1, decoders, model.chats[:4], MAX_TOKENS, kill)
    row.faults = f"SIGKILL of decode-0 (of {decoders}) after ~10 tokens of 4 x {MAX_TOKENS}-token streams"
    return row


def prefill_kill(model: Model) -> Row:
    prompts = model.long_prompts(4, 600)

    async def kill(c, outs):
        # wait until prefill-0 is busy with some of them, then kill it mid-prefill
        while not c.router.workers["prefill-0"].inflight:
            await asyncio.sleep(0.005)
        on_victim = [
            _index(rid) for rid, led in c.router.requests.items()
            if led.routes and led.routes[-1].prefill_worker == "prefill-0" and not led.token_ids
        ]  # fmt: skip
        return await _kill_actor(c, "prefill-0"), on_victim

    row = ray_scenario(model, "prefill-kill", 2, 1, prompts, 16, kill)
    row.faults = "SIGKILL of prefill-0 (of 2) while prefilling 4 x 600-token prompts"
    return row


def _lost(lasts: list) -> int:
    """Requests whose stream ended with neither a finish reason nor an explicit error."""
    return sum(1 for last in lasts if last is None or (last.finish_reason is None and last.error is None))


def _finished(last, reason: str = "length") -> bool:
    return last is not None and last.finish_reason == reason


# ---------------------------------------------------------------- in-process scenarios
def kv_corruption(model: Model) -> Row:
    from cluster.config import PoolConfig, RouterConfig, ServeConfig, TransferConfig
    from cluster.control.local import LocalCluster
    from engine.request import SamplingParams
    from engine.types import RequestSpec

    corrupted: set[str] = set()
    seen: list[str] = []

    def every_third_transfer(chunk):
        if chunk.request_id not in seen:
            seen.append(chunk.request_id)
        if seen.index(chunk.request_id) % 3 != 0 or (chunk.request_id in corrupted and chunk.layer != 0):
            return chunk
        if chunk.layer == 0 and chunk.first_page == 0:
            corrupted.add(chunk.request_id)
            payload = chunk.payload.clone()
            payload.view(-1).view(dtype=__import__("torch").uint8)[0] ^= 0xFF
            return type(chunk)(**{**chunk.__dict__, "payload": payload})
        return chunk

    cfg = ServeConfig(
        model=model.dir,
        pools=(PoolConfig("prefill", "prefill", 1, engine=ENGINE), PoolConfig("decode", "decode", 1, engine=ENGINE)),
        router=RouterConfig(short_prompt_threshold=1),
        transfer=TransferConfig(kind="shm"),
    )
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    prompts = model.chats

    async def run():
        cluster = await LocalCluster(cfg, transport_options={"fault_hook": every_third_transfer}).start()
        try:

            async def one(i: int):
                out, last, times = [], None, []
                async for chunk in cluster.router.generate(RequestSpec(f"kv-{i}", prompts[i], params)):
                    out += chunk.token_ids
                    last = chunk
                    times.append(time.monotonic())
                return out, last

            res = await asyncio.gather(*(one(i) for i in range(len(prompts))))
            rec = cluster.router.stats.recovery_report()
            return res, dict(cluster.router.stats.failovers), rec
        finally:
            await cluster.stop()

    res, failovers, rec = asyncio.run(run())
    correct = sum(1 for p, (o, last) in zip(prompts, res) if _finished(last) and model.correct(p, o))
    errors = sum(1 for _, last in res if last is not None and last.error is not None)
    mean = rec.sum / rec.count if rec.count else None
    return Row(
        "kv-corruption",
        f"{len(corrupted)} corrupted KV transfers (a flipped byte; every 3rd transfer, retries included)",
        failovers["kv_checksum"],
        correct,
        len(prompts),
        errors,
        _lost([last for _, last in res]),
        mean,
        f"failovers {failovers}; recovery = mean failure -> next token",
    )


def redis_outage(model: Model) -> Row:
    from cluster.config import PoolConfig, RouterConfig, ServeConfig, StateConfig, TransferConfig
    from cluster.control.local import LocalCluster
    from engine.request import SamplingParams
    from engine.types import RequestSpec

    redis = RedisServer(binary=benchmark_redis_binary())
    cfg = ServeConfig(
        model=model.dir,
        pools=(PoolConfig("prefill", "prefill", 1, engine=ENGINE), PoolConfig("decode", "decode", 1, engine=ENGINE)),
        router=RouterConfig(short_prompt_threshold=1),
        transfer=TransferConfig(kind="shm"),
        state=StateConfig(redis_url=redis.url, op_timeout_s=0.3, reconnect_interval_s=0.2),
    )
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    prompts = model.chats[:4]

    async def run():
        cluster = await LocalCluster(cfg).start()
        try:
            outs = [[] for _ in prompts]

            async def one(i: int):
                last = None
                async for chunk in cluster.router.generate(RequestSpec(f"ro-{i}", prompts[i], params)):
                    outs[i] += chunk.token_ids
                    last = chunk
                return last

            tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
            while not all(len(o) >= 10 for o in outs):
                await asyncio.sleep(0.01)
            redis.stop()
            while cluster.store.health().ok:
                await asyncio.sleep(0.01)
            await asyncio.sleep(3.0)
            redis.start()
            back = time.monotonic()
            while not cluster.store.health().ok:
                await asyncio.sleep(0.01)
            recovery = time.monotonic() - back
            lasts = await asyncio.gather(*tasks)
            journals = [await cluster.store.journal_load(f"ro-{i}") for i in range(len(prompts))]
            return outs, lasts, recovery, journals, cluster.store.health()
        finally:
            await cluster.stop()

    try:
        outs, lasts, recovery, journals, health = asyncio.run(run())
    finally:
        redis.close()
    correct = sum(1 for p, o, last in zip(prompts, outs, lasts) if _finished(last) and model.correct(p, o))
    complete_journals = sum(1 for j, o in zip(journals, outs) if j is not None and list(j.token_ids) == o)
    return Row(
        "redis-outage",
        "redis-server SIGKILLed for 3 s mid-stream (4 x 150-token streams), then restarted empty",
        len(prompts),
        correct,
        len(prompts),
        sum(1 for last in lasts if last is not None and last.error is not None),
        _lost(lasts),
        recovery,
        f"outages {health.outages}, writes dropped {health.dropped_writes}, journals complete after it: "
        f"{complete_journals}/{len(prompts)}",
    )


def serve_restart(model: Model) -> Row:
    from cluster.client import Client

    redis = RedisServer(password="bench-pw", binary=benchmark_redis_binary())
    tmp = Path(tempfile.mkdtemp(prefix="reliability-"))
    pwfile = tmp / "pw"
    pwfile.write_text("bench-pw\n")
    prompts = model.chats[:4]
    greedy = dict(temperature=0.0, ignore_eos=True)
    first = second = None
    try:
        first = ServeProcess(model.gguf, redis.url, str(pwfile), tmp / "serve-1.log")
        received: list[list[int]] = []
        with Client(first.grpc, timeout=300) as c:
            streams = [
                c.stream(p, request_id=f"sr-{i}", max_tokens=MAX_TOKENS, **greedy) for i, p in enumerate(prompts)
            ]
            for s in streams:
                got = []
                for chunk in s:
                    got += chunk.token_ids
                    if len(got) >= 10:
                        break
                received.append(got)
            killed_at = first.kill()
            for s in streams:
                s.close()
        second = ServeProcess(model.gguf, redis.url, str(pwfile), tmp / "serve-2.log")
        firsts, outs, lasts = [], [], []
        with Client(second.grpc, timeout=300) as c:
            for i, got in enumerate(received):
                tail, last = [], None
                for chunk in c.resume(f"sr-{i}", len(got)):
                    if not tail and chunk.token_ids:
                        firsts.append(time.monotonic())
                    tail += chunk.token_ids
                    last = chunk
                outs.append(got + tail)
                lasts.append(last)
        correct = sum(
            1 for p, o, last in zip(prompts, outs, lasts)
            if _finished(last) and len(o) == MAX_TOKENS and model.correct(p, o)
        )  # fmt: skip
        return Row(
            "serve-restart",
            "splitserve serve --redis SIGKILLed with 4 x 150-token streams in flight (~10 tokens each), restarted",
            len(prompts),
            correct,
            len(prompts),
            sum(1 for last in lasts if _finished(last, "abort")),
            _lost(lasts),
            min(firsts) - killed_at,
            f"new process up {second.started_at - killed_at:.1f}s after the kill; clients Resume from their cursors",
        )
    finally:
        for s in (first, second):
            if s is not None:
                s.stop()
        redis.close()
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- processes
class ServeProcess:
    def __init__(self, gguf: str, redis_url: str, password_file: str, log: Path):
        argv = [sys.executable, "-m", "cluster", "serve", "--model", gguf, "--host", "127.0.0.1"]
        argv += ["--grpc-port", "0", "--http-port", "0", "--no-metrics-port", "--num-cpus", "2"]
        argv += ["--redis", redis_url, "--redis-password-file", password_file, "--prompt", "hi", "--max-tokens", "2"]
        env = {k: v for k, v in os.environ.items() if k not in ("SPLITSERVE_API_KEY", "SPLITSERVE_REDIS_PASSWORD")}
        env["PYTHONUNBUFFERED"] = "1"
        self.log = open(log, "w")
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.session = None
        deadline = time.monotonic() + 300
        for line in self.proc.stdout:
            self.log.write(line)
            if line.startswith("Ray session "):
                self.session = line.split()[2]
            if line.startswith("gRPC on "):
                self.grpc = line.split()[2].rstrip(",")
            if "Press Ctrl-C to stop" in line:
                break
            assert time.monotonic() < deadline, "serve did not start"
        else:
            raise RuntimeError(f"serve exited; see {log}")
        self.started_at = time.monotonic()

    def kill(self) -> float:
        self.proc.kill()
        t = time.monotonic()
        self.proc.wait(30)
        self._cleanup()
        return t

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._cleanup()
        self.log.close()

    def _cleanup(self) -> None:
        """The SIGKILLed driver's Ray processes outlive it: end those of its session."""
        if self.session is None:
            return
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
                fds = [os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(f"/proc/{entry}/fd")]
            except OSError:
                continue
            if self.session in cmd or any(self.session in f for f in fds):
                try:
                    os.kill(int(entry), signal.SIGKILL)
                except ProcessLookupError:
                    pass


FAULTS = {
    "decode-kill-1d": lambda m: decode_kill(m, 1),
    "decode-kill-2d": lambda m: decode_kill(m, 2),
    "prefill-kill": prefill_kill,
    "kv-corruption": kv_corruption,
    "redis-outage": redis_outage,
    "serve-restart": serve_restart,
}


def table(rows: list[Row]) -> str:
    out = [
        "| scenario | faults injected | requests affected | completed correctly | explicit errors | lost | recovery |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rec = "-" if r.recovery_s is None else f"{r.recovery_s:.2f} s"
        out.append(
            f"| {r.scenario} | {r.faults} | {r.affected} | {r.completed_correctly}/{r.requests} | "
            f"{r.explicit_errors} | {r.lost} | {rec} |"
        )
    return "\n".join(out)


def plot(rows: list[Row], path: Path) -> None:
    """Tokens received over time per stream, the fault marked: one panel per scenario."""
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 3.6), squeeze=False)
    for ax, r in zip(axes[0], rows):
        for i, ts in enumerate(r.traces or []):
            ax.step(ts, range(1, len(ts) + 1), where="post", label=f"stream {i}")
        ax.axvline(r.fault_s, color="red", linestyle="--", label="SIGKILL")
        rec = "" if r.recovery_s is None else f", recovered in {r.recovery_s:.2f} s"
        ax.set_title(f"{r.scenario}{rec}", fontsize=9)
        ax.set_xlabel("seconds")
        ax.set_ylabel("tokens received")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", nargs="+", choices=sorted(FAULTS), default=list(FAULTS))
    args = ap.parse_args()
    from benchmarks.common import RESULTS_DIR, machine_description

    model = Model()
    rows: list[Row] = []
    loads = []
    for name in args.scenario:
        before = os.getloadavg()[0]
        t0 = time.monotonic()
        row = FAULTS[name](model)
        loads.append({"scenario": name, "load_before": before, "load_after": os.getloadavg()[0],
                      "wall_s": time.monotonic() - t0})  # fmt: skip
        rows.append(row)
        print(f"{name}: {row}", flush=True)
    out = RESULTS_DIR / "reliability.json"
    if out.exists() and set(args.scenario) != set(FAULTS):  # a partial run: keep the other scenarios' rows
        old = json.loads(out.read_text())
        kept = [Row(**r) for r in old["rows"] if r["scenario"] not in args.scenario]
        loads = [x for x in old["loads"] if x["scenario"] not in args.scenario] + loads
        rows = sorted(kept + rows, key=lambda r: list(FAULTS).index(r.scenario))
    print(table(rows))
    plot([r for r in rows if r.traces], RESULTS_DIR / "reliability.png")
    out.write_text(
        json.dumps({"machine": machine_description(), "rows": [asdict(r) for r in rows], "loads": loads}, indent=2)
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
