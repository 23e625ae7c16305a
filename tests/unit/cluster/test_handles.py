"""The typed worker boundary: handles mirror the worker APIs method for method, the actor
shells implement them, and failures arrive as typed exceptions."""

from __future__ import annotations

import asyncio
import inspect
import queue

import pytest

from attention_offload.api import AttentionAPI
from cluster.control.handles import (
    AttentionHandle,
    DecodeHandle,
    GroupMemberHandle,
    LocalInvoker,
    PrefillHandle,
    TPFollowerHandle,
    WorkerHandle,
    WorkerUnavailable,
)
from decode_worker.api import DecodeAPI
from engine.runtime.api import GroupMemberAPI, WorkerAPI
from engine.runtime.tp_follower import TPFollowerAPI
from engine.types import EngineStopped, UnknownRequest
from prefill_worker.api import PrefillAPI

HANDLES = [
    (WorkerHandle, WorkerAPI),
    (GroupMemberHandle, GroupMemberAPI),
    (PrefillHandle, PrefillAPI),
    (DecodeHandle, DecodeAPI),
    (AttentionHandle, AttentionAPI),
    (TPFollowerHandle, TPFollowerAPI),
]


def _api_methods(api: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(getattr(api, name)) for name in sorted(api.__abstractmethods__)}


@pytest.mark.parametrize("handle, api", HANDLES, ids=lambda c: c.__name__)
def test_every_api_method_has_a_handle_method_with_the_same_parameters(handle, api):
    methods = _api_methods(api)
    assert methods, f"{api.__name__} declares no methods"
    for name, sig in methods.items():
        mirrored = getattr(handle, name, None)
        assert mirrored is not None, f"{handle.__name__} lacks {name}"
        assert inspect.iscoroutinefunction(mirrored), f"{handle.__name__}.{name} must be async"
        got = inspect.signature(mirrored)
        assert list(got.parameters) == list(sig.parameters), f"{handle.__name__}.{name}{got} vs {api.__name__}{sig}"
        assert [p.default for p in got.parameters.values()] == [p.default for p in sig.parameters.values()]


def test_handles_have_nothing_the_api_lacks():
    for handle, api in HANDLES:
        extra = {n for n, v in vars(handle).items() if inspect.iscoroutinefunction(v)} - set(_api_methods(api))
        assert not extra, f"{handle.__name__} has methods outside {api.__name__}: {extra}"


@pytest.mark.parametrize("api", [PrefillAPI, DecodeAPI, TPFollowerAPI], ids=lambda c: c.__name__)
def test_workers_and_actor_shells_implement_the_api(api):
    from decode_worker.actor import DecodeActor, TPFollowerActor
    from decode_worker.worker import DecodeWorker
    from engine.runtime.tp_follower import TPFollowerWorker
    from prefill_worker.actor import PrefillActor
    from prefill_worker.worker import PrefillWorker

    impls = {
        PrefillAPI: (PrefillWorker, PrefillActor),
        DecodeAPI: (DecodeWorker, DecodeActor),
        TPFollowerAPI: (TPFollowerWorker, TPFollowerActor),
    }[api]
    for impl in impls:
        cls = getattr(impl, "__ray_actor_class__", impl)  # the class under @ray.remote
        assert issubclass(cls, api), f"{cls.__name__} does not derive from {api.__name__}"
        assert not getattr(cls, "__abstractmethods__", None), f"{cls.__name__} leaves {cls.__abstractmethods__} open"
        for name, sig in _api_methods(api).items():
            got = inspect.signature(getattr(cls, name))
            params = [p for p in got.parameters if not p.startswith("_ray")]  # Ray adds a tracing kwarg
            assert params == list(sig.parameters), f"{cls.__name__}.{name}{got}"


class FakeDecode(DecodeAPI):
    """Records calls; ``read`` fails the way a worker does."""

    def __init__(self, fail: BaseException | None = None):
        self.calls: list[tuple] = []
        self.fail = fail

    def _do(self, *call):
        self.calls.append(call)
        if self.fail is not None:
            raise self.fail

    def ping(self):
        self._do("ping")
        return "d"

    def stats(self):
        raise NotImplementedError

    def limits(self):
        raise NotImplementedError

    def node_id(self):
        return "local"

    def shutdown(self):
        self._do("shutdown")

    def kv_address(self):
        return "addr"

    def start_transfer(self, spec, emitted=()):
        self._do("start_transfer", spec, emitted)

    def set_first_token(self, request_id, first):
        self._do("set_first_token", request_id, first)

    def generate_local(self, spec, emitted=()):
        self._do("generate_local", spec, emitted)

    def read(self, request_id, cursor=0, timeout=1.0):
        self._do("read", request_id, cursor, timeout)

    def abort(self, request_id, reason="aborted"):
        self._do("abort", request_id, reason)

    def set_speculation_pressure(self, pressure):
        self._do("set_speculation_pressure", pressure)

    def node_ip(self):
        return "127.0.0.1"

    def free_port(self):
        return 1

    def join_group(self, spec):
        self._do("join_group", spec)


