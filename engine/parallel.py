"""Communicators and the one micro-batch overlap schedule, shared by tensor parallelism
(TokenWeave), attention offload (Lamina rotation) and expert parallelism (all-to-all dispatch).

The engine never creates a process group: a worker's runtime joins one
(engine/runtime/groups.py) and injects a ``Communicator`` into whatever needs it, like
gpt-fast's model that does not know it is distributed. ``LocalCommunicator`` is world size 1.

Communicator contract (every rank of a group):
- Collectives pair up by issue order: every rank issues the same collectives in the same order
  (the overlap schedule below is deterministic, so it keeps that invariant).
- Every op consumes its input tensor: the result may be the input itself (all_reduce reduces in
  place; LocalCommunicator returns inputs unchanged), and an async op's input must not be
  written until ``wait()`` returned. Always use the returned tensor.
- Tensors live on ``communicator.device`` (CPU for gloo, the current CUDA device for NCCL).
- A failed op raises ``CommunicationError``. ``TorchDistCommunicator`` bounds every op by its
  timeout, so a dead or hung peer fails the caller within seconds. After a failure the group is
  unusable (gloo closes the pair); the worker is failed and its group formed again.

Shapes: W = world_size, N = tokens (dim 0), "..." = the trailing dims, equal on every rank.
"""

from __future__ import annotations

import datetime
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import AllgatherOptions
from torch._C._distributed_c10d import Backend as _Backend

# A joined group: the gloo/NCCL backend object engine/runtime/groups.py returns, or a
# torch.distributed.ProcessGroup created elsewhere (same methods).
ProcessGroup = _Backend | dist.ProcessGroup

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class CommunicationError(RuntimeError):
    """A collective or point-to-point op failed (peer died, timed out, group broken)."""


class Pending(Protocol[T_co]):
    """An op in flight. ``wait()`` blocks until it is done (or raises CommunicationError) and
    returns its result; calling it again returns the same result."""

    def wait(self) -> T_co: ...


class Ready(Generic[T]):
    """A Pending that is already done (world size 1, or compute-only stages)."""

    def __init__(self, value: T):
        self.value = value

    def wait(self) -> T:
        return self.value


class AllOf:
    """Waits several ops, in order; returns their results as a list. Lamina's rotation sends
    q/k/v and receives the attention output as one pending step: ``AllOf(*sends, recv)``."""

    def __init__(self, *parts: Pending[Any]):
        self.parts = parts

    def wait(self) -> list[Any]:
        return [p.wait() for p in self.parts]


