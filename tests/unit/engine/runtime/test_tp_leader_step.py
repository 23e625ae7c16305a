"""TPLeaderEngine.step with a layer hook (a TP prefill worker's layer-wise KV push): every rank
steps without a model layer hook, so a step long enough for TokenWeave runs its token-split
overlap, and the hook then runs once per layer, in order, with the step's schedule."""

from __future__ import annotations

import pytest

from engine.llm import build_engine_config
from engine.request import Request, SamplingParams
from engine.runtime.tensor_parallel import TPFollower, TPLeaderEngine, build_tp_cores
from engine.scheduler.output import SchedulerOutput

WIDE = {"num_attention_heads": 16, "num_key_value_heads": 8, "hidden_size": 128, "intermediate_size": 256}
# TokenWeave from 2 tokens (the default waits for 2048), set as a served pool's engine options would
ENGINE = {"block_size": 8, "num_blocks": 64, "attention_backend": "sdpa", "tokenweave_min_tokens": 2}


@pytest.fixture(scope="module")
def leader(tiny_checkpoint):
    ckpt = tiny_checkpoint("llama", vocab_size=515, **WIDE)
    cores = build_tp_cores(build_engine_config(ckpt, **ENGINE), 2, "tp/leader-step")
    follower = TPFollower(cores[1], "tp/leader-step#1")
    yield TPLeaderEngine(cores[0], [follower])
    follower.stop(10.0)


def _prompt(rid: str, n: int) -> Request:
    return Request(rid, [3 + (7 * i) % 500 for i in range(n)], SamplingParams(max_tokens=3, temperature=0.0))


def test_a_hooked_step_runs_tokenweave_then_the_hook_for_every_layer(leader: TPLeaderEngine) -> None:
    stats = [leader.core.model.parallel.stats, leader.followers[0].engine.model.parallel.stats]
    runs_before = [s.runs for s in stats]
    calls: list[tuple[int, SchedulerOutput]] = []
    leader.add_request(_prompt("hooked", 40))
    result = leader.step(lambda layer, out: calls.append((layer, out)))
    assert [s.runs for s in stats] == [r + 1 for r in runs_before]  # both ranks took the overlapped path
    assert [layer for layer, _ in calls] == list(range(leader.core.layout.num_layers))
    assert all(out is result.schedule for _, out in calls)  # the step's own schedule, after the step
    assert [sr.request_id for sr in result.schedule.scheduled] == ["hooked"]
    # the same prompt without a hook: the same first token (the same model path on every rank)
    leader.add_request(_prompt("plain", 40))
    plain = leader.step()
    first = {r.request_id: r.output_token_ids[0] for r in (*result.outputs, *plain.outputs) if r.output_token_ids}
    assert first["hooked"] == first["plain"]
    while leader.core.has_work():  # an empty step's schedule is None: the hook is not called
        leader.step()
    calls.clear()
    empty = leader.step(lambda layer, out: calls.append((layer, out)))
    assert empty.schedule is None and calls == []


def test_a_served_tp_engine_runs_tokenweave_from_2048_tokens_unless_turned_off(tiny_checkpoint) -> None:
    ckpt = tiny_checkpoint("llama", vocab_size=515, **WIDE)
    default = build_engine_config(ckpt, block_size=8, num_blocks=16).tokenweave
    assert (default.enabled, default.min_tokens) == (True, 2048)
    off = build_engine_config(ckpt, block_size=8, num_blocks=16, tokenweave=False).tokenweave
    assert not off.enabled
    cores = build_tp_cores(build_engine_config(ckpt, block_size=8, num_blocks=16), 2, "tp/tokenweave-default")
    tw = [core.model.parallel for core in cores]
    assert all(t.overlaps(2048) and not t.overlaps(2047) for t in tw)
