"""``splitserve serve``: run a ServeConfig's pools as Ray actors and serve them.

    splitserve serve [--model DIR] [--config FILE] [--address ADDR] [--prefill N --decode N]
                     [--transport shm|grpc|torch] [--num-cpus-per-worker F]
                     [--prompt TEXT ...] [--max-tokens N] [--once] [frontend flags]

``serve`` starts (or joins) Ray, runs the configured pools as actors under a Controller,
prints the worker layout and streams a few demo prompts through the router. With
``--once`` it then exits (``make run``); otherwise it starts the gRPC, OpenAI HTTP and
metrics frontends (cluster/frontends/launch.py) and serves until Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import yaml

from cluster.config import DEFAULT_TINY_DIR, PLACEMENT_STRATEGIES, TRANSFER_KINDS, ConfigError, ServeConfig
from cluster.control.info import ClusterInfo
from cluster.frontends.launch import add_frontend_flags, apply_frontend_flags, start_frontends

# Engine options for the built-in tiny model: a small KV pool starts faster than the 1 GB default.
TINY_ENGINE = {"num_blocks": 512}
DEMO_PROMPTS = (
    "The quick brown fox",
    "Disaggregated serving splits prefill and decode because",
    "Once upon a time",
)
RAY_KINDS = tuple(k for k in TRANSFER_KINDS if k != "loopback")  # loopback is in-process only


# ---------------------------------------------------------------------------- parser
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run prefill/decode pools as Ray actors and serve",
        description="Start the worker pools as Ray actors, run demo prompts through the router, "
        "then keep serving until Ctrl-C (or exit with --once).",
    )
    p.add_argument("--model", help="HF safetensors directory (default: the config's, else a tiny random Llama)")
    p.add_argument("--config", metavar="FILE", help="ServeConfig YAML/JSON file (flags below override it)")
    p.add_argument("--address", help="join this Ray cluster ('auto' or host:port) instead of starting one")
    p.add_argument("--num-cpus", type=_non_negative_float, help="CPUs of the local Ray instance (default: enough)")
    p.add_argument("--prefill", type=_non_negative_int, metavar="N", help="workers in the 'prefill' pool")
    p.add_argument("--decode", type=_non_negative_int, metavar="N", help="workers in the 'decode' pool")
    p.add_argument(
        "--transport",
        choices=RAY_KINDS,
        help="KV transport (default: the config's transfer.kind, else shm; shm needs a single node)",
    )
    p.add_argument("--num-cpus-per-worker", type=_non_negative_float, metavar="F", help="Ray CPUs of every worker")
    p.add_argument(
        "--placement",
        choices=PLACEMENT_STRATEGIES,
        help="placement group of the workers (default: the config's, else auto = STRICT_PACK for shm, PACK otherwise)",
    )
    p.add_argument(
        "--prompt",
        action="append",
        dest="prompts",
        metavar="TEXT",
        help="demo prompt (repeatable; default: 3 built-in)",
    )
    p.add_argument("--max-tokens", type=_positive_int, default=24, help="tokens per demo prompt (default: %(default)s)")
    p.add_argument("--once", action="store_true", help="exit after the demo prompts instead of serving")
    add_frontend_flags(p)
    p.set_defaults(func=cmd_serve)


# ---------------------------------------------------------------------------- serve config
def _read_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)  # YAML is a superset of JSON: one reader for both
    except OSError as e:
        raise ConfigError("", f"cannot read config file: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError("", f"{path}: invalid YAML/JSON: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: must hold a mapping, got {type(data).__name__}")
    return data


def serve_config_from_args(args: argparse.Namespace, tiny_model: Callable[[], str]) -> ServeConfig:
    """The ServeConfig ``serve`` runs: the config file (if any) with the flags applied.

    Model: ``--model``, else the config's, else ``tiny_model()`` (which builds one). The KV
    transport defaults to "shm" when neither ``--transport`` nor the config names one.
    """
    data = _read_config_file(args.config) if args.config else {}
    if args.model:
        data["model"] = args.model
    elif not data.get("model"):
        data["model"] = tiny_model()
        if "pools" not in data:
            data["pools"] = [
                {"name": "prefill", "role": "prefill", "engine": dict(TINY_ENGINE)},
                {"name": "decode", "role": "decode", "engine": dict(TINY_ENGINE)},
            ]
    raw_pools = data.get("pools", [{"name": "prefill", "role": "prefill"}, {"name": "decode", "role": "decode"}])
    if not isinstance(raw_pools, list) or not all(isinstance(p, dict) for p in raw_pools):
        raise ConfigError("pools", "must be a list of mappings")
    pools = [dict(p) for p in raw_pools]
    for name, count in (("prefill", args.prefill), ("decode", args.decode)):
        if count is None:
            continue
        matching = [p for p in pools if p.get("name") == name]
        if matching:
            matching[0]["num_workers"] = count
        else:
            pools.append({"name": name, "role": name, "num_workers": count})
    if args.num_cpus_per_worker is not None:
        for p in pools:
            p["num_cpus"] = args.num_cpus_per_worker
    data["pools"] = pools
    transfer = dict(data.get("transfer") or {})
    if args.transport:
        transfer["kind"] = args.transport
    transfer.setdefault("kind", "shm")
    data["transfer"] = transfer
    if args.placement:
        data["placement"] = args.placement
    apply_frontend_flags(data, args)
    cfg = ServeConfig.from_dict(data)
    if cfg.transfer.kind not in RAY_KINDS:
        raise ConfigError(
            "transfer.kind",
            f"{cfg.transfer.kind!r} works only inside one process; use one of {list(RAY_KINDS)} "
            "(set it in the config or pass --transport)",
        )
    return cfg


def local_ray_resources(cfg: ServeConfig, num_cpus: float | None) -> tuple[int, dict[str, float]]:
    """(CPUs, custom resources) for a local Ray instance that can place every pool.

    Custom resources the pools ask for (meant for labelled KubeRay worker groups) are all
    provided by the one local node, so a cluster config also runs on a laptop.
    """
    need_cpus = sum(p.num_cpus * p.num_workers for p in cfg.pools)
    cpus = num_cpus if num_cpus is not None else max(os.cpu_count() or 1, need_cpus)
    custom: dict[str, float] = {}
    for p in cfg.pools:
        for key, amount in p.resources.items():
            custom[key] = custom.get(key, 0.0) + amount * p.num_workers
    return math.ceil(cpus), custom


# ---------------------------------------------------------------------------- serve
def _say(msg: str) -> None:
    print(msg, flush=True)


def _build_tiny_model() -> str:
    from engine.models.tiny import build_tiny_checkpoint

    _say(f"no --model given: building a tiny random-weight Llama in {DEFAULT_TINY_DIR} (cached) ...")
    return build_tiny_checkpoint(DEFAULT_TINY_DIR, family="llama")


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        cfg = serve_config_from_args(args, _build_tiny_model)
    except (ConfigError, FileNotFoundError) as e:
        print(f"splitserve serve: config error: {e}", file=sys.stderr)
        return 2
    # fail before starting actors; on a joined cluster the driver may not see the model volume
    if not args.address and not os.path.isfile(os.path.join(cfg.model, "config.json")):
        print(f"splitserve serve: model {cfg.model!r} is not a directory with a config.json", file=sys.stderr)
        return 2
    import ray

    if args.address:
        _say(f"joining Ray cluster at {args.address} ...")
        ray.init(address=args.address)
    else:
        cpus, custom = local_ray_resources(cfg, args.num_cpus)
        extra = f", custom resources {custom}" if custom else ""
        _say(f"starting a local Ray instance ({cpus} CPUs{extra}) ...")
        ray.init(num_cpus=cpus, resources=custom or None, include_dashboard=False)
    try:
        asyncio.run(_serve(cfg, args))
    except KeyboardInterrupt:
        _say("stopped.")
        return 130
    except asyncio.CancelledError:  # SIGTERM (see _serve)
        _say("terminated.")
        return 143
    except RuntimeError as e:  # a pool failed to start: the message names the workers and causes
        print(f"splitserve serve: {e}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    return 0


async def _serve(cfg: ServeConfig, args: argparse.Namespace) -> None:
    from cluster.control.controller import Controller
    from engine.tokenizer import Tokenizer

    # SIGTERM (Kubernetes stopping the pod) takes the Ctrl-C path: cancel, then shut down
    with contextlib.suppress(NotImplementedError, RuntimeError):  # not main thread / platform
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    controller = Controller(cfg, progress=_say)
    frontends = None
    try:
        await controller.start()
        _print_layout(controller.info())
        await run_demo(controller, Tokenizer(cfg.model), args.prompts or list(DEMO_PROMPTS), args.max_tokens)
        if args.once:
            return
        frontends = await start_frontends(cfg, controller, say=_say)
        _say("\nserving (health watcher on). Press Ctrl-C to stop.")
        await asyncio.Event().wait()  # until Ctrl-C cancels this task
    finally:
        if frontends is not None:
            await frontends.stop()
        _say("shutting the workers down ...")
        await controller.shutdown()


def _print_layout(info: ClusterInfo) -> None:
    _say(f"\nmodel {info.model}, KV transport {info.transfer}")
    for pool in info.pools:
        res = {"CPU": pool.num_cpus, "GPU": pool.num_gpus, **pool.resources}
        shown = ", ".join(f"{k}={v:g}" for k, v in res.items() if v)
        _say(f"pool {pool.name} ({pool.role}): {pool.num_workers} worker(s), each {shown or 'nothing'}")
        for w in (w for w in info.workers if w.pool == pool.name):
            st = w.stats
            kv = f"KV blocks {st.engine.free_kv_blocks}/{st.engine.total_kv_blocks}" if st else "KV blocks unknown"
            addr = f", KV address {w.address}" if w.address is not None else ""
            _say(f"  {w.worker_id:<12} node {(w.node_id or '?')[:8]}  {kv}{addr}")


async def run_demo(controller: Any, tokenizer: Any, prompts: list[str], max_tokens: int) -> None:
    """Send every prompt at once; print each one's text as it streams, in prompt order."""
    from engine.request import SamplingParams
    from engine.tokenizer import IncrementalDetokenizer
    from engine.types import RequestSpec

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    queues: list[asyncio.Queue] = [asyncio.Queue() for _ in prompts]

    async def one(i: int, text: str) -> None:
        # queue items: ("text", delta) ... then ("end", summary) or ("error", message)
        detok = IncrementalDetokenizer(tokenizer)
        n, reason = 0, None
        try:
            spec = RequestSpec(f"demo-{i}", tokenizer.encode(text), params)
            async for chunk in controller.router.generate(spec):
                before = len(detok.text)
                for t in chunk.token_ids:
                    detok.append(t)
                n += len(chunk.token_ids)
                reason = chunk.finish_reason if chunk.finished else reason
                if chunk.error:
                    raise RuntimeError(chunk.error)
                await queues[i].put(("text", detok.text[before:]))
            await queues[i].put(("end", f"{n} tokens, {reason}"))
        except Exception as e:  # shown in place of the text; the demo goes on
            await queues[i].put(("error", f"{type(e).__name__}: {e}"))

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    tasks = [asyncio.create_task(one(i, p)) for i, p in enumerate(prompts)]
    _say(f"\n{len(prompts)} demo prompts, greedy, {max_tokens} tokens each (a random-weight model babbles):")
    for i, prompt in enumerate(prompts):
        sys.stdout.write(f"\n[{i}] {prompt!r}\n    -> ")
        while True:
            kind, value = await queues[i].get()
            if kind == "text":
                sys.stdout.write(value)
                sys.stdout.flush()
                continue
            _say(f"\n    ({value})" if kind == "end" else f"\n    FAILED: {value}")
            break
    await asyncio.gather(*tasks)
    _say(f"\ndone in {loop.time() - t0:.2f}s")
