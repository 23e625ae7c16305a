"""ServeConfig parsing and validation: defaults, files, and errors that name the bad field."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cluster.config import (
    API_KEY_ENV,
    ConfigError,
    PoolConfig,
    RouterConfig,
    SecurityConfig,
    ServeConfig,
    TLSFiles,
    TransferConfig,
)

FULL = {
    "model": "/models/qwen3",
    "pools": [
        {"name": "prefill", "role": "prefill", "num_workers": 2, "num_gpus": 1, "engine": {"dtype": "bfloat16"}},
        {"name": "decode", "role": "decode", "num_workers": 3, "num_gpus": 1, "resources": {"decode_node": 1}},
        {"name": "mixed", "role": "mixed", "num_workers": 1},
    ],
    "router": {"prefill_policy": "jsq", "decode_policy": "round_robin", "short_prompt_threshold": 8},
    "transfer": {"kind": "torch", "layerwise": False, "timeout_s": 5},
    "grpc_port": 0,
    "http_port": 0,
    "metrics_port": 9100,
    "max_queue": 64,
}


def test_defaults_are_one_prefill_and_one_decode_worker():
    cfg = ServeConfig.from_dict({"model": "m"})
    assert [(p.name, p.role, p.num_workers) for p in cfg.pools] == [("prefill", "prefill", 1), ("decode", "decode", 1)]
    assert cfg.router == RouterConfig() and cfg.transfer == TransferConfig()
    assert cfg == ServeConfig("m")


def test_full_dict_is_parsed_into_typed_fields():
    cfg = ServeConfig.from_dict(FULL)
    assert cfg.pool("decode").resources == {"decode_node": 1.0}
    assert isinstance(cfg.pool("decode").resources["decode_node"], float)
    assert cfg.pool("prefill").engine == {"dtype": "bfloat16"}
    assert cfg.pool("prefill").num_gpus == 1.0 and isinstance(cfg.pool("prefill").num_gpus, float)
    assert cfg.router.decode_policy == "round_robin" and cfg.router.short_prompt_threshold == 8
    assert cfg.transfer == TransferConfig(kind="torch", layerwise=False, timeout_s=5.0)
    assert (cfg.grpc_port, cfg.http_port, cfg.metrics_port, cfg.max_queue) == (0, 0, 9100, 64)
    assert isinstance(cfg.pools, tuple)
    with pytest.raises(KeyError, match="no pool named 'x'"):
        cfg.pool("x")


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_from_file_and_to_dict_round_trip(tmp_path, suffix):
    import yaml

    path = tmp_path / f"serve{suffix}"
    path.write_text(json.dumps(FULL) if suffix == ".json" else yaml.safe_dump(FULL))
    cfg = ServeConfig.from_file(path)
    assert cfg == ServeConfig.from_dict(FULL)
    assert ServeConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_bad_files_are_clear_errors(tmp_path):
    (tmp_path / "a.toml").write_text("")
    with pytest.raises(ConfigError, match="unknown config file type"):
        ServeConfig.from_file(tmp_path / "a.toml")
    (tmp_path / "b.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="invalid YAML"):
        ServeConfig.from_file(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("- just a list")
    with pytest.raises(ConfigError, match="must be a mapping, got list"):
        ServeConfig.from_file(tmp_path / "c.yaml")


def with_(path: str, value) -> dict:
    """FULL with one dotted/indexed field replaced (value ... = deleted)."""
    data = json.loads(json.dumps(FULL))
    *parents, leaf = path.split(".")
    node = data
    for part in parents:
        node = node["pools"][int(part[6:-1])] if part.startswith("pools[") else node[part]
    if value is ...:
        del node[leaf]
    else:
        node[leaf] = value
    return data


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("modle", "x", r"^modle: unknown key; allowed keys: \[.*'model'"),
        ("router.short_prompt_thresold", 3, r"^router\.short_prompt_thresold: unknown key"),
        ("pools[1].gpus", 1, r"^pools\[1\]\.gpus: unknown key"),
        (
            "pools[0].role",
            "janitor",
            r"^pools\[0\]\.role: must be one of \['prefill', 'decode', 'mixed', 'attention'\]",
        ),
        ("pools[1].num_workers", -1, r"^pools\[1\]\.num_workers: must be >= 0, got -1"),
        ("pools[0].num_gpus", -0.5, r"^pools\[0\]\.num_gpus: must be >= 0"),
        ("pools[1].resources", {"decode_node": -1}, r"^pools\[1\]\.resources\.decode_node: must be >= 0"),
        ("pools[1].num_workers", "3", r"^pools\[1\]\.num_workers: must be int, got str"),
        ("pools[1].num_workers", True, r"^pools\[1\]\.num_workers: must be int, got bool"),
        ("pools[0].name", ..., r"^pools\[0\]\.name: required key is missing"),
        ("pools[2].name", "decode", r"^pools\[2\]\.name: duplicate pool name 'decode'"),
        ("pools", {"name": "x"}, r"^pools: must be a list"),
        ("model", ..., r"^model: required key is missing"),
        ("model", "", r"^model: must be a non-empty string"),
        ("router.decode_policy", "random", r"^router\.decode_policy: must be one of"),
        ("router.short_prompt_threshold", -1, r"^router\.short_prompt_threshold: must be >= 0"),
        (
            "router.prefill_release_tokens",
            9000,
            r"^router\.prefill_release_tokens: must be < prefill_saturation_tokens",
        ),
        ("router.mixed_min_free_kv_fraction", 1.5, r"^router\.mixed_min_free_kv_fraction: must be in \[0, 1\]"),
        ("transfer.kind", "rdma", r"^transfer\.kind: must be one of \['loopback', 'shm', 'torch', 'grpc'\]"),
        ("transfer.timeout_s", 0, r"^transfer\.timeout_s: must be > 0"),
        ("transfer.layerwise", "yes", r"^transfer\.layerwise: must be bool"),
        ("http_port", 9100, r"^metrics_port: port 9100 is also http_port"),
        ("grpc_port", 70000, r"^grpc_port: must be in \[0, 65535\]"),
        ("max_queue", 0, r"^max_queue: must be >= 1"),
        ("placement", "pack", r"^placement: must be one of \[.auto., .none., .PACK."),
        ("pools[0].experts", 3, r"^pools\[0\]\.experts: an EP pool is one group .*num_workers must be 3"),
        ("pools[1].experts", 2, r"^pools\[1\]\.experts: an EP pool is one group .*num_workers must be 2, got 3"),
        ("pools[2].experts", 0, r"^pools\[2\]\.experts: must be an int >= 1, got 0"),
        ("pools[1].expert_cache_slots", 1, r"^pools\[1\]\.expert_cache_slots: needs experts > 1"),
        ("pools[1].expert_placement", "/p.json", r"^pools\[1\]\.expert_placement: needs experts > 1"),
        ("pools[1].tensor_parallel", 0, r"^pools\[1\]\.tensor_parallel: must be an int >= 1, got 0"),
        (
            "pools[1].group_transport",
            "tcp",
            r"^pools\[1\]\.group_transport: must be one of \['auto', 'gloo', 'nccl', 'shm'\]",
        ),
        (
            "pools[1].group_transport",
            "shm",
            r"^pools\[1\]\.group_transport: 'shm' carries CPU tensors: a GPU pool",
        ),
    ],
)
def test_invalid_fields_are_named_in_the_error(path, value, message):
    with pytest.raises(ConfigError, match=message):
        ServeConfig.from_dict(with_(path, value))


def test_error_is_a_value_error_carrying_the_path():
    with pytest.raises(ValueError) as info:
        ServeConfig.from_dict(with_("pools[1].num_workers", -2))
    assert isinstance(info.value, ConfigError) and info.value.path == "pools[1].num_workers"


def test_at_least_one_decode_capable_worker_is_required():
    pools = [{"name": "p", "role": "prefill", "num_workers": 2}, {"name": "d", "role": "decode", "num_workers": 0}]
    with pytest.raises(ConfigError, match="^pools: need at least one worker in a decode or mixed pool"):
        ServeConfig.from_dict({"model": "m", "pools": pools})
    with pytest.raises(ConfigError, match="^pools: must list at least one pool"):
        ServeConfig.from_dict({"model": "m", "pools": []})
    only_mixed = ServeConfig.from_dict({"model": "m", "pools": [{"name": "m", "role": "mixed", "num_workers": 2}]})
    assert only_mixed.pools[0].role == "mixed"


def test_direct_construction_validates_too():
    with pytest.raises(ConfigError, match="^role: must be one of"):
        PoolConfig("x", "prefil")
    with pytest.raises(ConfigError, match="^prefill_release_tokens"):
        RouterConfig(prefill_saturation_tokens=100, prefill_release_tokens=100)


def test_configs_are_frozen_and_do_not_alias_caller_dicts():
    engine = {"dtype": "float16"}
    pool = PoolConfig("p", "prefill", engine=engine)
    engine["dtype"] = "float32"
    assert pool.engine == {"dtype": "float16"}
    cfg = ServeConfig.from_dict(FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_queue = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.router.decode_policy = "jsq"  # type: ignore[misc]


# ---------------------------------------------------------------- metrics_port, security


def test_metrics_port_null_means_no_separate_port():
    cfg = ServeConfig.from_dict({"model": "m", "metrics_port": None, "http_port": 9090})
    assert cfg.metrics_port is None and cfg.http_port == 9090  # no clash with a port that is not opened
    assert ServeConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match=r"^metrics_port: must be int, got str"):
        ServeConfig.from_dict({"model": "m", "metrics_port": "none"})


@pytest.fixture
def pki(tmp_path):
    from tests.pki import write_pki

    return write_pki(tmp_path)


def _security(**fields) -> dict:
    return {"model": "m", "security": fields}


def test_security_section_is_parsed_and_round_trips(pki, tmp_path):
    key = tmp_path / "key"
    key.write_text("sk-abc\n")
    cfg = ServeConfig.from_dict(
        _security(tls={"cert": pki.server, "key": pki.server_key, "ca": pki.ca}, api_key_file=str(key))
    )
    assert cfg.security == SecurityConfig(TLSFiles(pki.server, pki.server_key, pki.ca), str(key), False)
    assert cfg.security.tls.mutual and not TLSFiles(pki.server, pki.server_key).mutual
    assert ServeConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert "sk-abc" not in repr(cfg) and "sk-abc" not in json.dumps(cfg.to_dict())  # a path, never the key
    assert ServeConfig("m").security == SecurityConfig() and SecurityConfig().tls is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.security.protect_metrics = True  # type: ignore[misc]


def test_security_errors_name_the_field(pki, tmp_path):
    empty, two = tmp_path / "empty", tmp_path / "two"
    empty.write_text("\n")
    two.write_text("sk-one sk-two\n")
    cases = [
        (_security(tls={"key": pki.server_key}), r"^security\.tls\.cert: required"),
        (_security(tls={"cert": pki.server}), r"^security\.tls\.key: required"),
        (_security(tls={}), r"^security\.tls\.cert: required"),
        (_security(tls={"cert": "/no/cert.pem", "key": pki.server_key}), r"^security\.tls\.cert: no such file"),
        (_security(tls={"cert": pki.server, "key": pki.client_key}), r"^security\.tls\.cert: .* does not load"),
        (_security(tls={"cert": pki.server, "key": pki.server_key, "ca": pki.server_key}), r"^security\.tls\.ca: "),
        (_security(tls={"cert": pki.server, "key": pki.server_key, "crt": "x"}), r"^security\.tls\.crt: unknown key"),
        (_security(api_key_file="/no/key"), r"^security\.api_key_file: no such file '/no/key'"),
        (_security(api_key_file=str(empty)), r"^security\.api_key_file: .* is empty"),
        (_security(api_key_file=str(two)), r"^security\.api_key_file: .* must hold one key"),
        (_security(protect_metrics="yes"), r"^security\.protect_metrics: must be bool"),
        (_security(api_key="sk-inline"), r"^security\.api_key: unknown key"),
        ({"model": "m", "security": "tls"}, r"^security: must be a mapping"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError, match=message):
            ServeConfig.from_dict(data)
    with pytest.raises(ConfigError, match=r"^security\.api_key_file: .*must hold one key") as info:
        ServeConfig.from_dict(_security(api_key_file=str(two)))
    assert "sk-one" not in str(info.value)  # the file's content stays out of the message


def test_api_key_sources(tmp_path):
    key = tmp_path / "key"
    key.write_text("  sk-file\n")
    from_file = ServeConfig.from_dict(_security(api_key_file=str(key)))
    assert from_file.api_key(environ={}) == "sk-file"
    assert ServeConfig("m").api_key(environ={API_KEY_ENV: "sk-env"}) == "sk-env"
    assert ServeConfig("m").api_key(environ={API_KEY_ENV: ""}) is None  # empty = unset
    assert ServeConfig("m").api_key(environ={}) is None
    with pytest.raises(ConfigError, match=rf"^security\.api_key_file: is set and so is \${API_KEY_ENV}"):
        from_file.api_key(environ={API_KEY_ENV: "sk-env"})
    with pytest.raises(ConfigError, match=rf"^security: \${API_KEY_ENV} must be one key") as info:
        ServeConfig("m").api_key(environ={API_KEY_ENV: "sk env"})
    assert "sk env" not in str(info.value)
    protected = ServeConfig.from_dict(_security(protect_metrics=True))
    with pytest.raises(ConfigError, match=r"^security\.protect_metrics: needs an API key"):
        protected.api_key(environ={})
    assert protected.api_key(environ={API_KEY_ENV: "sk-env"}) == "sk-env"


def test_an_expert_parallel_pool_is_parsed(tmp_path):
    placement = tmp_path / "placement.json"
    placement.write_text('{"world_size": 2, "owners": {"0": [0, 0, 1, 1]}}')
    data = with_("pools[2].num_workers", 2)
    data["pools"][2].update(experts=2, expert_placement=str(placement), expert_cache_slots=1)
    pool = ServeConfig.from_dict(data).pool("mixed")
    assert (pool.experts, pool.expert_placement, pool.expert_cache_slots) == (2, str(placement), 1)
    data["pools"][2]["expert_placement"] = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match=r"^pools\[2\]\.expert_placement: no such file"):
        ServeConfig.from_dict(data)


def test_tensor_parallel_is_refused_with_expert_parallelism_and_attention_offload():
    ep_and_tp = {"name": "d", "role": "decode", "num_workers": 2, "experts": 2, "tensor_parallel": 2}
    with pytest.raises(ConfigError, match=r"^pools\[0\]\.tensor_parallel: .*expert parallelism"):
        ServeConfig.from_dict({"model": "/m", "pools": [ep_and_tp]})
    with pytest.raises(ConfigError, match=r"^pools\[0\]\.tensor_parallel: tensor parallelism with an attention pool"):
        ServeConfig.from_dict(
            {
                "model": "/m",
                "pools": [
                    {"name": "m", "role": "mixed", "tensor_parallel": 2},
                    {"name": "attention", "role": "attention", "num_workers": 2},
                ],
            }
        )


def test_a_tensor_parallel_pool_asks_for_its_resources_per_rank():
    from cluster.control.info import pool_info
    from cluster.control.placement import rank_ids, worker_bundle

    tp = PoolConfig("m", "mixed", 2, num_cpus=1.5, tensor_parallel=3)
    assert rank_ids("m-1", tp) == ["m-1", "m-1/tp1", "m-1/tp2"]  # one actor (and bundle) per rank
    assert rank_ids("m-0", PoolConfig("m", "mixed", 1)) == ["m-0"]
    assert worker_bundle(tp) == {"CPU": 1.5}  # each rank's bundle: the pool's request
    info = pool_info(tp, ["m-0", "m-1"])
    assert (info.tensor_parallel, info.num_cpus, info.workers) == (3, 1.5, ("m-0", "m-1"))


def test_group_transport_picks_each_groups_backend():
    from cluster.control.groups import group_backend

    cpu, gpu = PoolConfig("d", "decode"), PoolConfig("g", "decode", num_gpus=1)
    assert (group_backend([cpu]), group_backend([gpu]), group_backend([cpu, gpu])) == ("gloo", "nccl", "nccl")
    shm = PoolConfig("a", "attention", group_transport="shm")
    assert group_backend([shm, cpu]) == "shm" and group_backend([cpu, shm]) == "shm"
    assert group_backend([PoolConfig("x", "decode", group_transport="gloo"), gpu]) == "gloo"  # explicit wins
    with pytest.raises(ConfigError, match=r"^group_transport: 'nccl' carries CUDA tensors: .*num_gpus > 0"):
        PoolConfig("c", "decode", group_transport="nccl")
