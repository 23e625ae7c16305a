"""``splitserve bench`` end to end: the CLI's main against a LocalCluster served in-process
through the gRPC and the OpenAI HTTP frontends (real localhost sockets, tiny model, loopback
KV transfer). The servers run on an event loop in a background thread; ``main`` runs its
own loop in the test thread, as it would in a terminal.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from cluster.cli import main
from cluster.config import PoolConfig, RouterConfig, ServeConfig, TransferConfig
from cluster.control.local import LocalCluster
from cluster.frontends.grpc_server import GrpcFrontend
from cluster.frontends.http_server import HttpFrontend
from cluster.frontends.service import ServingBackend
from cluster.tools.bench.workloads import parse_workload
from engine.tokenizer import Tokenizer

pytestmark = pytest.mark.integration

MAX_LEN = 512  # same checkpoint arguments as test_grpc_frontend: built once per session
ENGINE = {"block_size": 4, "num_blocks": 256, "max_num_batched_tokens": 64}
N = 12
VLLM_FIELDS = (
    "duration completed failed total_input_tokens total_output_tokens request_throughput request_goodput "
    "output_throughput total_token_throughput mean_ttft_ms median_ttft_ms std_ttft_ms p90_ttft_ms p99_ttft_ms "
    "mean_tpot_ms median_tpot_ms p99_tpot_ms mean_itl_ms median_itl_ms p99_itl_ms mean_e2el_ms median_e2el_ms "
    "p99_e2el_ms input_lens output_lens ttfts itls errors num_prompts request_rate burstiness max_concurrency"
).split()


class Servers:
    def __init__(self, model: str):
        self.model = model
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-test-loop", daemon=True)
        self.thread.start()
        pools = (PoolConfig("prefill", "prefill", 1, engine=ENGINE), PoolConfig("decode", "decode", 1, engine=ENGINE))
        config = ServeConfig(model, pools, RouterConfig(short_prompt_threshold=8), TransferConfig(kind="loopback"))

        async def up():
            self.cluster = await LocalCluster(config).start()
            backend = ServingBackend.from_model_dir(self.cluster.router, model)
            self.grpc, self.http = GrpcFrontend(backend, port=0), HttpFrontend(backend, "127.0.0.1", 0)
            return await self.grpc.start(), await self.http.start()

        grpc_port, http_port = self.call(up())
        self.grpc_target = f"127.0.0.1:{grpc_port}"
        self.http_url = f"http://127.0.0.1:{http_port}/v1"

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.call(self.grpc.stop(grace=0))
        self.call(self.http.stop())
        self.cluster.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def servers(tiny_checkpoint):
    s = Servers(tiny_checkpoint("llama", max_position_embeddings=MAX_LEN))
    yield s
    s.close()


def bench(*argv: str) -> int:
    return main(["bench", "--disable-tqdm", *argv])


def check_run(run: dict, n: int, seed: int = 0) -> None:
    missing = [f for f in VLLM_FIELDS if f not in run]
    assert not missing, f"result lacks {missing}"
    assert run["completed"] == n and run["failed"] == 0, run["errors"]
    assert run["num_prompts"] == n
    # random:16:8 (range ratio 0.5): prompts of 8..24 tokens, 4..12 output tokens; the server
    # counted each prompt and generated every token asked for (ignore_eos), request by request
    # (the warm-up requests are drawn apart: the measured ones are the workload's first n)
    asked = parse_workload("random:16:8").sample(n, np.random.default_rng(seed), vocab_size=512)
    assert all(8 <= r.prompt_len <= 24 and 4 <= r.output_len <= 12 for r in asked)
    assert run["input_lens"] == [r.prompt_len for r in asked]
    assert run["output_lens"] == [r.output_len for r in asked]
    assert run["total_output_tokens"] == sum(run["output_lens"])
    assert run["total_input_tokens"] == sum(run["input_lens"])
    # each request's TTFT <= its E2E latency, so every order statistic is ordered the same way
    assert 0 < run["median_ttft_ms"] <= run["median_e2el_ms"] and run["p99_ttft_ms"] <= run["p99_e2el_ms"]
    assert run["mean_tpot_ms"] > 0 and run["mean_itl_ms"] > 0
    assert run["request_throughput"] == pytest.approx(n / run["duration"])


def test_grpc_backend_with_goodput_and_warmup(servers, tmp_path: Path, capsys):
    out = tmp_path / "grpc.json"
    rc = bench(
        "--backend", "grpc", "--target", servers.grpc_target, "--workload", "random:16:8",
        "--num-prompts", str(N), "--request-rate", "40", "--burstiness", "0.5", "--max-concurrency", "4",
        "--warmup", "2", "--goodput", "ttft:60000", "tpot:60000", "--seed", "3", "--save-result", str(out),
    )  # fmt: skip
    assert rc == 0
    run = json.loads(out.read_text())
    check_run(run, N, seed=3)
    assert run["warmup_run"]["completed"] == 2 and run["warmup"] == 2
    assert run["max_concurrent_requests"] <= 4
    assert run["backend"] == "grpc" and run["goodput_slos_ms"] == {"ttft": 60000.0, "tpot": 60000.0}
    assert run["good_requests"] == N  # a minute per token: every request meets it
    assert run["request_goodput"] == pytest.approx(run["request_throughput"])
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and f"{'Successful requests:':<40} {N}" in printed


def test_openai_backend_sweep_and_plots(servers, tmp_path: Path):
    out, plots = tmp_path / "http.json", tmp_path / "plots"
    rc = bench(
        "--backend", "openai", "--target", servers.http_url, "--workload", "random:16:8",
        "--num-prompts", "8", "--sweep", "50,inf", "--goodput", "e2el:0.001",
        "--save-result", str(out), "--plot", str(plots),
    )  # fmt: skip
    assert rc == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["request_rate"] for r in runs] == [50.0, "inf"]
    for run in runs:
        check_run(run, 8)
        assert run["good_requests"] == 0 and run["request_goodput"] == 0.0  # nobody finishes in 1 us
        assert run["backend"] == "openai"
    for name in ("latency_vs_rate.png", "goodput_vs_rate.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trace_replay_keeps_arrival_times(servers, tmp_path: Path):
    trace = tmp_path / "trace.csv"
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    rows += [f"2023-11-16 18:17:0{i}.5000000,{20 + i},{3 + i}" for i in range(5)]  # one per second
    trace.write_text("\r\n".join(rows))  # CRLF, no final newline, like the Azure files
    out = tmp_path / "trace.json"
    rc = bench(
        "--target", servers.grpc_target, "--workload", f"trace:{trace}", "--trace-speedup", "10",
        "--num-prompts", "100", "--save-result", str(out),
    )  # fmt: skip
    assert rc == 0
    run = json.loads(out.read_text())
    assert run["completed"] == 5 and run["input_lens"] == [20, 21, 22, 23, 24] and run["output_lens"] == [3, 4, 5, 6, 7]
    assert run["duration"] >= 0.4  # the last request is sent 4 s / 10 after the first


def test_jsonl_text_prompts_count_server_tokens(servers, tmp_path: Path):
    texts = ["Hello world", "The quick brown fox jumps over the lazy dog", "a b c d e f g"]
    wl = tmp_path / "w.jsonl"
    wl.write_text("".join(json.dumps({"prompt": t, "output_tokens": 2 + i}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "jsonl.json"
    assert bench("--target", servers.grpc_target, "--workload", f"jsonl:{wl}", "--num-prompts", "3",
                 "--save-result", str(out)) == 0  # fmt: skip
    run = json.loads(out.read_text())
    tok = Tokenizer(servers.model)
    assert run["input_lens"] == [len(tok.encode(t)) for t in texts]  # the server's count, not the estimate
    assert run["output_lens"] == [2, 3, 4] and run["completed"] == 3


def test_unreachable_server_fails_loudly(capsys):
    rc = bench("--target", "127.0.0.1:1", "--num-prompts", "2", "--request-timeout", "2")
    assert rc == 1
    assert "cannot reach the grpc server" in capsys.readouterr().err
