"""LoadSnapshot: fresh between steps, the last post-step snapshot (marked stale) while a long
step holds the engine loop."""

import threading

from engine.runtime.loop import EngineLoop, LoadSnapshot


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
        return {"n": work["n"]}

    loop = EngineLoop(step, lambda: work["pending"])
    snap = LoadSnapshot(loop, compute)
    loop.start()
    try:
        assert snap.get(wait_s=5) == {"n": 1}  # the loop is free: computed now
        loop.run(lambda: work.update(pending=True))
        assert stepping.wait(5)
        assert snap.get(wait_s=0.05) == {"n": 1, "stale": True}  # answered from the snapshot
        release.set()
        # n=2: the step's own refresh; n=3: the refresh the stale get queued (run_or still runs
        # it once the loop is free); n=4: this get, computed fresh
        assert snap.get(wait_s=5) == {"n": 4}
    finally:
        release.set()
        loop.stop()
