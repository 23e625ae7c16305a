"""Decode-step probes of the engine shared by the engine benchmarks (engine_throughput.py,
engine_vs_vllm.py): the median batch-1 step time and the bytes that step must read."""

from __future__ import annotations

import time

from benchmarks.common import median
from engine import LLM, SamplingParams
from engine.request import Request


def decode_step_ms(llm: LLM, prompt: list[int], steps: int) -> float:
    """Median wall time of one EngineCore.step() decoding one sequence (after its prefill)."""
    eng = llm.engine
    req = Request("decode-probe", list(prompt), SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True))
    eng.add_request(req)
    eng.step()  # prefill + first token
    times = []
    while eng.has_work():
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
    assert len(req.output_token_ids) == steps + 1
    return 1e3 * median(times)


def bytes_per_decode_step(llm: LLM, context_len: int) -> int:
    """Every parameter once, except the embedding table when the head reads its own tensor
    (an untied head, or a tied head's packed copy: only one embedding row is read), and the
    head's bf16 screen copy in place of the head when greedy steps take the greedy head
    (engine/models/greedy_head.py; its float32 refinement reads a few rows), plus the K/V of
    ``context_len`` tokens."""
    model = llm.engine.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head is not None or model.head_packed is not None:  # the head is its own tensor
        total -= model.embed.numel() * model.embed.element_size()
    greedy = llm.engine.runner.greedy_head
    if greedy is not None:  # the probe's steps are greedy: the screen's bf16 head is read instead
        head = model.plain_head_weight()
        total += greedy.w_bf16.numel() * greedy.w_bf16.element_size() - head.numel() * head.element_size()
    layout = llm.engine.layout
    kv_per_token = 2 * layout.num_layers * layout.num_kv_heads * layout.head_dim * model.embed.element_size()
    return total + context_len * kv_per_token
