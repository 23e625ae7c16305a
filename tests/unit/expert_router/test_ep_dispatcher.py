"""EPDispatcher over gloo ranks (threads of this process) against the local dispatcher.

Each rank holds its placement's share of one layer's experts (cut from one full
LocalExperts); every rank routes its own tokens. The EP output must equal the local
combine to rounding (the expert GEMMs see other row counts), ranks with
no tokens must still serve, and the byte counters must count only rows that cross ranks.
"""

from __future__ import annotations

import pytest
import torch

from engine.models.moe import LocalExperts, combine_local
from expert_router.dispatcher import EPDispatcher, EPProtocolError
from expert_router.placement import ExpertPlacement
from tests.unit.engine.gloo_ranks import gloo_comms, run_ranks

E, H, INTER, K = 6, 8, 12, 2


def _full_experts(seed: int = 0) -> LocalExperts:
    g = torch.Generator().manual_seed(seed)
    full = LocalExperts(range(E), H, INTER)
    with torch.no_grad():
        full.w13.copy_(torch.randn(full.w13.shape, generator=g))
        full.w2.copy_(torch.randn(full.w2.shape, generator=g))
    return full


def _share(full: LocalExperts, held: tuple[int, ...]) -> LocalExperts:
    part = LocalExperts(held, H, INTER)
    with torch.no_grad():
        part.w13.copy_(full.w13[list(held)])
        part.w2.copy_(full.w2[list(held)])
    return part


def _tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n)]) if n else torch.empty(0, K).long()
    w = torch.rand(n, K, generator=g)
    return x, w, ids


def _dispatchers(placement: ExpertPlacement, full: LocalExperts) -> list[EPDispatcher]:
    comms = gloo_comms(placement.world_size, timeout_s=20.0)
    out = []
    for comm in comms:
        d = EPDispatcher(comm, placement, K)
        held = d.held_experts(0, E)
        d.register(0, _share(full, tuple(held)))
        out.append(d)
    return out


@pytest.mark.parametrize(("world", "counts"), [(2, (9, 5)), (3, (7, 0, 4))], ids=["ep2", "ep3-one-rank-idle"])
def test_ep_dispatch_equals_local_experts(world: int, counts: tuple[int, ...]) -> None:
    full = _full_experts()
    placement = ExpertPlacement.contiguous(E, world, [0])
    ds = _dispatchers(placement, full)
    inputs = [_tokens(n, seed=10 + r) for r, n in enumerate(counts)]

    def rank(r: int) -> torch.Tensor | None:
        d = ds[r]
        out = None
        if counts[r]:
            out = d.dispatch(0, *inputs[r])
        assert d.end_step(unfinished=False) is False  # no rank has requests left
        return out

    outs = run_ranks(rank, world)
    for r, n in enumerate(counts):
        if not n:
            assert outs[r] is None
            continue
        want = combine_local(full, *inputs[r])
        torch.testing.assert_close(outs[r], want, rtol=1e-5, atol=1e-5)
    assert ds[counts.index(0) if 0 in counts else 0].stats.rounds >= 1  # an idle rank served a round


def test_tokens_whose_experts_share_a_rank_stay_home_and_bytes_count_crossings() -> None:
    """Every token chooses two experts of rank 0's block: rank 0's tokens never leave it;
    rank 1's tokens all cross (dispatch + combine bytes counted once each way)."""
    full = _full_experts(1)
    placement = ExpertPlacement.contiguous(E, 2, [0])  # rank 0: experts 0, 1, 2
    ds = _dispatchers(placement, full)
    g = torch.Generator().manual_seed(3)
    x = [torch.randn(5, H, generator=g), torch.randn(3, H, generator=g)]
    ids = [torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0]]), torch.tensor([[2, 1], [0, 1], [1, 2]])]
    w = [torch.rand(5, K, generator=g), torch.rand(3, K, generator=g)]

    def rank(r: int) -> torch.Tensor:
        out = ds[r].dispatch(0, x[r], w[r], ids[r])
        ds[r].end_step(unfinished=False)
        return out

    outs = run_ranks(rank, 2)
    for r in (0, 1):
        # expert GEMMs see other row counts than the local batch: equal to rounding
        torch.testing.assert_close(outs[r], combine_local(full, x[r], w[r], ids[r]), rtol=1e-5, atol=1e-5)
    s0, s1 = ds[0].stats, ds[1].stats
    assert (s0.remote_pairs, s0.dispatch_bytes) == (0, 0)
    assert s0.combine_bytes == 3 * H * 4  # rank 1's three tokens go back
    assert s1.remote_pairs == 3 and s1.dispatch_bytes == 3 * ((H + K) * 4 + K * 4)
    assert s0.distinct_ranks_per_token == s1.distinct_ranks_per_token == 1.0