class Communicator(ABC):
    """The communicator every distributed feature uses. Subclasses implement the ``_start_*``
    ops (issue, return a Pending); this class validates arguments and gives the blocking forms."""

    @property
    @abstractmethod
    def rank(self) -> int: ...

    @property
    @abstractmethod
    def world_size(self) -> int: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    # ------------------------------------------------------------------ async forms
    def all_reduce_async(self, x: torch.Tensor) -> Pending[torch.Tensor]:
        """x: [...] -> [...], the elementwise sum over ranks (in place where possible)."""
        self._check_tensor("all_reduce", x)
        return self._start_all_reduce(x)

    def reduce_scatter_async(self, x: torch.Tensor) -> Pending[torch.Tensor]:
        """x: [N, ...] with N % W == 0 -> [N / W, ...]: rank r gets rows [r*N/W, (r+1)*N/W) of
        the sum over ranks."""
        self._check_tensor("reduce_scatter", x, dim0=True)
        if x.shape[0] % self.world_size:
            raise ValueError(
                f"reduce_scatter: x.shape[0]={x.shape[0]} is not divisible by world_size={self.world_size}"
            )
        return self._start_reduce_scatter(x)

    def all_gather_async(self, x: torch.Tensor) -> Pending[torch.Tensor]:
        """x: [n, ...] (same n on every rank) -> [W * n, ...], rank r's rows at [r*n, (r+1)*n)."""
        self._check_tensor("all_gather", x, dim0=True)
        return self._start_all_gather(x)

    def all_to_all_async(
        self, x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int] | None = None
    ) -> Pending[torch.Tensor]:
        """x: [sum(send_splits), ...]; rows [off_p, off_p + send_splits[p]) go to rank p.
        -> [sum(recv_splits), ...], the rows from rank p at [off'_p, off'_p + recv_splits[p]).
        ``recv_splits=None`` learns them first with ``exchange_splits`` (a blocking exchange of
        W ints: the variable per-peer token counts of EP dispatch), then issues the data."""
        self._check_tensor("all_to_all", x, dim0=True)
        send = self._check_splits("all_to_all send_splits", send_splits)
        if sum(send) != x.shape[0]:
            raise ValueError(f"all_to_all: sum(send_splits)={sum(send)} != x.shape[0]={x.shape[0]}")
        recv = self.exchange_splits(send) if recv_splits is None else self._check_splits("recv_splits", recv_splits)
        return self._start_all_to_all(x, send, recv)

    def send_async(self, x: torch.Tensor, dst: int, tag: int = 0) -> Pending[None]:
        """x: any shape, to rank dst; the peer posts a recv of the same shape/dtype and tag."""
        self._check_tensor("send", x)
        self._check_peer("send", dst)
        return self._start_send(x, dst, tag)

    def recv_async(self, out: torch.Tensor, src: int, tag: int = 0) -> Pending[torch.Tensor]:
        """Fills ``out`` (contiguous, shape/dtype of the matching send) from rank src; returns it."""
        self._check_tensor("recv", out)
        self._check_peer("recv", src)
        if not out.is_contiguous():
            raise ValueError("recv: out must be contiguous (it is written in place)")
        return self._start_recv(out, src, tag)

    # ------------------------------------------------------------------ blocking forms
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_async(x).wait()

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce_scatter_async(x).wait()

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_gather_async(x).wait()

    def all_to_all(
        self, x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int] | None = None
    ) -> torch.Tensor:
        return self.all_to_all_async(x, send_splits, recv_splits).wait()

    def send(self, x: torch.Tensor, dst: int, tag: int = 0) -> None:
        self.send_async(x, dst, tag).wait()

    def recv(self, out: torch.Tensor, src: int, tag: int = 0) -> torch.Tensor:
        return self.recv_async(out, src, tag).wait()

    def exchange_splits(self, send_splits: Sequence[int]) -> list[int]:
        """send_splits[p] = rows this rank sends to p -> recv_splits[p] = rows p sends here."""
        send = self._check_splits("exchange_splits send_splits", send_splits)
        counts = torch.tensor(send, dtype=torch.int64, device=self.device)  # [W]
        ones = [1] * self.world_size
        return [int(n) for n in self._start_all_to_all(counts, ones, ones).wait().tolist()]

    def close(self) -> None:
        """Releases this rank's channels once its owner is done with the group (after the last
        op; peers' later ops fail). Default: nothing to release (a torch.distributed group is
        dropped with its last reference)."""
        return None

    # ------------------------------------------------------------------ implementations
    @abstractmethod
    def _start_all_reduce(self, x: torch.Tensor) -> Pending[torch.Tensor]: ...

    @abstractmethod
    def _start_reduce_scatter(self, x: torch.Tensor) -> Pending[torch.Tensor]: ...

    @abstractmethod
    def _start_all_gather(self, x: torch.Tensor) -> Pending[torch.Tensor]: ...

    @abstractmethod
    def _start_all_to_all(
        self, x: torch.Tensor, send_splits: list[int], recv_splits: list[int]
    ) -> Pending[torch.Tensor]: ...

    @abstractmethod
    def _start_send(self, x: torch.Tensor, dst: int, tag: int) -> Pending[None]: ...

    @abstractmethod
    def _start_recv(self, out: torch.Tensor, src: int, tag: int) -> Pending[torch.Tensor]: ...

    # ------------------------------------------------------------------ validation
    def _check_tensor(self, op: str, x: torch.Tensor, dim0: bool = False) -> None:
        if x.device.type != self.device.type:
            raise ValueError(f"{op}: tensor on {x.device}, this communicator's tensors live on {self.device}")
        if dim0 and x.dim() == 0:
            raise ValueError(f"{op}: needs a tensor with a token dim 0, got a scalar")

    def _check_splits(self, what: str, splits: Sequence[int]) -> list[int]:
        out = [int(s) for s in splits]
        if len(out) != self.world_size or any(s < 0 for s in out):
            raise ValueError(f"{what} must be {self.world_size} non-negative counts, got {out}")
        return out

    def _check_peer(self, op: str, peer: int) -> None:
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise ValueError(f"{op}: peer {peer} is not another rank (rank {self.rank}, world size {self.world_size})")


