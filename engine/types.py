"""The data that crosses the worker boundary: request specs, stream chunks, stats, limits, errors.

Every worker kind (prefill, decode; later attention and expert workers) speaks in these
types, in-process and over Ray alike (they pickle). They are plain frozen dataclasses with
no defaults for what a worker must report: a field a worker forgets is a TypeError at
construction, never a silent 0. ``None`` is reserved for "does not apply to this role"
(e.g. a decode worker sends no KV, so its ``transfer_bytes`` is None).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.request import Request, SamplingParams, TokenLogprobs

# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class RequestSpec:
    """What crosses process boundaries to start a request (no tokenizer, no engine state).

    ``prompt_token_ids`` are validated once, at the frontend, against ``WorkerLimits``."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams

    def to_request(self) -> Request:
        return Request(self.request_id, list(self.prompt_token_ids), self.params)


@dataclass(frozen=True)
class StreamChunk:
    """A read of a request's output stream from some cursor on."""

    token_ids: list[int]  # tokens from the requested cursor on
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    error: str | None = None  # set when the request failed (finish_reason "abort")
    num_cached_tokens: int = 0  # prompt tokens served from a prefix cache (where it was prefilled)
    # wall-clock time (time.time()) the prefill worker finished the prompt; set on a prefill
    # worker's chunks only (the start of the KV hand-off, see FirstToken.prefilled_at)
    prefilled_at: float | None = None


@dataclass(frozen=True)
class FirstToken:
    """The prefill worker's result that the decode worker needs to admit a transferred request."""

    token_id: int
    logprobs: TokenLogprobs | None
    num_cached_tokens: int  # prefix-cache hits of the prefill, reported in the request's usage
    # StreamChunk.prefilled_at of the prefill: the decode worker measures the hand-off (prefill
    # end -> its first decode step) from it. Wall clocks: exact on one node, skewed by the
    # clock offset across nodes. None: not measured.
    prefilled_at: float | None = None


# --------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class HistogramReport:
    """A cumulative histogram: ``counts[i]`` observations <= ``bounds[i]`` (Prometheus
    buckets); ``count`` is the +Inf bucket. Totals restart with the worker."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float
    count: int

    def __post_init__(self) -> None:
        if len(self.bounds) != len(self.counts):
            raise ValueError(f"{len(self.bounds)} bounds but {len(self.counts)} counts")


@dataclass(frozen=True)
class EngineStats:
    """What one EngineCore reports about its batch and KV pool (``EngineCore.stats()``)."""

    running_requests: int  # in the running batch
    waiting_requests: int  # queued for their (re)computation
    free_kv_blocks: int  # allocatable now, including evictable prefix-cached blocks
    total_kv_blocks: int
    pending_prompt_tokens: int  # prompt tokens queued or partially prefilled
    preemptions: int  # since start
    prefix_cache_hits: int  # blocks, since start
    prefix_cache_queries: int  # blocks, since start


@dataclass(frozen=True)
class SpeculationReport:
    """A speculating worker's draft counters since start (engine/spec/: ``SpecStats``)."""

    proposed_tokens: int  # draft tokens verified by the target model
    accepted_tokens: int  # of those, accepted (emitted)
    chosen_k: HistogramReport  # the speculation length the policy chose, per request and step
    # the draft model's own KV pool beside the target's (None: a proposer without one, n-gram)
    draft_free_kv_blocks: int | None
    draft_total_kv_blocks: int | None
    # proposer faults since start: each one's step ran without speculation (engine/spec/speculator.py)
    proposer_faults: int
    proposer_disabled: bool  # turned off for the worker's life after repeated faults


