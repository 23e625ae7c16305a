"""Offline API: ``LLM(model=dir_or_gguf, ...).generate(prompts, SamplingParams(...))``.

``model`` is a Hugging Face directory or a .gguf file (converted once, see engine/models/gguf.py).
``speculative_config`` (vLLM's keys, engine/spec/config.py) turns on speculative decoding.
With ``skip_tokenizer_init=True`` no tokenizer is loaded: prompts must be token ids, stop
strings are rejected, and ``CompletionOutput.text`` is "".
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

from engine.config import (
    CacheConfig,
    EngineConfig,
    KernelConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    TokenWeaveConfig,
)
from engine.engine import EngineCore
from engine.models.gguf import resolve_model_path
from engine.request import Request, SamplingParams, TokenLogprobs
from engine.tokenizer import IncrementalDetokenizer, TokenizerNotLoadedError, load_tokenizer

_CACHE_FIELDS = {f.name for f in dataclasses.fields(CacheConfig)}
_SCHED_FIELDS = {f.name for f in dataclasses.fields(SchedulerConfig)}
_ENGINE_FIELDS = {"attention_backend", "max_model_len", "kv_cache_shared"}
# KernelConfig fields under their LLM option names
_KERNEL_OPTIONS = {
    "native_kernels": "native",
    "stream_linear_max_rows": "stream_linear_max_rows",
    "prepack_linear": "prepack_linear",
    "greedy_head": "greedy_head",
}
# TokenWeaveConfig fields under their LLM option names (tensor-parallel engines only)
_TOKENWEAVE_OPTIONS = {"tokenweave": "enabled", "tokenweave_min_tokens": "min_tokens"}


@dataclass
class CompletionOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids only
    text: str  # "" when the LLM was built with skip_tokenizer_init=True
    finish_reason: str | None
    logprobs: list[TokenLogprobs]
    num_cached_tokens: int


def build_engine_config(
    model: str,
    dtype: str = "float32",
    device: str = "cpu",
    speculative_config: SpeculativeConfig | dict[str, Any] | None = None,
    **options,
) -> EngineConfig:
    """EngineConfig from flat keyword options: CacheConfig / SchedulerConfig field names,
    ``attention_backend`` / ``max_model_len`` / ``kv_cache_shared``, ``native_kernels`` /
    ``stream_linear_max_rows`` / ``prepack_linear`` / ``greedy_head`` (KernelConfig's ``native``
    / ``stream_linear_max_rows`` / ``prepack_linear`` / ``greedy_head``), and ``tokenweave`` /
    ``tokenweave_min_tokens`` (TokenWeaveConfig's ``enabled`` / ``min_tokens``).
    ``speculative_config``: a SpeculativeConfig or vLLM's dict form
    (``SpeculativeConfig.from_dict``), None for plain decoding.

    ``model`` is a HF directory or a .gguf file; ``model_path`` is the directory it resolves to.
    """
    unknown = (
        set(options) - _CACHE_FIELDS - _SCHED_FIELDS - _ENGINE_FIELDS - set(_KERNEL_OPTIONS) - set(_TOKENWEAVE_OPTIONS)
    )
    if unknown:
        raise TypeError(f"unknown engine options: {sorted(unknown)}")
    path = resolve_model_path(model)
    return EngineConfig(
        model=ModelConfig.from_hf_dir(path),
        model_path=path,
        cache=CacheConfig(**{k: v for k, v in options.items() if k in _CACHE_FIELDS}),
        scheduler=SchedulerConfig(**{k: v for k, v in options.items() if k in _SCHED_FIELDS}),
        kernels=KernelConfig(**{_KERNEL_OPTIONS[k]: v for k, v in options.items() if k in _KERNEL_OPTIONS}),
        tokenweave=TokenWeaveConfig(
            **{_TOKENWEAVE_OPTIONS[k]: v for k, v in options.items() if k in _TOKENWEAVE_OPTIONS}
        ),
        dtype=dtype,
        device=device,
        speculative=(
            SpeculativeConfig.from_dict(speculative_config)
            if isinstance(speculative_config, dict)
            else speculative_config
        ),
        **{k: v for k, v in options.items() if k in _ENGINE_FIELDS},
    )


class LLM:
    def __init__(
        self,
        model: str,
        dtype: str = "float32",
        device: str = "cpu",
        skip_tokenizer_init: bool = False,
        speculative_config: SpeculativeConfig | dict[str, Any] | None = None,
        **options,
    ):
        path = resolve_model_path(model)
        config = build_engine_config(path, dtype, device, speculative_config, **options)
        self.engine = EngineCore(config, progress=True)
        self.tokenizer = load_tokenizer(path, skip_tokenizer_init)
        self._ids = itertools.count()

    def make_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        if self.tokenizer is None:
            if isinstance(prompt, str):
                raise TokenizerNotLoadedError(
                    "text prompt given to an LLM built with skip_tokenizer_init=True; pass token ids"
                )
            if params.stop:
                raise TokenizerNotLoadedError(
                    f"stop strings {params.stop!r} need a tokenizer (LLM built with skip_tokenizer_init=True)"
                )
            return Request(request_id or f"req-{next(self._ids)}", list(prompt), params)
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        req = Request(request_id or f"req-{next(self._ids)}", ids, params)
        req.stop_checker = IncrementalDetokenizer(self.tokenizer, params.stop)
        return req

    def generate(
        self,
        prompts: str | list[str] | list[int] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[CompletionOutput]:
        """Run every prompt to completion; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [self.make_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        for i, r in enumerate(reqs):
            try:
                self.engine.add_request(r)
            except Exception:
                for added in reqs[:i]:  # all or nothing: leave no orphan in the engine
                    self.engine.abort(added.request_id)
                raise
        while any(not r.is_finished for r in reqs):
            self.engine.step()
        return [self.output(r) for r in reqs]

    def output(self, req: Request) -> CompletionOutput:
        detok = req.stop_checker
        if isinstance(detok, IncrementalDetokenizer):
            text = detok.final_text
        elif self.tokenizer is None:
            text = ""
        else:
            text = self.tokenizer.decode(req.output_token_ids)
        return CompletionOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            token_ids=list(req.output_token_ids),
            text=text,
            finish_reason=None if req.finish_reason is None else req.finish_reason.value,
            logprobs=req.logprobs,
            num_cached_tokens=max(req.num_cached_tokens, 0),
        )
