"""A real Prometheus server scrapes a running LocalCluster + ServingBackend.

The frontend's metrics endpoint (start_metrics_server on a free port) is scraped every
second by a ``prometheus`` subprocess that also loads deploy/prometheus/rules; after a few
requests the Prometheus HTTP API must report exactly that many requests, the worker-side
series pulled from the router's load reports, and the recording rules evaluated.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from cluster.config import PoolConfig, RouterConfig, ServeConfig, TransferConfig
from cluster.control.local import LocalCluster
from cluster.frontends.service import ServingBackend
from cluster.metrics.registry import Metrics, poll_loads, start_metrics_server
from tests.prereq import require

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMETHEUS = shutil.which("prometheus")
RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules"
ENGINE = {"block_size": 4, "num_blocks": 64, "max_num_batched_tokens": 32}
SHORT = 8  # prompts shorter than this are prefilled on the decode worker (no transfer)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prometheus(tmp_path):
    """Start prometheus scraping a target set later: returns (start(target) -> query function)."""
    require(
        PROMETHEUS is not None, "prometheus not on PATH (Debian package 'prometheus'; `make system-deps` installs it)"
    )
    procs: list[subprocess.Popen] = []

    def start(target: str):
        port = _free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES / "*.yml")],
            "scrape_configs": [{"job_name": "splitserve", "static_configs": [{"targets": [target]}]}],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        log = open(tmp_path / "prometheus.log", "w")  # the child keeps its own descriptor
        procs.append(
            subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        log.close()

        def query(promql: str) -> list[dict]:
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
            with urllib.request.urlopen(url, timeout=5) as r:
                body = json.load(r)
            assert body["status"] == "success", body
            return body["data"]["result"]

        return query

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def wait_for(query, promql: str, ok, deadline_s: float = 60.0) -> list[dict]:
    """Poll ``promql`` until ``ok(result)``; the last answer is in the failure message."""
    deadline = time.monotonic() + deadline_s
    result: list[dict] | str = "no answer yet"
    while time.monotonic() < deadline:
        try:
            result = query(promql)
        except OSError as e:  # prometheus still starting
            result = f"{type(e).__name__}: {e}"
        else:
            if ok(result):
                return result
        time.sleep(0.25)  # polling period, not synchronisation: the deadline bounds the wait
    raise AssertionError(f"{promql}: condition not met within {deadline_s}s; last answer: {result}")


def scalar(result: list[dict]) -> float | None:
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_requests_and_worker_series(prometheus, tiny_checkpoint):
    model = tiny_checkpoint("llama")
    config = ServeConfig(
        model=model,
        pools=(PoolConfig("prefill", "prefill", 1, engine=ENGINE), PoolConfig("decode", "decode", 1, engine=ENGINE)),
        router=RouterConfig(short_prompt_threshold=SHORT),
        transfer=TransferConfig(kind="loopback"),
    )
    prompts = [list(range(3, 3 + n)) for n in (20, 4, 33, 12, 5)]  # 3 split, 2 prefilled locally
    num_split = sum(len(p) >= SHORT for p in prompts)

    async def serve_and_check() -> None:
        cluster = await LocalCluster(config).start()
        metrics = Metrics("tiny")
        metrics.attach(cluster.router, transport=config.transfer.kind)
        server = start_metrics_server(metrics, 0, "127.0.0.1")
        poller = asyncio.create_task(poll_loads(cluster.router, interval_s=0.2))
        try:
            svc = ServingBackend(cluster.router, *_tok_and_config(model), "tiny", metrics=metrics)
            params = svc.sampling_params(1, max_tokens=6, temperature=0.0, ignore_eos=True)

            async def send(batch: list[list[int]]) -> None:
                for p in batch:
                    async for _ in svc.generate(p, params):
                        pass

            query = prometheus(f"127.0.0.1:{server.port}")

            def check(promql: str, ok):
                return asyncio.to_thread(wait_for, query, promql, ok)

            # two requests, scraped; then the rest, so Prometheus sees the counters grow
            await send(prompts[:2])
            await check("sum(splitserve_requests_total)", lambda r: scalar(r) == 2)
            await send(prompts[2:])
            got = await check("sum(splitserve_requests_total)", lambda r: scalar(r) == len(prompts))
            assert scalar(got) == len(prompts)
            await check('sum(splitserve_requests_total{finish_reason="length"})', lambda r: scalar(r) == len(prompts))
            await check("sum(splitserve_generation_tokens_total)", lambda r: scalar(r) == 6 * len(prompts))
            # worker-side series, pulled from the load reports: one per worker, transfers counted
            await check("count(splitserve_kv_cache_usage_ratio)", lambda r: scalar(r) == 2)
            await check("sum(splitserve_kv_transfer_duration_seconds_count)", lambda r: scalar(r) == num_split)
            # every prompt queued once for its prefill: split ones on prefill-0, short ones locally
            queued = 'splitserve_prefill_queue_time_seconds_count{worker="%s"}'
            await check(queued % "prefill-0", lambda r: scalar(r) == num_split)
            await check(queued % "decode-0", lambda r: scalar(r) == len(prompts) - num_split)
            await check("sum(splitserve_kv_reserve_wait_seconds_count)", lambda r: scalar(r) == num_split)
            await check("sum(splitserve_kv_handoff_seconds_count)", lambda r: scalar(r) == num_split)  # one each
            # every page of every split prompt crossed once (budget 32: no chunk ends mid-page)
            layout = cluster.workers["prefill-0"].engine.layout
            pages = sum(-(-len(p) // ENGINE["block_size"]) for p in prompts if len(p) >= SHORT)
            sent = pages * layout.num_layers * layout.page_bytes
            assert cluster.workers["prefill-0"].stats().transfer_bytes == sent
            await check('sum(splitserve_kv_transfer_bytes_total{transport="loopback"})', lambda r: scalar(r) == sent)
            await check('splitserve_worker_role{worker="decode-0", role="decode"}', lambda r: scalar(r) == 1)
            # the deploy recording rules run against the live series
            await check("model:splitserve_requests:rate5m", lambda r: (scalar(r) or 0) > 0)
            await check("model:splitserve_time_to_first_token_seconds:p99_5m", lambda r: 0 < (scalar(r) or 0) < 60)
        finally:
            poller.cancel()
            server.close()
            cluster.shutdown()

    asyncio.run(serve_and_check())


def _tok_and_config(model: str):
    from engine.config import ModelConfig
    from engine.tokenizer import Tokenizer

    return Tokenizer(model), ModelConfig.from_hf_dir(model)