@dataclass(frozen=True)
class ExpertCacheReport:
    """An EP rank's ExpertFlow fast tier (pool ``expert_cache_slots``; expert_router's
    CacheStats and TieredExperts), cumulative, restarting with the worker. Counts are
    (MoE layer, expert) accesses of this rank's own experts."""

    slots: int  # fast-tier experts per MoE layer
    hits: int  # needed experts already resident
    misses: int  # needed experts loaded on demand (the forward waited for them)
    prefetches: int  # experts loaded ahead of need by the path predictor (0 without one)
    prefetch_used: int  # of those, hit before being evicted
    evictions: int
    load_bytes: int  # expert weights copied slow tier -> fast tier
    load_seconds: float  # those bytes over the MODELLED slow-tier link (bandwidth_gbps)
    copy_seconds: float  # measured wall time of the copies themselves (host memory on CPU)

    @property
    def hit_ratio(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        return self.prefetch_used / self.prefetches if self.prefetches else 0.0


@dataclass(frozen=True)
class ExpertParallelReport:
    """An EP rank's place in its group and its cumulative traffic (expert_router's EPStats,
    this rank's view; counters restart with the worker). Bytes count what this rank sent to
    OTHER ranks."""

    rank: int
    world_size: int
    connected: bool  # its group formed (before that the worker serves nothing)
    rounds: int  # MoE layer rounds taken part in (active or serving peers)
    tokens: int  # tokens routed, summed over MoE layers
    local_tokens: int  # of those, tokens whose top-k experts all sit on this rank
    remote_pairs: int  # (token, other rank) rows sent
    dispatch_bytes: int
    combine_bytes: int
    comm_seconds: float  # wall time in the group's collectives
    cache: ExpertCacheReport | None = None  # None: no fast tier (the whole share resident)

    @property
    def local_fraction(self) -> float:
        return self.local_tokens / self.tokens if self.tokens else 0.0


@dataclass(frozen=True)
class AttentionOffloadReport:
    """A model worker's view of its attention workers (attention_offload; cumulative counters
    restart with the worker). Bytes are the attention tensors (q, k, v out, the output back);
    ``tokens`` are query rows attended, summed over layers (payload bytes / tokens: bytes per
    token and layer)."""

    attention_workers: int
    connected: bool  # its attention group formed (before that the worker serves nothing)
    used_blocks: tuple[int, ...]  # per attention worker: blocks in use in the engine's sub-pool for it
    total_blocks: tuple[int, ...]  # per attention worker: its pages (the sub-pool's size)
    tokens: int
    payload_bytes: int
    control_bytes: int  # headers and BEGIN bodies (the per-step block tables included)
    wait_seconds: float  # the model worker blocked waiting for attention outputs
    step_seconds: float  # the model worker's engine steps (wait / step: the share not overlapped)

    @property
    def max_load(self) -> float:
        """The busiest attention worker's fraction of blocks in use."""
        return max((u / t for u, t in zip(self.used_blocks, self.total_blocks, strict=True) if t), default=0.0)


@dataclass(frozen=True)
class WorkerStats:
    """One worker's load and health report (``WorkerAPI.stats()``).

    Counters and histograms restart from 0 with the worker; ``started_at`` (unix time)
    identifies the incarnation. ``stale``: a long engine step kept the loop busy, so this is
    the report taken after the last step instead of a fresh one."""

    worker_id: str
    role: str  # "prefill" | "decode" | "mixed"
    started_at: float
    stale: bool
    engine: EngineStats
    pending_requests: int  # accepted and not finished (queued, running, or waiting for KV)
    transfers_in_flight: int  # KV transfers this worker is sending or receiving
    transfer_failures: int  # transfers that failed or timed out, as seen by this worker
    transfer_bytes: int | None  # payload bytes of completed transfers; None: not a KV sender
    transfer_seconds: HistogramReport | None  # first chunk -> sender DONE; None: not a sender
    queue_seconds: HistogramReport  # arrival -> first scheduled, for prompts prefilled here
    reserve_wait_seconds: HistogramReport | None  # KV block reservation wait; None: not a receiver
    # KV hand-off: the prefill worker's end of prompt -> the start of this worker's first decode
    # step of the request (transfer tail, admission, scheduling); None: not a receiver
    handoff_seconds: HistogramReport | None
    speculation: SpeculationReport | None  # None: the worker does not speculate
    cached_block_hashes: frozenset[int]  # prefix-cache hashes of full blocks held (prefix routing)
    expert_parallel: ExpertParallelReport | None = None  # None: not an EP rank
    attention: AttentionOffloadReport | None = None  # None: not a model worker of an attention pool


@dataclass(frozen=True)
class WorkerLimits:
    """What a worker can serve; the frontend validates every request against these once."""

    max_model_len: int  # prompt + generated tokens never exceed this
    vocab_size: int
    block_size: int  # tokens per KV block (prefix hashes are per full block)
    num_kv_blocks: int  # the most one request can hold (the whole pool; offloaded: one shard's)
    max_num_batched_tokens: int  # per step
    chunked_prefill: bool  # without it a prompt must fit max_num_batched_tokens

    @property
    def max_context_tokens(self) -> int:
        """Longest context (prompt + output) this worker can ever hold."""
        return min(self.max_model_len, self.num_kv_blocks * self.block_size)

    def combine(self, other: WorkerLimits) -> WorkerLimits:
        """Limits that satisfy both workers (a request may land on either)."""
        if other.block_size != self.block_size:
            raise ValueError(f"workers disagree on the KV block size: {self.block_size} vs {other.block_size}")
        if other.vocab_size != self.vocab_size:
            raise ValueError(f"workers disagree on the vocabulary size: {self.vocab_size} vs {other.vocab_size}")
        return WorkerLimits(
            max_model_len=min(self.max_model_len, other.max_model_len),
            vocab_size=self.vocab_size,
            block_size=self.block_size,
            num_kv_blocks=min(self.num_kv_blocks, other.num_kv_blocks),
            max_num_batched_tokens=min(self.max_num_batched_tokens, other.max_num_batched_tokens),
            chunked_prefill=self.chunked_prefill and other.chunked_prefill,
        )


# --------------------------------------------------------------------------- errors

# How a stream that failed for its KV transfer begins its error (``StreamChunk.error``), on
# either side of the transfer: the router tells a failed transfer (retried with a fresh one)
# from other failures by these.
KV_TRANSFER_FAILED = "KV transfer failed"
KV_TRANSFER_TIMED_OUT = "KV transfer timed out"


class EngineStopped(RuntimeError):
    """The worker's engine loop is not running (it crashed, or the worker shut down): the
    worker cannot serve anything. Callers treat the worker as unavailable."""


class UnknownRequest(KeyError):
    """A call named a request id the worker does not hold (finished, aborted, never sent)."""


class PeerUnreachable(ConnectionError):
    """A worker could not open its KV link to a peer's address: the peer (a decode worker's
    KV receiver) is gone or not listening. Nothing was admitted for the request."""


# Where a decode worker's KV receiver listens: transport-specific and opaque to everyone but
# the transport (a Unix socket path for shm, (host, port) for grpc and torch).
KVAddress = object
