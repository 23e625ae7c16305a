"""Test helper: one scripted request stream driven through an EngineCore, and the rank program
that drives it through a tensor-parallel EngineCore on each rank of a gloo group
(tests/unit/engine/tp_ranks.run_tp_ranks spawns the ranks).

The SPMD invariant under test: every rank gets the same calls in the same order, so its
scheduler makes the same batches; the script is a pure function of the engine's step count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.engine import EngineCore
from engine.request import SamplingParams


@dataclass(frozen=True)
class Script:
    """prompts[i] is request f"r{i}"; the first ``first_wave`` are added before step 0, the
    rest before step ``second_wave_step``; ``cancel`` is aborted before step ``cancel_step``.
    ``sampled``: ids of requests drawn at temperature 1 without a seed (the others greedy)."""

    prompts: list[list[int]]
    max_tokens: int
    first_wave: int
    second_wave_step: int
    cancel: str
    cancel_step: int
    sampled: tuple[str, ...] = ()


@dataclass
class Played:
    tokens: dict[str, list[int]] = field(default_factory=dict)  # finished requests' outputs
    aborted: list[str] = field(default_factory=list)
    preemptions: int = 0
    steps: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    kv_heads: int = 0  # of the engine's KVLayout (the paged cache's heads)
    overlapped_steps: int = 0  # steps run as TokenWeave micro-batches (TP engines)


def play(engine: EngineCore, script: Script, max_steps: int = 2000) -> Played:
    """Drive ``engine`` through ``script`` until it has no work -> what came out."""
    from engine.request import Request

    def add(i: int) -> None:
        rid = f"r{i}"
        temp = 1.0 if rid in script.sampled else 0.0
        params = SamplingParams(max_tokens=script.max_tokens, temperature=temp, ignore_eos=True)
        engine.add_request(Request(rid, list(script.prompts[i]), params))

    played = Played(kv_heads=engine.layout.num_kv_heads)
    for i in range(script.first_wave):
        add(i)
    step = 0
    while step < max_steps:
        if step == script.second_wave_step:
            for i in range(script.first_wave, len(script.prompts)):
                add(i)
        if step == script.cancel_step and engine.abort(script.cancel) is not None:
            played.aborted.append(script.cancel)
        if step > script.second_wave_step and not engine.has_work():
            break
        result = engine.step()
        for req in result.finished:
            played.tokens[req.request_id] = list(req.output_token_ids)
        step += 1
    played.steps = step
    played.preemptions = engine.stats().preemptions
    played.free_blocks, played.total_blocks = engine.pool.num_free, engine.pool.num_blocks
    tp = engine.model.parallel
    played.overlapped_steps = 0 if tp is None else tp.stats.runs
    return played


def tp_engine_play(comm, runs: list[tuple[str, Script, dict[str, Any], int | None]]) -> list[Played]:
    """Rank program: per (checkpoint, script, options: LLM's flat engine options, TokenWeave's
    min_tokens or None for off) a TP EngineCore on ``comm`` plays the script (all runs in one
    spawn of the ranks: a spawn costs seconds on a small machine); every rank returns what it
    saw (they must agree)."""
    from engine.llm import build_engine_config
    from engine.models.tensor_parallel import TokenWeaveConfig

    return [
        play(
            EngineCore(
                build_engine_config(c, **o),
                tensor_parallel=comm,
                tokenweave=TokenWeaveConfig(enabled=False)
                if tw is None
                else TokenWeaveConfig(min_tokens=tw, fused_norm=False),
            ),
            s,
        )
        for c, s, o, tw in runs
    ]
