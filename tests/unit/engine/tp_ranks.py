"""Test helper: the ranks of a tensor-parallel gloo group as spawned processes.

Each process joins the group through engine/runtime/groups.py (as a worker's runtime does),
wraps it in a TorchDistCommunicator and runs ``fn(comm, *args)``; the parent collects what each
rank returned or raised. A rank that dies without reporting shows up as its exit code, so a
test can kill one rank and check what the others saw.

``fn`` must be a module-level function (it is pickled by reference into the children).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

HOST = "127.0.0.1"


@dataclass(frozen=True)
class RankOutcome:
    rank: int
    value: Any = None  # fn's return value, when it returned
    error: str | None = None  # "<ExceptionType>: message", when it raised
    exitcode: int | None = None  # the process's exit status (set once it ended)
    seconds: float = 0.0  # fn's own duration, measured in the child

    @property
    def ok(self) -> bool:
        return self.error is None and self.exitcode == 0


def _child(fn: Callable[..., Any], rank: int, world_size: int, port: int, timeout_s: float, args: tuple, out) -> None:
    import torch

    torch.set_num_threads(1)  # the ranks share the machine's cores
    from engine.parallel import TorchDistCommunicator
    from engine.runtime.groups import GroupSpec, join_group

    spec = GroupSpec("tp", rank, world_size, HOST, port, "gloo", timeout_s, local_host=HOST)
    t0 = time.monotonic()
    try:
        comm = TorchDistCommunicator(join_group(spec), timeout_s=timeout_s, name="tp")
        t0 = time.monotonic()
        value = fn(comm, *args)
        report = (rank, value, None, time.monotonic() - t0)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which asserts on it
        report = (rank, None, f"{type(e).__name__}: {e}\n{traceback.format_exc()}", time.monotonic() - t0)
    # plain pickle bytes: torch's queue reductions would share tensors through file
    # descriptors that die with this process
    out.put(pickle.dumps(report))


def run_tp_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 10.0, deadline_s: float = 240.0
) -> list[RankOutcome]:
    """fn(comm, *args) on ``world_size`` spawned ranks -> one RankOutcome per rank, by rank.
    ``timeout_s`` is the group's (join and per-op) timeout; ``deadline_s`` bounds the whole run
    (a rank still alive past it is killed and reported with error "deadline")."""
    from engine.runtime.groups import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port(HOST)
    procs = [
        ctx.Process(target=_child, args=(fn, r, world_size, port, timeout_s, args, out), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    reported: dict[int, tuple[Any, str | None, float]] = {}
    end = time.monotonic() + deadline_s
    while len(reported) < world_size and time.monotonic() < end:
        try:
            rank, value, error, seconds = pickle.loads(out.get(timeout=0.2))
            reported[rank] = (value, error, seconds)
        except queue.Empty:
            # every rank that has not reported is dead: nothing more can come
            if all(not p.is_alive() for r, p in enumerate(procs) if r not in reported):
                break
    outcomes = []
    for r, p in enumerate(procs):
        p.join(timeout=max(0.0, end - time.monotonic()) if r in reported else 0.5)
        if p.is_alive():
            p.kill()
            p.join()
            if r not in reported:
                reported[r] = (None, "deadline", 0.0)
        value, error, seconds = reported.get(r, (None, None, 0.0))
        outcomes.append(RankOutcome(r, value, error, p.exitcode, seconds))
    return outcomes


def die() -> None:
    """Ends this rank's process at once, as a crash would (no cleanup, no report)."""
    os._exit(3)


# ============================================================================ rank programs


def tp_logits(comm, ckpts: list[str], prompts: list[list[int]], min_tokens: int) -> dict[str, Any] | None:
    """Per checkpoint, the full-forward logits [len(prompt), V] of every prompt with TokenWeave
    off, on (fused AR-RMSNorm) and on with all-reduce (``min_tokens``: its threshold). Rank 0
    returns {ckpt: {mode: [logits per prompt], f"{mode}_tokenweave_runs": n}}; other ranks
    None (they computed the same gathered logits)."""
    import torch

    from engine.models.tensor_parallel import TokenWeaveConfig, TPModel

    result: dict[str, Any] = {}
    for ckpt in ckpts:
        per: dict[str, Any] = {}
        for mode in ("off", "on", "on_allreduce"):
            tw = TokenWeaveConfig(enabled=mode != "off", min_tokens=min_tokens, fused_norm=mode == "on")
            model = TPModel.load(ckpt, comm, tw)
            per[mode] = [model.compute_logits(model.forward(torch.tensor(p))) for p in prompts]
            per[f"{mode}_tokenweave_runs"] = model.stats.runs
            model.close()
        result[ckpt] = per
    return result if comm.rank == 0 else None


def tp_greedy(comm, ckpt: str, prompts: list[list[int]], max_new: int, min_tokens: int) -> dict[str, Any] | None:
    """Greedy continuation of each prompt (a full forward per token, no KV cache) with
    TokenWeave off and on, and the full-forward argmax at every prompt position.
    Rank 0 returns {"off": {"generated": [...], "prompt_argmax": [...]}, "on": {...}}."""
    import torch

    from engine.models.tensor_parallel import TokenWeaveConfig, TPModel

    result: dict[str, Any] = {}
    for mode in ("off", "on"):
        model = TPModel.load(ckpt, comm, TokenWeaveConfig(enabled=mode == "on", min_tokens=min_tokens))
        generated, prompt_argmax = [], []
        for p in prompts:
            tokens = list(p)
            logits = model.compute_logits(model.forward(torch.tensor(tokens)))
            prompt_argmax.append(logits.argmax(-1))
            for _ in range(max_new):
                tokens.append(int(logits[-1].argmax()))
                if len(tokens) - len(p) == max_new:
                    break
                logits = model.compute_logits(model.forward(torch.tensor(tokens)))
            generated.append(tokens[len(p) :])
        result[mode] = {"generated": generated, "prompt_argmax": prompt_argmax, "tokenweave_runs": model.stats.runs}
    return result if comm.rank == 0 else None


def tp_die_mid_forward(
    comm, ckpt: str, prompt: list[int], tokenweave: bool, die_rank: int, layer: int, hang_s: float = 0.0
) -> tuple:
    """Rank ``die_rank`` dies when it reaches layer ``layer``'s MLP (``hang_s`` > 0: it hangs
    there that long instead, then goes on); every other rank runs the forward, which must fail:
    returns ("<ExceptionType>: message", seconds from the start of the forward to the failure)."""
    import torch

    from engine.models.tensor_parallel import TokenWeaveConfig, TPModel

    model = TPModel.load(ckpt, comm, TokenWeaveConfig(enabled=tokenweave, min_tokens=4))
    if comm.rank == die_rank:
        mlp = model.model.layers[layer].mlp
        run = mlp.forward
        mlp.forward = lambda x: (time.sleep(hang_s), run(x))[1] if hang_s else die()
    t0 = time.monotonic()
    try:
        model.forward(torch.tensor(prompt))  # the survivors must raise here
    except Exception as e:  # noqa: BLE001 - the parent asserts on what it was
        return f"{type(e).__name__}: {e}", time.monotonic() - t0
    raise AssertionError("the forward finished although a rank died")
