"""A tensor-parallel follower rank in another process, without Ray (engine/runtime/tp_follower.py):
its shard loads before any group exists (DeferredCommunicator), it applies rank 0's numbered
calls in number order whatever order they arrive in, a failed call surfaces at rank 0
(TPLeaderEngine.step raises TPFollowerFailed naming it) and at the controller (ping), and a
request's stop checker crosses the boundary as data, rebuilt with the follower's tokenizer."""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, field

import pytest
import torch

from engine.engine import StepResult
from engine.parallel import CommunicationError, DeferredCommunicator, LocalCommunicator
from engine.request import Request, SamplingParams
from engine.runtime.groups import GroupSpec, free_port, join_deferred
from engine.runtime.tensor_parallel import Abort, AddRequest, Admit, Step, TPFollowerFailed, TPLeaderEngine
from engine.runtime.tp_follower import RemoteFollower, StopState, TPFollowerWorker, WireCall, from_wire, to_wire
from engine.tokenizer import IncrementalDetokenizer
from engine.types import EngineStopped

WIDE = {"num_attention_heads": 16, "num_key_value_heads": 8, "hidden_size": 128, "intermediate_size": 256}
ENGINE = {"block_size": 8, "num_blocks": 32, "attention_backend": "sdpa", "skip_tokenizer_init": True}


def _req(rid: str, n: int = 5) -> Request:
    return Request(rid, list(range(3, 3 + n)), SamplingParams(max_tokens=4, temperature=0.0))


# ---------------------------------------------------------------- DeferredCommunicator
def test_deferred_communicator_refuses_ops_before_connect_and_a_connect_of_another_rank() -> None:
    comm = DeferredCommunicator(0, 1, "cpu", name="tp/x")
    assert (comm.rank, comm.world_size, comm.device, comm.connected) == (0, 1, torch.device("cpu"), False)
    with pytest.raises(CommunicationError, match=r"all_reduce on 'tp/x' rank 0/1 before connect\(\)"):
        comm.all_reduce(torch.ones(2))
    with pytest.raises(ValueError, match=r"connect got rank 0/1 on cpu, this rank was built as 1/2 on cpu"):
        DeferredCommunicator(1, 2, "cpu", name="tp/x").connect(LocalCommunicator())
    comm.connect(LocalCommunicator())
    x = torch.arange(4.0)
    assert comm.connected and torch.equal(comm.all_gather(x), x)  # delegated: world size 1 is the identity
    with pytest.raises(RuntimeError, match="already connected"):
        comm.connect(LocalCommunicator())
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, 2\)"):
        DeferredCommunicator(2, 2)


def test_join_deferred_refuses_another_rank_before_joining_and_connects_its_own() -> None:
    comm = DeferredCommunicator(0, 1, "cpu", name="tp/x")
    wrong = GroupSpec("tp/x", 1, 2, "127.0.0.1", free_port("127.0.0.1"), "gloo", 5.0, local_host="127.0.0.1")
    with pytest.raises(ValueError, match=r"'tp/x': this rank was built as rank 0 of 1, asked to join as rank 1 of 2"):
        join_deferred(comm, wrong)  # refused before any rendezvous: it would wait for a peer
    assert not comm.connected
    right = GroupSpec("tp/x", 0, 1, "127.0.0.1", free_port("127.0.0.1"), "gloo", 5.0, local_host="127.0.0.1")
    join_deferred(comm, right)  # a real gloo group of one
    x = torch.arange(3.0)
    assert comm.connected and torch.equal(comm.all_reduce(x.clone()), x)


# ---------------------------------------------------------------- the follower rank
@pytest.fixture(scope="module")
def follower_ckpt(tiny_checkpoint) -> str:
    return tiny_checkpoint("llama", vocab_size=515, **WIDE)


def _applied(worker: TPFollowerWorker) -> None:
    worker.shutdown()  # Stop after every call handed over: returns once they ran


def test_a_follower_loads_its_shard_without_a_group_and_applies_calls_in_number_order(follower_ckpt) -> None:
    worker = TPFollowerWorker(follower_ckpt, ENGINE, rank=1, world_size=2, worker_id="mixed-0")
    assert worker.worker_id == "mixed-0/tp1" and not worker.comm.connected
    assert worker.engine.layout.num_kv_heads == 4  # rank 1's half of the 8 KV heads
    # rank 0 sent: add a, add b, abort a. They arrive 3, 1, 2: applied in arrival order the
    # abort would come first (a no-op) and a would stay.
    worker.submit(3, Abort("a"))
    assert worker.stats().applied == 0  # parked until 1 and 2 arrive
    worker.submit(1, AddRequest(_req("a")))
    with pytest.raises(ValueError, match=r"mixed-0/tp1: call 1 arrived twice"):
        worker.submit(1, AddRequest(_req("a")))
    worker.submit(2, AddRequest(_req("b")))
    assert worker.stats().applied == 3
    _applied(worker)
    assert [r.request_id for r in worker.engine.scheduler.waiting] == ["b"]
    stats = worker.stats()
    assert (stats.error, stats.free_blocks, stats.total_blocks) == (None, 32, 32)


