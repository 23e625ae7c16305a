"""PagedModel: a DecoderLM with its own paged KV cache, driven sequence by sequence.

The draft proposer (draft.py) runs its model through this, and the offline speculative loop
(offline.py) runs a target through it. It is the engine's model runner without a scheduler:
the caller says which tokens of which sequence to compute, and owns rollback.

Per sequence (string id) it keeps ``tokens``: the ids whose K/V are in the cache, at
positions 0..len-1, and ``blocks``: page i holds positions [i*bs, (i+1)*bs). Invariants:
``len(blocks) >= ceil(len(tokens) / bs)``; a block belongs to at most one sequence (no
prefix sharing: a draft's pages are short-lived and rolled back often); every block is either
held by one sequence or free in the BlockPool.

Lifecycle: ``grow`` (blocks for a target length, all or nothing) -> ``forward`` (computes the
new tokens' K/V, returns logits) -> ``truncate`` (roll back to a prefix: drops tokens and
frees the pages past it) -> ``release`` (frees everything). For a handoff between processes:
``reserve`` (blocks for n tokens) -> pages written in place or by ``write_pages`` ->
``commit(token_ids)``; ``read_pages`` copies a sequence's pages out.

Forward inputs are built by the engine's own ``StepInputs`` (engine/model_runner.py) from a
SchedulerOutput of ``ScheduledRequest`` entries, so the attention metadata is exactly the
engine's, and the CPU kernels are chosen as the runner chooses them (``KernelConfig``,
``native_kernels_for``). Tensor shapes: logits [B, V] fp32 (the last new row of each sequence) or
[sum(new tokens), V] with ``all_rows``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from engine.attention.backend import AttentionBackend
from engine.config import KernelConfig, ModelConfig
from engine.kv_cache.block_pool import BlockPool, NoFreeBlocks
from engine.kv_cache.layout import KVLayout
from engine.kv_cache.paged_cache import PagedKVCache
from engine.model_runner import StepInputs, native_kernels_for
from engine.models.gguf import resolve_model_path
from engine.models.llama import DecoderLM
from engine.models.loader import load_model
from engine.request import SamplingParams
from engine.scheduler.output import ScheduledRequest, SchedulerOutput

# (cache, sliding_window) -> the attention backend over that cache. The engine injects its own
# choice (engine.engine.make_attention_backend with its config); the default is torch SDPA.
BackendFactory = Callable[[PagedKVCache, int | None], AttentionBackend]

_PARAMS = SamplingParams()  # StepInputs reads no sampling field; ScheduledRequest needs one


def sdpa_backend(cache: PagedKVCache, sliding_window: int | None) -> AttentionBackend:
    from engine.attention.sdpa import TorchSDPABackend

    return TorchSDPABackend(cache, sliding_window=sliding_window)


@dataclass
class _Seq:
    tokens: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)


class PagedModel:
    def __init__(
        self,
        model: DecoderLM,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: str = "float32",
        device: str = "cpu",
        backend_factory: BackendFactory | None = None,
        kernels: KernelConfig | None = None,
    ):
        self.model = model
        self.config = config
        self.device = torch.device(device)
        self.layout = KVLayout(dtype, block_size, config.num_layers, config.num_kv_heads, config.head_dim)
        self.cache = PagedKVCache(self.layout, num_blocks, device)
        self.backend = (backend_factory or sdpa_backend)(self.cache, config.sliding_window)
        self.model.set_attention_backend(self.backend)
        # the same CPU kernel choice as the engine's ModelRunner (native where they apply)
        self.model.set_native_kernels(native_kernels_for(model, self.device, kernels or KernelConfig()))
        self.pool = BlockPool(num_blocks, enable_prefix_caching=False)
        self.block_size = block_size
        self._seqs: dict[str, _Seq] = {}

    @staticmethod
    def load(
        path: str,
        max_model_len: int,
        num_blocks: int,
        block_size: int,
        dtype: str = "float32",
        device: str = "cpu",
        backend_factory: BackendFactory | None = None,
        kernels: KernelConfig | None = None,
        progress: bool = False,
    ) -> PagedModel:
        """Load a checkpoint (HF directory or .gguf) with ``num_blocks`` pages of KV."""
        path = resolve_model_path(path, progress=progress)
        config = ModelConfig.from_hf_dir(path)
        model = load_model(path, config, getattr(torch, dtype), device, max_model_len, progress=progress)
        return PagedModel(model, config, num_blocks, block_size, dtype, device, backend_factory, kernels)

    # ------------------------------------------------------------ capacity
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def grow(self, seq_id: str, num_tokens: int) -> bool:
        """Hold blocks for positions [0, num_tokens) of the sequence (created if new).
        False, changing nothing, when the pool lacks them."""
        seq = self._seqs.get(seq_id)
        held = 0 if seq is None else len(seq.blocks)
        need = self.blocks_needed(num_tokens) - held
        if need > self.pool.num_free:
            return False
        if seq is None:
            seq = self._seqs[seq_id] = _Seq()
        if need > 0:
            seq.blocks.extend(self.pool.allocate(need))
        return True

    # ------------------------------------------------------------ queries
    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def num_computed(self, seq_id: str) -> int:
        seq = self._seqs.get(seq_id)
        return 0 if seq is None else len(seq.tokens)

    def tokens(self, seq_id: str) -> list[int]:
        """The ids whose K/V the sequence holds (a view: do not modify)."""
        seq = self._seqs.get(seq_id)
        return [] if seq is None else seq.tokens

    def block_ids(self, seq_id: str) -> list[int]:
        seq = self._seqs.get(seq_id)
        return [] if seq is None else list(seq.blocks)

    def num_held_blocks(self) -> int:
        return sum(len(s.blocks) for s in self._seqs.values())

    # ------------------------------------------------------------ compute
    @torch.inference_mode()
    def forward(self, batch: Sequence[tuple[str, Sequence[int]]], all_rows: bool = False) -> torch.Tensor:
        """Compute K/V of each sequence's ``new`` tokens (appended after its tokens) and return
        fp32 logits: [B, V] of each sequence's last new token, or [sum(len(new)), V].

        Raises NoFreeBlocks when a sequence's blocks cannot be grown (call ``grow`` first to
        find out without raising)."""
        if not batch:
            return torch.empty(0, self.config.vocab_size)
        scheduled = []
        for seq_id, new in batch:
            if not new:
                raise ValueError(f"sequence {seq_id!r}: forward needs at least one new token")
            start = self.num_computed(seq_id)
            if not self.grow(seq_id, start + len(new)):
                raise NoFreeBlocks(f"sequence {seq_id!r}: no free blocks for {start + len(new)} tokens")
            scheduled.append(
                ScheduledRequest(
                    request_id=seq_id,
                    token_ids=list(new),
                    start_pos=start,
                    block_ids=self._seqs[seq_id].blocks,
                    sample=True,
                    params=_PARAMS,
                    num_output_tokens=0,
                )
            )
        inputs = StepInputs(SchedulerOutput(scheduled=scheduled), self.block_size, self.device)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta)  # [T, hidden]
        for seq_id, new in batch:
            self._seqs[seq_id].tokens.extend(new)
        return self.model.compute_logits(hidden if all_rows else hidden[inputs.sample_rows])

    # ------------------------------------------------------------ rollback
    def truncate(self, seq_id: str, num_tokens: int) -> None:
        """Keep the first ``num_tokens`` tokens' K/V; free the pages past them."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            if num_tokens:
                raise KeyError(f"unknown sequence {seq_id!r}")
            return
        if not 0 <= num_tokens <= len(seq.tokens):
            raise ValueError(f"sequence {seq_id!r}: cannot truncate {len(seq.tokens)} tokens to {num_tokens}")
        del seq.tokens[num_tokens:]
        keep = self.blocks_needed(num_tokens)
        if len(seq.blocks) > keep:
            self.pool.free(list(reversed(seq.blocks[keep:])))
            del seq.blocks[keep:]

    def release(self, seq_id: str) -> None:
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            self.pool.free(list(reversed(seq.blocks)))

    # ------------------------------------------------------------ handoff
    def reserve(self, seq_id: str, num_tokens: int) -> list[int] | None:
        """Blocks for a sequence whose K/V arrive from elsewhere (None: no room now)."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already exists")
        if not self.grow(seq_id, num_tokens):
            return None
        return list(self._seqs[seq_id].blocks)

    def commit(self, seq_id: str, token_ids: Sequence[int]) -> None:
        """The reserved pages now hold the K/V of ``token_ids`` (positions 0..n-1)."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise KeyError(f"unknown sequence {seq_id!r} (reserve it first)")
        if seq.tokens:
            raise ValueError(f"sequence {seq_id!r} already holds {len(seq.tokens)} tokens")
        if self.blocks_needed(len(token_ids)) > len(seq.blocks):
            raise ValueError(f"sequence {seq_id!r}: {len(token_ids)} tokens do not fit its {len(seq.blocks)} blocks")
        seq.tokens.extend(token_ids)

    def read_pages(self, seq_id: str) -> torch.Tensor:
        """Copy of the sequence's pages: [num_layers, n_blocks, 2, block_size, Hkv, D]."""
        blocks = self.block_ids(seq_id)[: self.blocks_needed(self.num_computed(seq_id))]
        return self.cache.kv[:, blocks].clone()

    def write_pages(self, seq_id: str, pages: torch.Tensor) -> None:
        """Overwrite the sequence's first pages with ``pages`` [num_layers, n, 2, bs, Hkv, D]."""
        blocks = self.block_ids(seq_id)
        n = pages.shape[1]
        if pages.shape[0] != self.layout.num_layers or tuple(pages.shape[2:]) != self.layout.page_shape:
            raise ValueError(
                f"pages {tuple(pages.shape)} do not match the layout "
                f"[{self.layout.num_layers}, n, {', '.join(map(str, self.layout.page_shape))}]"
            )
        if n > len(blocks):
            raise ValueError(f"sequence {seq_id!r}: {n} pages for {len(blocks)} blocks")
        for layer in range(self.layout.num_layers):
            self.cache.write_pages(layer, blocks[:n], pages[layer])
