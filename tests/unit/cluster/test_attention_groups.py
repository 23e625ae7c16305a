"""Which attention workers hold which model worker's KV (cluster/control/attention_groups.py),
and the groups the Ray controller replaces on a failure: a member's own attention group only,
a prefill worker beside an attention pool alone (no Ray needed: the controller is built, not
started)."""

from __future__ import annotations

from cluster.config import PoolConfig, ServeConfig, TransferConfig
from cluster.control.attention_groups import group_of, model_worker_blocks, plan_attention_groups
from cluster.control.controller import Controller, WorkerRecord

NO_PREFIX = {"enable_prefix_caching": False}


def _cfg(*pools: PoolConfig) -> ServeConfig:
    return ServeConfig("m", pools=pools)


def test_several_model_workers_split_the_attention_pool_evenly_in_config_order():
    """Model worker i (decode-capable workers in config order) holds attention workers
    [i*N/M, (i+1)*N/M) in its own group attn/<model worker>; prefill workers are in none."""
    cfg = _cfg(
        PoolConfig("p", "prefill", 1),
        PoolConfig("d", "decode", 2, engine=NO_PREFIX),
        PoolConfig("a", "attention", 4),
    )
    plans = plan_attention_groups(cfg)
    assert [(p.name, p.members) for p in plans] == [
        ("attn/d-0", ("d-0", "a-0", "a-1")),
        ("attn/d-1", ("d-1", "a-2", "a-3")),
    ]
    assert group_of(plans, "a-2") == plans[1] and group_of(plans, "d-0") == plans[0]
    assert group_of(plans, "p-0") is None
    # across decode-capable pools, in the order they are listed; one attention worker each
    mixed = _cfg(
        PoolConfig("m", "mixed", 1, engine=NO_PREFIX), PoolConfig("d", "decode", 1), PoolConfig("a", "attention", 2)
    )
    assert [p.members for p in plan_attention_groups(mixed)] == [("m-0", "a-0"), ("d-0", "a-1")]
    assert plan_attention_groups(_cfg(PoolConfig("d", "decode", 2))) == ()


def test_each_model_worker_is_sized_to_its_own_attention_workers():
    plans = plan_attention_groups(_cfg(PoolConfig("d", "decode", 2, engine=NO_PREFIX), PoolConfig("a", "attention", 6)))
    assert model_worker_blocks(plans, 24) == {"d-0": [24, 24, 24], "d-1": [24, 24, 24]}


def test_the_controller_replaces_only_the_failed_members_group(tiny_checkpoint):
    """A dead attention worker or model worker: its own attention group, in rank order; a
    prefill worker: itself alone (not an attention group)."""
    attention = {"block_size": 8, "num_blocks": 24}
    cfg = ServeConfig(
        tiny_checkpoint("llama"),
        pools=(
            PoolConfig("p", "prefill", 1, engine={"block_size": 8}),
            PoolConfig("d", "decode", 2, engine={"block_size": 8, **NO_PREFIX}),
            PoolConfig("a", "attention", 4, engine=attention),
        ),
        transfer=TransferConfig(kind="shm"),
    )
    c = Controller(cfg)
    for pool in cfg.pools:
        for i in range(pool.num_workers):
            wid = f"{pool.name}-{i}"
            c.workers[wid] = WorkerRecord(wid, pool, actor=None, handle=None)  # type: ignore[arg-type]
    assert c._attention_blocks == {"d-0": [24, 24], "d-1": [24, 24]}  # what each model worker is built with
    for wid, members in [
        ("a-3", ["d-1", "a-2", "a-3"]),
        ("d-0", ["d-0", "a-0", "a-1"]),
        ("a-1", ["d-0", "a-0", "a-1"]),
    ]:
        group = c._group_of(c.workers[wid])
        assert group is not None and group.kind == "attention", wid
        assert [r.worker_id for r in group.members] == members and group.name == f"attn/{members[0]}"
    assert c._group_of(c.workers["p-0"]) is None
