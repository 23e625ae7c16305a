"""The decoder-only transformer shared by every supported family.

Llama, Mistral, Qwen2 (qkv bias) and Qwen3 (q/k RMSNorm) differ only in flags of
ModelConfig; the MoE families (mixtral.py, qwen_moe.py) swap the MLP for an MoEBlock.
Tokens are flattened across the batch: hidden states are [T, hidden], never padded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention.backend import AttentionBackend, AttentionMetadata
from engine.config import ModelConfig
from engine.models.layers import GatedMLP, NativeKernels, RMSNorm, RotaryEmbedding, linear
from engine.models.moe import LocalExpertDispatcher, LocalExperts, MoEBlock
from engine.moe import ExpertDispatcher

# Called after layer ``i`` has written its K/V for the step (layer-wise KV push seam).
LayerHook = Callable[[int], None]


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
        o = backend.forward(self.layer, q, k, v.contiguous(), meta)  # [T, H, D]
        return linear(o.reshape(t, self.h * self.d), self.o)

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
        t = x.shape[0]
        q, k, v = kn.rope_split_qkv(kn.linear(x, self.qkv, self.qkv_bias), rope, positions, self.h, self.hkv)
        o = backend.forward(self.layer, q, k, v, meta)  # [T, H, D]
        return kn.linear(o.reshape(t, self.h * self.d), self.o)


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
        # Native CPU kernels (``set_native_kernels``); None runs the torch ops. The native path
        # covers dense layers without q/k norm; MoE and Qwen3 layers keep the torch path.
        self.native: NativeKernels | None = None

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

    def set_native_kernels(self, kernels: NativeKernels | None) -> None:
        """Run ``forward`` through the native CPU kernels (None: the torch ops). Only models
        whose every layer is dense and without q/k norm take them (see ``native_capable``)."""
        if kernels is not None and not self.native_capable:
            raise ValueError(f"{self.cfg.architecture}: the native kernel path needs dense layers without q/k norm")
        self.native = kernels

    @property
    def native_capable(self) -> bool:
        return self.cfg.moe is None and not self.cfg.qk_norm

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        layer_hook: LayerHook | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden]."""
        x = F.embedding(input_ids, self.embed)
        if self.native is not None:
            return self._forward_native(x, positions, meta, layer_hook, self.native)
        rope = self.rope.tables(positions, x.dtype)  # gathered once, shared by every layer
        for i, layer in enumerate(self.layers):
            x = x + layer.attn(layer.input_norm(x), rope, self.backend, meta)
            x = x + layer.mlp(layer.post_attn_norm(x))
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

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> fp32 logits [N, vocab]."""
        w = self.embed if self.lm_head is None else self.lm_head
        if self.native is not None:
            return self.native.linear(hidden, w).float()
        return linear(hidden, w).float()
