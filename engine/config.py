"""Frozen, validated configuration for the engine.

Every config is a frozen dataclass validated once in ``__post_init__``; later code trusts it.
``ModelConfig`` is parsed from a Hugging Face ``config.json`` (both the transformers 4.x
``rope_theta``/``rope_scaling`` keys and the 5.x ``rope_parameters`` key are accepted).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not implemented."""


# architecture name in config.json -> model family implemented in engine/models
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    # "default" | "linear" | "llama3"
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    top_k: int
    intermediate_size: int  # per routed expert
    norm_topk_prob: bool  # renormalise the top-k routing weights to sum to 1
    shared_intermediate_size: int = 0  # 0: no shared expert (Qwen2-MoE has one)
    # layer indices that use a dense MLP instead of experts
    dense_layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    family: str  # key of SUPPORTED_ARCHITECTURES values
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rope
    sliding_window: int | None = None  # Mistral; None = full attention
    hidden_act: str = "silu"
    moe: MoEConfig | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")
        if self.hidden_act != "silu":
            raise UnsupportedModelError(f"hidden_act {self.hidden_act!r} is not supported (only silu)")

    @staticmethod
    def from_hf_dir(path: str) -> ModelConfig:
        """Parse ``path``/config.json. A .gguf file must be resolved to its converted directory
        first (``engine.models.gguf.resolve_model_path``; ``build_engine_config`` does it)."""
        if os.path.isfile(path):
            raise ValueError(
                f"ModelConfig.from_hf_dir needs a model directory, got the file {path!r} "
                "(resolve a .gguf with engine.models.gguf.resolve_model_path first)"
            )
        with open(os.path.join(path, "config.json")) as f:
            return ModelConfig.from_hf_dict(json.load(f))

    @staticmethod
    def from_hf_dict(cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        model_type = cfg.get("model_type", "")
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        sliding = cfg.get("sliding_window")
        if model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe") and not cfg.get("use_sliding_window", False):
            sliding = None
        if sliding is not None and sliding <= 0:
            sliding = None
        return ModelConfig(
            architecture=arch,
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rope=_parse_rope(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type in ("qwen2", "qwen2_moe") or bool(cfg.get("attention_bias", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            sliding_window=sliding,
            hidden_act=cfg.get("hidden_act", "silu"),
            moe=_parse_moe(family, cfg),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
        )


def _parse_rope(cfg: dict[str, Any]) -> RopeConfig:
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=params["factor"])
    if kind == "llama3":
        return RopeConfig(
            theta=theta,
            kind="llama3",
            factor=params["factor"],
            low_freq_factor=params["low_freq_factor"],
            high_freq_factor=params["high_freq_factor"],
            original_max_position=params["original_max_position_embeddings"],
        )
    raise UnsupportedModelError(f"rope type {kind!r} is not supported (default, linear, llama3)")


def _parse_moe(family: str, cfg: dict[str, Any]) -> MoEConfig | None:
    if family == "llama":
        return None
    num_experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    if family == "mixtral":
        return MoEConfig(num_experts, cfg["num_experts_per_tok"], cfg["intermediate_size"], norm_topk_prob=True)
    step = cfg.get("decoder_sparse_step", 1) or 1
    only = set(cfg.get("mlp_only_layers") or [])
    dense = tuple(i for i in range(cfg["num_hidden_layers"]) if i in only or (i + 1) % step != 0)
    return MoEConfig(
        num_experts=num_experts,
        top_k=cfg["num_experts_per_tok"],
        intermediate_size=cfg["moe_intermediate_size"],
        norm_topk_prob=bool(cfg.get("norm_topk_prob", family == "qwen3_moe")),
        shared_intermediate_size=cfg.get("shared_expert_intermediate_size", 0) if family == "qwen2_moe" else 0,
        dense_layers=dense,
    )


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV page
    # Number of KV pages. None: sized from ``max_kv_memory_gb`` at engine start.
    num_blocks: int | None = None
    max_kv_memory_gb: float = 1.0
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError("block_size must be positive")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")


class SchedulerMode(str, Enum):
    MIXED = "mixed"  # prefill and decode in one engine (colocated)
    PREFILL_ONLY = "prefill_only"  # stop after the first token; KV blocks held for transfer
    DECODE_ONLY = "decode_only"  # requests arrive prefilled via reserve()/admit()


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # running requests at once
    max_num_batched_tokens: int = 2048  # token budget of one step (chunked prefill chunk cap)
    enable_chunked_prefill: bool = True
    mode: SchedulerMode = SchedulerMode.MIXED

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        object.__setattr__(self, "mode", SchedulerMode(self.mode))


@dataclass(frozen=True)
class KernelConfig:
    """Which CPU kernels the model runs (engine/native: csrc/linear.cpp, csrc/fused_ops.cpp).

    The native path covers dense models without q/k norm (Llama, Mistral, Qwen2) on CPU in
    float32 / bfloat16 / float16 (``stream_linear`` takes float32 and bfloat16 weights; float16
    linears stay on torch). Everything else runs the torch ops of engine/models.
    """

    # None: native kernels when the model is on CPU, the model is covered and the kernels build
    # (a failed build logs one warning and runs the torch ops); True: require them (an error
    # otherwise); False: torch ops only.
    native: bool | None = None
    # Linears with at most this many rows (tokens of the step) stream their weight once through
    # the native kernel; larger ones use oneDNN / MKL (0: never). 16 is where oneDNN catches up
    # on the 2-core dev machine (benchmarks/linear_kernels.py).
    stream_linear_max_rows: int = 16

    def __post_init__(self) -> None:
        if self.stream_linear_max_rows < 0:
            raise ValueError(f"stream_linear_max_rows must be >= 0, got {self.stream_linear_max_rows}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    model_path: str
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    dtype: str = "float32"  # "float32" | "float16" | "bfloat16"
    device: str = "cpu"
    attention_backend: str = "auto"  # "sdpa" | "triton" | "auto" (triton on CUDA, sdpa on CPU)
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    # allocate the KV cache in a memfd another process can map (CPU only): lets the shm KV
    # transport's receiver copy pages straight out of this cache (see PagedKVCache)
    kv_cache_shared: bool = False
    kernels: KernelConfig = field(default_factory=KernelConfig)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype {self.dtype!r} must be float32, float16 or bfloat16")
        if self.attention_backend not in ("sdpa", "triton", "auto"):
            raise ValueError(f"attention_backend {self.attention_backend!r} must be sdpa, triton or auto")
        if self.kv_cache_shared and self.device.split(":")[0] != "cpu":
            raise ValueError(f"kv_cache_shared needs a CPU KV cache, not device {self.device!r}")
        if self.max_model_len is None:
            object.__setattr__(self, "max_model_len", self.model.max_position_embeddings)
