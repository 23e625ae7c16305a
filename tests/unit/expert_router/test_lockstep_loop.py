"""EP ranks driven by the worker runtime's EngineLoop (engine/runtime/loop.py) with a
LockstepStepper each, as a serving worker would run them: requests arrive on either rank at
any time through the loop's queued calls, idle ranks keep serving, the tokens equal
engine.LLM's, and a stop asked by one rank stops the whole group without a hung collective."""

from __future__ import annotations

import time

from engine import LLM
from engine.llm import build_engine_config
from engine.request import Request
from engine.runtime.loop import EngineLoop
from expert_router.dispatcher import LockstepStepper
from expert_router.group import build_ep_engine
from tests.correctness.hf_ref import greedy_params, random_prompts
from tests.unit.engine.gloo_ranks import gloo_comms, run_ranks

OPTIONS = {"block_size": 8, "num_blocks": 96, "attention_backend": "sdpa"}


def _wait(predicate, what: str, timeout_s: float = 120.0) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_engine_loops_in_lockstep_serve_requests_arriving_on_either_rank(tiny_checkpoint) -> None:
    ckpt = tiny_checkpoint("qwen2_moe")
    comms = gloo_comms(2, timeout_s=30.0)
    built = run_ranks(lambda r: build_ep_engine(build_engine_config(ckpt, **OPTIONS), comms[r]), 2)
    steppers = [LockstepStepper(engine.step, engine.has_work, dispatcher, idle_s=0.002) for engine, dispatcher in built]
    loops = [EngineLoop(s.step, s.has_work, name=f"ep-rank-{r}").start() for r, s in enumerate(steppers)]
    prompts = random_prompts(seed=71, lengths=(9, 33, 17, 48, 5))
    reqs = [Request(f"p{i}", list(p), greedy_params(20)) for i, p in enumerate(prompts)]
    try:
        for q in reqs[:2]:  # rank 0 first; rank 1 idles and serves
            loops[0].run(lambda q=q: built[0][0].add_request(q))
        _wait(lambda: len(reqs[0].output_token_ids) >= 3, "rank 0 to decode")
        idle = built[1][1].stats
        assert idle.tokens == 0 and idle.rounds > 0  # rank 1, without requests, served rank 0's rounds
        for q in reqs[2:]:  # then rank 1 gets work while rank 0 is mid-decode
            loops[1].run(lambda q=q: built[1][0].add_request(q))
        _wait(lambda: all(q.is_finished for q in reqs), "every request to finish")
        assert all(loop.error is None for loop in loops), [loop.error for loop in loops]
        steppers[1].request_stop()
        _wait(lambda: all(s.stopped for s in steppers), "the group to stop")
    finally:
        for loop in loops:
            loop.stop()
    assert all(loop.error is None for loop in loops), [loop.error for loop in loops]
    want = [o.token_ids for o in LLM(ckpt, skip_tokenizer_init=True, **OPTIONS).generate(prompts, greedy_params(20))]
    assert [list(q.output_token_ids) for q in reqs] == want
    assert steppers[0].iterations == steppers[1].iterations  # aligned to the last iteration
