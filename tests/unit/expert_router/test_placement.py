"""ExpertPlacement: contiguous blocks, balance and layer checks, JSON round trip."""

from __future__ import annotations

import pytest

from expert_router.placement import ExpertPlacement, distinct_ranks


def test_contiguous_blocks_larger_first() -> None:
    p = ExpertPlacement.contiguous(4, 3, layers=[0, 2])
    assert p.owners[0] == (0, 0, 1, 2)
    assert p.experts_of(2, 0) == (0, 1) and p.experts_of(2, 2) == (3,)
    assert p.owner_table(0).tolist() == [0, 0, 1, 2]
    assert ExpertPlacement.contiguous(8, 2, [0]).experts_of(0, 1) == (4, 5, 6, 7)


def test_unbalanced_or_out_of_range_owners_are_refused() -> None:
    with pytest.raises(ValueError, match="unbalanced"):
        ExpertPlacement(2, {0: (0, 0, 0, 1)})
    with pytest.raises(ValueError, match="outside"):
        ExpertPlacement(2, {0: (0, 1, 2, 1)})
    with pytest.raises(ValueError, match="cannot be spread"):
        ExpertPlacement.contiguous(2, 3, [0])


def test_unknown_layer_names_the_placed_layers() -> None:
    with pytest.raises(KeyError, match=r"no layer 1 .*\[0\]"):
        ExpertPlacement.contiguous(4, 2, [0]).experts_of(1, 0)


def test_json_round_trip() -> None:
    p = ExpertPlacement(2, {0: (1, 0, 0, 1), 3: (0, 1, 0, 1)})
    assert ExpertPlacement.from_json(p.to_json()) == p


def test_distinct_ranks_per_token() -> None:
    p = ExpertPlacement(2, {0: (0, 0, 1, 1)})
    assert distinct_ranks(p, 0, [[0, 1], [0, 2], [3, 2]]) == [1, 2, 1]
