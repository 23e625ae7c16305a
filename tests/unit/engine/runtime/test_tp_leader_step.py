"""TPLeaderEngine.step with a layer hook (a TP prefill worker's layer-wise KV push): every rank
steps without a model layer hook, so a step long enough for TokenWeave runs its token-split
overlap, and the hook then runs once per layer, in order, with the step's schedule. The pages
it sends were all-gathered during the step, each layer's as soon as the layer wrote them
(engine/kv_cache/step_gather.py), on the TokenWeave path and on the sequential one."""

from __future__ import annotations

import pytest
import torch

from engine.llm import build_engine_config
from engine.request import Request, SamplingParams
from engine.runtime.tensor_parallel import TPFollower, TPLeaderEngine, build_tp_cores
from engine.scheduler.output import SchedulerOutput

WIDE = {"num_attention_heads": 16, "num_key_value_heads": 8, "hidden_size": 128, "intermediate_size": 256}
# TokenWeave from 2 tokens (the default waits for 2048), set as a served pool's engine options would
ENGINE = {"block_size": 8, "num_blocks": 64, "attention_backend": "sdpa", "tokenweave_min_tokens": 2}


def _leader(ckpt: str, tokenweave: bool):
    name = f"tp/leader-step-{'tokenweave' if tokenweave else 'sequential'}"
    cores = build_tp_cores(build_engine_config(ckpt, **ENGINE, tokenweave=tokenweave), 2, name)
    follower = TPFollower(cores[1], f"{name}#1")
    yield TPLeaderEngine(cores[0], [follower])
    follower.stop(10.0)


@pytest.fixture(scope="module")
def leader(tiny_checkpoint):
    """TokenWeave from 2 tokens: every step below takes the overlapped path."""
    yield from _leader(tiny_checkpoint("llama", vocab_size=515, **WIDE), True)


@pytest.fixture(scope="module")
def sequential_leader(tiny_checkpoint):
    yield from _leader(tiny_checkpoint("llama", vocab_size=515, **WIDE), False)


def _prompt(rid: str, n: int, salt: int = 0) -> Request:
    """Prompts of one salt share their prefix (the prefix cache serves it)."""
    return Request(rid, [3 + (7 * i + salt) % 500 for i in range(n)], SamplingParams(max_tokens=3, temperature=0.0))


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


@pytest.mark.parametrize("which", ["leader", "sequential_leader"], ids=["tokenweave", "sequential"])
def test_a_hooked_step_gathers_each_layer_during_the_step(which: str, request, monkeypatch) -> None:
    """On the TokenWeave path rank 0's all-gathers start inside the step, each before the
    all-reduces of the layers after it; on the sequential path the step gathers every layer at
    its end, in one collective. Both give the pages a gather after the step gives (the old
    path, the reference)."""
    leader: TPLeaderEngine = request.getfixturevalue(which)
    stats = leader.core.model.parallel.stats
    runs_before = stats.runs
    comm, layers = leader.core.tensor_parallel, leader.core.layout.num_layers
    events: list[str] = []

    def record(real, kind):
        def op(x, *a, **k):  # a KV gather is [1, n, 2, bs, h, D]; the head's logits gather is 2-D
            events.append("kv" if kind == "gather" and x.dim() == 6 else kind)
            return real(x, *a, **k)

        return op

    for name, kind in (("all_gather_async", "gather"), ("all_reduce_async", "reduce"), ("all_reduce", "reduce")):
        monkeypatch.setattr(comm, name, record(getattr(comm, name), kind))
    leader.add_request(_prompt("gathered", 37, salt=1))  # 5 new blocks of 8, the last one partial
    result = leader.step(lambda layer, out: None)
    monkeypatch.undo()
    assert stats.runs == runs_before + (which == "leader")  # the path the parameter names
    pages = leader.step_pages
    assert pages is not None
    blocks = result.schedule.scheduled[0].block_ids[:5]
    assert pages.block_ids == tuple(blocks)
    gathers = [i for i, e in enumerate(events) if e == "kv"]
    assert len(gathers) == (layers if which == "leader" else 0), events
    for layer, at in enumerate(gathers[:-1]):  # overlapped with every later layer's reductions
        assert events[at + 1 :].count("reduce") >= 2 * (layers - 1 - layer), events
    after = leader.gather_kv(blocks)  # one all-gather after the step: [W, n, 2, bs, h, D] per layer
    # whole pages by hand: rank r holds the r-th contiguous slice of the KV heads
    reference = torch.stack([torch.cat(list(after.per_layer[layer].unbind(0)), dim=-2) for layer in range(layers)])
    assert reference.abs().sum() > 0
    for layer in range(layers):
        assert torch.equal(pages.pages(layer, blocks), reference[layer])
        assert torch.equal(pages.pages(layer, blocks[3:1:-1]), reference[layer, [3, 2]])
    other = next(b for b in range(leader.core.pool.num_blocks) if b not in blocks)
    assert pages.pages(0, [blocks[0], other]) is None  # not written by the step: gather it the old way
    while leader.core.has_work():
        leader.step()
    assert leader.step_pages is None  # a step without a hook gathers nothing


def test_a_served_tp_engine_runs_tokenweave_from_2048_tokens_unless_turned_off(tiny_checkpoint) -> None:
    ckpt = tiny_checkpoint("llama", vocab_size=515, **WIDE)
    default = build_engine_config(ckpt, block_size=8, num_blocks=16).tokenweave
    assert (default.enabled, default.min_tokens) == (True, 2048)
    off = build_engine_config(ckpt, block_size=8, num_blocks=16, tokenweave=False).tokenweave
    assert not off.enabled
    cores = build_tp_cores(build_engine_config(ckpt, block_size=8, num_blocks=16), 2, "tp/tokenweave-default")
    tw = [core.model.parallel for core in cores]
    assert all(t.overlaps(2048) and not t.overlaps(2047) for t in tw)
