"""engine/parallel.py CommWorker: the communication thread TokenWeave runs its fused
AR-RMSNorm on (jobs in submission order, errors re-raised by wait, collectives issued from it
pair up across ranks)."""

from __future__ import annotations

import threading

import pytest
import torch

from engine.parallel import CommunicationError, CommWorker
from tests.unit.engine.gloo_ranks import gloo_comms, run_ranks


def test_jobs_run_one_at_a_time_in_submission_order_off_the_calling_thread() -> None:
    worker = CommWorker("t")
    order: list[int] = []
    threads: set[str] = set()
    gate = threading.Event()

    def job(i: int) -> int:
        if i == 0:
            assert gate.wait(10)  # the first job holds the worker until the caller released it
        order.append(i)
        threads.add(threading.current_thread().name)
        return i * i

    pending = [worker.submit(lambda i=i: job(i)) for i in range(5)]
    assert order == []  # nothing ran past the held first job
    gate.set()
    assert [p.wait() for p in pending] == [0, 1, 4, 9, 16]
    assert order == [0, 1, 2, 3, 4]
    assert len(threads) == 1 and threading.current_thread().name not in threads
    worker.close()


def test_jobs_run_under_the_callers_grad_and_inference_modes() -> None:
    worker = CommWorker("t")
    w = torch.ones(3, requires_grad=True)

    def modes() -> tuple[bool, bool, bool]:
        return torch.is_grad_enabled(), torch.is_inference_mode_enabled(), (w * 2).requires_grad

    with torch.inference_mode():
        assert worker.submit(modes).wait() == (False, True, False)
    with torch.no_grad():
        assert worker.submit(modes).wait() == (False, False, False)
    assert worker.submit(modes).wait() == (True, False, True)
    worker.close()


def test_a_failed_job_raises_at_wait_and_the_worker_goes_on() -> None:
    worker = CommWorker("t")

    def fail() -> None:
        raise CommunicationError("peer gone")

    bad = worker.submit(fail)
    good = worker.submit(lambda: 7)
    with pytest.raises(CommunicationError, match="peer gone"):
        bad.wait()
    assert good.wait() == 7
    worker.close()


def test_chained_collectives_on_the_worker_pair_up_across_ranks() -> None:
    comms = gloo_comms(2)

    def rank_fn(r: int) -> list[torch.Tensor]:
        comm, worker = comms[r], CommWorker(f"r{r}")
        # reduce-scatter -> local op -> all-gather per micro-batch, as TokenWeave's AR-RMSNorm
        pending = []
        for mb in range(3):
            x = torch.full((4, 2), float(r + 1 + mb))
            pending.append(worker.submit(lambda x=x: comm.all_gather(comm.reduce_scatter(x) * 2)))
            torch.ones(64, 64) @ torch.ones(64, 64)  # the caller computes meanwhile
        out = [p.wait() for p in pending]
        worker.close()
        return out

    for out in run_ranks(rank_fn):
        for mb, y in enumerate(out):
            assert torch.equal(y, torch.full((4, 2), 2.0 * (3 + 2 * mb)))  # 2 * ((1 + mb) + (2 + mb))
