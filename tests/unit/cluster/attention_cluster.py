"""The in-process cluster the attention-pool LocalCluster tests share: a prefill worker, M
model workers (a decode pool) and N attention workers of ``ATTN_BLOCKS`` blocks each, every
prompt through a KV transfer; the reference tokens; and the poll that waits until every pool
is back to full."""

from __future__ import annotations

import asyncio

from cluster.config import PoolConfig, RouterConfig, ServeConfig, TransferConfig
from cluster.control.local import LocalCluster
from engine import LLM, SamplingParams

BS = 8
MODEL_ENGINE = {
    "block_size": BS,
    "attention_backend": "sdpa",
    "skip_tokenizer_init": True,
    "enable_prefix_caching": False,
}
PREFILL_ENGINE = {"block_size": BS, "attention_backend": "sdpa", "skip_tokenizer_init": True}
ATTN_BLOCKS = 24  # per attention worker
ATTN_ENGINE = {"block_size": BS, "num_blocks": ATTN_BLOCKS, "attention_backend": "sdpa"}
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
DEADLINE_S = 30.0


def attention_config(
    ckpt: str, model_workers: int, attention_workers: int, kind: str = "loopback", layerwise: bool = True
) -> ServeConfig:
    """Every prompt goes through a transfer (short_prompt_threshold 0); with several model
    workers, JSQ makes concurrent requests alternate between them."""
    return ServeConfig(
        model=ckpt,
        pools=(
            PoolConfig("prefill", "prefill", 1, engine=PREFILL_ENGINE),
            PoolConfig("decode", "decode", model_workers, engine=MODEL_ENGINE),
            PoolConfig("attention", "attention", attention_workers, engine=ATTN_ENGINE),
        ),
        router=RouterConfig(short_prompt_threshold=0, decode_policy="jsq" if model_workers > 1 else "kv"),
        transfer=TransferConfig(kind=kind, layerwise=layerwise),
    )


def reference(ckpt: str, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    """engine.LLM's tokens, with one model worker's KV budget (two attention workers' blocks)."""
    return [o.token_ids for o in LLM(ckpt, **{**MODEL_ENGINE, "num_blocks": 2 * ATTN_BLOCKS}).generate(prompts, params)]


async def pools_full(cluster: LocalCluster, model_ids: list[str], attention_workers: int) -> None:
    """Polls (load reports reach the router asynchronously) until every model worker's pages on
    its two attention workers, the prefill worker's pool and every transfer are settled."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while True:
        await cluster.router.refresh_loads()
        info = cluster.info()
        by_id = {w.worker_id: w.stats for w in info.workers}
        models = [by_id[m] for m in model_ids]
        full = (
            len(info.attention_workers) == attention_workers
            and all(m.attention.used_blocks == (0, 0) for m in models)
            and all(m.attention.total_blocks == (ATTN_BLOCKS, ATTN_BLOCKS) for m in models)
            and all(m.engine.free_kv_blocks == m.engine.total_kv_blocks == 2 * ATTN_BLOCKS for m in models)
            and all(m.transfers_in_flight == 0 for m in models)
            and by_id["prefill-0"].engine.free_kv_blocks == by_id["prefill-0"].engine.total_kv_blocks > 0
            and all(info.attention_free_blocks(a) == a.total_blocks == ATTN_BLOCKS for a in info.attention_workers)
        )
        if full:
            return
        assert loop.time() < deadline, (models, info.attention_workers)
        await asyncio.sleep(0.05)  # poll interval
