"""Reading a router's streams in tests (in-process LocalCluster or a Ray Controller: both
expose ``.router``)."""

from __future__ import annotations

import asyncio

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


class CancelledMidway:
    """A client that starts a long greedy stream and goes away after its first token.

    Lifecycle: ``start()`` launches the stream as a task; ``cancel()`` waits for the first
    token (so the request really is running on a worker), then cancels the task, which
    aborts the request everywhere."""

    def __init__(self, router: Router, rid: str, prompt: list[int]):
        self.router, self.rid, self.prompt = router, rid, prompt
        self.first_token = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> CancelledMidway:
        self.task = asyncio.create_task(self._stream())
        return self

    async def _stream(self) -> None:
        long = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
        async for _ in self.router.generate(RequestSpec(self.rid, self.prompt, long)):
            self.first_token.set()

    async def cancel(self) -> None:
        assert self.task is not None, "start() first"
        await self.first_token.wait()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
