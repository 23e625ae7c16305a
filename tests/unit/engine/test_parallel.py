"""engine/parallel.py: communicators (LocalCommunicator; TorchDistCommunicator over gloo and
engine/runtime/shm_group.ShmCommunicator, both held to the same contract with the ranks as
threads) and the micro-batch overlap schedule (event order with a recording fake
communicator; numerics of TokenWeave, EP dispatch/combine and Lamina-style send/recv against
the unsplit computation)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from engine import parallel
from engine.parallel import (
    AllOf,
    CommunicationError,
    Communicator,
    LocalCommunicator,
    OverlapStats,
    Pending,
    Ready,
    Stage,
    TokenSplit,
    aligned_split,
    even_split,
    run_overlapped,
    run_token_split,
)
from tests.unit.engine.gloo_ranks import comms_of, gloo_comms, run_ranks

F64 = torch.float64
# every multi-rank test below runs over both group backends: the Communicator contract is one
BACKENDS = pytest.mark.parametrize("backend", ["gloo", "shm"])


# ============================================================================ LocalCommunicator


def test_local_communicator_is_the_identity_and_has_no_peers() -> None:
    comm = LocalCommunicator()
    x = torch.arange(6.0).reshape(3, 2)
    assert (comm.rank, comm.world_size, comm.device) == (0, 1, torch.device("cpu"))
    assert comm.all_reduce(x) is x
    assert comm.reduce_scatter(x) is x
    assert comm.all_gather(x) is x
    assert comm.all_to_all(x, [3]) is x
    assert comm.all_to_all(x, [3], [3]) is x
    assert comm.exchange_splits([3]) == [3]
    with pytest.raises(ValueError, match="peer 0 is not another rank"):
        comm.send(x, 0)
    with pytest.raises(ValueError, match="peer 1 is not another rank"):
        comm.recv(x, 1)


def test_arguments_are_checked_before_anything_is_issued() -> None:
    comm = LocalCommunicator()
    with pytest.raises(ValueError, match=r"sum\(send_splits\)=2 != x.shape\[0\]=3"):
        comm.all_to_all(torch.zeros(3, 2), [2])
    with pytest.raises(ValueError, match="send_splits must be 1 non-negative counts"):
        comm.all_to_all(torch.zeros(3, 2), [1, 2])
    with pytest.raises(ValueError, match="scalar"):
        comm.all_gather(torch.tensor(1.0))
    with pytest.raises(ValueError, match="tensor on cpu, this communicator's tensors live on meta"):
        LocalCommunicator("meta").all_reduce(torch.zeros(2))


# ============================================================================ TorchDistCommunicator


@BACKENDS
def test_collectives_give_the_right_values(backend: str) -> None:
    comms = comms_of(backend, 2)

    def rank_ops(r: int) -> dict[str, Any]:
        c = comms[r]
        base = torch.arange(8.0).reshape(4, 2) * (r + 1)  # [4, 2]; sum over ranks = 3 * arange
        # rank 0 sends 1 row to itself, 3 to rank 1; rank 1 sends 0 to rank 0, 2 to itself
        send = [[1, 3], [0, 2]][r]
        rows = torch.full((sum(send), 3), float(r)) + torch.arange(sum(send))[:, None]  # [sum(send), 3]
        # async forms issued together, waited after
        pending = {
            "all_reduce": c.all_reduce_async(base.clone()),
            "reduce_scatter": c.reduce_scatter_async(base.clone()),
            "all_gather": c.all_gather_async(torch.full((2, 2), float(r))),
        }
        out = {k: p.wait() for k, p in pending.items()}
        out["all_to_all"] = c.all_to_all(rows, send)  # recv_splits learnt by exchange
        out["all_to_all_explicit"] = c.all_to_all(rows, send, [[1, 0], [3, 2]][r])
        if r == 0:
            c.send(torch.tensor([7.0, 8.0]), 1, tag=3)
        else:
            out["recv"] = c.recv(torch.empty(2), 0, tag=3)
        return out

    out = run_ranks(rank_ops)
    full = 3 * torch.arange(8.0).reshape(4, 2)
    for r in (0, 1):
        assert torch.equal(out[r]["all_reduce"], full)
        assert torch.equal(out[r]["reduce_scatter"], full[2 * r : 2 * r + 2])
        assert torch.equal(out[r]["all_gather"], torch.tensor([[0.0, 0], [0, 0], [1, 1], [1, 1]]))
        assert torch.equal(out[r]["all_to_all"], out[r]["all_to_all_explicit"])
    # rank 0 gets its own row 0 only; rank 1 gets rank 0's rows 1..3 then its own 2 rows
    assert torch.equal(out[0]["all_to_all"], torch.zeros(1, 3))
    assert torch.equal(out[1]["all_to_all"][:, 0], torch.tensor([1.0, 2, 3, 1, 2]))
    assert torch.equal(out[1]["recv"], torch.tensor([7.0, 8.0]))


def test_gloo_reduce_scatter_needs_rows_divisible_by_world_size() -> None:
    comm = gloo_comms(2)[0]
    with pytest.raises(ValueError, match=r"x.shape\[0\]=3 is not divisible by world_size=2"):
        comm.reduce_scatter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="peer 0 is not another rank"):
        comm.send(torch.zeros(1), 0)


@BACKENDS
def test_a_peer_that_never_joins_the_op_fails_the_caller_within_the_timeout(backend: str) -> None:
    comms = comms_of(backend, 2, timeout_s=1.0)  # groups built with 1 s, the communicator's ops too
    failed = threading.Event()

    def rank_fn(r: int) -> float:
        if r == 1:
            failed.wait(30)  # this rank never issues the collective
            return 0.0
        t0 = time.monotonic()
        try:
            with pytest.raises(CommunicationError, match="all_reduce .*'test' rank 0/2"):
                comms[0].all_reduce(torch.ones(4))
        finally:
            failed.set()
        return time.monotonic() - t0

    elapsed = run_ranks(rank_fn)[0]
    assert 0.5 < elapsed < 5.0, elapsed
    with pytest.raises(CommunicationError):  # the group is broken for good after a timeout
        comms[0].all_reduce(torch.ones(4))


# ============================================================================ overlap schedule: order


class RecordingComm(Communicator):
    """World size 1, identity ops; logs ("issue", op, mb) and ("wait", op, mb), where the
    micro-batch index is the value of the tensor's first element (the test keeps it so)."""

    def __init__(self, log: list[tuple[str, str, int]]):
        self.log = log

    rank = 0  # type: ignore[assignment]
    world_size = 1  # type: ignore[assignment]
    device = torch.device("cpu")  # type: ignore[assignment]

    def _record(self, op: str, x: torch.Tensor) -> Pending[torch.Tensor]:
        mb = int(x.reshape(-1)[0])
        self.log.append(("issue", op, mb))
        log = self.log

        class Recorded:
            def wait(self) -> torch.Tensor:
                log.append(("wait", op, mb))
                return x

        return Recorded()

    def _start_all_reduce(self, x):
        return self._record("all_reduce", x)

    def _start_reduce_scatter(self, x):
        return self._record("reduce_scatter", x)

    def _start_all_gather(self, x):
        return self._record("all_gather", x)

    def _start_all_to_all(self, x, send_splits, recv_splits):
        return self._record("all_to_all", x)

    def _start_send(self, x, dst, tag):
        raise AssertionError("no peers")

    def _start_recv(self, out, src, tag):
        raise AssertionError("no peers")