def test_a_failed_call_surfaces_at_the_next_submit_the_check_and_the_ping(follower_ckpt) -> None:
    worker = TPFollowerWorker(follower_ckpt, ENGINE, rank=1, world_size=2, worker_id="mixed-0")
    assert worker.ping() == "mixed-0/tp1"
    worker.submit(1, Admit("never-reserved", 7))  # raises in the apply thread
    deadline = time.monotonic() + 10.0
    while worker.check() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # poll interval
    failure = worker.check()
    assert failure is not None and "never-reserved" in failure, failure
    with pytest.raises(TPFollowerFailed, match=r"mixed-0/tp1: .*never-reserved"):
        worker.submit(2, Step())
    with pytest.raises(EngineStopped, match="never-reserved"):
        worker.ping()
    assert worker.stats().error == failure
    worker.shutdown()


# ---------------------------------------------------------------- rank 0's side
@dataclass
class FakeChannel:
    """A FollowerChannel that records what it was sent and fails as told."""

    sent: list[tuple[int, WireCall]] = field(default_factory=list)
    failed_sends: list[str] = field(default_factory=list)
    answer: str | None = None
    asked: int = 0

    def send(self, seq: int, call: WireCall) -> None:
        self.sent.append((seq, call))

    def failures(self) -> list[str]:
        return list(self.failed_sends)

    def ask(self, timeout_s: float) -> str | None:
        self.asked += 1
        return self.answer


class StubCore:
    """Rank 0's EngineCore as far as TPLeaderEngine's step and writes go."""

    config = None
    layout = None

    def __init__(self, step_error: BaseException | None = None):
        self.step_error = step_error
        self.steps = 0

    def step(self, layer_hook=None, gather_kv=False):
        self.steps += 1
        if self.step_error is not None:
            raise self.step_error
        return StepResult()

    def abort(self, request_id: str):
        return None


def test_rank_0_numbers_its_calls_and_does_not_step_once_a_follower_failed() -> None:
    channel = FakeChannel()
    leader = TPLeaderEngine(StubCore(), [RemoteFollower("mixed-0/tp1", channel)])  # type: ignore[arg-type]
    leader.abort("a")
    leader.step()
    assert [(seq, type(c).__name__) for seq, c in channel.sent] == [(1, "Abort"), (2, "Step")]
    channel.failed_sends.append("TPFollowerFailed: KeyError: 'x'")  # its submit of call 2 raised
    with pytest.raises(TPFollowerFailed, match=r"^mixed-0/tp1: TPFollowerFailed: KeyError: 'x'$"):
        leader.step()
    assert leader.core.steps == 1 and len(channel.sent) == 2  # no collective issued that could only time out


def test_rank_0_names_the_follower_when_its_own_collective_fails() -> None:
    channel = FakeChannel(answer="RuntimeError: shard exploded")
    core = StubCore(CommunicationError("all_reduce timed out after 0:00:02"))
    leader = TPLeaderEngine(core, [RemoteFollower("mixed-0/tp1", channel)])  # type: ignore[arg-type]
    with pytest.raises(TPFollowerFailed, match=r"mixed-0/tp1: RuntimeError: shard exploded \(rank 0: all_reduce") as e:
        leader.step()
    assert isinstance(e.value.__cause__, CommunicationError) and channel.asked == 1
    # a follower that answers "fine" leaves rank 0's own error as it is
    quiet = TPLeaderEngine(StubCore(CommunicationError("peer reset")), [RemoteFollower("f", FakeChannel())])  # type: ignore[arg-type]
    with pytest.raises(CommunicationError, match="peer reset"):
        quiet.step()


def test_a_follower_that_cannot_answer_is_reported_as_such() -> None:
    class Gone(FakeChannel):
        def ask(self, timeout_s: float) -> str | None:
            raise RuntimeError("actor gone: RayActorError")

    leader = TPLeaderEngine(StubCore(CommunicationError("x")), [RemoteFollower("m/tp1", Gone())])  # type: ignore[arg-type]
    with pytest.raises(TPFollowerFailed, match=r"m/tp1: did not answer: RuntimeError: actor gone"):
        leader.step()


# ---------------------------------------------------------------- stop checkers cross as data
class CharTokenizer:
    """decode = one character per id; holds something unpicklable, like a real tokenizer's handle."""

    def __init__(self):
        self.handle = lambda: None  # not picklable: proves the tokenizer is never sent

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_a_stop_checker_travels_as_its_stop_strings_and_fed_tokens() -> None:
    tok = CharTokenizer()
    req = _req("s")
    req.stop_checker = IncrementalDetokenizer(tok, ("cd",))  # type: ignore[arg-type]
    for t in (0, 1, 2):
        req.stop_checker.append(t)  # "abc": one token short of the stop string
    wire = to_wire(AddRequest(req))
    assert wire.stop == StopState(("cd",), (0, 1, 2))  # type: ignore[union-attr]
    sent = pickle.loads(pickle.dumps(wire))  # what a process boundary does
    call = from_wire(sent, tok)  # type: ignore[arg-type]
    assert isinstance(call, AddRequest) and call.request.stop_checker is not None
    assert call.request.stop_checker.text == "abc" and call.request.stop_checker.append(3)  # "abcd" stops
    assert req.stop_checker.append(3)  # as rank 0's own does
    with pytest.raises(ValueError, match="has stop strings but this follower has no tokenizer"):
        from_wire(pickle.loads(pickle.dumps(wire)), None)
    plain = AddRequest(_req("p"))
    assert to_wire(plain) is plain  # nothing to strip
