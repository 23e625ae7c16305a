"""Reading a router's streams in tests (in-process LocalCluster or a Ray Controller: both
expose ``.router``)."""

from __future__ import annotations

from cluster.control.router import Router
from engine.request import SamplingParams
from engine.types import RequestSpec, StreamChunk


async def collect(
    router: Router, rid: str, prompt: list[int], params: SamplingParams
) -> tuple[list[int], StreamChunk | None]:
    """Run one request to its end -> (every token streamed, the last chunk or None if none came)."""
    tokens: list[int] = []
    last: StreamChunk | None = None
    async for chunk in router.generate(RequestSpec(rid, prompt, params)):
        tokens += chunk.token_ids
        last = chunk
    return tokens, last


async def collect_ok(router: Router, rid: str, prompt: list[int], params: SamplingParams) -> list[int]:
    """``collect`` for a request that must not fail: every chunk carries no error -> its tokens."""
    tokens: list[int] = []
    async for chunk in router.generate(RequestSpec(rid, prompt, params)):
        assert chunk.error is None, chunk.error
        tokens += chunk.token_ids
    return tokens
