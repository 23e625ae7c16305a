"""Serve configuration: frozen dataclasses, validated once, loadable from YAML or JSON.

Shape (every key optional except ``model``; unknown keys are errors)::

    model: /models/Qwen3-0.6B
    pools:                      # default: one "prefill" and one "decode" pool of 1 worker each
      - {name: prefill, role: prefill, num_workers: 2, num_gpus: 1, engine: {dtype: bfloat16}}
      - {name: decode,  role: decode,  num_workers: 2, num_gpus: 1, resources: {decode_node: 1}}
    router: {prefill_policy: token_jsq, decode_policy: kv, short_prompt_threshold: 32}
    transfer: {kind: torch, layerwise: true, timeout_s: 30}
    grpc_port: 50051
    http_port: 8000             # the OpenAI API, /health, and /metrics too
    metrics_port: 9090          # a separate port serving only /metrics; null: none
    max_queue: 1024
    placement: auto             # placement group strategy for all workers (PLACEMENT_STRATEGIES)
    security:                   # default: plaintext, no API key
      tls: {cert: /tls/tls.crt, key: /tls/tls.key, ca: /tls/ca.crt}   # ca: mutual TLS
      api_key_file: /secrets/api-key   # else $SPLITSERVE_API_KEY, else no key
      protect_metrics: false           # true: /metrics needs the API key too
    state:                      # default: in memory (one node, nothing survives a restart)
      redis_url: redis://splitserve-redis:6379/1      # journal, worker registry, prefix index
      password_file: /secrets/redis-password          # else $SPLITSERVE_REDIS_PASSWORD
    failover: {max_retries: 3, wait_for_worker_s: 120}

Errors are ``ConfigError`` (a ``ValueError``) whose message starts with the dotted path of the
bad field, e.g. ``pools[1].num_workers: must be >= 0, got -1``.

Invariants of a constructed ``ServeConfig``:
- pool names are unique and at least one worker is decode-capable (role decode or mixed);
- nonzero ports are distinct (0 = pick a free port, for tests; ``metrics_port`` None = no
  separate metrics port);
- every file named by ``security`` exists and loads (TLS cert/key/CA parse, the cert matches
  its key, the API key file holds one key), checked once, here.
- ``router.prefill_release_tokens < router.prefill_saturation_tokens`` (role-switch hysteresis).
- ``state.password_file`` exists and holds one password; a password is given at most one way
  (file, $SPLITSERVE_REDIS_PASSWORD, or the URL).
"""

from __future__ import annotations

import json
import os
import ssl
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