class RankedCommunicator(Communicator):
    """A Communicator whose rank, world size and device are fixed when it is built (every
    implementation but test stand-ins): subclasses call ``__init__`` with them."""

    def __init__(self, rank: int, world_size: int, device: torch.device | str):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"{type(self).__name__}: rank {rank} is not in [0, {world_size})")
        self._rank, self._world_size, self._device = rank, world_size, torch.device(device)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def device(self) -> torch.device:
        return self._device


class LocalCommunicator(RankedCommunicator):
    """World size 1: every collective is the identity and returns its input; there is no peer
    to send to or receive from. No torch.distributed involved."""

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__(0, 1, device)

    def _start_all_reduce(self, x: torch.Tensor) -> Pending[torch.Tensor]:
        return Ready(x)

    def _start_reduce_scatter(self, x: torch.Tensor) -> Pending[torch.Tensor]:
        return Ready(x)

    def _start_all_gather(self, x: torch.Tensor) -> Pending[torch.Tensor]:
        return Ready(x)

    def _start_all_to_all(
        self, x: torch.Tensor, send_splits: list[int], recv_splits: list[int]
    ) -> Pending[torch.Tensor]:
        if recv_splits != send_splits:
            raise ValueError(f"all_to_all on one rank receives what it sends: {recv_splits} != {send_splits}")
        return Ready(x)

    def _start_send(self, x: torch.Tensor, dst: int, tag: int) -> Pending[None]:
        raise AssertionError("unreachable: _check_peer refuses every peer at world size 1")

    def _start_recv(self, out: torch.Tensor, src: int, tag: int) -> Pending[torch.Tensor]:
        raise AssertionError("unreachable: _check_peer refuses every peer at world size 1")


class _TorchWork(Generic[T]):
    """A torch ``Work`` in flight. Holds the op's tensors until waited (the backend reads and
    writes them meanwhile). On CPU, ``wait`` blocks at most ``timeout``; on CUDA it orders the
    current stream after the op without blocking the host (NCCL's watchdog enforces the
    group's timeout there)."""

    def __init__(self, comm: TorchDistCommunicator, op: str, work: Any, result: T, keep: tuple[torch.Tensor, ...]):
        self._comm, self._op, self._work, self._result, self._keep = comm, op, work, result, keep
        self._done = False

    def wait(self) -> T:
        if not self._done:
            comm = self._comm
            try:
                ok = self._work.wait(comm.timeout) if comm.device.type == "cpu" else self._work.wait()
            except RuntimeError as e:
                raise CommunicationError(f"{self._op} failed on {comm.describe()}: {e}") from e
            if ok is False:
                raise CommunicationError(f"{self._op} timed out after {comm.timeout} on {comm.describe()}")
            self._done, self._keep = True, ()
        return self._result


