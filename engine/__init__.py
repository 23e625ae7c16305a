"""splitserve engine: the model runtime shared by every worker (no Ray, no network)."""

from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SchedulerMode
from engine.engine import EngineCore
from engine.llm import LLM, CompletionOutput
from engine.request import FinishReason, Request, SamplingParams

__all__ = [
    "LLM",
    "CacheConfig",
    "CompletionOutput",
    "EngineConfig",
    "EngineCore",
    "FinishReason",
    "ModelConfig",
    "Request",
    "SamplingParams",
    "SchedulerConfig",
    "SchedulerMode",
]