# Worker roles. "mixed" workers take both phases (a Splitwise mixed pool).
ROLES: tuple[str, ...] = ("prefill", "decode", "mixed")
# Pool roles: the routed worker roles, plus "attention" (attention_offload/: attention workers
# holding the decode KV of the decode-capable worker they serve; never routed to).
ATTENTION_ROLE = "attention"
POOL_ROLES: tuple[str, ...] = (*ROLES, ATTENTION_ROLE)
# PoolConfig.group_transport: "auto" or an engine/runtime/groups.py backend
GROUP_TRANSPORTS: tuple[str, ...] = ("auto", "gloo", "nccl", "shm")
# Within-pool choice policies implemented by cluster/control/routing.py (kept in sync by a test).
ROUTING_POLICIES: tuple[str, ...] = ("round_robin", "jsq", "token_jsq", "kv", "prefix")
# KV transports implemented by kv_transfer (its make_sender/make_receiver kinds).
TRANSFER_KINDS: tuple[str, ...] = ("loopback", "shm", "torch", "grpc")
# How the controller reserves the workers' resources (cluster/control/placement.py): "auto" is
# STRICT_PACK for the node-local shm transport and PACK otherwise; "none" places each actor
# on its own, by its resources only (no placement group).
PLACEMENT_STRATEGIES: tuple[str, ...] = ("auto", "none", "PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# The environment variable that holds the API key when security.api_key_file is not set.
API_KEY_ENV = "SPLITSERVE_API_KEY"
# The environment variable that holds the Redis password when state.password_file is not set.
REDIS_PASSWORD_ENV = "SPLITSERVE_REDIS_PASSWORD"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
# Where `serve` and `profile` build the tiny random-weight Llama when no model is given.
DEFAULT_TINY_DIR = os.path.join(os.path.expanduser("~"), ".cache", "splitserve", "tiny-llama")


class ConfigError(ValueError):
    """A serve config field is missing, unknown, of the wrong type, or out of range."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message

    def under(self, prefix: str) -> ConfigError:
        """The same error with ``prefix`` prepended to its field path."""
        return ConfigError(f"{prefix}.{self.path}" if self.path else prefix, self.message)


def _check(cond: bool, path: str, message: str) -> None:
    if not cond:
        raise ConfigError(path, message)


@dataclass(frozen=True)
class PoolConfig:
    name: str
    role: str  # one of POOL_ROLES
    num_workers: int = 1
    num_cpus: float = 1.0  # Ray CPUs per worker actor
    num_gpus: float = 0.0  # Ray GPUs per worker actor (1 on GPU nodes)
    # Custom Ray resources per worker, e.g. {"decode_node": 1} to pin a pool to labelled nodes.
    resources: dict[str, float] = field(default_factory=dict)
    # How the ranks of this pool's worker groups talk (its EP group; on Ray its TP workers'
    # rank groups; for an attention pool, each model worker <-> its attention workers group): one of
    # GROUP_TRANSPORTS. "auto": NCCL when the
    # pool has GPUs, else gloo. "shm": shared memory between processes of ONE node
    # (engine/runtime/shm_group.py; CPU pools only; a group Ray spread over nodes fails to form,
    # naming its ranks' nodes).
    group_transport: str = "auto"
    # Engine options handed to the worker's engine builder as-is (dtype, cache sizes, ...);
    # their names are validated there, not here. Treat as read-only.
    engine: dict[str, Any] = field(default_factory=dict)
    # Expert parallelism (expert_router/): >1 makes the pool ONE EP group of ``experts`` workers
    # (num_workers must equal it; decode, mixed and prefill pools): attention data-parallel, each
    # worker holding 1/experts of every MoE layer's routed experts, worker i = EP rank i. Needs
    # an MoE model whose expert count ``experts`` divides (checked against the model by
    # ``check_experts_against_model``, before any actor starts). 1: no EP.
    experts: int = 1
    # An s-EG placement (``splitserve`` ExpertPlacement JSON, expert_router/seg.py) for the EP
    # group; None: contiguous. Only with experts > 1; its world size must equal ``experts``.
    expert_placement: str | None = None
    # ExpertFlow fast tier: resident experts per MoE layer on each EP worker (LRU over the
    # worker's share; expert_router/expertflow.py). None: the whole share resident.
    expert_cache_slots: int | None = None
    # s-TS request placement: a routing log (``splitserve route-log`` .npz with token ids,
    # expert_router/routing_log.py) whose per-token-id prior the router votes with to place a
    # request on the member most likely to host its experts (cluster/control/expert_affinity.py).
    # None: the router's usual decode policy. Only with experts > 1.
    expert_routing_log: str | None = None
    # Tensor parallelism (engine/models/tensor_parallel.py): each worker of the pool is N ranks,
    # each holding 1/N of every layer (EngineCore(tensor_parallel=comm)). Prefill, decode and
    # mixed pools; not with EP, attention offload or speculation. N must divide the model's
    # query/KV heads and MLP width (checked against the model by serve's ``resolve_model``,
    # before any actor starts). 1: no TP. In process (LocalCluster) a worker is N shards in one
    # process (decode_worker/ and prefill_worker/tensor_parallel.py), and KV moves between pools
    # of any TP degrees (whole-head pages, cut or gathered at the TP worker's edge). On Ray a
    # decode/mixed worker is N actors, one per rank, each asking for the pool's num_cpus /
    # num_gpus / resources (cluster/control/controller.py), prefill and decode alike, with KV
    # moving between pools of any TP degrees there too.
    tensor_parallel: int = 1

    def __post_init__(self) -> None:
        _check(bool(self.name), "name", "must be a non-empty string")
        _check(self.role in POOL_ROLES, "role", f"must be one of {list(POOL_ROLES)}, got {self.role!r}")
        _check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        _check(self.num_cpus >= 0, "num_cpus", f"must be >= 0, got {self.num_cpus}")
        _check(self.num_gpus >= 0, "num_gpus", f"must be >= 0, got {self.num_gpus}")
        for key, amount in self.resources.items():
            _check(amount >= 0, f"resources.{key}", f"must be >= 0, got {amount}")
        _check(
            self.group_transport in GROUP_TRANSPORTS,
            "group_transport",
            f"must be one of {list(GROUP_TRANSPORTS)}, got {self.group_transport!r}",
        )
        _check(
            self.group_transport != "nccl" or self.num_gpus > 0,
            "group_transport",
            "'nccl' carries CUDA tensors: the pool needs num_gpus > 0",
        )
        _check(
            self.group_transport != "shm" or self.num_gpus == 0,
            "group_transport",
            "'shm' carries CPU tensors: a GPU pool uses 'nccl' (or 'auto')",
        )
        _check(
            isinstance(self.experts, int) and self.experts >= 1, "experts", f"must be an int >= 1, got {self.experts!r}"
        )
        if self.experts > 1:
            _check(
                self.role in ("decode", "mixed", "prefill"),
                "experts",
                f"expert parallelism runs on decode, mixed and prefill pools, not on a {self.role} pool",
            )
            _check(
                self.num_workers == self.experts,
                "experts",
                f"an EP pool is one group of `experts` workers: num_workers must be {self.experts}, "
                f"got {self.num_workers}",
            )
        else:
            for name in ("expert_placement", "expert_cache_slots", "expert_routing_log"):
                _check(getattr(self, name) is None, name, "needs experts > 1 (an expert-parallel pool)")
        _check(
            isinstance(self.tensor_parallel, int) and self.tensor_parallel >= 1,
            "tensor_parallel",
            f"must be an int >= 1, got {self.tensor_parallel!r}",
        )
        if self.tensor_parallel > 1:
            _check(
                self.experts == 1,
                "tensor_parallel",
                "tensor parallelism with expert parallelism (experts > 1) is not supported",
            )
            _check(
                self.engine.get("speculative_config") is None,
                "tensor_parallel",
                "tensor parallelism with speculative decoding (engine.speculative_config) is not supported",
            )
        if self.expert_placement is not None:
            _check(os.path.isfile(self.expert_placement), "expert_placement", f"no such file {self.expert_placement!r}")
        if self.expert_routing_log is not None:
            _check(
                os.path.isfile(self.expert_routing_log),
                "expert_routing_log",
                f"no such file {self.expert_routing_log!r}",
            )
        if self.expert_cache_slots is not None:
            _check(self.expert_cache_slots >= 1, "expert_cache_slots", f"must be >= 1, got {self.expert_cache_slots}")
        # defensive copies: the caller's dicts must not alias a frozen config
        object.__setattr__(self, "resources", dict(self.resources))
        object.__setattr__(self, "engine", dict(self.engine))


@dataclass(frozen=True)
class RouterConfig:
    prefill_policy: str = "token_jsq"  # how a prefill worker is chosen (ROUTING_POLICIES)
    decode_policy: str = "kv"  # how a decode worker is chosen (ROUTING_POLICIES)
    # Prompts with fewer tokens are prefilled on the decode worker itself (no KV transfer).
    # 0 disables the short path.
    short_prompt_threshold: int = 32
    # Splitwise mixed pool: when every healthy prefill worker has more pending prompt tokens
    # than this, an idle decode worker is promoted to "mixed" and takes whole requests ...
    prefill_saturation_tokens: int = 8192
    # ... and promoted workers return to the decode pool once some prefill worker has fewer
    # pending prompt tokens than this (hysteresis: must be < prefill_saturation_tokens).
    prefill_release_tokens: int = 2048
    mixed_max_running: int = 8  # a decode worker is promotable only below this many running
    mixed_min_free_kv_fraction: float = 0.5  # ... and with at least this fraction of KV free
    max_mixed_workers: int = 1  # promoted decode workers at once; 0 disables role switching
    # No healthy prefill worker: prefill on the decode worker (True) or refuse (False).
    fallback_local_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("prefill_policy", "decode_policy"):
            value = getattr(self, name)
            _check(value in ROUTING_POLICIES, name, f"must be one of {list(ROUTING_POLICIES)}, got {value!r}")
        for name in ("short_prompt_threshold", "prefill_release_tokens", "mixed_max_running", "max_mixed_workers"):
            value = getattr(self, name)
            _check(value >= 0, name, f"must be >= 0, got {value}")
        _check(
            self.prefill_saturation_tokens >= 1,
            "prefill_saturation_tokens",
            f"must be >= 1, got {self.prefill_saturation_tokens}",
        )
        _check(
            self.prefill_release_tokens < self.prefill_saturation_tokens,
            "prefill_release_tokens",
            f"must be < prefill_saturation_tokens ({self.prefill_saturation_tokens}) for hysteresis, "
            f"got {self.prefill_release_tokens}",
        )
        _check(
            0.0 <= self.mixed_min_free_kv_fraction <= 1.0,
            "mixed_min_free_kv_fraction",
            f"must be in [0, 1], got {self.mixed_min_free_kv_fraction}",
        )


@dataclass(frozen=True)
class TransferConfig:
    kind: str = "shm"  # one of TRANSFER_KINDS (loopback: in-process only)
    layerwise: bool = True  # stream KV layer by layer during prefill (else once at the end)
    timeout_s: float = 30.0  # a transfer not Done by then is Failed

    def __post_init__(self) -> None:
        _check(self.kind in TRANSFER_KINDS, "kind", f"must be one of {list(TRANSFER_KINDS)}, got {self.kind!r}")
        _check(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")


def _is_api_key(text: str) -> bool:
    """One token of visible ASCII (what fits ``authorization: Bearer <key>`` and gRPC metadata)."""
    return bool(text) and all("!" <= ch <= "~" for ch in text)


def read_secret_file(path: str, field_name: str, what: str) -> str:
    """The one token of visible ASCII in ``path`` (a final newline removed). Raises
    ConfigError(field_name) when it cannot be read or holds anything else; the message never
    contains the file's content."""
    try:
        with open(path, encoding="ascii") as f:
            secret = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(field_name, f"cannot read {path!r}: {type(e).__name__}: {e}") from None
    _check(bool(secret), field_name, f"{path!r} is empty")
    _check(_is_api_key(secret), field_name, f"{path!r} must hold one {what} of visible ASCII, without spaces")
    return secret


def read_api_key_file(path: str) -> str:
    """The key in ``path`` (surrounding whitespace, e.g. a final newline, removed). Raises
    ConfigError("api_key_file") when it cannot be read or does not hold one key; the message
    never contains the file's content."""
    return read_secret_file(path, "api_key_file", "key")


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of a TLS server: the gRPC and HTTP frontends and the metrics port share them.

    ``cert`` and ``key`` go together; with ``ca`` set, every client must present a certificate
    signed by it (mutual TLS: the handshake fails without one). Paths are as the serving
    process sees them. The files are loaded once here (so a bad PEM or a key that does not
    match the certificate fails at startup, naming the field) and again by each server.
    """

    cert: str | None = None  # certificate chain the server presents
    key: str | None = None  # private key of ``cert``
    ca: str | None = None  # CA bundle for client certificates; set = mutual TLS

    def __post_init__(self) -> None:
        _check(self.cert is not None, "cert", "required: the server's PEM certificate chain (it goes with 'key')")
        _check(self.key is not None, "key", "required: the PEM private key of 'cert'")
        for name in ("cert", "key", "ca"):
            path = getattr(self, name)
            _check(path is None or os.path.isfile(path), name, f"no such file {path!r}")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError("cert", f"{self.cert!r} with key {self.key!r} does not load: {e}") from None
        if self.ca is not None:
            try:
                ctx.load_verify_locations(cafile=self.ca)
            except (ssl.SSLError, OSError) as e:
                raise ConfigError("ca", f"{self.ca!r} does not load as a PEM CA bundle: {e}") from None

    @property
    def mutual(self) -> bool:
        return self.ca is not None


@dataclass(frozen=True)
class SecurityConfig:
    """Transport security and the API key of every frontend (gRPC, HTTP, metrics port).

    - ``tls``: None = plaintext. Set, gRPC, HTTP and the separate metrics port all serve TLS
      with the same files (and all require client certificates when ``tls.ca`` is set).
    - The API key: read from ``api_key_file`` (e.g. a mounted Kubernetes secret), else from the
      ``$SPLITSERVE_API_KEY`` environment variable, else none (everything open). Setting both is
      an error. The key itself is never a config field or a flag, so it stays out of command
      lines, config dumps and logs. With a key, every SplitServe gRPC method and every /v1
      route require it; gRPC health/reflection and HTTP /health never do.
    - ``protect_metrics``: /metrics (on the HTTP port and on the metrics port) is open by
      default, as Prometheus expects; True makes it require the API key too.
    """

    tls: TLSFiles | None = None
    api_key_file: str | None = None
    protect_metrics: bool = False

    def __post_init__(self) -> None:
        if self.api_key_file is not None:
            _check(os.path.isfile(self.api_key_file), "api_key_file", f"no such file {self.api_key_file!r}")
            read_api_key_file(self.api_key_file)  # validated once; read again when serving

    def api_key(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """The API key the frontends require (None: no key). An empty $SPLITSERVE_API_KEY is unset.
        Raises ConfigError naming the field when the sources conflict or the key is malformed,
        or when ``protect_metrics`` is set without any key."""
        from_env = environ.get(API_KEY_ENV) or None
        if self.api_key_file is not None:
            _check(from_env is None, "api_key_file", f"is set and so is ${API_KEY_ENV}: give the key one way")
            return read_api_key_file(self.api_key_file)
        if from_env is not None:
            _check(_is_api_key(from_env), "", f"${API_KEY_ENV} must be one key of visible ASCII, without spaces")
            return from_env
        _check(not self.protect_metrics, "protect_metrics", f"needs an API key: set api_key_file or ${API_KEY_ENV}")
        return None


@dataclass(frozen=True)
class StateConfig:
    """Where the control plane keeps its state (cluster/control/state/): the request journal
    (what Resume and failover continue from), the worker registry and the prefix index.

    ``redis_url`` None: in memory, in the serving process (one node; a restart forgets it).
    Set: Redis (``redis://host:port/db``, ``rediss://`` for TLS), so the journal and the prefix
    index survive a restart of the serving process. Redis going away never stops serving: the
    store turns "degraded" (health says so, a metric counts it, one warning is logged), writes
    are dropped until it reconnects by itself, and live requests' journals are rewritten then.

    The password: ``password_file`` (e.g. a mounted Kubernetes secret), else
    $SPLITSERVE_REDIS_PASSWORD, else the URL's own (``redis://:pw@host``, which shows in ``ps``),
    else none. Giving it two ways is an error.
    """

    redis_url: str | None = None
    password_file: str | None = None
    key_prefix: str = "splitserve"  # every key the store writes starts with "<key_prefix>:"
    journal_ttl_s: float = 3600.0  # a request's journal expires this long after its last write
    # Entries of one request's journal stream (one per streamed chunk); the stream is trimmed
    # beyond it (XADD MAXLEN ~), after which that request can no longer be resumed (an
    # explicit error says so). Keep it above the longest max_tokens served.
    journal_max_entries: int = 100_000
    memory_max_records: int = 10_000  # in-memory backend: journals kept (oldest finished dropped first)
    heartbeat_ttl_s: float = 10.0  # a worker-registry entry not refreshed this long has expired
    op_timeout_s: float = 0.5  # a Redis round trip slower than this counts as Redis being down
    reconnect_interval_s: float = 1.0  # while degraded, Redis is pinged this often

    def __post_init__(self) -> None:
        if self.redis_url is not None:
            _check(
                self.redis_url.startswith(REDIS_SCHEMES),
                "redis_url",
                f"must start with one of {list(REDIS_SCHEMES)}, got {self.redis_url!r}",
            )
        if self.password_file is not None:
            _check(self.redis_url is not None, "password_file", "is set but redis_url is not")
            _check(os.path.isfile(self.password_file), "password_file", f"no such file {self.password_file!r}")
            read_secret_file(self.password_file, "password_file", "password")
        _check(bool(self.key_prefix) and ":" not in self.key_prefix, "key_prefix", "must be non-empty, without ':'")
        for name in ("journal_ttl_s", "heartbeat_ttl_s", "op_timeout_s", "reconnect_interval_s"):
            _check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        _check(self.journal_max_entries >= 16, "journal_max_entries", f"must be >= 16, got {self.journal_max_entries}")
        _check(self.memory_max_records >= 1, "memory_max_records", f"must be >= 1, got {self.memory_max_records}")

    def password(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """The Redis password (None: none, or the URL's own). Raises ConfigError naming the
        field when it is given two ways or is malformed."""
        from_env = environ.get(REDIS_PASSWORD_ENV) or None
        in_url = self.redis_url is not None and _url_has_password(self.redis_url)
        if self.password_file is not None:
            _check(from_env is None, "password_file", f"is set and so is ${REDIS_PASSWORD_ENV}: give it one way")
            _check(not in_url, "password_file", "is set and redis_url holds a password too: give it one way")
            return read_secret_file(self.password_file, "password_file", "password")
        if from_env is not None:
            _check(not in_url, "redis_url", f"holds a password and so does ${REDIS_PASSWORD_ENV}: give it one way")
            _check(_is_api_key(from_env), "", f"${REDIS_PASSWORD_ENV} must be one password of visible ASCII")
            return from_env
        return None


def _url_has_password(url: str) -> bool:
    from urllib.parse import urlsplit

    return bool(urlsplit(url).password)


@dataclass(frozen=True)
class FailoverConfig:
    """How the router keeps requests alive across worker failures (cluster/control/failover.py).

    A request whose worker dies (or whose KV transfer fails) is placed again, on a worker that
    can serve it, with its prompt plus the tokens generated so far re-prefilled there; its
    stream continues with no token missing or repeated. Every re-placement counts against
    ``max_retries``; past it the request ends with an explicit error.
    """

    max_retries: int = 3  # re-placements of one request before it fails with an explicit error
    # A failed-over request with no worker to go to (e.g. the only decode worker died) waits
    # this long for one (its replacement) before it fails.
    wait_for_worker_s: float = 120.0
    # New requests the router places on one worker at once; with every candidate at this bound
    # a request is refused (RESOURCE_EXHAUSTED / 429, with Retry-After). Failed-over requests
    # are exempt: they were accepted already.
    max_inflight_per_worker: int = 256
    # Each worker's own bound on requests it holds (its queues included); a request past it is
    # refused by the worker (queue.Full) and placed elsewhere. Must leave room for failed-over
    # requests above ``max_inflight_per_worker``.
    worker_max_pending: int = 512
    retry_after_s: int = 1  # Retry-After (seconds) sent with every refusal

    def __post_init__(self) -> None:
        _check(self.max_retries >= 0, "max_retries", f"must be >= 0, got {self.max_retries}")
        _check(self.wait_for_worker_s >= 0, "wait_for_worker_s", f"must be >= 0, got {self.wait_for_worker_s}")
        _check(
            self.max_inflight_per_worker >= 1,
            "max_inflight_per_worker",
            f"must be >= 1, got {self.max_inflight_per_worker}",
        )
        _check(
            self.worker_max_pending >= self.max_inflight_per_worker,
            "worker_max_pending",
            f"must be >= max_inflight_per_worker ({self.max_inflight_per_worker}), got {self.worker_max_pending}",
        )
        _check(self.retry_after_s >= 1, "retry_after_s", f"must be >= 1, got {self.retry_after_s}")


def _default_pools() -> tuple[PoolConfig, ...]:
    return (PoolConfig("prefill", "prefill", 1), PoolConfig("decode", "decode", 1))


@dataclass(frozen=True)
class ServeConfig:
    model: str  # HF checkpoint directory (or hub id resolved by the engine loader)
    pools: tuple[PoolConfig, ...] = field(default_factory=_default_pools)
    router: RouterConfig = field(default_factory=RouterConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    host: str = "0.0.0.0"
    grpc_port: int = 50051  # 0: pick a free port
    http_port: int = 8000  # 0: pick a free port; serves /metrics too
    # A separate port serving only the metrics (same TLS and protection as the HTTP port's
    # /metrics). 0: pick a free port; None: no separate port.
    metrics_port: int | None = 9090
    max_queue: int = 1024  # requests admitted but not finished; more are refused (RESOURCE_EXHAUSTED)
    request_timeout_s: float = 600.0  # a request not finished by then is aborted
    placement: str = "auto"  # one of PLACEMENT_STRATEGIES
    security: SecurityConfig = field(default_factory=SecurityConfig)
    state: StateConfig = field(default_factory=StateConfig)
    failover: FailoverConfig = field(default_factory=FailoverConfig)

    def __post_init__(self) -> None:
        _check(bool(self.model), "model", "must be a non-empty string")
        _check(
            self.placement in PLACEMENT_STRATEGIES,
            "placement",
            f"must be one of {list(PLACEMENT_STRATEGIES)}, got {self.placement!r}",
        )
        object.__setattr__(self, "pools", tuple(self.pools))
        _check(len(self.pools) > 0, "pools", "must list at least one pool")
        seen: set[str] = set()
        for i, pool in enumerate(self.pools):
            _check(pool.name not in seen, f"pools[{i}].name", f"duplicate pool name {pool.name!r}")
            seen.add(pool.name)
        _check(
            any(p.role in ("decode", "mixed") and p.num_workers > 0 for p in self.pools),
            "pools",
            "need at least one worker in a decode or mixed pool",
        )
        _check_attention_pools(self.pools)
        ports: dict[int, str] = {}
        for name in ("grpc_port", "http_port", "metrics_port"):
            port = getattr(self, name)
            if port is None and name == "metrics_port":
                continue
            _check(0 <= port <= 65535, name, f"must be in [0, 65535], got {port}")
            _check(port == 0 or port not in ports, name, f"port {port} is also {ports.get(port)}")
            if port:
                ports[port] = name
        _check(self.max_queue >= 1, "max_queue", f"must be >= 1, got {self.max_queue}")
        _check(self.request_timeout_s > 0, "request_timeout_s", f"must be > 0, got {self.request_timeout_s}")

    def attention_pool(self) -> PoolConfig | None:
        """The attention pool with workers (at most one, checked), else None."""
        return next((p for p in self.pools if p.role == ATTENTION_ROLE and p.num_workers > 0), None)

    def api_key(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """``security.api_key(environ)``, its errors named from the top (``security.api_key_file``)."""
        try:
            return self.security.api_key(environ)
        except ConfigError as e:
            raise e.under("security") from None

    def pool(self, name: str) -> PoolConfig:
        for p in self.pools:
            if p.name == name:
                return p
        raise KeyError(f"no pool named {name!r}; pools: {[p.name for p in self.pools]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; ``from_dict(to_dict())`` rebuilds an equal config."""
        d = asdict(self)
        d["pools"] = list(d["pools"])
        return d

    @staticmethod
    def from_dict(data: dict[str, Any]) -> ServeConfig:
        return _build(ServeConfig, data, "")

    @staticmethod
    def from_file(path: str | os.PathLike[str]) -> ServeConfig:
        path = os.fspath(path)
        with open(path) as f:
            text = f.read()
        if path.endswith((".yaml", ".yml")):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ConfigError("", f"{path}: invalid YAML: {e}") from e
        elif path.endswith(".json"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError("", f"{path}: invalid JSON: {e}") from e
        else:
            raise ConfigError("", f"{path}: unknown config file type (use .yaml, .yml or .json)")
        return ServeConfig.from_dict(data)


# ---------------------------------------------------------------- generic dict -> dataclass


def _check_attention_pools(pools: tuple[PoolConfig, ...]) -> None:
    """An attention pool (attention offload, attention_offload/) of N workers serves the M
    decode-capable (decode or mixed) workers, N a multiple of M: each is a model worker running
    an OffloadedEngine over its own N / M attention workers (the assignment:
    cluster/control/attention_groups.py). What the offloaded engine does not support yet is
    refused here, naming the field (prefix caching and speculation on the model worker are
    supported: its engine owns the shards' pages). A prefill pool beside it is supported:
    prefill workers push each request's KV straight to the attention worker holding it
    (decode_worker/attention_receiver.py)."""
    att = [(i, p) for i, p in enumerate(pools) if p.role == ATTENTION_ROLE and p.num_workers > 0]
    if not att:
        return
    i, pool = att[0]
    _check(len(att) == 1, f"pools[{att[-1][0]}].role", "at most one attention pool with workers")
    _check(pool.experts == 1, f"pools[{i}].experts", "an attention pool is not expert-parallel")
    for key in ("speculative_config", "enable_prefix_caching"):
        _check(key not in pool.engine, f"pools[{i}].engine.{key}", "is a model-worker option, not an attention pool's")
    served = [(j, p) for j, p in enumerate(pools) if p.role in ("decode", "mixed") and p.num_workers > 0]
    workers = sum(p.num_workers for _, p in served)
    counts = " + ".join(f"pools[{j}].num_workers = {p.num_workers}" for j, p in served)
    _check(
        pool.num_workers % workers == 0,
        f"pools[{i}].num_workers",
        f"the attention workers are split evenly among the decode and mixed workers ({counts}): "
        f"{pool.num_workers} attention workers is not a multiple of {workers}",
    )
    for j, model in served:
        _check(model.experts == 1, f"pools[{j}].experts", "expert parallelism with an attention pool is not supported")
        _check(
            model.tensor_parallel == 1,
            f"pools[{j}].tensor_parallel",
            "tensor parallelism with an attention pool is not supported",
        )
        for key in ("block_size", "dtype"):
            _check(
                pool.engine.get(key) == model.engine.get(key),
                f"pools[{i}].engine.{key}",
                f"must equal the model workers' (pools[{j}]: {model.engine.get(key)!r}), got {pool.engine.get(key)!r}",
            )


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, path: str) -> Any:
    """``value`` checked against the annotation ``tp`` (the few shapes the configs use)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if isinstance(tp, type) and hasattr(tp, "__dataclass_fields__"):
        return _build(tp, value, path)
    if origin is tuple:  # tuple[X, ...]
        (item_tp, _ellipsis) = typing.get_args(tp)
        _check(isinstance(value, list | tuple), path, f"must be a list, got {type(value).__name__}")
        return tuple(_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        _check(isinstance(value, dict), path, f"must be a mapping, got {type(value).__name__}")
        out = {}
        for k, v in value.items():
            _check(isinstance(k, key_tp), f"{path}.{k}", f"key must be {_type_name(key_tp)}")
            out[k] = _convert(val_tp, v, f"{path}.{k}")
        return out
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if len(args) != 2 or type(None) not in args:
            raise TypeError(f"{path}: only 'X | None' unions are supported by the config loader")
        (inner,) = (a for a in args if a is not type(None))
        return None if value is None else _convert(inner, value, path)
    # scalars: bool is not an int here, an int is a fine float
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, tp)
    _check(ok, path, f"must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: Any, path: str) -> Any:
    """Construct dataclass ``cls`` from a mapping, rejecting unknown and missing keys."""
    _check(isinstance(data, dict), path, f"must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    prefix = f"{path}." if path else ""
    unknown = sorted(set(data) - set(known), key=str)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}", f"unknown key; allowed keys: {sorted(known)}")
    kwargs = {}
    for name, f in known.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], f"{prefix}{name}")
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{prefix}{name}", "required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.under(path) if path else e from None