def test_local_handle_calls_the_worker_method_with_the_arguments():
    w = FakeDecode()
    h = DecodeHandle("d", LocalInvoker("d", w))
    assert asyncio.run(h.ping()) == "d"
    asyncio.run(h.read("r", 3, 0.5))
    asyncio.run(h.abort("r"))
    asyncio.run(h.set_speculation_pressure(0.5))
    assert w.calls == [("ping",), ("read", "r", 3, 0.5), ("abort", "r", "aborted"), ("set_speculation_pressure", 0.5)]


def test_a_stopped_engine_is_worker_unavailable_other_errors_pass_through():
    down = DecodeHandle("d", LocalInvoker("d", FakeDecode(EngineStopped("engine loop stopped: boom"))))
    with pytest.raises(WorkerUnavailable, match="worker d unavailable") as e:
        asyncio.run(down.read("r"))
    assert e.value.worker_id == "d"
    unknown = DecodeHandle("d", LocalInvoker("d", FakeDecode(UnknownRequest("r"))))
    with pytest.raises(UnknownRequest):
        asyncio.run(unknown.read("r"))
    refused = DecodeHandle("d", LocalInvoker("d", FakeDecode(ValueError("prompt: bad"))))
    with pytest.raises(ValueError, match="prompt: bad"):
        asyncio.run(refused.generate_local(None))
    full = DecodeHandle("d", LocalInvoker("d", FakeDecode(queue.Full("d holds 4 requests"))))
    with pytest.raises(queue.Full, match="holds 4"):
        asyncio.run(full.generate_local(None, (1, 2)))


def test_router_refuses_a_handle_of_the_wrong_kind():
    from cluster.config import RouterConfig
    from cluster.control.router import Router
    from cluster.control.routing import RoutingPolicy

    r = Router(RoutingPolicy(RouterConfig()))
    with pytest.raises(TypeError, match="needs a PrefillHandle"):
        r.add_worker("p", DecodeHandle("p", LocalInvoker("p", FakeDecode())), "prefill")


def test_router_feeds_speculation_pressure_to_speculating_workers():
    """Pressure = requests waiting at the decoding workers per request running; it goes to
    the workers whose reports say they speculate, and only when it moved by more than
    PRESSURE_STEP."""
    from cluster.config import RouterConfig
    from cluster.control.router import PRESSURE_STEP, Router
    from cluster.control.routing import RoutingPolicy
    from engine.types import SpeculationReport
    from tests.fakes import EMPTY_HISTOGRAM, worker_stats

    speculating, plain = FakeDecode(), FakeDecode()
    r = Router(RoutingPolicy(RouterConfig()))
    r.add_worker("decode-0", DecodeHandle("decode-0", LocalInvoker("decode-0", speculating)), "decode", "a0")
    r.add_worker("decode-1", DecodeHandle("decode-1", LocalInvoker("decode-1", plain)), "decode", "a1")
    report = SpeculationReport(10, 7, EMPTY_HISTOGRAM, None, None, 0, False)

    def load(waiting: int, running: int, in_flight: int = 0) -> None:
        r.workers["decode-0"].stats = worker_stats(
            engine={"waiting_requests": waiting, "running_requests": running},
            transfers_in_flight=in_flight,
            speculation=report,
        )
        r.workers["decode-1"].stats = worker_stats("decode-1", engine={"running_requests": running})

    load(0, 4)
    assert r.speculation_pressure() == 0.0
    asyncio.run(r._feed_speculation_pressure())
    load(3, 4, in_flight=1)  # 4 waiting (3 queued + 1 KV transfer) over 8 running
    assert r.speculation_pressure() == 0.5
    asyncio.run(r._feed_speculation_pressure())
    load(3, 4, in_flight=1)
    asyncio.run(r._feed_speculation_pressure())  # unchanged: not sent again
    load(4, 4, in_flight=1)  # 5/8 = 0.625: more than PRESSURE_STEP above 0.5
    assert 0.625 - 0.5 > PRESSURE_STEP
    asyncio.run(r._feed_speculation_pressure())
    sent = [c[1] for c in speculating.calls if c[0] == "set_speculation_pressure"]
    assert sent == [0.0, 0.5, 0.625]
    assert plain.calls == []  # it does not speculate
