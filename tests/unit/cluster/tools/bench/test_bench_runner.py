"""The runner with a fake client: warm-up, concurrency cap, duration bound, sweeps, clipping."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest

from cluster.tools.bench.arrivals import LoadConfig, schedule
from cluster.tools.bench.clients import BenchClient, ServerInfo
from cluster.tools.bench.runner import BenchConfig, BenchError, run_bench, run_once
from cluster.tools.bench.workloads import BenchRequest, parse_workload


class Fake(BenchClient):
    """Answers every request with its output_len tokens, one per message, yielding to the loop
    between messages; ``service_s`` adds simulated service time; ``fail`` makes requests fail."""

    name = "fake"

    def __init__(self, info=ServerInfo("fake-model", 100, 64), service_s=0.0, fail=lambda req: False):
        self._info, self.service_s, self.fail = info, service_s, fail
        self.sent: list[BenchRequest] = []
        self.inflight = self.peak = 0

    async def info(self) -> ServerInfo:
        if isinstance(self._info, Exception):
            raise self._info
        return self._info

    async def _stream(self, req, sampling, rec):
        self.sent.append(req)
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            if self.service_s:
                await asyncio.sleep(self.service_s)  # simulated server time
            if self.fail(req):
                raise RuntimeError("boom")
            for _ in range(req.output_len):
                await asyncio.sleep(0)  # yield: other requests interleave
                rec.add_chunk(time.perf_counter(), 1)  # the clock send() stamps rec.start with
            rec.end = time.perf_counter()
            return "length"
        finally:
            self.inflight -= 1

    async def close(self) -> None:
        pass


def cfg(spec="fixed:8:4", **load) -> BenchConfig:
    rates = load.pop("rates", (math.inf,))
    return BenchConfig(parse_workload(spec), LoadConfig(**load), rates=rates, show_progress=False, seed=1)


def test_warmup_runs_first_and_is_not_measured():
    client = Fake()
    [run] = asyncio.run(run_bench(client, cfg(num_requests=5, warmup=3, max_concurrency=2), say=lambda _: None))
    assert len(client.sent) == 8 and run["completed"] == 5 and run["num_prompts"] == 5
    assert run["warmup"] == 3 and run["model_id"] == "fake-model"
    warm, measured = client.sent[:3], client.sent[3:]
    # shaped like the first measured requests, with prompts of their own
    assert [(len(r.prompt), r.output_len) for r in warm] == [(len(r.prompt), r.output_len) for r in measured[:3]]
    assert not {tuple(r.prompt) for r in warm} & {tuple(r.prompt) for r in measured}
    assert run["total_output_tokens"] == 5 * 4 and run["output_lens"] == [4] * 5
    assert 0 < run["median_ttft_ms"] < run["median_e2el_ms"] < 1000 and run["mean_tpot_ms"] > 0


def test_failed_warmup_aborts():
    client = Fake(fail=lambda req: True)
    with pytest.raises(BenchError, match="2 of 2 warm-up requests failed; first: RuntimeError: boom"):
        asyncio.run(run_bench(client, cfg(num_requests=5, warmup=2)))


def test_unreachable_server():
    with pytest.raises(BenchError, match="cannot reach the fake server: OSError: refused"):
        asyncio.run(run_bench(Fake(info=OSError("refused")), cfg()))


def test_failures_are_counted():
    client = Fake(fail=lambda req: req.prompt[0] % 2 == 0)
    [run] = asyncio.run(run_bench(client, cfg(num_requests=40)))
    expected_failures = sum(r.prompt[0] % 2 == 0 for r in client.sent)
    assert 0 < expected_failures < 40
    assert run["failed"] == expected_failures and run["completed"] == 40 - expected_failures
    assert run["errors"].count("RuntimeError: boom") == expected_failures


@pytest.mark.parametrize("cap", [1, 3, None])
def test_max_concurrency_caps_requests_in_flight(cap):
    client = Fake()
    reqs = parse_workload("fixed:4:6").sample(20, np.random.default_rng(0))
    records, _ = asyncio.run(run_once(client, reqs, LoadConfig(max_concurrency=cap), {}, np.random.default_rng(0)))
    assert len(records) == 20 and all(r.success for r in records)
    assert client.peak == (cap or 20)  # rate inf: every slot is taken at once


def test_duration_bounds_the_schedule():
    load = LoadConfig(request_rate=40.0, duration_s=0.25)
    reqs = parse_workload("fixed:4:2").sample(100, np.random.default_rng(0))
    expected = len(schedule(100, load, np.random.default_rng(5)))
    assert 0 < expected < 100
    records, duration = asyncio.run(run_once(Fake(), reqs, load, {}, np.random.default_rng(5)))
    assert len(records) == expected
    offsets = sorted(r.start for r in records)
    assert offsets[-1] - offsets[0] < 0.25 + 1.0  # scheduled inside the window (slack for a loaded machine)


def test_requests_waiting_for_a_slot_past_the_duration_are_not_sent():
    load = LoadConfig(max_concurrency=1, duration_s=0.05)
    reqs = parse_workload("fixed:4:2").sample(5, np.random.default_rng(0))
    client = Fake(service_s=0.1)  # the first request holds the only slot past the end of the run
    records, duration = asyncio.run(run_once(client, reqs, load, {}, np.random.default_rng(0)))
    assert len(records) == 1 == len(client.sent) and duration >= 0.1


def test_sweep_sends_fresh_prompts_of_the_same_lengths_at_each_rate():
    client = Fake()
    runs = asyncio.run(run_bench(client, cfg("random:24:4:0.5", num_requests=6, rates=(math.inf, 200.0, 100.0))))
    assert [r["request_rate"] for r in runs] == ["inf", 200.0, 100.0]
    assert [r["completed"] for r in runs] == [6, 6, 6] and all(r["fresh_prompts"] for r in runs)
    by_rate = [client.sent[i : i + 6] for i in (0, 6, 12)]
    # the same lengths and outputs (one workload), in the same order ...
    shapes = [[(len(r.prompt), r.output_len) for r in rate] for rate in by_rate]
    assert shapes[0] == shapes[1] == shapes[2] and len({n for n, _ in shapes[0]}) > 1
    # ... but no prompt of one rate starts like a prompt of another (a prefix cache finds nothing)
    heads = [{tuple(r.prompt[:8]) for r in rate} for rate in by_rate]
    assert not (heads[0] & heads[1]) and not (heads[0] & heads[2]) and not (heads[1] & heads[2])
    assert all(0 < t < 100 for rate in by_rate for r in rate for t in r.prompt)  # the server's vocab


def test_a_files_prompts_repeat_across_rates_and_say_so(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(f'{{"prompt": "hello {i}", "output_tokens": 3}}\n' for i in range(4)))
    said: list[str] = []
    client = Fake()
    runs = asyncio.run(run_bench(client, cfg(f"jsonl:{path}", num_requests=4, rates=(math.inf, 50.0)), say=said.append))
    assert [r.prompt for r in client.sent[:4]] == [r.prompt for r in client.sent[4:]]
    assert [r["fresh_prompts"] for r in runs] == [True, False]
    assert any("prompts repeat at every rate" in line for line in said)


def test_the_warmup_is_reported_apart_and_cached_tokens_are_summed():
    class Cached(Fake):
        async def _stream(self, req, sampling, rec):
            reason = await super()._stream(req, sampling, rec)
            rec.cached_tokens = len(req.prompt) // 2  # what a server's usage reports
            return reason

    said: list[str] = []
    client = Cached()
    [run] = asyncio.run(run_bench(client, cfg(num_requests=5, warmup=2), say=said.append))
    assert run["warmup_run"]["completed"] == 2 and run["warmup_run"]["total_output_tokens"] == 2 * 4
    assert run["warmup_run"]["median_ttft_ms"] > 0 and any(line.startswith("warm-up: 2 requests") for line in said)
    assert run["cached_input_tokens"] == 5 * 4  # 5 measured prompts of 8 tokens, half cached each
    [plain] = asyncio.run(run_bench(Fake(), cfg(num_requests=2), say=lambda _: None))
    assert plain["cached_input_tokens"] is None and plain["warmup_run"] is None  # not reported: not 0


def test_synthetic_prompts_use_the_server_vocab_and_fit_its_context():
    client = Fake(info=ServerInfo("m", vocab_size=50, max_model_len=64))
    said: list[str] = []
    asyncio.run(run_bench(client, cfg("fixed:100:10", num_requests=4), say=said.append))
    assert all(r.prompt_len + r.output_len <= 63 and max(r.prompt) < 50 for r in client.sent)
    assert said == ["clipped 4 of 4 requests to the model's context of 64 tokens"]


def test_trace_workloads_take_no_rate(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,5,2\n2023-11-16 18:17:03.02,6,2\n")
    with pytest.raises(ValueError, match="replays its own arrival times"):
        cfg(f"trace:{f}", rates=(2.0,))
    client = Fake()
    [run] = asyncio.run(run_bench(client, cfg(f"trace:{f}", num_requests=10)))
    assert run["completed"] == 2 and run["request_rate"] == "inf" and run["duration"] >= 0.02