def _recorded_run(n: int) -> tuple[list[tuple[str, str, int]], list[torch.Tensor]]:
    log: list[tuple[str, str, int]] = []
    comm = RecordingComm(log)
    ops = ("all_reduce", "all_to_all", "all_gather")

    def stage(op: str) -> Stage:
        def compute(i: int, x: torch.Tensor) -> torch.Tensor:
            log.append(("compute", op, i))
            assert int(x[0]) == i, "a micro-batch got another's data"
            return x.clone()

        def communicate(i: int, y: torch.Tensor) -> Pending[torch.Tensor]:
            if op == "all_to_all":
                return comm.all_to_all_async(y, [y.shape[0]], [y.shape[0]])
            return getattr(comm, f"{op}_async")(y)

        return Stage(compute, communicate, op)

    inputs = [torch.full((2,), float(i)) for i in range(n)]
    return log, run_overlapped(inputs, [stage(op) for op in ops])


def test_two_micro_batches_rotate_compute_against_communication() -> None:
    log, outputs = _recorded_run(2)
    assert log == [
        ("compute", "all_reduce", 0),
        ("issue", "all_reduce", 0),
        ("compute", "all_reduce", 1),  # mb 1 computes while mb 0's all_reduce is in flight
        ("issue", "all_reduce", 1),
        ("wait", "all_reduce", 0),
        ("compute", "all_to_all", 0),  # mb 0 computes while mb 1's all_reduce is in flight
        ("issue", "all_to_all", 0),
        ("wait", "all_reduce", 1),
        ("compute", "all_to_all", 1),
        ("issue", "all_to_all", 1),
        ("wait", "all_to_all", 0),
        ("compute", "all_gather", 0),
        ("issue", "all_gather", 0),
        ("wait", "all_to_all", 1),
        ("compute", "all_gather", 1),
        ("issue", "all_gather", 1),
        ("wait", "all_gather", 0),
        ("wait", "all_gather", 1),
    ]
    assert [int(o[0]) for o in outputs] == [0, 1]


