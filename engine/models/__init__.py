"""Model families and the Hugging Face checkpoint loader."""

from engine.models.llama import DecoderLM
from engine.models.loader import WeightLoadError, load_model

__all__ = ["DecoderLM", "WeightLoadError", "load_model"]
