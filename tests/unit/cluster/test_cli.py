"""``splitserve`` argument parsing and the ServeConfig that ``serve`` derives from it (no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cluster.cli import build_parser
from cluster.config import ConfigError, PoolConfig, ServeConfig
from cluster.serve import (
    DEMO_PROMPTS,
    TINY_ENGINE,
    cmd_serve,
    local_ray_resources,
    serve_config_from_args,
)


def _parse(*argv: str):
    return build_parser().parse_args(list(argv))


class _Tiny:
    """Stands in for building the tiny checkpoint; counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        return "/cache/tiny-llama"


def _pools(cfg: ServeConfig) -> list[tuple[str, str, int, float]]:
    return [(p.name, p.role, p.num_workers, p.num_cpus) for p in cfg.pools]


def test_serve_defaults():
    args = _parse("serve")
    assert args.command == "serve" and args.func is cmd_serve
    assert (args.model, args.config, args.address, args.transport) == (None, None, None, None)
    assert (args.prefill, args.decode, args.num_cpus_per_worker, args.prompts) == (None, None, None, None)
    assert args.max_tokens == 24 and args.once is False and args.log_level == "WARNING"


def test_serve_flags_parse():
    args = _parse(
        *"--log-level info serve --model /m --address auto --prefill 2 --decode 3 --transport grpc".split(),
        *"--num-cpus-per-worker 0.5 --max-tokens 7 --once".split(),
        *("--prompt", "a b", "--prompt", "c"),
    )
    assert args.log_level == "INFO"
    assert (args.model, args.address, args.prefill, args.decode) == ("/m", "auto", 2, 3)
    assert (args.transport, args.num_cpus_per_worker, args.prompts) == ("grpc", 0.5, ["a b", "c"])
    assert args.max_tokens == 7 and args.once is True


@pytest.mark.parametrize(
    "argv",
    [
        [],  # a subcommand is required
        ["serve", "--transport", "loopback"],  # in-process only: not offered
        ["serve", "--max-tokens", "0"],
        ["serve", "--prefill", "-1"],
        ["serve", "--num-cpus-per-worker", "-0.5"],
        ["serve", "--bogus"],
        ["--log-level", "chatty", "serve"],
    ],
)
def test_bad_arguments_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "usage: splitserve" in capsys.readouterr().err


def test_no_model_builds_the_tiny_one_with_a_small_kv_pool():
    tiny = _Tiny()
    cfg = serve_config_from_args(_parse("serve"), tiny)
    assert tiny.calls == 1 and cfg.model == "/cache/tiny-llama"
    assert _pools(cfg) == [("prefill", "prefill", 1, 1.0), ("decode", "decode", 1, 1.0)]
    assert all(p.engine == TINY_ENGINE for p in cfg.pools)
    assert cfg.transfer.kind == "shm"
    assert DEMO_PROMPTS  # the demo has something to send without --prompt


def test_flags_shape_the_default_pools():
    tiny = _Tiny()
    args = _parse(*"serve --model /m --prefill 2 --decode 3 --num-cpus-per-worker 0.5 --transport torch".split())
    cfg = serve_config_from_args(args, tiny)
    assert tiny.calls == 0 and cfg.model == "/m"
    assert _pools(cfg) == [("prefill", "prefill", 2, 0.5), ("decode", "decode", 3, 0.5)]
    assert all(p.engine == {} for p in cfg.pools)  # a real model keeps the engine defaults
    assert cfg.transfer.kind == "torch"
    assert cfg.placement == "auto"  # resolved by the controller: PACK for torch


def test_placement_flag_overrides_the_config():
    args = _parse(*"serve --model /m --placement STRICT_SPREAD".split())
    assert serve_config_from_args(args, _Tiny()).placement == "STRICT_SPREAD"
    with pytest.raises(SystemExit):
        _parse(*"serve --placement sideways".split())


def test_config_file_with_flag_overrides(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(
        "model: /from/config\n"
        "pools:\n"
        "  - {name: prefill, role: prefill, num_workers: 2, resources: {prefill_node: 1}}\n"
        "  - {name: big, role: decode, num_workers: 1, num_gpus: 1}\n"
        "transfer: {kind: grpc, timeout_s: 5}\n"
        "router: {short_prompt_threshold: 4}\n"
    )
    tiny = _Tiny()
    cfg = serve_config_from_args(_parse("serve", "--config", str(path)), tiny)
    assert tiny.calls == 0 and cfg.model == "/from/config"
    assert _pools(cfg) == [("prefill", "prefill", 2, 1.0), ("big", "decode", 1, 1.0)]
    assert cfg.pool("prefill").resources == {"prefill_node": 1} and cfg.pool("big").num_gpus == 1
    assert (cfg.transfer.kind, cfg.transfer.timeout_s, cfg.router.short_prompt_threshold) == ("grpc", 5.0, 4)

    # flags win: the named pool is resized, a missing "decode" pool is added, transport replaced
    args = _parse("serve", "--config", str(path), "--model", "/flag", "--prefill", "1", "--decode", "2")
    args.transport = "shm"
    cfg = serve_config_from_args(args, tiny)
    assert cfg.model == "/flag" and cfg.transfer.kind == "shm" and cfg.transfer.timeout_s == 5.0
    assert _pools(cfg) == [("prefill", "prefill", 1, 1.0), ("big", "decode", 1, 1.0), ("decode", "decode", 2, 1.0)]


def test_json_config_without_model_or_transfer_gets_the_serve_defaults(tmp_path):
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"pools": [{"name": "decode", "role": "decode", "num_workers": 2}]}))
    tiny = _Tiny()
    cfg = serve_config_from_args(_parse("serve", "--config", str(path)), tiny)
    assert tiny.calls == 1 and cfg.model == "/cache/tiny-llama"
    assert _pools(cfg) == [("decode", "decode", 2, 1.0)]  # the config's pools are kept as written
    assert cfg.transfer.kind == "shm"


def test_loopback_in_a_config_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("model: /m\ntransfer: {kind: loopback}\n")
    with pytest.raises(ConfigError, match=r"transfer\.kind: 'loopback' works only inside one process.*--transport"):
        serve_config_from_args(_parse("serve", "--config", str(path)), _Tiny())


@pytest.mark.parametrize(
    "text,match",
    [
        ("model: /m\npools: [{name: p, role: sideways}]\n", r"pools\[0\]\.role"),
        ("model: /m\nbogus: 1\n", "bogus: unknown key"),
        ("model: /m\npools: [prefill, decode]\n", "pools: must be a list of mappings"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("model: [unclosed\n", "invalid YAML"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path, text, match):
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        serve_config_from_args(_parse("serve", "--config", str(path)), _Tiny())


def test_local_ray_gets_enough_cpus_and_every_custom_resource():
    cfg = ServeConfig(
        model="/m",
        pools=(
            PoolConfig("prefill", "prefill", 3, num_cpus=2.0, resources={"prefill_node": 1}),
            PoolConfig("decode", "decode", 2, num_cpus=0.5, resources={"decode_node": 0.5, "fast": 1}),
        ),
    )
    cpus, custom = local_ray_resources(cfg, None)
    assert cpus >= 7  # 3 * 2 + 2 * 0.5 (more when the machine has more cores)
    assert custom == {"prefill_node": 3.0, "decode_node": 1.0, "fast": 2.0}
    assert local_ray_resources(cfg, 2.5)[0] == 3  # an explicit --num-cpus wins (rounded up)


def test_importing_the_cli_does_not_import_ray():
    code = "import sys, cluster.cli; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