@pytest.mark.parametrize("n", [2, 3, 5])
def test_compute_of_the_next_micro_batch_is_issued_before_the_wait_of_the_previous(n: int) -> None:
    log, outputs = _recorded_run(n)
    at = {event: k for k, event in enumerate(log)}
    assert len(at) == len(log) == 3 * 3 * n, "an event happened twice"
    ops = ("all_reduce", "all_to_all", "all_gather")
    for s, op in enumerate(ops):
        for i in range(n):
            assert at["compute", op, i] < at["issue", op, i] < at["wait", op, i]
            if i + 1 < n:
                assert at["compute", op, i + 1] < at["wait", op, i], (op, i)
            if s > 0:  # a stage's input is the previous stage's communicated output
                assert at["wait", ops[s - 1], i] < at["compute", op, i]
    assert [int(o[0]) for o in outputs] == list(range(n))


def test_one_micro_batch_is_the_plain_sequential_path() -> None:
    log, _ = _recorded_run(1)
    kinds = [kind for kind, _, _ in log]
    assert kinds == ["compute", "issue", "wait"] * 3


def test_overlap_stats_accumulate_and_compute_only_stages_pass_values_through(monkeypatch) -> None:
    """A fake clock advanced 1 s per compute call and 10 s per blocking wait: the stats
    attribute exactly the compute to compute_s and the exposed communication to wait_s."""
    now = [0.0]
    monkeypatch.setattr(parallel, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def tick(seconds: float, value: Any) -> Any:
        now[0] += seconds
        return value

    class Blocking:  # a communication still in flight: its wait blocks for 10 s
        def __init__(self, value: Any):
            self.value = value

        def wait(self) -> Any:
            return tick(10.0, self.value)

    stats = OverlapStats()
    stages = [
        Stage(lambda i, x: tick(1.0, x * 2)),
        Stage(lambda i, x: tick(1.0, x + i), lambda i, y: AllOf(Ready(y), Blocking(-y))),
    ]
    assert run_overlapped([1, 10], stages, stats) == [[2, -2], [21, -21]]
    assert (stats.runs, stats.compute_s, stats.wait_s) == (1, 4.0, 20.0)  # 2 x 2 computes, 2 waits
    run_overlapped([1], stages, stats)
    assert (stats.runs, stats.compute_s, stats.wait_s) == (2, 6.0, 30.0)


# ============================================================================ split rules


def test_split_rules() -> None:
    assert even_split(7, 2) == [4, 3]
    assert even_split(1, 3) == [1, 0, 0]  # empty micro-batches keep every rank's count equal
    assert aligned_split(128)(1000, 2) == [512, 488]
    assert aligned_split(2)(10, 2) == [6, 4]
    assert aligned_split(4)(3, 2) == [0, 3]
    assert aligned_split(8)(100, 3) == [32, 32, 36]
    assert TokenSplit().sizes(9) == [5, 4]
    assert TokenSplit(min_tokens=16).sizes(9) == [9]  # tiny batches take the plain path
    assert TokenSplit(micro_batches=1).sizes(9) == [9]
    with pytest.raises(ValueError, match=r"split rule gave \[3, 3\] for 9 tokens"):
        TokenSplit(rule=lambda n, parts: [3] * parts).sizes(9)
    with pytest.raises(ValueError, match="micro_batches must be >= 1"):
        TokenSplit(micro_batches=0)


# ============================================================================ overlap schedule: numerics


def _rms_norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _mlp_weights(layers: int, hidden: int, inter: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(hidden, inter, generator=g, dtype=F64), torch.randn(inter, hidden, generator=g, dtype=F64) / 4)
        for _ in range(layers)
    ]


