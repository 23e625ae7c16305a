"""Profile tables (validation, JSON round trip) and the step-time model's interpolation."""

from __future__ import annotations

import json
import random

import pytest

from cluster.tools.sim.model import PROFILE_FORMAT, ProfileTable, StepTimeModel
from cluster.tools.sim.roofline import EXAMPLE_PATH, roofline_table
from tests.unit.cluster.tools.sim.helpers import linear_table


def test_json_round_trip(tmp_path):
    t = linear_table()
    path = tmp_path / "t.json"
    t.save(path)
    assert ProfileTable.load(path) == t
    data = json.loads(path.read_text())
    assert data["format"] == PROFILE_FORMAT and data["illustrative"] is False


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prefill_tokens": (64, 16, 256, 1024)}, "strictly increasing"),
        ({"prefill_s": (0.1, 0.2, 0.3)}, "one entry per"),
        ({"prefill_s": (0.1, -0.2, 0.3, 0.4)}, "positive"),
        ({"decode_s": ((0.1, 0.2, 0.3),)}, "rows"),
        ({"num_layers": 0}, "num_layers"),
    ],
)
def test_invalid_tables_are_rejected(change, message):
    fields = {**linear_table().__dict__, **change}
    with pytest.raises(ValueError, match=message):
        ProfileTable(**fields)


def test_loading_something_else_is_an_error(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a profile table"):
        ProfileTable.load(p)
    p.write_text(json.dumps({"format": PROFILE_FORMAT, "model": {}}))
    with pytest.raises(ValueError, match="missing the field"):
        ProfileTable.load(p)


def test_interpolation_hits_the_table_and_is_linear_between():
    t = linear_table()
    m = StepTimeModel(t)
    for tok, s in zip(t.prefill_tokens, t.prefill_s):
        assert m.prefill(tok) == pytest.approx(s)
    assert m.prefill(40) == pytest.approx((0.004 + 0.006) / 2)
    assert m.prefill(1) == pytest.approx(0.004)  # held below the first point
    assert m.prefill(2048) == pytest.approx(0.05 + (0.05 - 0.014) / 768 * 1024)  # last slope
    for i, b in enumerate(t.decode_batch_sizes):
        for j, c in enumerate(t.decode_context_lens):
            assert m.decode(b, c) == pytest.approx(t.decode_s[i][j])
    mid = m.decode(36, 256)  # halfway between batch 8 and 64
    assert mid == pytest.approx((0.004 + 0.01) / 2)


def test_noisy_tables_are_made_monotone():
    t = ProfileTable(
        prefill_tokens=(16, 64, 256),
        prefill_s=(0.01, 0.008, 0.02),  # a noisy dip
        decode_batch_sizes=(1, 8),
        decode_context_lens=(16, 256),
        decode_s=((0.005, 0.004), (0.004, 0.009)),
        num_layers=2,
        kv_bytes_per_token=64,
    )
    m = StepTimeModel(t)
    xs = [m.prefill(x) for x in range(1, 400, 7)]
    assert xs == sorted(xs)
    for b in (1, 3, 8, 20):
        ys = [m.decode(b, c) for c in range(1, 600, 11)]
        assert ys == sorted(ys)
    assert m.decode(8, 16) >= m.decode(1, 16)


def test_mixed_step_model():
    m = StepTimeModel(linear_table())
    # one fresh chunk: exactly the prefill table
    for n in (16, 100, 700):
        assert m.step_time(n, n * n, 0, 0) == pytest.approx(m.prefill(n))
    # pure decode: exactly the decode table at the mean context
    assert m.step_time(0, 0, 8, 8 * 256) == pytest.approx(m.decode(8, 256))
    # attention is per sequence: four 64-token prompts cost less than one 256-token prompt
    assert m.step_time(256, 4 * 64 * 64, 0, 0) <= m.step_time(256, 256 * 256, 0, 0)
    # decoding alongside a prefill adds time, more with longer contexts
    with_dec = m.step_time(100, 100 * 100, 8, 8 * 2048)
    assert with_dec > m.step_time(100, 100 * 100, 8, 8 * 16) > m.prefill(100)


def test_closed_form_runs_match_step_by_step():
    m = StepTimeModel(roofline_table())
    rng = random.Random(0)
    for _ in range(300):
        b, c, n = rng.choice([1, 3, 40, 256, 400]), rng.uniform(1, 12000), rng.randrange(0, 400)
        exact = sum(m.decode(b, c + k) for k in range(n))
        assert m.decode_run(b, c, n) == pytest.approx(exact, rel=1e-9, abs=1e-12)
        elapsed = rng.uniform(0, exact * 1.2 + 1e-3)
        k = m.decode_steps_within(b, c, n, elapsed)
        assert m.decode_run(b, c, k) <= elapsed + 1e-12
        assert k == n or m.decode_run(b, c, k + 1) > elapsed


def test_shipped_example_is_marked_illustrative_and_reproducible():
    shipped = ProfileTable.load(EXAMPLE_PATH)
    assert shipped.illustrative is True
    assert "ILLUSTRATIVE" in shipped.source and "NOT a measurement" in shipped.source
    assert shipped == roofline_table()  # the numbers follow from the stated assumptions
    m = StepTimeModel(shipped)
    # plausible shape for a 7B model on an A100: ~10 ms decode steps, ~0.1-0.2 s per 2k-token prefill
    assert 0.005 < m.decode(1, 512) < 0.03
    assert 0.05 < m.prefill(2048) < 0.5


def test_time_scale_multiplies_every_step():
    base, slow = StepTimeModel(linear_table()), StepTimeModel(linear_table(), time_scale=2.0)
    assert slow.decode(8, 256) == pytest.approx(2 * base.decode(8, 256))
    assert slow.prefill(100) == pytest.approx(2 * base.prefill(100))
    assert slow.step_time(100, 100 * 100, 4, 4 * 64) == pytest.approx(2 * base.step_time(100, 100 * 100, 4, 4 * 64))
    assert slow.decode_run(8, 256, 10) == pytest.approx(2 * base.decode_run(8, 256, 10))
    with pytest.raises(ValueError, match="time_scale"):
        StepTimeModel(linear_table(), time_scale=0)


def test_token_overhead_is_per_decoding_request_per_step():
    base, over = StepTimeModel(linear_table()), StepTimeModel(linear_table(), token_overhead_s=0.001)
    assert over.decode(8, 256) == pytest.approx(base.decode(8, 256) + 0.008)
    assert over.decode_run(8, 256, 10) == pytest.approx(sum(over.decode(8, 256 + k) for k in range(10)))
    assert over.step_time(100, 100 * 100, 4, 4 * 64) == pytest.approx(base.step_time(100, 100 * 100, 4, 4 * 64) + 0.004)
    assert over.prefill(100) == base.prefill(100)
    with pytest.raises(ValueError, match="token_overhead_s"):
        StepTimeModel(linear_table(), token_overhead_s=-1)
