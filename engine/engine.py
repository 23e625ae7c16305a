"""EngineCore: one model on one device; ``step()`` is schedule -> run -> update.

EngineCore is the narrow facade every worker drives: workers never reach into the
scheduler, the block pool or the KV manager. Request lifecycle through it:

    colocated / prefill:  add_request -> step()* -> finished (or, in prefill_only mode,
                          PREFILLED: blocks held until release())
    transferred (decode): reserve (blocks for KV computed elsewhere) -> KV written into
                          them by a transport -> admit(first token) -> step()* -> finished
    any time:             abort (blocks freed); pin/unpin keep blocks alive for readers
                          outside the engine (e.g. a transport reading pages in place)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.attention.backend import AttentionBackend, RemoteKVBackend
from engine.config import EngineConfig, ModelConfig, TokenWeaveConfig
from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.layout import KVLayout
from engine.kv_cache.manager import KVCacheManager
from engine.kv_cache.paged_cache import PagedKVCache
from engine.kv_cache.partitioned import PartitionedBlockPool, PartitionedKVCacheManager
from engine.kv_cache.step_gather import StepKVGather, StepKVPages
from engine.model_runner import ModelRunner
from engine.models.gguf import resolve_model_path
from engine.models.loader import load_model
from engine.models.tensor_parallel import load_tp_engine_model
from engine.moe import ExpertDispatcher
from engine.parallel import Communicator
from engine.request import Request, TokenLogprobs
from engine.scheduler.output import SchedulerOutput
from engine.scheduler.scheduler import Scheduler
from engine.spec.draft import DraftProposer
from engine.spec.ngram import NgramProposer
from engine.spec.proposer import Proposer
from engine.spec.smartspec import SpeculationPolicy
from engine.spec.speculator import SpecStats, Speculator, make_speculator
from engine.types import EngineStats, WorkerLimits

log = logging.getLogger(__name__)

# Called after each layer of a step: (layer index, the step's SchedulerOutput).
StepLayerHook = Callable[[int, SchedulerOutput], None]


@dataclass(frozen=True)
class StepResult:
    """What one ``step()`` did. ``outputs``: requests that gained tokens or finished (a
    request whose prompt completed in prefill_only mode is here, status PREFILLED);
    ``preempted``: ids sent back to waiting for recompute (their blocks were freed, so any
    KV already sent for them must be sent again)."""

    outputs: list[Request] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    # the step's schedule when the model ran (None for an empty step); data only, read after
    # the step (TPLeaderEngine runs a layer hook from it once the step is done)
    schedule: SchedulerOutput | None = None
    # step(gather_kv=True) on a TP engine: the step's new pages of every layer, all-gathered
    # over the TP group during the step (engine/kv_cache/step_gather.py)
    kv_pages: StepKVPages | None = None

    @property
    def finished(self) -> list[Request]:
        return [r for r in self.outputs if r.is_finished]


def make_attention_backend(kind: str, cache: PagedKVCache, sliding_window: int | None) -> AttentionBackend:
    if kind == "auto":
        kind = "triton" if cache.kv.is_cuda else "sdpa"
    if kind == "triton":
        from engine.attention.triton_paged import TritonPagedBackend

        return TritonPagedBackend(cache, sliding_window=sliding_window)
    from engine.attention.sdpa import TorchSDPABackend

    return TorchSDPABackend(cache, sliding_window=sliding_window)


class EngineCore:
    """Owns the model, the paged KV cache and the scheduler.

    Plug-ins arrive by constructor injection: ``dispatcher`` (expert-parallel MoE) and
    ``attention_backend`` (e.g. remote attention); the defaults run everything locally.

    Speculative decoding (``config.speculative``): the proposer it names (the n-gram lookup,
    or a draft model loaded here with its own paged KV of as many blocks as the target's, so
    whatever the target admits the draft can hold; sized from ``max_kv_memory_gb`` the two
    pools split the memory in proportion to their bytes per token), and the policy it names.
    ``proposer`` / ``policy`` replace them (tests inject oracles).

    Tensor parallelism (``tensor_parallel``: this rank's communicator, made outside; the
    engine creates no process group): the model is rank ``comm.rank``'s shard
    (engine/models/tensor_parallel.py: local query / KV heads, MLP rows, vocab slice) whose
    forward all-reduces the embedding, o_proj and down_proj outputs and gathers the logits,
    and the paged cache holds only this rank's KV heads (``layout.num_kv_heads`` is local).
    SPMD invariant: every rank of the group is an EngineCore fed the same calls (add_request,
    abort, reserve/admit/release, step) in the same order; the scheduler and block pool are
    then in the same state on every rank, so each step schedules the same batch and issues the
    same collectives, the gathered logits are identical, and sampling agrees (greedy and
    seeded rows by construction, unseeded draws are rank 0's: sampler.sample's ``agree``).
    Each rank's StepResult is the same; a worker reports rank 0's. ``tokenweave`` (None:
    ``config.tokenweave``, on from 2048 tokens by default): steps of at least ``min_tokens``
    tokens run as two token micro-batches whose all-reduces overlap the other's compute
    (TPReductions.forward_overlapped; not with a layer hook, which needs the layers in order:
    TPLeaderEngine runs its hooks after the step). Not combined with expert
    parallelism (``dispatcher``), a remote attention backend or speculative decoding (refused).
    """

    def __init__(
        self,
        config: EngineConfig,
        dispatcher: ExpertDispatcher | None = None,
        attention_backend: AttentionBackend | None = None,
        progress: bool = False,
        proposer: Proposer | None = None,
        policy: SpeculationPolicy | None = None,
        tensor_parallel: Communicator | None = None,
        tokenweave: TokenWeaveConfig | None = None,
    ):
        self.config = config
        mc = config.model
        spec = config.speculative
        if spec is None and (proposer is not None or policy is not None):
            raise ValueError("a proposer or speculation policy was given but EngineConfig.speculative is None")
        dtype = getattr(torch, config.dtype)
        kv_heads, kv_head_start = mc.num_kv_heads, 0
        if tokenweave is not None and tensor_parallel is None:
            raise ValueError("tokenweave was given without tensor_parallel (it overlaps TP's all-reduces)")
        if tensor_parallel is None:
            self.model = load_model(
                config.model_path, mc, dtype, config.device, config.max_model_len, dispatcher, progress
            )
        else:
            refused = [
                what
                for what, given in (
                    ("an expert-parallel dispatcher", dispatcher is not None),
                    ("an injected attention_backend", attention_backend is not None),
                    ("EngineConfig.speculative", spec is not None),
                )
                if given
            ]
            if refused:
                raise ValueError(f"tensor_parallel is not combined with {', '.join(refused)}")
            path = resolve_model_path(config.model_path, progress=progress)
            self.model, plan = load_tp_engine_model(
                path, mc, tensor_parallel, config.max_model_len, dtype, config.device, tokenweave or config.tokenweave
            )
            kv_heads = plan.kv_heads  # the paged cache holds this rank's KV heads only
            kv_head_start = plan.rank * plan.kv_heads
        self.tensor_parallel = tensor_parallel
        # a TP rank's layout names its heads [rank * kv_heads, (rank + 1) * kv_heads) of the model's
        self.layout = KVLayout(
            config.dtype,
            config.cache.block_size,
            mc.num_layers,
            kv_heads,
            mc.head_dim,
            kv_head_start=kv_head_start,
            total_kv_heads=mc.num_kv_heads,
        )
        draft_path = draft_config = None
        if spec is not None and spec.method == "draft_model" and proposer is None:
            draft_path = resolve_model_path(spec.model, progress=progress)
            draft_config = ModelConfig.from_hf_dir(draft_path)
        kv_gb = config.cache.max_kv_memory_gb
        if draft_config is not None:  # the draft's pool takes its share of the KV memory
            draft_layout = KVLayout(
                config.dtype,
                config.cache.block_size,
                draft_config.num_layers,
                draft_config.num_kv_heads,
                draft_config.head_dim,
            )
            t, d = (x.page_bytes * x.num_layers for x in (self.layout, draft_layout))
            kv_gb *= t / (t + d)
        num_blocks = config.cache.num_blocks or PagedKVCache.blocks_for_memory(self.layout, kv_gb)
        # K/V kept remotely (attention offload): the pool accounts for the remote pages, no local ones
        remote_kv = isinstance(attention_backend, RemoteKVBackend) and attention_backend.keeps_kv_remotely
        local_blocks = 1 if remote_kv else num_blocks
        self.cache = PagedKVCache(self.layout, local_blocks, config.device, shared=config.kv_cache_shared)
        self.backend = attention_backend or make_attention_backend(
            config.attention_backend, self.cache, mc.sliding_window
        )
        self.model.set_attention_backend(self.backend)
        if remote_kv:  # one sub-pool per remote store; its block ids address the store's pages
            parts = list(attention_backend.kv_partitions)
            if sum(parts) != num_blocks:
                raise ValueError(
                    f"CacheConfig.num_blocks ({num_blocks}) must equal the remote stores' total "
                    f"kv_partitions {parts} (sum {sum(parts)})"
                )
            self.pool = PartitionedBlockPool(parts, config.cache.enable_prefix_caching)
            self.kv = PartitionedKVCacheManager(self.pool, config.cache.block_size)
        else:
            self.pool = BlockPool(num_blocks, config.cache.enable_prefix_caching)
            self.kv = KVCacheManager(self.pool, config.cache.block_size)
        self.scheduler = Scheduler(config.scheduler, config.cache, self.kv)
        self.runner = ModelRunner(self.model, config.cache.block_size, config.device, config.kernels)
        self.speculator: Speculator | None = None
        if spec is not None:
            if proposer is None and draft_path is not None:
                proposer = DraftProposer.load(
                    draft_path,
                    mc,
                    config.max_model_len,
                    num_blocks,
                    config.cache.block_size,
                    config.dtype,
                    config.device,
                    target_path=config.model_path,
                    backend_factory=lambda cache, window: make_attention_backend(
                        config.attention_backend, cache, window
                    ),
                    kernels=config.kernels,
                    progress=progress,
                )
            elif proposer is None:
                proposer = NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
            self.speculator = make_speculator(
                spec, proposer, config.max_model_len, config.scheduler.max_num_batched_tokens, policy
            )
        log.info("engine ready: %s, %d KV blocks of %d tokens", mc.architecture, num_blocks, config.cache.block_size)

    # ------------------------------------------------------------ requests
    def validate(self, req: Request) -> None:
        """Raise ValueError for a request the engine cannot serve (message names the field).

        The serving path validates requests at the frontend against ``limits()``; this is
        the engine's own guard for direct users (LLM) and a last line against bugs."""
        vocab = self.config.model.vocab_size
        bad = [t for t in req.prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        limit = self.config.max_model_len
        if len(req.prompt_token_ids) >= limit:
            raise ValueError(f"prompt of {len(req.prompt_token_ids)} tokens reaches max_model_len {limit}")

    def prepare(self, req: Request) -> Request:
        """Fill engine-owned fields of a new request and validate it."""
        if not req.eos_token_ids:
            req.eos_token_ids = self.config.model.eos_token_ids
        req.max_model_len = self.config.max_model_len
        self.validate(req)
        return req

    def add_request(self, req: Request) -> None:
        """Queue a prompt to compute here. Raises ValueError for a request that can never run."""
        self.scheduler.add_request(self.prepare(req))

    def abort(self, request_id: str) -> Request | None:
        """Cancel a request wherever it is (waiting, running, prefilled, reserved); frees its
        blocks. None if unknown."""
        req = self.scheduler.abort(request_id)
        if req is not None and self.speculator is not None:
            self.speculator.forget(request_id)
        return req

    def reserve(self, req: Request, partition: int | None = None) -> list[int] | None:
        """decode_only: take blocks for ``req``'s prompt KV, computed elsewhere, before it
        arrives. Returns the block ids (the transport writes the pages there), or None when
        the pool has no room now (retry later). Raises ValueError for a request that can
        never fit. ``partition``: the sub-pool of a partitioned pool (a remote KV backend's
        ``kv_partitions``) to take them from; None: the engine's choice (the most free)."""
        return self.scheduler.reserve(self.prepare(req), partition)

    def admit(self, request_id: str, first_token: int) -> Request:
        """decode_only: the reserved request's prompt KV has arrived and its first token was
        sampled by the prefill; it joins the running batch (or finishes, if that token ends it)."""
        return self.scheduler.admit(request_id, first_token)

    def release(self, request_id: str) -> Request:
        """prefill_only: the PREFILLED request's KV has been sent (or given up on); free its blocks."""
        return self.scheduler.release(request_id)

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (a copy): page i holds tokens [i*block_size, (i+1)*block_size)."""
        return list(self.kv.block_ids(request_id))

    def pin(self, blocks: list[int]) -> None:
        """Take one extra reference on each block: it is not reused until ``unpin``."""
        self.pool.touch(blocks)

    def unpin(self, blocks: list[int]) -> None:
        """Drop the references ``pin`` took (pass the same blocks, in any order)."""
        self.pool.free(list(blocks))

    # ------------------------------------------------------------ the step
    def step(self, layer_hook: StepLayerHook | None = None, gather_kv: bool = False) -> StepResult:
        """One iteration: schedule -> run -> update. ``gather_kv`` (tensor parallelism, every
        rank alike): all-gather each layer's new pages over the TP group as soon as the layer
        wrote them, returned as ``StepResult.kv_pages`` (engine/kv_cache/step_gather.py)."""
        if gather_kv and (self.tensor_parallel is None or self.speculator is not None):
            raise ValueError("step(gather_kv=True) needs a tensor-parallel engine without speculation")
        if self.speculator is not None:
            return self._speculative_step(self.speculator, layer_hook)
        out = self.scheduler.schedule()
        if out.is_empty:
            return StepResult(self.scheduler.take_finished_in_schedule(), list(out.preempted))
        hook = None if layer_hook is None else (lambda layer: layer_hook(layer, out))
        gather = (
            StepKVGather(self.cache, self.tensor_parallel, out.written_blocks(self.layout.block_size))
            if gather_kv
            else None
        )
        sampled, logprobs = self.runner.execute(out, hook, None if gather is None else gather.layer_written)
        kv_pages = None if gather is None else gather.finish()
        changed = self.scheduler.update(out, sampled)
        for req in changed:
            lp = logprobs.get(req.request_id)
            if lp is not None:
                req.logprobs.append(lp)
        return StepResult(changed, list(out.preempted), out, kv_pages)

    def _speculative_step(self, spec: Speculator, layer_hook: StepLayerHook | None) -> StepResult:
        """propose -> schedule -> run (score + verify when drafts were scheduled, the plain
        sampling path otherwise) -> update -> tell the proposer and policy (speculator.py)."""
        start = time.perf_counter()
        s = self.scheduler
        spec.propose(s.running, self._pending_prompt_tokens())
        out = s.schedule()
        for rid in out.preempted:
            spec.preempted(rid)
        if out.is_empty:
            done = s.take_finished_in_schedule()
            spec.end_step(out, [*s.running, *done], None)
            for req in done:
                spec.forget(req.request_id)
            return StepResult(done, list(out.preempted))
        hook = None if layer_hook is None else (lambda layer: layer_hook(layer, out))
        logprobs: dict[str, list[TokenLogprobs]]
        if out.num_draft_tokens:
            sampled, logprobs = spec.verify(out, self.runner.score(out, hook))
        else:
            sampled, one = self.runner.execute(out, hook)
            logprobs = {rid: [lp] for rid, lp in one.items()}
        before = {sr.request_id: sr.num_output_tokens for sr in out.scheduled}  # nothing appended since schedule()
        changed = s.update(out, sampled)
        for req in changed:
            lps = logprobs.get(req.request_id)
            if lps is not None:  # one per token update() appended (a finish may cut the run)
                req.logprobs.extend(lps[: len(req.output_token_ids) - before.get(req.request_id, 0)])
        spec.end_step(out, [*s.running, *changed], time.perf_counter() - start)
        for req in changed:
            if req.is_finished:
                spec.forget(req.request_id)
        return StepResult(changed, list(out.preempted), out)

    def _pending_prompt_tokens(self) -> int:
        s = self.scheduler
        pending = sum(r.num_tokens - r.num_computed_tokens for r in s.waiting)
        return pending + sum(
            r.num_tokens - r.num_computed_tokens for r in s.running if r.num_computed_tokens < r.num_tokens - 1
        )

    def set_cluster_pressure(self, pressure: float) -> None:
        """Queueing at the decode pool (>= 0) from the router: SmartSpec counts each second
        of speculative work (1 + pressure) seconds. Ignored without speculation."""
        if self.speculator is not None:
            self.speculator.set_cluster_pressure(pressure)

    def spec_stats(self) -> SpecStats | None:
        """Speculative decoding counters and the draft KV pool (None without speculation)."""
        return None if self.speculator is None else self.speculator.stats()

    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ------------------------------------------------------------ reports
    def stats(self) -> EngineStats:
        s = self.scheduler
        pending = sum(r.num_tokens - r.num_computed_tokens for r in s.waiting)
        # running requests past their prompt have exactly their last sampled token uncomputed:
        # only partially prefilled ones hold prompt work
        pending += sum(
            r.num_tokens - r.num_computed_tokens for r in s.running if r.num_computed_tokens < r.num_tokens - 1
        )
        return EngineStats(
            running_requests=len(s.running),
            waiting_requests=len(s.waiting),
            free_kv_blocks=self.pool.num_free,
            total_kv_blocks=self.pool.num_blocks,
            pending_prompt_tokens=pending,
            preemptions=s.num_preemptions,
            prefix_cache_hits=self.pool.prefix_hits,
            prefix_cache_queries=self.pool.prefix_queries,
        )

    def cached_block_hashes(self) -> frozenset[int]:
        """Prefix-cache hashes of the full blocks this engine holds (in use or evictable)."""
        return self.pool.cached_hashes()

    def limits(self) -> WorkerLimits:
        c = self.config
        return WorkerLimits(
            max_model_len=c.max_model_len,
            vocab_size=c.model.vocab_size,
            block_size=c.cache.block_size,
            num_kv_blocks=self.kv.max_blocks_per_request,  # the pool; offloaded: one shard
            max_num_batched_tokens=c.scheduler.max_num_batched_tokens,
            chunked_prefill=c.scheduler.enable_chunked_prefill,
        )
