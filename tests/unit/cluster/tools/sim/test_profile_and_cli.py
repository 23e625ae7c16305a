"""``splitserve profile`` on a tiny model (table round trip) and ``splitserve sim`` end to end."""

from __future__ import annotations

import json

import pytest

from cluster.cli import build_parser, main
from cluster.tools.profile import profile_engine
from cluster.tools.sim.model import ProfileTable, StepTimeModel
from cluster.tools.sim.simulator import SimConfig, Simulator
from cluster.tools.sim.workload import fixed


def test_profile_tiny_model_round_trips_and_drives_the_simulator(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llama")
    table = profile_engine(
        model,
        prefill_tokens=(8, 32, 128),
        batch_sizes=(1, 4),
        context_lens=(8, 64),
        reps=2,
        decode_steps=2,
        num_blocks=256,
        max_num_batched_tokens=256,
        max_num_seqs=32,
    )
    assert table.prefill_tokens == (8, 32, 128) and table.decode_batch_sizes == (1, 4)
    assert all(0 < s < 5 for s in table.prefill_s)
    assert all(0 < s < 5 for row in table.decode_s for s in row)
    assert not table.illustrative and "measured" in table.source
    assert table.machine["torch_threads"] == 1 and table.machine["device"] == "cpu"
    # tiny llama: 2 layers x K,V x 2 kv heads x 16 dims x 4 bytes
    assert table.num_layers == 2 and table.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    assert (table.num_blocks, table.max_num_batched_tokens, table.max_num_seqs) == (256, 256, 32)
    path = tmp_path / "p.json"
    table.save(path)
    loaded = ProfileTable.load(path)
    assert loaded == table
    r = Simulator(StepTimeModel(loaded), SimConfig()).run(fixed(20, 40, 8, rate=50.0))
    assert r.summary()["finished"] == 20


def test_profile_command(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "prof.json"
    argv = ["profile", "--model", tiny_checkpoint("llama"), "--out", str(out), "--prefill-tokens", "8", "16"]
    argv += ["--batch-sizes", "1", "2", "--context-lens", "8", "--reps", "1", "--decode-steps", "1"]
    assert main(argv) == 0
    t = ProfileTable.load(out)
    assert t.prefill_tokens == (8, 16) and t.decode_context_lens == (8,)
    assert "wrote" in capsys.readouterr().out
    assert main(["profile", "--model", str(tmp_path), "--out", str(out)]) == 2  # not a model dir


def test_sim_command_prints_a_summary(capsys):
    argv = "sim --workload code --rate 5 --duration 20 --prefill 2 --decode 2 --slo-ttft 2000 --slo-tpot 100"
    assert main(argv.split()) == 0
    out = capsys.readouterr()
    assert "TTFT (ms)" in out.out and "SLO (TTFT <= 2000 ms, TPOT <= 100 ms)" in out.out
    assert "ILLUSTRATIVE" in out.err  # the default table is the illustrative example


def test_sim_command_json_and_trace_replay(capsys, tmp_path):
    assert main("sim --workload conversation --duration 30 --decode 2 --json".split()) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["workload"] == "conversation" and s["finished"] == s["requests"] > 0
    assert s["instances"] == {"prefill": 1, "decode": 2, "mixed": 0}


def test_sim_command_sweep(capsys):
    argv = "sim --workload conversation --sweep-ratio --instances 8 --target-rate 20 --slo-ttft 1000 --slo-tpot 50"
    assert main([*argv.split(), "--duration", "15", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    best = plan["best"]
    assert best["num_prefill"] + best["num_decode"] == 8 and plan["simulations"] >= 3


@pytest.mark.parametrize(
    "argv, message",
    [
        ("sim --sweep-ratio --instances 8", "needs --instances, --target-rate"),
        ("sim --table /nonexistent.json", "No such file"),
        ("sim --decode 0", "at least one decode or mixed"),
    ],
)
def test_sim_command_errors(argv, message, capsys):
    assert main(argv.split()) == 2
    assert message in capsys.readouterr().err


def test_parsers_are_registered():
    p = build_parser()
    args = p.parse_args("sim --prefill 3 --decode 5 --mixed 1 --rate 2.5".split())
    assert (args.prefill, args.decode, args.mixed, args.rate) == (3, 5, 1, 2.5)
    args = p.parse_args("profile --quick --threads 2".split())
    assert args.quick and args.threads == 2 and args.out == "profile.json"