def test_a_rank_with_more_forwards_is_served_until_it_is_done() -> None:
    """Rank 0 runs three forwards of the layer in a step, rank 1 one: rank 1 serves the
    other two from end_step, and end_step reports rank 0's unfinished requests to both."""
    full = _full_experts(2)
    placement = ExpertPlacement.contiguous(E, 2, [0])
    ds = _dispatchers(placement, full)
    batches = [[_tokens(4, s) for s in (20, 21, 22)], [_tokens(2, 23)]]

    def rank(r: int) -> tuple[list[torch.Tensor], bool]:
        outs = [ds[r].dispatch(0, *b) for b in batches[r]]
        return outs, ds[r].end_step(unfinished=r == 0)

    results = run_ranks(rank, 2)
    for r in (0, 1):
        outs, more = results[r]
        assert more is True
        for b, got in zip(batches[r], outs, strict=True):
            torch.testing.assert_close(got, combine_local(full, *b), rtol=1e-5, atol=1e-5)
    assert ds[1].stats.rounds == 3  # one own round + two served for rank 0


def test_active_ranks_at_different_layers_is_a_protocol_error() -> None:
    full = _full_experts(4)
    placement = ExpertPlacement(2, {0: ExpertPlacement.contiguous(E, 2, [0]).owners[0], 1: (0, 1, 0, 1, 0, 1)})
    comms = gloo_comms(2, timeout_s=20.0)
    ds = []
    for comm in comms:
        d = EPDispatcher(comm, placement, K)
        for layer in (0, 1):
            d.register(layer, _share(full, tuple(d.held_experts(layer, E))))
        ds.append(d)

    def rank(r: int) -> str:
        with pytest.raises(EPProtocolError, match="different layers") as e:
            ds[r].dispatch(r, *_tokens(2, 30 + r))  # rank 0 at layer 0, rank 1 at layer 1
        return str(e.value)

    assert all("different layers" in m for m in run_ranks(rank, 2))


def test_placement_must_match_the_model_and_the_group() -> None:
    comm = gloo_comms(2)[0]
    with pytest.raises(ValueError, match="placement is for rank 0 of 3 ranks, the communicator is rank 0 of 2"):
        EPDispatcher(comm, ExpertPlacement.contiguous(E, 3, [0]), K)
    d = EPDispatcher(comm, ExpertPlacement.contiguous(E, 2, [0]), K)
    with pytest.raises(ValueError, match="places 6 experts, the model has 8"):
        d.held_experts(0, 8)
    with pytest.raises(ValueError, match="placement says"):
        d.register(0, LocalExperts((3, 4, 5), H, INTER))


def test_a_rank_that_stops_fails_the_others_within_the_timeout() -> None:
    """Rank 1 never joins the round (a dead or hung worker): rank 0's dispatch raises
    CommunicationError within the group's timeout instead of hanging."""
    import time

    from engine.parallel import CommunicationError

    full = _full_experts(5)
    placement = ExpertPlacement.contiguous(E, 2, [0])
    comms = gloo_comms(2, timeout_s=2.0)
    d = EPDispatcher(comms[0], placement, K)
    d.register(0, _share(full, tuple(d.held_experts(0, E))))
    t0 = time.monotonic()
    with pytest.raises(CommunicationError):
        d.dispatch(0, *_tokens(3, 40))
    assert time.monotonic() - t0 < 10.0


def test_a_rank_builds_before_its_group_forms_and_connects_later() -> None:
    """A worker loads its share for its rank first (no communicator), then connects; a
    dispatch before connect, a second connect, or a communicator of another rank are refused."""
    full = _full_experts(6)
    placement = ExpertPlacement.contiguous(E, 2, [0])
    ds = [EPDispatcher(None, placement, K, rank=r) for r in (0, 1)]
    for d in ds:
        d.register(0, _share(full, tuple(d.held_experts(0, E))))
    with pytest.raises(EPProtocolError, match="not connected"):
        ds[0].dispatch(0, *_tokens(2, 50))
    comms = gloo_comms(2)
    with pytest.raises(ValueError, match="rank 1 of 2"):
        ds[0].connect(comms[1])
    for d, comm in zip(ds, comms, strict=True):
        d.connect(comm)
    with pytest.raises(EPProtocolError, match="already connected"):
        ds[0].connect(comms[0])
    inputs = [_tokens(4, 51), _tokens(3, 52)]

    def rank(r: int) -> torch.Tensor:
        out = ds[r].dispatch(0, *inputs[r])
        ds[r].end_step(unfinished=False)
        return out

    for r, out in enumerate(run_ranks(rank, 2)):
        torch.testing.assert_close(out, combine_local(full, *inputs[r]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs a communicator or"):
        EPDispatcher(None, placement, K)