class TorchDistCommunicator(RankedCommunicator):
    """A Communicator over an already-joined torch.distributed group (it never creates one:
    see engine/runtime/groups.py). Calls the group's own methods, so groups outside
    torch.distributed's global registry work.

    ``timeout_s`` bounds every collective (per-op option) and every wait on CPU; join the group
    with the same value so that send/recv, which take no per-op timeout, agree.
    ``device``: where tensors live; None infers it from the backend (gloo: CPU, NCCL: the
    current CUDA device)."""

    def __init__(
        self, group: ProcessGroup, *, timeout_s: float, name: str = "group", device: torch.device | None = None
    ):
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s}")
        self.group = group
        self.name = name
        self.timeout = datetime.timedelta(seconds=timeout_s)
        if device is None:
            backend = group.name()
            if backend == "gloo":
                device = torch.device("cpu")
            elif backend == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            else:
                raise ValueError(f"cannot infer the tensor device of a {backend!r} group: pass device=")
        super().__init__(group.rank(), group.size(), device)

    def describe(self) -> str:
        return f"{self.name!r} rank {self._rank}/{self._world_size}"

    def _issue(self, op: str, start: Callable[[], Any], result: T, *keep: torch.Tensor) -> _TorchWork[T]:
        try:
            work = start()
        except RuntimeError as e:  # a broken pair refuses new ops at once
            raise CommunicationError(f"{op} failed on {self.describe()}: {e}") from e
        return _TorchWork(self, op, work, result, keep)

    def _start_all_reduce(self, x: torch.Tensor) -> Pending[torch.Tensor]:
        x = x.contiguous()
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        opts.timeout = self.timeout
        return self._issue("all_reduce", lambda: self.group.allreduce([x], opts), x, x)

    def _start_reduce_scatter(self, x: torch.Tensor) -> Pending[torch.Tensor]:
        x = x.contiguous()
        out = x.new_empty((x.shape[0] // self._world_size, *x.shape[1:]))
        opts = dist.ReduceScatterOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        opts.timeout = self.timeout
        return self._issue("reduce_scatter", lambda: self.group._reduce_scatter_base(out, x, opts), out, x, out)

    def _start_all_gather(self, x: torch.Tensor) -> Pending[torch.Tensor]:
        x = x.contiguous()
        out = x.new_empty((x.shape[0] * self._world_size, *x.shape[1:]))
        opts = AllgatherOptions()
        opts.timeout = self.timeout
        return self._issue("all_gather", lambda: self.group._allgather_base(out, x, opts), out, x, out)

    def _start_all_to_all(
        self, x: torch.Tensor, send_splits: list[int], recv_splits: list[int]
    ) -> Pending[torch.Tensor]:
        x = x.contiguous()
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        opts = dist.AllToAllOptions()
        opts.timeout = self.timeout

        def start() -> Any:
            return self.group.alltoall_base(out, x, recv_splits, send_splits, opts)

        return self._issue("all_to_all", start, out, x, out)

    def _start_send(self, x: torch.Tensor, dst: int, tag: int) -> Pending[None]:
        x = x.contiguous()
        return self._issue(f"send to {dst}", lambda: self.group.send([x], dst, tag), None, x)

    def _start_recv(self, out: torch.Tensor, src: int, tag: int) -> Pending[torch.Tensor]:
        return self._issue(f"recv from {src}", lambda: self.group.recv([out], src, tag), out, out)


class DeferredCommunicator(RankedCommunicator):
    """A rank's communicator whose group is joined after the rank was built.

    Lifecycle: ``DeferredCommunicator(rank, world_size, device)`` (what a model shard needs to
    load: engine/models/tensor_parallel.load_tp_engine_model reads only rank and world size,
    and building an EngineCore issues no collective) -> ``connect(comm)`` once the group is
    joined (engine/runtime/groups.py; the comm's rank, world size and device type must match)
    -> every op delegates to ``comm``. An op before ``connect`` raises CommunicationError
    naming the rank; ``connect`` twice raises (a broken group is replaced, never re-joined)."""

    def __init__(self, rank: int, world_size: int, device: torch.device | str = "cpu", name: str = "group"):
        super().__init__(rank, world_size, device)
        self.name = name
        self._comm: Communicator | None = None

    @property
    def connected(self) -> bool:
        return self._comm is not None

    def connect(self, comm: Communicator) -> None:
        """Attach the joined group's communicator (ValueError if it is another rank's, group size's
        or device type's; RuntimeError if already connected)."""
        if self._comm is not None:
            raise RuntimeError(f"{self.name!r} rank {self._rank} is already connected")
        got = (comm.rank, comm.world_size, comm.device.type)
        want = (self._rank, self._world_size, self._device.type)
        if got != want:
            raise ValueError(
                f"{self.name!r}: connect got rank {got[0]}/{got[1]} on {got[2]}, this rank was built as "
                f"{want[0]}/{want[1]} on {want[2]}"
            )
        self._comm = comm

    def _inner(self, op: str) -> Communicator:
        if self._comm is None:
            raise CommunicationError(f"{op} on {self.name!r} rank {self._rank}/{self._world_size} before connect()")
        return self._comm

    def _start_all_reduce(self, x: torch.Tensor) -> Pending[torch.Tensor]:
        return self._inner("all_reduce").all_reduce_async(x)

    def _start_reduce_scatter(self, x: torch.Tensor) -> Pending[torch.Tensor]:
        return self._inner("reduce_scatter").reduce_scatter_async(x)

    def _start_all_gather(self, x: torch.Tensor) -> Pending[torch.Tensor]:
        return self._inner("all_gather").all_gather_async(x)

    def _start_all_to_all(
        self, x: torch.Tensor, send_splits: list[int], recv_splits: list[int]
    ) -> Pending[torch.Tensor]:
        return self._inner("all_to_all").all_to_all_async(x, send_splits, recv_splits)

    def _start_send(self, x: torch.Tensor, dst: int, tag: int) -> Pending[None]:
        return self._inner("send").send_async(x, dst, tag)

    def _start_recv(self, out: torch.Tensor, src: int, tag: int) -> Pending[torch.Tensor]:
        return self._inner("recv").recv_async(out, src, tag)

    def close(self) -> None:
        """Closes the joined group's communicator (nothing before ``connect``)."""
        if self._comm is not None:
            self._comm.close()


# ============================================================================ communication worker


class _FuturePending(Generic[T]):
    def __init__(self, future: Future[T]):
        self._future = future

    def wait(self) -> T:
        return self._future.result()  # re-raises the job's exception (e.g. CommunicationError)


class CommWorker:
    """One thread that runs submitted jobs one at a time, in submission order: a
    "communication stream" for chains of collectives with a little compute between them,
    such as TokenWeave's fused AR-RMSNorm (reduce-scatter -> RMSNorm on the token shard ->
    all-gather), which must overlap the caller's compute as one unit.

    Ordering invariant: while jobs that issue collectives on a communicator are in flight,
    only this worker issues collectives on it (so every rank issues them in the same order:
    the order of its deterministic submissions). A job's blocking ops are bounded by the
    communicator's timeout, so ``wait()`` never hangs on a dead peer; it re-raises what the
    job raised. Lifecycle: created by its owner, ``close()`` joins the thread."""

    def __init__(self, name: str = "comm"):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def submit(self, job: Callable[[], T]) -> Pending[T]:
        """Queues ``job``; it runs under the caller's grad and inference modes (thread-local in
        torch: a bare worker thread would record autograd graphs for an inference caller)."""
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def run() -> T:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return job()

        return _FuturePending(self._pool.submit(run))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


# ============================================================================ overlap schedule


@dataclass(frozen=True)
class Stage:
    """One step of a micro-batch's pipeline: ``compute(i, x) -> y`` runs on the calling thread
    (i = micro-batch index), then ``communicate(i, y)`` issues the async op on y and returns its
    Pending at once; what that Pending yields is the next stage's x. ``communicate=None``: a
    compute-only stage.

    - TokenWeave:  Stage(row-parallel matmul, reduce_scatter_async)
                   -> Stage(RMSNorm on the local shard, all_gather_async) -> next layer ...
    - Lamina:      Stage(dense part up to q/k/v, AllOf(send q, k, v; recv attention output))
                   -> Stage(o_proj + MLP + next layer's q/k/v, ...) ...
    - EP:          Stage(gate + permute, all_to_all_async dispatch)
                   -> Stage(local experts, all_to_all_async combine) -> Stage(un-permute)
    """

    compute: Callable[[int, Any], Any]
    communicate: Callable[[int, Any], Pending[Any]] | None = None
    name: str = ""


@dataclass
class OverlapStats:
    """Accumulated over runs: time in compute calls (issuing communication included) and time
    blocked in waits, i.e. the communication left exposed. exposed fraction =
    wait_s / (compute_s + wait_s)."""

    compute_s: float = 0.0
    wait_s: float = 0.0
    runs: int = 0


def run_overlapped(inputs: Sequence[Any], stages: Sequence[Stage], stats: OverlapStats | None = None) -> list[Any]:
    """Drives every micro-batch through ``stages`` and returns their outputs in input order.

    Rotation, for stage s and micro-batches i = 0..n-1 in order:
        wait(comm[s-1][i]) -> compute[s](i) -> issue comm[s](i)
    so compute[s](i+1) runs while comm[s](i) is in flight, and comm[s-1][i] is waited only right
    before its output is needed. With one micro-batch this is the plain sequential path.
    Every rank must call it with the same number of micro-batches and stages (collectives pair
    by issue order); a micro-batch may be empty (EP ranks with no tokens still take part).
    """
    clock = time.perf_counter
    pending: list[Pending[Any]] = [Ready(x) for x in inputs]
    compute_s = wait_s = 0.0
    for stage in stages:
        for i in range(len(pending)):
            t0 = clock()
            x = pending[i].wait()
            t1 = clock()
            y = stage.compute(i, x)
            pending[i] = Ready(y) if stage.communicate is None else stage.communicate(i, y)
            t2 = clock()
            wait_s += t1 - t0
            compute_s += t2 - t1
    t0 = clock()
    outputs = [p.wait() for p in pending]
    wait_s += clock() - t0
    if stats is not None:
        stats.compute_s += compute_s
        stats.wait_s += wait_s
        stats.runs += 1
    return outputs


# (num_tokens, parts) -> micro-batch sizes: `parts` non-negative ints summing to num_tokens
SplitRule = Callable[[int, int], list[int]]


def even_split(num_tokens: int, parts: int) -> list[int]:
    """Sizes that differ by at most one, larger first: even_split(7, 2) == [4, 3]."""
    base, extra = divmod(num_tokens, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def aligned_split(multiple: int) -> SplitRule:
    """Wave-aware sizes: every micro-batch but the last is a multiple of ``multiple`` (e.g. the
    token count of one full wave of the GEMM's tiles, or W for reduce-scatter), each as close to
    an even share as that allows; the last takes the rest. aligned_split(128)(1000, 2) == [512, 488]."""
    if multiple < 1:
        raise ValueError(f"aligned_split: multiple must be >= 1, got {multiple}")

    def rule(num_tokens: int, parts: int) -> list[int]:
        sizes, left = [], num_tokens
        for i in range(parts - 1):
            share = left / (parts - i)
            size = min(int(share / multiple + 0.5) * multiple, left // multiple * multiple)
            sizes.append(size)
            left -= size
        return [*sizes, left]

    return rule


@dataclass(frozen=True)
class TokenSplit:
    """How run_token_split cuts a batch: ``micro_batches`` parts sized by ``rule``, or one
    micro-batch (the plain path) below ``min_tokens`` tokens, where splitting costs more than
    the overlap saves. Every rank of a group must get the same sizes (under TP they see the
    same tokens, so the same TokenSplit does it)."""

    micro_batches: int = 2
    min_tokens: int = 0
    rule: SplitRule = even_split

    def __post_init__(self) -> None:
        if self.micro_batches < 1:
            raise ValueError(f"TokenSplit.micro_batches must be >= 1, got {self.micro_batches}")
        if self.min_tokens < 0:
            raise ValueError(f"TokenSplit.min_tokens must be >= 0, got {self.min_tokens}")

    def sizes(self, num_tokens: int) -> list[int]:
        if self.micro_batches == 1 or num_tokens < self.min_tokens:
            return [num_tokens]
        sizes = [int(s) for s in self.rule(num_tokens, self.micro_batches)]
        if len(sizes) != self.micro_batches or any(s < 0 for s in sizes) or sum(sizes) != num_tokens:
            raise ValueError(
                f"split rule gave {sizes} for {num_tokens} tokens in {self.micro_batches} micro-batches "
                "(want that many non-negative sizes summing to the token count)"
            )
        return sizes


def run_token_split(
    x: torch.Tensor, stages: Sequence[Stage], split: TokenSplit | None = None, stats: OverlapStats | None = None
) -> torch.Tensor:
    """x: [N, ...] -> the stages' outputs per micro-batch, concatenated along dim 0 in order.
    Micro-batches are views of x (rows in order, sizes from ``split``; default: two halves)."""
    sizes = (split or TokenSplit()).sizes(x.shape[0])
    parts = list(torch.split(x, sizes, dim=0))
    outputs = run_overlapped(parts, stages, stats)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
