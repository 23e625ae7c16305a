"""StatsSnapshot: fresh between steps, the last post-step report (marked stale) while a long
step holds the engine loop."""

import threading

from engine.runtime.loop import EngineLoop, StatsSnapshot
from tests.fakes import worker_stats


def test_fresh_between_steps_stale_during_a_long_step():
    release, stepping = threading.Event(), threading.Event()
    work = {"pending": False, "n": 0}

    def step():
        work["pending"] = False
        stepping.set()
        release.wait(10)  # a long step: holds the loop until the test lets go
        snap.refresh()

    def compute():
        work["n"] += 1
        return worker_stats(pending_requests=work["n"])

    loop = EngineLoop(step, lambda: work["pending"])
    snap = StatsSnapshot(loop, compute)
    loop.start()
    try:
        fresh = snap.get(wait_s=5)  # the loop is free: computed now
        assert (fresh.pending_requests, fresh.stale) == (1, False)
        loop.run(lambda: work.update(pending=True))
        assert stepping.wait(5)
        stale = snap.get(wait_s=0.05)  # answered from the snapshot
        assert (stale.pending_requests, stale.stale) == (1, True)
        release.set()
        # 2: the step's own refresh; 3: the refresh the stale get queued (run_or still runs
        # it once the loop is free); 4: this get, computed fresh
        again = snap.get(wait_s=5)
        assert (again.pending_requests, again.stale) == (4, False)
    finally:
        release.set()
        loop.stop()
