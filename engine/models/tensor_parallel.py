"""Tensor parallelism for the Llama-family models (dense and MoE), with TokenWeave overlap.

One rank of a TP group holds a ``DecoderLM`` built for its *local* shapes (its query / KV
heads, its share of the MLP's intermediate size, its slice of the vocabulary) and runs it with
an injected ``Communicator``; the model never sees a process group (like gpt-fast).

Partition (W = world size, r = rank; Megatron-style):
- q/k/v and gate/up are column-parallel: rank r holds heads [r*H/W, (r+1)*H/W) of q and
  [r*Hkv/W, (r+1)*Hkv/W) of k/v, and rows [r*I/W, (r+1)*I/W) of gate and of up.
- o and down are row-parallel: rank r holds the matching input columns, so its output is a
  partial sum [T, hidden] that an all-reduce (or reduce-scatter + all-gather) completes.
- Embedding and lm_head are vocab-parallel: rank r holds rows [r*Vs, min((r+1)*Vs, V)) with
  Vs = ceil(V / W), zero-padded to Vs rows (the documented uneven split: only the last
  rank(s) carry padding). The embedding is a partial sum (a token's row lives on one rank);
  logits are all-gathered and the padding columns dropped.
- Norms, rope and q/k norms are replicated.
- MoE (Mixtral, Qwen2/3-MoE): every rank holds every expert with 1/W of its intermediate rows
  (experts sharded like the dense MLP, router replicated; see ``plan_shard``).
Query heads, KV heads and the (expert) intermediate sizes must divide by W
(``TPDivisibilityError`` names the numbers and the degrees that would work).

Two forward paths, same math, different reduction order:
- sequential: per sublayer ``x = x + all_reduce(partial)``, the residual stream [T, hidden]
  replicated on every rank.
- TokenWeave (``TokenWeaveConfig.enabled`` and T >= ``min_tokens``): the batch's tokens are cut
  into two micro-batches (split point a multiple of W, and of the attention chunk when the
  batch allows: engine.parallel.aligned_split) and the stages run through
  engine.parallel.run_overlapped, so one micro-batch's reduction runs while the other
  computes. With ``fused_norm`` (default) each all-reduce + RMSNorm becomes reduce-scatter ->
  residual add + RMSNorm on this rank's token shard -> all-gather of the normed shard (the
  fused AR-RMSNorm; the residual stream stays sharded by tokens, [t / W, hidden] per
  micro-batch), run as one job on a communication thread (engine.parallel.CommWorker, the CPU
  stand-in for TokenWeave's fused kernel on a few SMs). Without it: async all-reduce, add +
  norm on every token. Tokens are padded at the end to a multiple of W; padding tokens come
  last in causal order, so no real token attends to them, and their outputs are dropped.

Attention: a simple causal attention over the whole prompt, on this rank's heads, without the
paged KV cache (``PrefixAttention``). With two micro-batches the second attends to the first's
keys/values, which the schedule computed before it (chunked-prefill semantics).

The engine step (paged KV cache, continuous batching, the scheduler) runs TP through
``load_tp_engine_model``: the shard DecoderLM with ``TPReductions`` set (its own forward, the
engine's AttentionBackend over a paged cache of this rank's KV heads); EngineCore builds it
when given a communicator (``EngineCore(config, tensor_parallel=comm)``). That path is
sequential TP: TokenWeave runs only in TPModel's full-prompt forward.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open

from engine.attention.backend import AttentionMetadata
from engine.config import ModelConfig, TokenWeaveConfig
from engine.models.gguf import resolve_model_path
from engine.models.layers import RMSNorm, linear
from engine.models.llama import DecoderLM
from engine.models.loader import (
    FAMILY_RULES,
    WeightLoadError,
    destination,
    empty_model,
    match_tensor,
    safetensors_files,
)
from engine.models.weight_rules import Rule
from engine.parallel import (
    AllOf,
    Communicator,
    CommWorker,
    OverlapStats,
    Pending,
    Ready,
    Stage,
    TokenSplit,
    aligned_split,
    run_overlapped,
)


class TPDivisibilityError(ValueError):
    """A tensor-parallel degree that the model cannot be split by."""


# ============================================================================ the partition


@dataclass(frozen=True)
class ShardPlan:
    """What rank ``rank`` of ``world_size`` holds of a model (see the module docstring)."""

    rank: int
    world_size: int
    heads: int  # local query heads
    kv_heads: int  # local KV heads
    intermediate: int  # local rows of gate (and of up)
    vocab: int  # the full vocabulary V
    vocab_shard: int  # Vs = ceil(V / W): local embedding / lm_head rows (padded)

    @property
    def vocab_start(self) -> int:
        return min(self.rank * self.vocab_shard, self.vocab)

    @property
    def vocab_end(self) -> int:
        return min((self.rank + 1) * self.vocab_shard, self.vocab)

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """The ModelConfig whose DecoderLM has exactly this rank's parameter shapes (MoE: every
        expert, and the shared expert, with 1/W of its intermediate rows)."""
        moe = cfg.moe
        if moe is not None:
            moe = dataclasses.replace(
                moe,
                intermediate_size=moe.intermediate_size // self.world_size,
                shared_intermediate_size=moe.shared_intermediate_size // self.world_size,
            )
        return dataclasses.replace(
            cfg,
            num_heads=self.heads,
            num_kv_heads=self.kv_heads,
            intermediate_size=self.intermediate,
            vocab_size=self.vocab_shard,
            moe=moe,
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_shard(cfg: ModelConfig, rank: int, world_size: int) -> ShardPlan:
    """The shard of rank ``rank``; raises TPDivisibilityError for a degree the model cannot take.

    MoE: every rank holds every expert, each expert's MLP split like GatedMLP (gate/up
    column-, down row-parallel: 1/W of its intermediate rows), the router (and Qwen2-MoE's
    shared-expert gate) replicated. Every rank routes the same tokens the same way, and the
    block's output (sum of weighted expert outputs + gated shared expert) is linear in the
    split dimension, so one all-reduce completes it, as for a dense MLP. (The alternative,
    whole experts per rank with tokens all-to-all'ed, is expert parallelism: expert_router.)"""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"tensor parallel: rank {rank} / world size {world_size} is not a valid rank")
    sizes = [
        ("query heads (num_heads)", cfg.num_heads),
        ("KV heads (num_kv_heads)", cfg.num_kv_heads),
        ("MLP intermediate_size", cfg.intermediate_size),
    ]
    if cfg.moe is not None:
        sizes.append(("expert intermediate_size", cfg.moe.intermediate_size))
        if cfg.moe.shared_intermediate_size:
            sizes.append(("shared expert intermediate_size", cfg.moe.shared_intermediate_size))
    problems = []
    for what, n in sizes:
        if n % world_size:
            problems.append(f"{what}={n}")
    if problems:
        ok = [d for d in _divisors(math.gcd(*(n for _, n in sizes))) if d <= cfg.num_kv_heads]
        raise TPDivisibilityError(
            f"tensor_parallel={world_size} does not divide {', '.join(problems)} of {cfg.architecture} "
            f"({cfg.num_heads} query / {cfg.num_kv_heads} KV heads, intermediate {cfg.intermediate_size}); "
            f"degrees that divide all of them: {ok}"
        )
    return ShardPlan(
        rank=rank,
        world_size=world_size,
        heads=cfg.num_heads // world_size,
        kv_heads=cfg.num_kv_heads // world_size,
        intermediate=cfg.intermediate_size // world_size,
        vocab=cfg.vocab_size,
        vocab_shard=-(-cfg.vocab_size // world_size),
    )


# (dim, start, stop) of the full tensor that the local parameter holds; None = replicated
Slice = tuple[int, int, int] | None


def _source_slice(cfg: ModelConfig, plan: ShardPlan, target: str, rule: Rule | None) -> Slice:
    """The part of a full (checkpoint-shaped) tensor that this rank loads into ``target``.
    For qkv / gate_up targets ``rule`` says which fused part (q, k, v / gate, up) the tensor is."""
    r, d = plan.rank, cfg.head_dim
    if target in ("embed", "lm_head"):
        return (0, plan.vocab_start, plan.vocab_end)
    if target.endswith(".attn.qkv") or target.endswith(".attn.qkv_bias"):
        assert rule is not None and rule.qkv is not None
        n = (plan.heads if rule.qkv == "q" else plan.kv_heads) * d
        return (0, r * n, (r + 1) * n)
    if target.endswith(".attn.o"):
        n = plan.heads * d
        return (1, r * n, (r + 1) * n)
    if target.endswith(".mlp.gate_up") or target.endswith(".mlp.down"):
        n = plan.intermediate
        return (0, r * n, (r + 1) * n) if target.endswith("gate_up") else (1, r * n, (r + 1) * n)
    moe = cfg.moe
    if moe is not None and (target.endswith(".mlp.experts.w13") or target.endswith(".mlp.experts.w2")):
        # one expert's [I, H] gate or up, or its [H, I] down (the loader's per-expert names)
        if rule is None or rule.expert is None:
            raise WeightLoadError(f"{target}: tensor parallelism loads per-expert tensors only, not fused stacks")
        n = moe.intermediate_size // plan.world_size
        return (0, r * n, (r + 1) * n) if target.endswith("w13") else (1, r * n, (r + 1) * n)
    if moe is not None and (target.endswith(".mlp.shared.gate_up") or target.endswith(".mlp.shared.down")):
        n = moe.shared_intermediate_size // plan.world_size
        return (0, r * n, (r + 1) * n) if target.endswith("gate_up") else (1, r * n, (r + 1) * n)
    return None


def _take(t: Any, s: Slice) -> torch.Tensor:
    """t: a tensor or a safetensors slice (reads only the selected bytes)."""
    if s is None:
        return t[:] if not isinstance(t, torch.Tensor) else t
    dim, a, b = s
    return t[a:b] if dim == 0 else t[:, a:b]


def load_tp_shard(
    path: str,
    cfg: ModelConfig,
    plan: ShardPlan,
    max_positions: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> DecoderLM:
    """This rank's DecoderLM (local shapes, on ``device``), filled from the HF checkpoint at
    ``path`` reading only its slices of the sharded tensors (safetensors ``get_slice``)."""
    path = resolve_model_path(path)
    local = plan.local_config(cfg)
    model = empty_model(local, max_positions, dtype, device)  # local shapes; rope as the full model's
    params = dict(model.named_parameters())
    for name in ("embed", "lm_head"):
        if name in params:
            with torch.no_grad():
                params[name].zero_()  # the padding rows of an uneven vocab split stay zero
    loaded: dict[str, int] = {}
    rules = FAMILY_RULES[cfg.family]
    for file in safetensors_files(path):
        with safe_open(file, "pt", device="cpu") as f:
            for name in f.keys():
                found = match_tensor(cfg, rules, params, name)
                if found is None:
                    continue
                target, rule, m = found
                src = _take(f.get_slice(name), _source_slice(cfg, plan, target, rule)).to(device)
                dst = destination(local, params[target], rule, m)
                if target in ("embed", "lm_head"):
                    dst = dst[: src.shape[0]]
                if dst.shape != src.shape:
                    raise WeightLoadError(f"{name!r} rank {plan.rank}: shard {tuple(src.shape)} != {tuple(dst.shape)}")
                with torch.no_grad():
                    dst.copy_(src)
                loaded[target] = loaded.get(target, 0) + src.numel()
    missing = [
        n
        for n, p in params.items()
        if loaded.get(n, 0)
        != (p.shape[1] * (plan.vocab_end - plan.vocab_start) if n in ("embed", "lm_head") else p.numel())
    ]
    if missing:
        raise WeightLoadError(f"checkpoint {path!r} did not provide: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return model.eval()


def shard_model(full: DecoderLM, plan: ShardPlan) -> DecoderLM:
    """This rank's DecoderLM cut from a full in-memory one (same dtype and device)."""
    cfg = full.cfg
    model = empty_model(plan.local_config(cfg), full.rope.cos.shape[0], full.embed.dtype, full.embed.device)
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    parts = {
        "q": Rule("", "", qkv="q"),
        "k": Rule("", "", qkv="k"),
        "v": Rule("", "", qkv="v"),
        "gate": Rule("", "", half=0),
        "up": Rule("", "", half=1),
    }
    full_params = dict(full.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            src = full_params[name].data
            if name.endswith(".attn.qkv") or name.endswith(".attn.qkv_bias"):
                pieces = {"q": src[:q], "k": src[q : q + kv], "v": src[q + kv :]}
                local = [_take(pieces[k], _source_slice(cfg, plan, name, parts[k])) for k in "qkv"]
                p.copy_(torch.cat(local, 0))
            elif name.endswith(".mlp.gate_up") or name.endswith(".mlp.shared.gate_up"):
                half = src.shape[0] // 2
                pieces = {"gate": src[:half], "up": src[half:]}
                p.copy_(torch.cat([_take(pieces[k], _source_slice(cfg, plan, name, parts[k])) for k in ("gate", "up")]))
            elif name.endswith(".mlp.experts.w13") or name.endswith(".mlp.experts.w2"):
                rule = Rule("", "", expert=0, half=0)
                for e in range(src.shape[0]):  # per expert, as the checkpoint stores them
                    if name.endswith("w13"):
                        half = src.shape[1] // 2
                        gate, up = (
                            _take(x, _source_slice(cfg, plan, name, rule)) for x in (src[e, :half], src[e, half:])
                        )
                        p[e].copy_(torch.cat((gate, up)))
                    else:
                        p[e].copy_(_take(src[e], _source_slice(cfg, plan, name, rule)))
            elif name in ("embed", "lm_head"):
                rows = _take(src, _source_slice(cfg, plan, name, None))
                p.zero_()
                p[: rows.shape[0]].copy_(rows)
            else:
                p.copy_(_take(src, _source_slice(cfg, plan, name, None)))
    return model.eval()


def embed_partial(ids: torch.Tensor, weight: torch.Tensor, plan: ShardPlan) -> torch.Tensor:
    """ids: [t] full-vocab ids, weight: this rank's [Vs, hidden] rows -> this rank's partial
    embedding [t, hidden] (zero rows for the ids other ranks hold; the sum over ranks is the
    full embedding, each row coming from exactly one rank)."""
    local = ids - plan.vocab_start
    mine = (local >= 0) & (local < plan.vocab_end - plan.vocab_start)
    x = F.embedding(torch.where(mine, local, 0), weight)
    return x * mine[:, None].to(x.dtype)


# ============================================================================ the engine path


class TPReductions:
    """engine.models.llama.ShardReductions over an injected Communicator: what makes a
    shard-shaped DecoderLM (``load_tp_shard`` / ``shard_model``) compute the full model's values
    inside the engine step, through the engine's paged AttentionBackend (its KVLayout has the
    rank's ``plan.kv_heads``, so the paged cache holds only this rank's heads).

    Per forward of T tokens: one all-reduce [T, hidden] for the embedding, two per layer
    (after o_proj, after down_proj / the MoE block); per ``compute_logits`` of N rows one
    all-gather [Vs, N] per rank; per plain-greedy step (``greedy_tokens``) one all-gather
    [N, 2] per rank instead. Sequential TP (TokenWeave is TPModel's full-prompt path only)."""

    def __init__(self, plan: ShardPlan, comm: Communicator, tokenweave: TokenWeaveConfig | None = None):
        if comm.world_size != plan.world_size or comm.rank != plan.rank:
            raise ValueError(
                f"TPReductions: communicator is rank {comm.rank}/{comm.world_size}, "
                f"the shard plan {plan.rank}/{plan.world_size}"
            )
        self.plan, self.comm = plan, comm
        self.tokenweave = tokenweave or TokenWeaveConfig(enabled=False)
        self.stats = OverlapStats()  # TokenWeave steps: compute vs exposed communication

    def overlaps(self, num_tokens: int) -> bool:
        """Whether a step of ``num_tokens`` tokens runs TokenWeave (the same answer on every
        rank: they see the same tokens)."""
        tw = self.tokenweave
        return tw.enabled and self.plan.world_size > 1 and num_tokens >= max(tw.min_tokens, 2)

    def forward_overlapped(
        self,
        model: DecoderLM,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_hook: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """TokenWeave in the engine step: the step's T tokens cut into two micro-batches at an
        even token split (``split_metadata``: a sequence the cut falls in continues in the
        second, attending to the first's keys in the paged cache), run through
        ``overlapped_all_reduce`` (async all-reduce + norm; the fused AR-RMSNorm's reduce-scatter
        would need T padded to a multiple of W, and padding rows would write cache slots).
        input_ids, positions: [T] -> final hidden states [T, hidden]."""
        t0 = TokenSplit(micro_batches=2).sizes(input_ids.shape[0])[0]
        metas = split_metadata(meta, t0)
        dtype = model.embed.dtype
        ropes = [model.rope.tables(p, dtype) for p in (positions[:t0], positions[t0:])]
        backend = model.backend

        def attend(layer: Any, i: int, h: torch.Tensor) -> torch.Tensor:
            return layer.attn(h, ropes[i], backend, metas[i])

        def embed(ids: torch.Tensor) -> torch.Tensor:
            return embed_partial(ids, model.embed, self.plan)

        parts = [input_ids[:t0], input_ids[t0:]]
        return torch.cat(overlapped_all_reduce(model, self.comm, parts, attend, embed, self.stats, kv_hook))

    def embed(self, input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(embed_partial(input_ids, weight, self.plan))

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(partial)

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        gathered = self.comm.all_gather(local.t().contiguous())  # [W * Vs, N]
        return gathered[: self.plan.vocab].t()

    def greedy_tokens(self, local: torch.Tensor) -> list[int]:
        """Each row's argmax over the whole vocabulary from this rank's fp32 logits [N, Vs]
        (padding columns past V ignored), the lowest token id on a tie: the token
        ``gather_logits(local).argmax(-1)`` gives, from one all-gather of each rank's
        (maximum, its id) per row, [N, 2] float64 (exact for fp32 values and ids < 2^53),
        instead of every rank's [Vs, N] logits."""
        n = local.shape[0]
        valid = local[:, : self.plan.vocab_end - self.plan.vocab_start]
        if valid.shape[1]:
            idx = valid.argmax(dim=1)  # the first maximum: torch.argmax's rule
            best = torch.stack(
                [valid.gather(1, idx[:, None])[:, 0].double(), (idx + self.plan.vocab_start).double()], 1
            )
        else:  # a rank whose ceil-split slice is all padding
            best = torch.stack(
                [torch.full((n,), float("-inf"), dtype=torch.float64), torch.zeros(n, dtype=torch.float64)], 1
            )
        got = self.comm.all_gather(best.to(local.device)).view(self.plan.world_size, n, 2).cpu()
        values, ids = got[..., 0], got[..., 1]  # [W, N]: rank r's slice starts after rank r-1's
        first = (values == values.max(dim=0).values).int().argmax(dim=0)  # the lowest rank holding it
        return ids.gather(0, first[None])[0].long().tolist()

    def agree_tokens(self, tokens: list[int]) -> list[int]:
        """Rank 0's tokens on every rank: an all-reduce of rank 0's ids and zeros elsewhere
        (exact in int64; no broadcast in the Communicator protocol)."""
        t = torch.tensor(tokens, dtype=torch.long, device=self.comm.device)
        if self.comm.rank != 0:
            t.zero_()
        return self.comm.all_reduce(t).tolist()


def split_metadata(meta: AttentionMetadata, rows: int) -> tuple[AttentionMetadata, AttentionMetadata]:
    """The step's metadata cut at query row ``rows`` (0 < rows < T) -> (rows [0, rows), rows
    [rows, T)), rows renumbered from 0, as micro-batches (0, 2) and (1, 2). A sequence the cut
    falls inside is in both: its first part sees its keys up to the cut (seq_len shortened by
    the rows after it), its second part the whole context, the first part's keys read from
    the paged cache (chunked-prefill semantics: micro-batch 0's layer l, which writes them,
    runs before micro-batch 1's: run_overlapped's order)."""
    qsl, total = meta.query_start_loc, meta.query_start_loc[-1]
    if not 0 < rows < total:
        raise ValueError(f"split_metadata: cut at row {rows} outside (0, {total})")
    i = max(j for j in range(meta.num_seqs) if qsl[j] < rows)  # the sequence holding row rows - 1
    after = qsl[i + 1] - rows  # rows of sequence i in the second part
    first = AttentionMetadata(
        slot_mapping=meta.slot_mapping[:rows],
        query_start_loc=[*qsl[: i + 1], rows],
        seq_lens=[*meta.seq_lens[:i], meta.seq_lens[i] - after],
        block_tables=meta.block_tables[: i + 1],
        request_ids=meta.request_ids[: i + 1],
        micro_batch=(0, 2),
    )
    j = i if after else i + 1  # the second part's first sequence
    second = AttentionMetadata(
        slot_mapping=meta.slot_mapping[rows:],
        query_start_loc=[0, *(q - rows for q in qsl[j + 1 :])],
        seq_lens=meta.seq_lens[j:],
        block_tables=meta.block_tables[j:],
        request_ids=meta.request_ids[j:],
        micro_batch=(1, 2),
    )
    return first, second


def load_tp_engine_model(
    path: str,
    cfg: ModelConfig,
    comm: Communicator,
    max_positions: int,
    dtype: torch.dtype,
    device: str,
    tokenweave: TokenWeaveConfig | None = None,
) -> tuple[DecoderLM, ShardPlan]:
    """Rank ``comm.rank``'s shard of the checkpoint at ``path`` as an engine model: a
    DecoderLM of the local shapes whose forward / compute_logits reduce through ``comm``
    (TPReductions; ``tokenweave``: None is off). Raises TPDivisibilityError for a degree the
    model cannot take."""
    plan = plan_shard(cfg, comm.rank, comm.world_size)
    model = load_tp_shard(path, cfg, plan, max_positions, dtype, device)
    model.set_tensor_parallel(TPReductions(plan, comm, tokenweave))
    return model, plan


# ============================================================================ attention


class PrefixAttention:
    """Causal attention of one sequence over its whole prompt, on this rank's heads, without
    a paged cache: the AttentionBackend the TP forward passes to each layer's Attention.

    Lifecycle: one instance per forward. Micro-batches arrive at each layer in token order
    (run_overlapped guarantees it); the keys/values of earlier micro-batches are kept per
    layer, so a later one attends to them (``start`` checks the order).

    Queries run in chunks whose boundaries are the multiples of ``CHUNK`` positions, each
    chunk against the keys up to its end: the score matrix stays [h, CHUNK, S] (cache
    friendly) and the work done for a token does not depend on how the batch was split into
    micro-batches, as long as the split points are multiples of CHUNK (TokenWeave aligns them)."""

    CHUNK = 128

    def __init__(self, sliding_window: int | None):
        self.sliding_window = sliding_window
        self.keys: dict[int, torch.Tensor] = {}  # layer -> [S, hkv, D], every position so far
        self.values: dict[int, torch.Tensor] = {}
        self.start = 0  # first position of the micro-batch about to run (set by the caller)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: Any) -> torch.Tensor:
        """q: [t, h, D], k/v: [t, hkv, D] at positions [start, start + t) -> [t, h, D]."""
        seen = self.keys[layer].shape[0] if layer in self.keys else 0
        if seen != self.start:
            raise RuntimeError(f"PrefixAttention layer {layer}: micro-batch at {self.start} after {seen} keys")
        if seen:
            k, v = torch.cat((self.keys[layer], k)), torch.cat((self.values[layer], v))
        self.keys[layer], self.values[layer] = k, v  # [S, hkv, D], S = start + t
        out = torch.empty_like(q)
        pos, end_all = self.start, self.start + q.shape[0]
        while pos < end_all:
            end = min((pos // self.CHUNK + 1) * self.CHUNK, end_all)
            lo = 0 if self.sliding_window is None else max(0, pos - self.sliding_window + 1)
            qpos = torch.arange(pos, end, device=q.device)[:, None]
            kpos = torch.arange(lo, end, device=q.device)[None, :]
            mask = kpos <= qpos  # [c, end - lo]
            if self.sliding_window is not None:
                mask &= kpos > qpos - self.sliding_window
            qc = q[pos - self.start : end - self.start].transpose(0, 1)  # [h, c, D]
            o = F.scaled_dot_product_attention(
                qc, k[lo:end].transpose(0, 1), v[lo:end].transpose(0, 1), attn_mask=mask, enable_gqa=True
            )  # [h, c, D]
            out[pos - self.start : end - self.start] = o.transpose(0, 1)
            pos = end
        return out


def overlapped_all_reduce(
    m: DecoderLM,
    comm: Communicator,
    parts: list[torch.Tensor],
    attend: Callable[[Any, int, torch.Tensor], torch.Tensor],
    embed: Callable[[torch.Tensor], torch.Tensor],
    stats: OverlapStats,
    kv_hook: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """TokenWeave without the fused norm: the layers of a shard DecoderLM ``m`` over the token
    micro-batches ``parts`` (ids [t_i], in token order) through run_overlapped, each stage's
    partial sum [t_i, hidden] all-reduced asynchronously (issued by the calling thread) while
    the next micro-batch computes; the residual add and RMSNorm run at the start of the next
    stage. ``attend(layer, i, h)``: micro-batch i's attention output at ``layer`` ([t_i, hidden],
    o_proj applied, partial); ``embed(ids)``: the partial embedding. -> the final normed
    hidden states per micro-batch [t_i, hidden]. ``kv_hook(l)``: issued right after the last
    micro-batch's attention of layer l (every micro-batch's KV of layer l is then written), before
    that stage's all-reduce, from the calling thread. Used by TPModel and the engine path
    (TPReductions.forward_overlapped)."""

    # state between stages: (reduced partial sum [t, hidden], residual [t, hidden] or None)
    def add_norm(y: list[Any], norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        x = y[0] if y[1] is None else y[1] + y[0]  # the residual stream after the sublayer
        return norm(x), x

    def all_reduce(i: int, y: tuple[torch.Tensor, torch.Tensor | None]) -> Pending[list[Any]]:
        return AllOf(comm.all_reduce_async(y[0]), Ready(y[1]))

    last = len(parts) - 1

    def attn_stage(index: int, layer: Any) -> Stage:
        def compute(i: int, y: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
            h, x = add_norm(y, layer.input_norm)
            return attend(layer, i, h), x

        def communicate(i: int, y: tuple[torch.Tensor, torch.Tensor | None]) -> Pending[list[Any]]:
            if kv_hook is not None and i == last:
                kv_hook(index)
            return all_reduce(i, y)

        return Stage(compute, communicate, "attn")

    def mlp_stage(layer: Any) -> Stage:
        def compute(i: int, y: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
            h, x = add_norm(y, layer.post_attn_norm)
            return layer.mlp(h), x

        return Stage(compute, all_reduce, "mlp")

    stages = [Stage(lambda i, x: (embed(x), None), all_reduce, "embed")]
    for index, layer in enumerate(m.layers):
        stages += [attn_stage(index, layer), mlp_stage(layer)]
    outs = run_overlapped(parts, stages, stats)
    return [add_norm(y, m.norm)[0] for y in outs]


# ============================================================================ the TP model


class TPModel:
    """One rank of a tensor-parallel model (dense or MoE): a local-shaped DecoderLM + a communicator.

    Every rank of the group calls ``forward`` / ``compute_logits`` with the same tokens at the
    same time (collectives pair by issue order). Inference only (no autograd)."""

    def __init__(self, shard: DecoderLM, plan: ShardPlan, comm: Communicator, tokenweave: TokenWeaveConfig):
        if comm.world_size != plan.world_size or comm.rank != plan.rank:
            raise ValueError(
                f"TPModel: communicator is rank {comm.rank}/{comm.world_size}, the shard plan {plan.rank}/{plan.world_size}"
            )
        self.model, self.plan, self.comm, self.tokenweave = shard, plan, comm, tokenweave
        self.stats = OverlapStats()  # TokenWeave runs: compute vs exposed communication
        self._comm_worker: CommWorker | None = None  # started by the first TokenWeave forward

    @classmethod
    def load(
        cls,
        path: str,
        comm: Communicator,
        tokenweave: TokenWeaveConfig | None = None,
        dtype: torch.dtype = torch.float32,
        max_positions: int | None = None,
    ) -> TPModel:
        """Rank ``comm.rank``'s shard of the HF checkpoint (or .gguf) at ``path``, on the
        communicator's device (CUDA under NCCL: written for it, untested without a GPU)."""
        path = resolve_model_path(path)
        cfg = ModelConfig.from_hf_dir(path)
        plan = plan_shard(cfg, comm.rank, comm.world_size)
        shard = load_tp_shard(path, cfg, plan, max_positions or cfg.max_position_embeddings, dtype, comm.device)
        return cls(shard, plan, comm, tokenweave or TokenWeaveConfig())

    @classmethod
    def from_full(cls, full: DecoderLM, comm: Communicator, tokenweave: TokenWeaveConfig | None = None) -> TPModel:
        plan = plan_shard(full.cfg, comm.rank, comm.world_size)
        return cls(shard_model(full, plan), plan, comm, tokenweave or TokenWeaveConfig())

    # ------------------------------------------------------------------ pieces
    def _embed_partial(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [t] -> this rank's partial embedding [t, hidden] (zero rows for other ranks' ids)."""
        return embed_partial(ids, self.model.embed, self.plan)

    def uses_tokenweave(self, num_tokens: int) -> bool:
        w = self.plan.world_size
        return self.tokenweave.enabled and w > 1 and num_tokens >= max(self.tokenweave.min_tokens, 2 * w)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [T] (one sequence, positions 0..T-1) -> final hidden states [T, hidden]."""
        if self.uses_tokenweave(input_ids.shape[0]):
            return self._forward_tokenweave(input_ids)
        return self._forward_sequential(input_ids)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> fp32 logits [N, V], gathered from the vocab shards."""
        m = self.model
        w = m.head_weight()
        local = linear(hidden, w).float()  # [N, Vs]
        gathered = self.comm.all_gather(local.t().contiguous())  # [W * Vs, N]
        return gathered[: self.plan.vocab].t()

    # ------------------------------------------------------------------ sequential TP
    def _forward_sequential(self, ids: torch.Tensor) -> torch.Tensor:
        m, comm = self.model, self.comm
        positions = torch.arange(ids.shape[0], device=ids.device)
        x = comm.all_reduce(self._embed_partial(ids))
        rope = m.rope.tables(positions, x.dtype)
        attn = PrefixAttention(m.cfg.sliding_window)
        for layer in m.layers:
            x = x + comm.all_reduce(layer.attn(layer.input_norm(x), rope, attn, None))
            x = x + comm.all_reduce(layer.mlp(layer.post_attn_norm(x)))
        return m.norm(x)

    # ------------------------------------------------------------------ TokenWeave
    def _forward_tokenweave(self, ids: torch.Tensor) -> torch.Tensor:
        """Per micro-batch the stages are: embedding, then per layer attention and MLP; each
        stage's compute yields a partial sum [t, hidden] whose reduction (and the RMSNorm after
        it) overlaps the other micro-batch's compute.

        fused_norm: the reduction is one job on the communication worker (``_fused_ar_norm``:
        reduce-scatter -> norm on the token shard -> all-gather), so the job of micro-batch 0
        runs while micro-batch 1 computes, and the other way round; the main thread issues no
        collective until every job was waited (CommWorker's ordering invariant).
        Otherwise: an async all-reduce issued by the main thread; the residual add and norm run
        at the start of the next stage's compute (no extra thread)."""
        m, w, comm = self.model, self.plan.world_size, self.comm
        n = ids.shape[0]
        padded = -(-n // w) * w
        if padded > m.rope.cos.shape[0]:
            raise ValueError(f"TokenWeave: {n} tokens padded to {padded} exceed the rope table ({m.rope.cos.shape[0]})")
        ids = F.pad(ids, (0, padded - n))  # padding tokens come last in causal order
        # split point: a multiple of W (reduce-scatter) and, when the batch allows, of the
        # attention chunk (the same attention work as unsplit)
        multiple = math.lcm(w, PrefixAttention.CHUNK)
        multiple = multiple if padded >= 2 * multiple else w
        sizes = TokenSplit(micro_batches=2, rule=aligned_split(multiple)).sizes(padded)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        dtype = m.embed.dtype
        ropes = [
            m.rope.tables(torch.arange(s, s + t, device=ids.device), dtype) for s, t in zip(starts, sizes, strict=True)
        ]
        attn = PrefixAttention(m.cfg.sliding_window)
        parts = list(torch.split(ids, sizes))

        def attend(layer: Any, i: int, h: torch.Tensor) -> torch.Tensor:
            attn.start = starts[i]
            return layer.attn(h, ropes[i], attn, None)

        if self.tokenweave.fused_norm:
            # state between stages: (normed input [t, hidden], residual shard [t / W, hidden])
            worker = self._worker()

            def reduce(norm: RMSNorm) -> Any:
                def issue(i: int, y: tuple[torch.Tensor, torch.Tensor | None]) -> Pending[Any]:
                    return worker.submit(lambda: self._fused_ar_norm(y[0], y[1], norm))

                return issue

            stages = [Stage(lambda i, x: (self._embed_partial(x), None), reduce(m.layers[0].input_norm), "embed")]
            for j, layer in enumerate(m.layers):
                nxt = m.layers[j + 1].input_norm if j + 1 < len(m.layers) else m.norm
                stages += [
                    Stage(
                        lambda i, y, layer=layer: (attend(layer, i, y[0]), y[1]),
                        reduce(layer.post_attn_norm),
                        f"attn{j}",
                    ),
                    Stage(lambda i, y, layer=layer: (layer.mlp(y[0]), y[1]), reduce(nxt), f"mlp{j}"),
                ]
            outs = run_overlapped(parts, stages, self.stats)
            return torch.cat([h for h, _ in outs])[:n]

        outs = overlapped_all_reduce(m, comm, parts, attend, self._embed_partial, self.stats)
        return torch.cat(outs)[:n]

    def _fused_ar_norm(
        self, partial: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """TokenWeave's fused AR-RMSNorm of one micro-batch of t tokens, on the communication
        worker. partial: [t, hidden] this rank's partial sum; residual: this rank's residual
        shard [t / W, hidden] (None: the embedding, which starts it) -> (norm(residual + sum of
        partials) [t, hidden], the new residual shard).

        reduce-scatter -> residual add + RMSNorm on this rank's token shard -> all-gather of the
        normed shard; the residual stays sharded: rows [r*t/W, (r+1)*t/W), which reduce-scatter
        hands rank r and all-gather puts back."""
        x = self.comm.reduce_scatter(partial)
        x = x if residual is None else x + residual
        return self.comm.all_gather(norm(x)), x

    def _worker(self) -> CommWorker:
        if self._comm_worker is None:
            self._comm_worker = CommWorker(f"tp{self.plan.rank}-comm")
        return self._comm_worker

    def close(self) -> None:
        """Stops the communication worker (TokenWeave); the model stays usable."""
        if self._comm_worker is not None:
            self._comm_worker.close()
            self._comm_worker = None