def _tokenweave_stages(comm: Communicator, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> list[Stage]:
    """Per layer: column/row-parallel MLP -> reduce-scatter -> residual + RMSNorm on the local
    token shard -> all-gather (the fused AR-RMSNorm of TokenWeave)."""
    r, w = comm.rank, comm.world_size
    stages = []
    for w1, w2 in weights:
        cols = w1.shape[1] // w
        w1_r, w2_r = w1[:, r * cols : (r + 1) * cols], w2[r * cols : (r + 1) * cols]

        def mlp(i: int, x: torch.Tensor, w1_r=w1_r, w2_r=w2_r) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.relu(x @ w1_r) @ w2_r, x  # partial sum [t, H], residual [t, H]

        def reduce_scatter(i: int, y: tuple[torch.Tensor, torch.Tensor]) -> Pending[list[torch.Tensor]]:
            partial, x = y
            shard = x.shape[0] // w
            return AllOf(comm.reduce_scatter_async(partial), Ready(x[r * shard : (r + 1) * shard]))

        def norm(i: int, parts: list[torch.Tensor]) -> torch.Tensor:
            reduced, residual = parts
            return _rms_norm(reduced + residual)  # [t / W, H]

        stages += [Stage(mlp, reduce_scatter), Stage(norm, lambda i, h: comm.all_gather_async(h))]
    return stages


def _tokenweave_reference(x: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    for w1, w2 in weights:
        x = _rms_norm(x + torch.relu(x @ w1) @ w2)
    return x


@pytest.mark.parametrize(
    ("tokens", "split"),
    [(12, TokenSplit()), (10, TokenSplit(rule=aligned_split(2))), (12, TokenSplit(micro_batches=1))],
    ids=["halves", "aligned", "unsplit"],
)
@BACKENDS
def test_tokenweave_schedule_matches_the_unsplit_computation(tokens: int, split: TokenSplit, backend: str) -> None:
    weights = _mlp_weights(layers=2, hidden=8, inter=16)
    x = torch.randn(tokens, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    comms = comms_of(backend, 2)
    stats = [OverlapStats(), OverlapStats()]
    out = run_ranks(lambda r: run_token_split(x.clone(), _tokenweave_stages(comms[r], weights), split, stats[r]))
    want = _tokenweave_reference(x, weights)
    for r in (0, 1):
        torch.testing.assert_close(out[r], want, rtol=1e-12, atol=1e-12)
        assert stats[r].runs == 1


@BACKENDS
def test_ep_dispatch_and_combine_through_the_schedule_match_local_experts(backend: str) -> None:
    """Data-parallel tokens, expert e on rank e, top-1 routing; rank 1 has a single token, so
    its second micro-batch is empty and still takes part in both all-to-alls."""
    hidden = 4
    g = torch.Generator().manual_seed(2)
    experts = torch.randn(2, hidden, hidden, generator=g, dtype=F64)  # [E=2, H, H]
    tokens = [torch.randn(7, hidden, generator=g, dtype=F64), torch.randn(1, hidden, generator=g, dtype=F64)]
    choice = [torch.tensor([1, 0, 1, 1, 0, 0, 1]), torch.tensor([0])]  # expert id per token
    comms = comms_of(backend, 2)

    def rank_fn(r: int) -> torch.Tensor:
        comm = comms[r]
        sizes = even_split(tokens[r].shape[0], 2)
        ids = list(torch.split(choice[r], sizes))

        def permute(i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            order = torch.argsort(ids[i], stable=True)  # tokens grouped by destination rank
            return x[order], order

        def dispatch(i: int, y: tuple[torch.Tensor, torch.Tensor]) -> Pending[list[Any]]:
            x_sorted, order = y
            send = torch.bincount(ids[i], minlength=2).tolist()
            recv = comm.exchange_splits(send)
            return AllOf(comm.all_to_all_async(x_sorted, send, recv), Ready((send, recv, order)))

        def expert(i: int, parts: list[Any]) -> tuple[torch.Tensor, Any]:
            received, meta = parts
            return received @ experts[r], meta  # this rank holds expert r

        def combine(i: int, y: tuple[torch.Tensor, Any]) -> Pending[list[Any]]:
            out, (send, recv, order) = y
            return AllOf(comm.all_to_all_async(out, recv, send), Ready(order))

        def unpermute(i: int, parts: list[Any]) -> torch.Tensor:
            combined, order = parts
            return combined[torch.argsort(order)]

        stages = [Stage(permute, dispatch), Stage(expert, combine), Stage(unpermute)]
        return run_token_split(tokens[r], stages, TokenSplit(micro_batches=2))

    out = run_ranks(rank_fn)
    for r in (0, 1):
        want = torch.stack([t @ experts[e] for t, e in zip(tokens[r], choice[r].tolist(), strict=True)])
        torch.testing.assert_close(out[r], want, rtol=1e-12, atol=1e-12)


@BACKENDS
def test_lamina_rotation_with_send_recv_matches_local_attention(backend: str) -> None:
    """Rank 0 is the model worker (dense parts), rank 1 the attention worker: per layer each
    micro-batch sends q and receives the attention output, while the other micro-batch computes."""
    layers, hidden, tokens = 2, 6, 9
    g = torch.Generator().manual_seed(3)
    wq = torch.randn(layers, hidden, hidden, generator=g, dtype=F64) / 3
    wo = torch.randn(layers, hidden, hidden, generator=g, dtype=F64) / 3
    x = torch.randn(tokens, hidden, generator=g, dtype=F64)
    split = TokenSplit(micro_batches=2)
    sizes = split.sizes(tokens)

    def attention(q: torch.Tensor) -> torch.Tensor:  # the remote side's work
        return torch.tanh(q)

    def model_worker(comm: Communicator) -> torch.Tensor:
        stages = []
        for layer in range(layers):

            def project(i: int, h: torch.Tensor, layer=layer) -> tuple[torch.Tensor, torch.Tensor]:
                return h @ wq[layer], h

            def remote(i: int, y: tuple[torch.Tensor, torch.Tensor], layer=layer) -> Pending[list[Any]]:
                q, h = y
                tag = layer * 8 + i
                sent = comm.send_async(q, 1, tag)
                return AllOf(sent, comm.recv_async(torch.empty_like(q), 1, tag), Ready(h))

            def output(i: int, parts: list[Any], layer=layer) -> torch.Tensor:
                _, attn, h = parts
                return h + attn @ wo[layer]

            stages += [Stage(project, remote), Stage(output)]
        return run_token_split(x.clone(), stages, split)

    def attention_worker(comm: Communicator) -> None:
        for layer in range(layers):
            for i, n in enumerate(sizes):
                q = comm.recv(torch.empty(n, hidden, dtype=F64), 0, layer * 8 + i)
                comm.send(attention(q), 0, layer * 8 + i)

    comms = comms_of(backend, 2)
    out = run_ranks(lambda r: model_worker(comms[0]) if r == 0 else attention_worker(comms[1]))[0]
    want = x
    for layer in range(layers):
        want = want + attention(want @ wq[layer]) @ wo[layer]
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
