"""EngineCore: one model on one device; ``step()`` is schedule -> run -> update."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from engine.attention.backend import AttentionBackend
from engine.config import EngineConfig
from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.layout import KVLayout
from engine.kv_cache.manager import KVCacheManager
from engine.kv_cache.paged_cache import PagedKVCache
from engine.model_runner import ModelRunner
from engine.models.loader import load_model
from engine.moe import ExpertDispatcher
from engine.request import Request
from engine.scheduler.output import SchedulerOutput
from engine.scheduler.scheduler import Scheduler

log = logging.getLogger(__name__)

# Called after each layer of a step: (layer index, the step's SchedulerOutput).
StepLayerHook = Callable[[int, SchedulerOutput], None]


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
    """

    def __init__(
        self,
        config: EngineConfig,
        dispatcher: ExpertDispatcher | None = None,
        attention_backend: AttentionBackend | None = None,
        progress: bool = False,
    ):
        self.config = config
        mc = config.model
        dtype = getattr(torch, config.dtype)
        self.model = load_model(config.model_path, mc, dtype, config.device, config.max_model_len, dispatcher, progress)
        self.layout = KVLayout(config.dtype, config.cache.block_size, mc.num_layers, mc.num_kv_heads, mc.head_dim)
        num_blocks = config.cache.num_blocks or PagedKVCache.blocks_for_memory(
            self.layout, config.cache.max_kv_memory_gb
        )
        self.cache = PagedKVCache(self.layout, num_blocks, config.device, shared=config.kv_cache_shared)
        self.backend = attention_backend or make_attention_backend(
            config.attention_backend, self.cache, mc.sliding_window
        )
        self.model.set_attention_backend(self.backend)
        self.pool = BlockPool(num_blocks, config.cache.enable_prefix_caching)
        self.kv = KVCacheManager(self.pool, config.cache.block_size)
        self.scheduler = Scheduler(config.scheduler, config.cache, self.kv)
        self.runner = ModelRunner(self.model, config.cache.block_size, config.device)
        log.info("engine ready: %s, %d KV blocks of %d tokens", mc.architecture, num_blocks, config.cache.block_size)

    def validate(self, req: Request) -> None:
        """Raise ValueError for a request the engine cannot serve (message names the field)."""
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
        self.scheduler.add_request(self.prepare(req))

    def abort(self, request_id: str) -> Request | None:
        return self.scheduler.abort(request_id)

    def step(self, layer_hook: StepLayerHook | None = None) -> list[Request]:
        """One iteration: schedule -> run -> update. Returns requests with new tokens."""
        out = self.scheduler.schedule()
        if out.is_empty:
            return self.scheduler.take_finished_in_schedule()
        hook = None if layer_hook is None else (lambda layer: layer_hook(layer, out))
        sampled, logprobs = self.runner.execute(out, hook)
        changed = self.scheduler.update(out, sampled)
        for req in changed:
            lp = logprobs.get(req.request_id)
            if lp is not None:
                req.logprobs.append(lp)
        return changed

    def has_work(self) -> bool:
        return self.scheduler.has_work

    def load_stats(self) -> dict:
        """The load-report fields every worker shares (batch, KV pool, preemptions, prefix cache)."""
        return {
            "running_requests": len(self.scheduler.running),
            "free_kv_blocks": self.pool.num_free,
            "total_kv_blocks": self.pool.num_blocks,
            "preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hits": self.pool.prefix_hits,
            "prefix_cache_queries": self.pool.prefix_queries,
        }
