"""The `attention` pool role (attention offload serving): what ServeConfig accepts and refuses,
and `splitserve serve --attention N`."""

from __future__ import annotations

import pytest

from cluster.cli import build_parser
from cluster.config import ConfigError, PoolConfig, ServeConfig
from cluster.control.attention_groups import plan_attention_groups
from cluster.serve import TINY_ENGINE, ModelChoice, serve_config_from_args

NO_PREFIX = {"enable_prefix_caching": False}


def _cfg(*pools: PoolConfig) -> ServeConfig:
    return ServeConfig("m", pools=pools)


def test_an_attention_pool_serves_a_mixed_worker():
    cfg = _cfg(PoolConfig("mixed", "mixed", 1, engine=NO_PREFIX), PoolConfig("attn", "attention", 2))
    assert cfg.attention_pool() == cfg.pool("attn") and cfg.attention_pool().num_workers == 2
    assert _cfg(PoolConfig("decode", "decode", 1)).attention_pool() is None
    # an attention pool of 0 workers is no attention pool: nothing is checked against it
    assert _cfg(PoolConfig("d", "decode", 2), PoolConfig("a", "attention", 0)).attention_pool() is None


def test_prefix_caching_and_speculation_on_the_model_worker_are_accepted():
    """The model worker's engine owns the shards' pages: its prefix cache and its speculative
    rollback work with an attention pool (tests/unit/attention_offload/test_engine_blocks.py)."""
    spec = {"enable_prefix_caching": True, "speculative_config": {"method": "ngram", "num_speculative_tokens": 2}}
    cfg = _cfg(PoolConfig("m", "mixed", 1, engine=spec), PoolConfig("a", "attention", 2))
    assert cfg.pool("m").engine == spec and cfg.attention_pool().num_workers == 2


def test_a_prefill_pool_beside_an_attention_pool_is_accepted():
    """Prefill workers push each request's KV straight to the attention worker holding it
    (tests/unit/cluster/test_attention_prefill_local_cluster.py)."""
    cfg = _cfg(
        PoolConfig("p", "prefill", 2),
        PoolConfig("d", "decode", 1, engine=NO_PREFIX),
        PoolConfig("a", "attention", 2),
    )
    assert cfg.attention_pool().num_workers == 2 and cfg.pool("p").num_workers == 2


def test_an_attention_pool_without_a_decode_or_mixed_pool_is_refused():
    with pytest.raises(ConfigError, match=r"^pools: need at least one worker in a decode or mixed pool"):
        _cfg(PoolConfig("attn", "attention", 2))
    with pytest.raises(ConfigError, match=r"^pools: need at least one worker"):
        _cfg(PoolConfig("p", "prefill", 1), PoolConfig("attn", "attention", 2))


@pytest.mark.parametrize(
    ("pools", "path", "says"),
    [
        (
            [PoolConfig("m", "mixed", 2, engine=NO_PREFIX), PoolConfig("a", "attention", 3)],
            r"pools\[1\]\.num_workers",
            r"split evenly among the decode and mixed workers \(pools\[0\]\.num_workers = 2\): "
            "3 attention workers is not a multiple of 2",
        ),
        (
            [
                PoolConfig("m", "mixed", 1, engine=NO_PREFIX),
                PoolConfig("d", "decode", 1),
                PoolConfig("a", "attention", 1),
            ],
            r"pools\[2\]\.num_workers",
            r"\(pools\[0\]\.num_workers = 1 \+ pools\[1\]\.num_workers = 1\): 1 attention workers is not a multiple of 2",
        ),
        (
            [
                PoolConfig("m", "mixed", 1, engine=NO_PREFIX),
                PoolConfig("a", "attention", 1),
                PoolConfig("b", "attention", 1),
            ],
            r"pools\[2\]\.role",
            "at most one attention pool",
        ),
        (
            [PoolConfig("m", "mixed", 1, engine=NO_PREFIX), PoolConfig("a", "attention", 1, engine={"block_size": 32})],
            r"pools\[1\]\.engine\.block_size",
            r"must equal the model workers' \(pools\[0\]: None\), got 32",
        ),
        (
            [PoolConfig("m", "mixed", 1, engine=NO_PREFIX), PoolConfig("a", "attention", 1, engine=NO_PREFIX)],
            r"pools\[1\]\.engine\.enable_prefix_caching",
            "model-worker option",
        ),
    ],
)
def test_what_the_offloaded_engine_does_not_support_is_refused_naming_the_field(pools, path, says):
    with pytest.raises(ConfigError, match=rf"^{path}: .*{says}"):
        _cfg(*pools)


