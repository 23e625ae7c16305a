"""The decoder-only transformer shared by every supported family.

Llama, Mistral, Qwen2 (qkv bias) and Qwen3 (q/k RMSNorm) differ only in flags of
ModelConfig; the MoE families (mixtral.py, qwen_moe.py) swap the MLP for an MoEBlock.
Tokens are flattened across the batch: hidden states are [T, hidden], never padded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention.backend import AttentionBackend, AttentionMetadata, SplitAttentionBackend, split_backend
from engine.config import ModelConfig
from engine.models.layers import (
    GatedMLP,
    NativeKernels,
    RMSNorm,
    RotaryEmbedding,
    linear,
    pack_linear_weight,
    packable,
)
from engine.models.moe import LocalExpertDispatcher, LocalExperts, MoEBlock
from engine.moe import ExpertDispatcher
from engine.parallel import OverlapStats, Pending, Stage, run_overlapped

# Called after layer ``i`` has written its K/V for the step (layer-wise KV push seam).
LayerHook = Callable[[int], None]


class ShardReductions(Protocol):
    """What a tensor-parallel rank's DecoderLM (local heads / rows / vocab slice, see
    engine/models/tensor_parallel.py) needs to compute the full model's values: the
    collectives at the three places where a shard's output is partial. Every rank of the group
    calls them in the same order with the same shapes (collectives pair by issue order)."""

    def embed(self, input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """input_ids: [T] (full vocab ids), weight: this rank's [Vs, hidden] rows -> the full
        embedding [T, hidden], identical on every rank."""
        ...

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """A row-parallel output (o_proj, down_proj / MoE block): this rank's partial sum
        [T, hidden] -> the sum over ranks [T, hidden]."""
        ...

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's fp32 logits [N, Vs] -> the full logits [N, V], identical on every rank."""
        ...

    def agree_tokens(self, tokens: list[int]) -> list[int]:
        """Tokens drawn at random on each rank -> rank 0's, on every rank."""
        ...

    def greedy_tokens(self, local: torch.Tensor) -> list[int]:
        """This rank's fp32 logits [N, Vs] -> each row's argmax over the full vocabulary (the
        lowest id on a tie), identical on every rank, without gathering the logits."""
        ...

    def overlaps(self, num_tokens: int) -> bool:
        """Whether a step of ``num_tokens`` tokens runs ``forward_overlapped`` (TokenWeave)."""
        ...

    def forward_overlapped(
        self,
        model: DecoderLM,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_hook: LayerHook | None = None,
    ) -> torch.Tensor:
        """``model.forward`` with communication overlapped across token micro-batches -> [T, hidden];
        ``kv_hook(l)`` once layer l's KV of every micro-batch is written."""
        ...


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.h, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        out = (self.h + 2 * self.hkv) * self.d
        self.qkv = nn.Parameter(torch.empty(out, cfg.hidden_size))  # rows: q | k | v
        self.qkv_bias = nn.Parameter(torch.zeros(out)) if cfg.qkv_bias else None
        self.o = nn.Parameter(torch.empty(cfg.hidden_size, self.h * self.d))
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        backend: AttentionBackend,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """x: [T, hidden]; rope: the step's (cos, sin) from ``RotaryEmbedding.tables``."""
        q, k, v = self.project(x, rope)
        return self.output(backend.forward(self.layer, q, k, v, meta))

    def project(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [T, hidden] -> dense q [T, H, D], k [T, Hkv, D] (rotated), v [T, Hkv, D]."""
        t = x.shape[0]
        qkv = linear(x, self.qkv, self.qkv_bias)
        nq, nk = self.h * self.d, self.hkv * self.d
        v = qkv[:, nq + nk :].view(t, self.hkv, self.d)
        if self.q_norm is None:
            # q and k heads side by side [T, H + Hkv, D]: one rotation for both
            qk = RotaryEmbedding.apply(qkv[:, : nq + nk].view(t, self.h + self.hkv, self.d), *rope)
            q, k = qk[:, : self.h].contiguous(), qk[:, self.h :].contiguous()  # backends get dense q/k/v
        else:
            q = RotaryEmbedding.apply(self.q_norm(qkv[:, :nq].view(t, self.h, self.d)), *rope)
            k = RotaryEmbedding.apply(self.k_norm(qkv[:, nq : nq + nk].view(t, self.hkv, self.d)), *rope)
        return q, k, v.contiguous()

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """o: the attention output [T, H, D] -> o_proj(o): [T, hidden]."""
        return linear(o.reshape(o.shape[0], self.h * self.d), self.o)

    def forward_native(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: RotaryEmbedding,
        backend: AttentionBackend,
        meta: AttentionMetadata,
        kn: NativeKernels,
    ) -> torch.Tensor:
        """``forward`` through the native kernels (no q/k norm). x: [T, hidden]; positions: [T]."""
        q, k, v = self.project_native(x, positions, rope, kn)
        return self.output_native(backend.forward(self.layer, q, k, v, meta), kn)

    def project_native(
        self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding, kn: NativeKernels
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``project`` through the native kernels. x: [T, hidden]; positions: [T]."""
        return kn.rope_split_qkv(kn.linear(x, self.qkv, self.qkv_bias), rope, positions, self.h, self.hkv)

    def output_native(self, o: torch.Tensor, kn: NativeKernels) -> torch.Tensor:
        return kn.linear(o.reshape(o.shape[0], self.h * self.d), self.o)


class _Carry:
    """A micro-batch's state riding along its attention in flight: wait() -> (state, output)."""

    def __init__(self, state: tuple, pending: Pending[torch.Tensor]):
        self.state, self.pending = state, pending

    def wait(self) -> tuple[tuple, torch.Tensor]:
        return self.state, self.pending.wait()


def micro_batches(meta: AttentionMetadata, parts: int) -> list[tuple[int, int, AttentionMetadata]]:
    """Cut the step's sequences into ``min(parts, B)`` contiguous non-empty groups of about
    equal token counts -> [(first row, end row, the group's metadata)], in row order."""
    parts = min(parts, meta.num_seqs)
    qsl, total = meta.query_start_loc, meta.query_start_loc[-1]
    cuts, seq = [0], 0
    for p in range(1, parts):
        # the first sequence boundary at or past p/parts of the tokens, leaving room for the rest
        seq = max(seq + 1, next(i for i in range(1, meta.num_seqs + 1) if qsl[i] * parts >= total * p))
        cuts.append(min(seq, meta.num_seqs - (parts - p)))
    cuts.append(meta.num_seqs)
    return [meta.select(a, b, (i, parts)) for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False))]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, mlp: nn.Module):
        super().__init__()
        self.attn = Attention(cfg, layer)
        self.mlp = mlp
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DecoderLM(nn.Module):
    """Embedding -> N x (attention, MLP or MoE) -> norm -> lm_head.

    The attention backend is injected after the KV cache exists (``set_attention_backend``);
    MoE layers get their ExpertDispatcher at construction (local by default).
    """

    def __init__(self, cfg: ModelConfig, max_positions: int, dispatcher: ExpertDispatcher | None = None):
        super().__init__()
        self.cfg = cfg
        self.dispatcher = dispatcher or LocalExpertDispatcher()
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, self._make_mlp(i)) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.rope = RotaryEmbedding(cfg.rope, cfg.head_dim, max_positions)
        self.backend: AttentionBackend | None = None
        self.split: SplitAttentionBackend | None = None  # the backend's split form (split_backend)
        # Micro-batch rotation timings (run_overlapped): compute vs time blocked on attention
        self.rotation_stats = OverlapStats()
        # Native CPU kernels (``set_native_kernels``); None runs the torch ops. The native path
        # covers dense layers without q/k norm; MoE and Qwen3 layers keep the torch path.
        self.native: NativeKernels | None = None
        # Tensor parallelism (``set_tensor_parallel``): this model is one rank's shard and these
        # complete its partial values; None: the whole model.
        self.parallel: ShardReductions | None = None
        # A tied head's oneDNN-packed copy (``prepack_linears``); None: the head is read plain
        self.head_packed: nn.Parameter | None = None

    def _make_mlp(self, layer: int) -> nn.Module:
        moe = self.cfg.moe
        if moe is None or layer in moe.dense_layers:
            return GatedMLP(self.cfg.hidden_size, self.cfg.intermediate_size)
        block = MoEBlock(layer, self.cfg.hidden_size, moe, self.dispatcher)
        held = self.dispatcher.held_experts(layer, moe.num_experts)  # all, or an EP rank's share
        experts = LocalExperts(held, self.cfg.hidden_size, moe.intermediate_size)
        block.add_module("experts", experts)  # weights live on the layer; the dispatcher uses them
        self.dispatcher.register(layer, experts)
        return block

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        self.backend = backend
        self.split = split_backend(backend)

    def set_tensor_parallel(self, reductions: ShardReductions) -> None:
        """Make this (shard-shaped) model one rank of a TP group: embedding, o_proj and
        down_proj outputs and the logits are completed through ``reductions``. The native
        kernels and the micro-batch rotation do not take it (``forward`` refuses them)."""
        if self.native is not None:
            raise ValueError("tensor parallelism: the native kernel path does not reduce across ranks")
        self.parallel = reductions

    def set_native_kernels(self, kernels: NativeKernels | None) -> None:
        """Run ``forward`` through the native CPU kernels (None: the torch ops). Only models
        whose every layer is dense and without q/k norm take them (see ``native_capable``)."""
        if kernels is not None and not self.native_capable:
            raise ValueError(f"{self.cfg.architecture}: the native kernel path needs dense layers without q/k norm")
        self.native = kernels

    def prepack_linears(self) -> int:
        """Reorder every packable linear weight once into oneDNN's blocked layout
        (layers.pack_linear_weight): attention qkv / o, the dense MLPs' (and MoE shared
        experts') gate_up / down, and the head; routed experts and gates stay plain. Call once,
        after the weights are loaded (loading and TP sharding write plain tensors).

        With native kernels that stream plain weights (``native.max_rows`` > 0) the plain
        weights stay, and the packed copies go to ``native.packed`` (small row counts stream
        the plain weight, larger ones run oneDNN on the copy: the weights' bytes twice);
        otherwise each weight is replaced by its packed form, and a tied head gets a packed
        copy beside the embedding, which lookups still read (its bytes once more). Returns the
        number of weights packed."""
        weights: list[tuple[nn.Module, str]] = []
        for module in self.modules():
            if isinstance(module, Attention | GatedMLP):
                names = ("qkv", "o") if isinstance(module, Attention) else ("gate_up", "down")
                weights += [(module, name) for name in names if packable(getattr(module, name))]
        head = (self, "lm_head") if self.lm_head is not None else (self, "embed")
        if packable(getattr(*head)):
            weights.append(head)
        keep_plain = self.native is not None and self.native.max_rows > 0
        for module, name in weights:
            plain = getattr(module, name)
            if keep_plain:
                self.native.packed[id(plain)] = pack_linear_weight(plain)  # type: ignore[union-attr]
            elif name == "embed":
                self.head_packed = pack_linear_weight(plain)
            else:
                setattr(module, name, pack_linear_weight(plain))
        return len(weights)

    @property
    def native_capable(self) -> bool:
        return self.cfg.moe is None and not self.cfg.qk_norm and self.parallel is None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        layer_hook: LayerHook | None = None,
        kv_hook: LayerHook | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden].

        ``layer_hook(l)`` runs after layer l, in layer order, and keeps the layers in order
        (no TokenWeave / rotation overlap). ``kv_hook(l)``: on the TokenWeave path only, once
        layer l's KV of every token micro-batch is in the cache; it keeps the overlap and runs
        at the same point on every TP rank, so it may issue collectives (engine/kv_cache/
        step_gather.py). Other paths never call it."""
        rotation = 1 if self.split is None else self.split.rotation
        tp = self.parallel
        if rotation > 1 and meta.num_seqs > 1 and layer_hook is None:
            if tp is not None:
                raise ValueError("tensor parallelism: the micro-batch rotation (attention offload) does not take it")
            return self._forward_rotated(input_ids, positions, meta, rotation)
        if tp is not None and layer_hook is None and tp.overlaps(input_ids.shape[0]):
            return tp.forward_overlapped(self, input_ids, positions, meta, kv_hook)
        if tp is None:
            x = F.embedding(input_ids, self.embed)
            if self.native is not None:
                return self._forward_native(x, positions, meta, layer_hook, self.native)
        else:  # one TP rank: each partial value is completed across ranks (ShardReductions)
            x = tp.embed(input_ids, self.embed)
        rope = self.rope.tables(positions, x.dtype)  # gathered once, shared by every layer
        for i, layer in enumerate(self.layers):
            a = layer.attn(layer.input_norm(x), rope, self.backend, meta)
            x = x + (a if tp is None else tp.reduce(a))
            m = layer.mlp(layer.post_attn_norm(x))
            x = x + (m if tp is None else tp.reduce(m))
            if layer_hook is not None:
                layer_hook(i)
        return self.norm(x)

    def _forward_native(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        layer_hook: LayerHook | None,
        kn: NativeKernels,
    ) -> torch.Tensor:
        """``forward``'s loop with each residual add fused into the next norm: x (the residual
        stream, [T, hidden]) is updated in place; h is the normed input of the next sublayer."""
        layers = self.layers
        h = kn.rms_norm(x, layers[0].input_norm)
        for i, layer in enumerate(layers):
            a = layer.attn.forward_native(h, positions, self.rope, self.backend, meta, kn)
            h = kn.add_rms_norm(x, a, layer.post_attn_norm)
            m = layer.mlp.forward_native(h, kn)
            h = kn.add_rms_norm(x, m, layers[i + 1].input_norm if i + 1 < len(layers) else self.norm)
            if layer_hook is not None:
                layer_hook(i)
        return h

    def _forward_rotated(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, parts: int
    ) -> torch.Tensor:
        """``forward`` over micro-batches of whole sequences, rotated through the split backend
        (Lamina): stage l of micro-batch i finishes layer l (o_proj, MLP/MoE) and projects
        layer l + 1's q/k/v, then submits that attention; run_overlapped runs micro-batch
        i + 1's stage while i's attention is in flight. The same ops as the sequential loop,
        per micro-batch (native kernels when set). -> final hidden states [T, hidden]."""
        split, kn, layers = self.split, self.native, self.layers
        assert split is not None
        groups = micro_batches(meta, parts)
        # per micro-batch (ids [t], positions [t], its metadata); state = (x residual [t, hidden], positions, meta, rope)
        inputs = [(input_ids[a:b], positions[a:b], m) for a, b, m in groups]

        def project(layer: int, h: torch.Tensor, state: tuple) -> _Carry:
            attn = layers[layer].attn
            _, pos, m, rope = state
            q, k, v = attn.project(h, rope) if kn is None else attn.project_native(h, pos, self.rope, kn)
            return _Carry(state, split.submit(layer, q, k, v, m))

        def embed(i: int, inp: tuple) -> tuple:
            ids, pos, m = inp
            x = F.embedding(ids, self.embed)
            rope = None if kn is not None else self.rope.tables(pos, x.dtype)
            h = layers[0].input_norm(x) if kn is None else kn.rms_norm(x, layers[0].input_norm)
            return h, (x, pos, m, rope)

        def finish(layer: int) -> Callable[[int, tuple], tuple]:
            lay = layers[layer]
            nxt = layers[layer + 1].input_norm if layer + 1 < len(layers) else self.norm

            def compute(i: int, carried: tuple) -> tuple:
                (x, pos, m, rope), o = carried
                if kn is None:
                    x = x + lay.attn.output(o)
                    x = x + lay.mlp(lay.post_attn_norm(x))
                    return nxt(x), (x, pos, m, rope)
                h = kn.add_rms_norm(x, lay.attn.output_native(o, kn), lay.post_attn_norm)
                return kn.add_rms_norm(x, lay.mlp.forward_native(h, kn), nxt), (x, pos, m, rope)

            return compute

        def submit(layer: int) -> Callable[[int, tuple], Pending[tuple]]:
            return lambda i, y: project(layer, y[0], y[1])

        stages = [Stage(embed, submit(0), "embed")]
        for j in range(len(layers)):
            last = j + 1 == len(layers)
            stages.append(Stage(finish(j), None if last else submit(j + 1), f"layer{j}"))
        outs = run_overlapped(inputs, stages, self.rotation_stats)
        return torch.cat([h for h, _ in outs], dim=0)

    def head_weight(self) -> torch.Tensor:
        """The head's [vocab, hidden] weight: lm_head, else the tied embedding (its packed
        copy once ``prepack_linears`` made one)."""
        if self.lm_head is not None:
            return self.lm_head
        return self.embed if self.head_packed is None else self.head_packed

    def plain_head_weight(self) -> torch.Tensor:
        """The head's [vocab, hidden] weight as it was loaded: lm_head, else the tied embedding
        (an mkldnn tensor when ``prepack_linears`` replaced an untied head by its packed form)."""
        return self.lm_head if self.lm_head is not None else self.embed

    def parallel_greedy_tokens(self, hidden: torch.Tensor) -> list[int]:
        """A TP rank's plain-greedy tokens: hidden [N, hidden] -> the argmax of each row's full
        logits (``compute_logits(hidden).argmax(-1)``), gathering one (max, id) pair per rank
        and row instead of the logits (ShardReductions.greedy_tokens)."""
        if self.parallel is None:
            raise ValueError("parallel_greedy_tokens: not a tensor-parallel shard")
        return self.parallel.greedy_tokens(linear(hidden, self.head_weight()).float())

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> fp32 logits [N, vocab]."""
        w = self.head_weight()
        if self.parallel is not None:  # this rank's vocab slice [N, Vs] -> gathered [N, V]
            return self.parallel.gather_logits(linear(hidden, w).float())
        if self.native is not None:
            return self.native.linear(hidden, w).float()
        return linear(hidden, w).float()
