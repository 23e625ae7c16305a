"""Frozen, validated configuration for the engine.

Every config is a frozen dataclass validated once in ``__post_init__``; later code trusts it.
``ModelConfig`` is parsed from a Hugging Face ``config.json`` (both the transformers 4.x
``rope_theta``/``rope_scaling`` keys and the 5.x ``rope_parameters`` key are accepted).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
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
    # the native kernel; larger ones use oneDNN / MKL (0: never). None: by the vector paths the
    # kernels were built with (STREAM_ROWS_BY_ISA), each measured in the engine's decode step on
    # a 2-core EPYC: AVX-512 (Zen 4) 4, streaming wins at 1-4 rows and packed oneDNN
    # (prepack_linear) from 8 (12.9 vs 14.2 ms at 1 row; 24.9 vs 26.6 ms at 8); AVX2 (Zen 3) 16,
    # streaming 0.91x the step at 8 rows, 0.97x at 12, a tie at 16 (BENCHMARKS.md).
    stream_linear_max_rows: int | None = None
    # Reorder float32 linear weights, and bfloat16 ones where oneDNN runs bf16 natively
    # (layers.PACKABLE_DTYPES; bf16 SmolLM2's batch-8 step 0.78x the time: benchmarks/
    # decode_step_profile.py --dtype bfloat16), (attention, dense MLP, head; at least ONEDNN_MIN_WEIGHT
    # elements) once at load into oneDNN's blocked layout (engine/models/layers.py
    # pack_linear_weight), so oneDNN skips its per-call reorder: decode steps 0.85x the time at
    # 8 rows and 0.90x at 64 on SmolLM2 (BENCHMARKS.md, engine vs vLLM). With the streaming kernel on
    # (stream_linear_max_rows > 0) the plain weights stay for it and the packed copies are
    # extra: the linear weights' bytes twice. Without it the packed form replaces the plain one
    # (a tied head: a packed copy beside the embedding). CPU only; SPLITSERVE_ONEDNN_LINEAR=0
    # turns it off too.
    prepack_linear: bool = True
    # Steps whose rows are all greedy without logprobs take each row's float32 argmax from a
    # bf16 screen of the head plus a float32 refinement of the few tokens the screen cannot rule
    # out (engine/models/greedy_head.py: a rigorous bound, so the token is the float32 argmax).
    # Needs the native kernels built (the model need not run them: MoE models get it too) and a
    # float32 head; steps above stream_linear_max_rows rows need oneDNN bf16 on the CPU too (else
    # they take the full head). Costs two bf16 copies of the head (one float32 head's bytes; one
    # copy without oneDNN bf16), plus the plain head where prepack_linear replaces an untied one. Head +
    # argmax at 1 / 8 / 64 rows on SmolLM2: 0.50x / 0.58x / 0.57x the full head's time, decode step 0.92-0.95x (benchmarks/greedy_head.py).
    # On a tensor-parallel rank the same switch makes plain-greedy steps all-gather one
    # (max, id) pair per row and rank instead of the vocab-parallel logits (TPReductions.greedy_tokens).
    greedy_head: bool = True

    def __post_init__(self) -> None:
        if self.stream_linear_max_rows is not None and self.stream_linear_max_rows < 0:
            raise ValueError(f"stream_linear_max_rows must be >= 0, got {self.stream_linear_max_rows}")


# ---------------------------------------------------------------- speculative decoding
# (validation and vLLM key resolution; the draft compatibility check is engine/spec/config.py)

METHODS = ("ngram", "draft_model")
POLICIES = ("smartspec", "fixed")

# Why 16: a request verifies k + 1 rows per step, so K bounds what one request adds to a
# step's token budget and the draft model's sequential forwards per step (k of them). The
# gain of the k-th draft token is a^k (a: per-token acceptance): even at a = 0.9 the 17th
# token would add 0.17 expected tokens for a full extra draft forward, and measured
# acceptance of real drafts is far lower. vLLM's rejection sampler caps at 128; nothing here
# needs that much, and a small cap keeps the policy's search (B x K candidates) cheap.
MAX_SPECULATIVE_TOKENS = 16
DEFAULT_PROMPT_LOOKUP_MIN = 2
DEFAULT_PROMPT_LOOKUP_MAX = 5
MAX_PROMPT_LOOKUP = 64  # the n-gram proposer compares n positions per candidate match

# vLLM keys this engine knows but does not implement (a clear error, not "unknown key").
_UNSUPPORTED_VLLM_KEYS = frozenset(
    {
        "draft_tensor_parallel_size",
        "quantization",
        "max_model_len",
        "revision",
        "code_revision",
        "disable_by_batch_size",
        "disable_mqa_scorer",
        "disable_logprobs",
        "disable_log_stats",
        "speculative_token_tree",
        "enforce_eager",
        "parallel_drafting",
    }
)


def _field_error(name: str, message: str) -> ValueError:
    return ValueError(f"speculative_config.{name} {message}")


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _field_error(name, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise _field_error(name, f"must be in [{low}, {high}], got {value}")


@dataclass(frozen=True)
class SpeculativeConfig:
    """One speculation setup, shared by every request of an engine.

    method: "ngram" (prompt lookup over prompt + output) or "draft_model" (``model``).
    num_speculative_tokens: K, the most draft tokens a request verifies in one step (1..16).
        With policy "smartspec" each request gets k in 0..K per step; "fixed" always K.
    model: the draft checkpoint (HF directory or .gguf) for "draft_model"; None for "ngram".
    policy: "smartspec" (goodput-maximising k per request) or "fixed".
    prompt_lookup_min / prompt_lookup_max: n-gram sizes tried, longest first ("ngram" only;
        None for "draft_model").
    acceptance_prior: SmartSpec's cold-start per-token acceptance estimate for this
        proposer, before any request was verified (0 < prior < 1).
    """

    method: str
    num_speculative_tokens: int
    model: str | None = None
    policy: str = "smartspec"
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    acceptance_prior: float = 0.5

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise _field_error("method", f"must be one of {list(METHODS)}, got {self.method!r}")
        _check_int("num_speculative_tokens", self.num_speculative_tokens, 1, MAX_SPECULATIVE_TOKENS)
        if self.policy not in POLICIES:
            raise _field_error("policy", f"must be one of {list(POLICIES)}, got {self.policy!r}")
        prior = self.acceptance_prior
        if isinstance(prior, bool) or not isinstance(prior, int | float) or not 0.0 < prior < 1.0:
            raise _field_error("acceptance_prior", f"must be a number in (0, 1), got {prior!r}")
        if self.method == "draft_model":
            if not isinstance(self.model, str) or not self.model:
                raise _field_error(
                    "model", "must name the draft checkpoint directory (or .gguf) for method draft_model"
                )
            for name in ("prompt_lookup_min", "prompt_lookup_max"):
                if getattr(self, name) is not None:
                    raise _field_error(name, "applies to method ngram only")
            return
        if self.model is not None:
            raise _field_error("model", f"must be unset for method ngram, got {self.model!r}")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if lo is None and hi is None:
            lo, hi = DEFAULT_PROMPT_LOOKUP_MIN, DEFAULT_PROMPT_LOOKUP_MAX
        elif lo is None:
            lo = hi
        elif hi is None:
            hi = lo
        _check_int("prompt_lookup_min", lo, 1, MAX_PROMPT_LOOKUP)
        _check_int("prompt_lookup_max", hi, 1, MAX_PROMPT_LOOKUP)
        if lo > hi:
            raise _field_error("prompt_lookup_min", f"({lo}) must be <= prompt_lookup_max ({hi})")
        object.__setattr__(self, "prompt_lookup_min", lo)
        object.__setattr__(self, "prompt_lookup_max", hi)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> SpeculativeConfig:
        """From vLLM-style ``speculative_config`` keys (module docstring); unknown keys are errors."""
        if not isinstance(d, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclass_fields(SpeculativeConfig)}
        unsupported = sorted(set(d) & _UNSUPPORTED_VLLM_KEYS)
        if unsupported:
            raise ValueError(f"speculative_config keys {unsupported} are vLLM options this engine does not implement")
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown speculative_config keys {unknown}; known: {sorted(known)}")
        if "num_speculative_tokens" not in d:
            raise _field_error("num_speculative_tokens", "is required")
        method, model = d.get("method"), d.get("model")
        if method is None:
            if model is None:
                raise _field_error("method", f"is required (one of {list(METHODS)}) when no model is given")
            method = "ngram" if model in ("ngram", "[ngram]") else "draft_model"
        if method == "ngram" and model in ("ngram", "[ngram]"):
            model = None  # vLLM spells the n-gram method as a model name too
        fields = {k: v for k, v in d.items() if k not in ("method", "model")}
        return SpeculativeConfig(method=method, model=model, **fields)

    @staticmethod
    def from_json(text: str) -> SpeculativeConfig:
        """``--speculative-config JSON``; a JSON syntax error names the option."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        return SpeculativeConfig.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config in ``from_dict`` form (None fields left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class TokenWeaveConfig:
    """TokenWeave's switch and threshold. Below ``min_tokens`` tokens the sequential path runs:
    two micro-batches cost more than the overlap saves. Measured at TP=2 over gloo on the 2-core
    CPU box (benchmarks/tensor_parallel.py, SmolLM2-width 16/8-head model, load ~3): TokenWeave
    was slower than sequential TP up to 1024 tokens and paid from 2048, hence the default.
    ``fused_norm``: each all-reduce + RMSNorm is reduce-scatter -> RMSNorm on the token shard ->
    all-gather (TokenWeave's fused AR-RMSNorm, run on a communication thread); False keeps
    all-reduce + RMSNorm on every token (still split and overlapped, no extra thread), which
    measured faster on gloo, whose reduce-scatter takes as long as its all-reduce (an engine's
    TP step always uses that form: EngineCore, TPReductions.forward_overlapped)."""

    enabled: bool = True
    min_tokens: int = 2048
    fused_norm: bool = True

    def __post_init__(self) -> None:
        if self.min_tokens < 0:
            raise ValueError(f"TokenWeaveConfig.min_tokens must be >= 0, got {self.min_tokens}")


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
    # speculative decoding (engine/spec/): None = plain decoding, one token per request per step
    speculative: SpeculativeConfig | None = None
    # token-split overlap of a tensor-parallel engine's all-reduces (ignored without TP)
    tokenweave: TokenWeaveConfig = field(default_factory=TokenWeaveConfig)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype {self.dtype!r} must be float32, float16 or bfloat16")
        if self.attention_backend not in ("sdpa", "triton", "auto"):
            raise ValueError(f"attention_backend {self.attention_backend!r} must be sdpa, triton or auto")
        if self.kv_cache_shared and self.device.split(":")[0] != "cpu":
            raise ValueError(f"kv_cache_shared needs a CPU KV cache, not device {self.device!r}")
        if self.max_model_len is None:
            object.__setattr__(self, "max_model_len", self.model.max_position_embeddings)