def test_an_unknown_role_names_the_attention_role():
    with pytest.raises(ConfigError, match=r"^role: must be one of \['prefill', 'decode', 'mixed', 'attention'\]"):
        PoolConfig("x", "atention")
    with pytest.raises(ConfigError, match=r"^experts: .*not on a attention pool"):
        PoolConfig("a", "attention", 2, experts=2)


def test_an_attention_pool_round_trips_through_a_dict():
    cfg = _cfg(
        PoolConfig("m", "mixed", 1, engine=NO_PREFIX), PoolConfig("a", "attention", 2, engine={"num_blocks": 64})
    )
    assert ServeConfig.from_dict(cfg.to_dict()) == cfg


class _Tiny:
    def __call__(self) -> ModelChoice:
        return ModelChoice("/cache/tiny-llama", dict(TINY_ENGINE))


def _args(line: str):
    return serve_config_from_args(build_parser().parse_args(line.split()), _Tiny())


def test_attention_flag_makes_one_mixed_worker_and_an_attention_pool():
    cfg = _args("serve --model /m --attention 2")
    assert [(p.name, p.role, p.num_workers) for p in cfg.pools] == [
        ("decode", "mixed", 1),
        ("attention", "attention", 2),
    ]
    assert "enable_prefix_caching" not in cfg.pool("decode").engine  # the engine's default: on
    # the default model's layout too; the attention pool takes the model worker's dtype and block size
    cfg = _args("serve --attention 1")
    model, attn = cfg.pools
    assert model.role == "mixed" and attn.role == "attention" and attn.num_workers == 1
    assert {k: attn.engine.get(k) for k in ("dtype", "block_size")} == {
        k: model.engine.get(k) for k in ("dtype", "block_size")
    }


def test_attention_flag_with_several_decode_workers_splits_the_attention_pool():
    cfg = _args("serve --model /m --attention 4 --decode 2")
    assert [(p.name, p.role, p.num_workers) for p in cfg.pools] == [
        ("decode", "mixed", 2),
        ("attention", "attention", 4),
    ]
    assert [p.attention_workers for p in plan_attention_groups(cfg)] == [
        ("attention-0", "attention-1"),
        ("attention-2", "attention-3"),
    ]
    with pytest.raises(ConfigError, match=r"^pools\[1\]\.num_workers: .*3 attention workers is not a multiple of 2"):
        _args("serve --model /m --attention 3 --decode 2")


def test_attention_flag_over_a_config_keeps_its_pools(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: /m\npools:\n  - {name: prefill, role: prefill}\n  - {name: decode, role: decode}\n")
    cfg = _args(f"serve --config {path} --attention 2")  # prefill workers push KV to the attention workers
    assert [(p.name, p.role, p.num_workers) for p in cfg.pools] == [
        ("prefill", "prefill", 1),
        ("decode", "decode", 1),
        ("attention", "attention", 2),
    ]
    cfg = _args(f"serve --config {path} --attention 2 --prefill 0")
    assert cfg.attention_pool().num_workers == 2 and "enable_prefix_caching" not in cfg.pool("decode").engine
    with pytest.raises(SystemExit):
        _args("serve --model /m --attention 0")


def test_attention_flag_with_a_prefill_flag_keeps_the_prefill_pool():
    cfg = _args("serve --model /m --attention 2 --prefill 2")
    assert [(p.name, p.role, p.num_workers) for p in cfg.pools] == [
        ("prefill", "prefill", 2),
        ("decode", "decode", 1),
        ("attention", "attention", 2),
    ]


def test_attention_flag_with_speculation_keeps_it_on_the_model_worker():
    cfg = _args('serve --model /m --attention 2 --speculative-config {"method":"ngram","num_speculative_tokens":3}')
    (model,) = [p for p in cfg.pools if p.role == "mixed"]
    assert model.engine["speculative_config"]["num_speculative_tokens"] == 3
    assert "speculative_config" not in cfg.attention_pool().engine
