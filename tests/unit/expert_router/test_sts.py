"""s-TS request pre-scheduling: on a SYNTHETIC log with sticky routing paths, placing each
sequence on the rank its first tokens vote for (with s-EG, layers aligned) sends fewer
bytes than round robin; the vote and its load tie-break."""

from __future__ import annotations

import numpy as np

from expert_router.placement import ExpertPlacement
from expert_router.seg import coactivation_placement
from expert_router.sts import predict_rank, sts_traffic
from expert_router.synthetic import PlantedStructure, planted_log

STRUCT = PlantedStructure(num_experts=16, top_k=2, num_layers=4, num_groups=4, stickiness=0.9)


def test_seg_plus_sts_sends_fewer_bytes_than_seg_and_plain_ep() -> None:
    train, _ = planted_log(STRUCT, 40, 30, seed=1)
    held_out, _ = planted_log(STRUCT, 30, 30, seed=1, sample_seed=5)
    seg = coactivation_placement(train, 4)
    plain = sts_traffic(held_out, ExpertPlacement.contiguous(16, 4, held_out.layers), 64, sts=False)
    seg_only = sts_traffic(held_out, seg, 64, sts=False)
    both = sts_traffic(held_out, seg, 64, sts=True)
    print(
        f"bytes/token plain {plain.bytes_per_token:.0f}, s-EG {seg_only.bytes_per_token:.0f}, "
        f"s-EG + s-TS {both.bytes_per_token:.0f}; local (token, layer) {both.local_fraction:.3f}"
    )
    assert both.bytes_per_token < seg_only.bytes_per_token < plain.bytes_per_token
    assert both.local_fraction > seg_only.local_fraction
    assert both.max_rank_requests <= 1.5 * (1 / 4) + 1 / 30  # the imbalance cap held


def test_unaligned_layers_lose_the_sts_gain() -> None:
    train, _ = planted_log(STRUCT, 40, 30, seed=2)
    held_out, _ = planted_log(STRUCT, 30, 30, seed=2, sample_seed=6)
    aligned = sts_traffic(held_out, coactivation_placement(train, 4, align_layers=True), 64)
    unaligned = sts_traffic(held_out, coactivation_placement(train, 4, align_layers=False), 64)
    assert aligned.local_fraction > unaligned.local_fraction


def test_predict_rank_votes_and_breaks_ties_by_load() -> None:
    p = ExpertPlacement(2, {0: (0, 0, 1, 1)})
    ids = np.array([[[0, 1]], [[2, 0]]])  # votes: rank 0 three, rank 1 one
    assert predict_rank(p, (0,), ids) == 0
    tie = np.array([[[0, 2]]])
    assert predict_rank(p, (0,), tie) == 0
    assert predict_rank(p, (0,), tie, load=np.array([3.0, 1.0])) == 1
