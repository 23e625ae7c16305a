"""WorkerRuntime's parts every worker kind shares: the stream registry and liveness."""

from __future__ import annotations

import threading

import pytest

from engine.request import Request, SamplingParams
from engine.runtime.worker import StreamRegistry
from engine.types import UnknownRequest


def test_streams_are_unique_per_id_and_unknown_ids_are_typed_errors():
    reg = StreamRegistry("w0")
    s = reg.open("a")
    with pytest.raises(ValueError, match="duplicate request id 'a'"):
        reg.open("a")
    assert reg.get("a") is s and reg.find("b") is None
    with pytest.raises(UnknownRequest, match="unknown request 'b' on w0"):
        reg.get("b")
    assert reg.close("a") is s and reg.close("a") is None
    with pytest.raises(UnknownRequest):
        reg.get("a")


def test_fail_all_wakes_every_waiting_reader():
    reg = StreamRegistry("w0")
    streams = [reg.open(f"r{i}") for i in range(3)]
    req = Request("r0", [1, 2], SamplingParams(max_tokens=2))
    req.output_token_ids.append(7)
    streams[0].publish(req)  # r0 already has a token; the failure still ends it
    got: list = []
    readers = [threading.Thread(target=lambda s=s: got.append(s.read(len(s.token_ids), timeout=10))) for s in streams]
    for t in readers:
        t.start()
    reg.fail_all("w0 engine failed: boom")
    for t in readers:
        t.join(10)
    assert len(got) == 3 and all(c.finished and c.finish_reason == "abort" and "boom" in c.error for c in got)
    assert streams[0].token_ids == [7]  # what was delivered stays delivered


def test_wake_ends_an_idle_wait_at_once():
    import threading
    import time

    from engine.runtime.loop import EngineLoop

    ticks: list[float] = []
    ticked = threading.Condition()

    def tick():
        with ticked:
            ticks.append(time.monotonic())
            ticked.notify_all()

    def ticks_beyond(n: int, timeout: float) -> bool:
        with ticked:
            return ticked.wait_for(lambda: len(ticks) > n, timeout)

    loop = EngineLoop(step=lambda: None, has_work=lambda: False, tick=tick, idle_poll_s=600.0).start()
    try:
        assert ticks_beyond(0, 30)  # the first round ran; the loop now idles for 10 minutes
        n = len(ticks)
        loop.wake()
        assert ticks_beyond(n, 30), "wake() did not end the idle wait"
    finally:
        loop.stop()
