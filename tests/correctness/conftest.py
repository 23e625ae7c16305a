"""Fixtures of the correctness suite that need more than a tiny checkpoint."""

from __future__ import annotations

import pytest

from tests.real_model import real_model_dir, real_model_gguf


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct as a .gguf path (tests/real_model.py: skip locally, fail in CI)."""
    return real_model_gguf()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: str) -> str:
    """The converted Hugging Face directory of ``smollm2_gguf``."""
    return real_model_dir()
