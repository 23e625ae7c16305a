"""Prefill time at TP=2 (two processes, one gloo group, one torch thread each): compute only,
communication only, sequential TP and TokenWeave, by prompt length.

    .venv/bin/python benchmarks/tensor_parallel.py                 # ~3 min on 2 cores
    .venv/bin/python benchmarks/tensor_parallel.py --quick         # 256 and 1024 tokens, 3 rounds
    # results: benchmarks/results/tensor_parallel.{json,png}

The model is a random-weight Llama of SmolLM2-135M's width with 16 query / 8 KV heads
(hidden 576, head_dim 36, intermediate 1536, vocab 49152, ``--layers`` layers, fp32), so it
splits at TP=2. Both ranks build the same weights from one seed and keep their shard
(engine.models.tensor_parallel.TPModel.from_full). One prefill = forward over the prompt +
the logits of its last token (vocab-parallel head, gathered).

Modes, interleaved round by round (each round runs every mode once per length), median over
rounds, timed on rank 0 between two barriers:
- ``compute``: the sequential TP forward with every collective replaced by a local stand-in
  of the right shape (no communication): the compute a rank does.
- ``compute_split``: the TokenWeave forward (all-reduce variant, no extra thread) with the
  same stand-ins: compute of two micro-batches (shows what the split itself costs).
- ``comm``: only the collectives of sequential TP (1 + 2 * layers all-reduces of [T, hidden]
  and the logits all-gather), back to back. Its wall time and its process CPU time (every
  thread of rank 0, user + system, i.e. gloo's copying and the kernel's TCP work) give the
  free fraction f = (comm wall - comm CPU) / comm wall: the share of communication that does
  not need this rank's core and so can hide under compute.
- ``compute_with_comm``: ``compute`` on the main thread while a second thread runs the
  ``comm`` sequence: how much of the communication compute really hides. The process CPU time
  misses the kernel's loopback TCP work done in softirq context, so f overestimates what is
  free; f_interference = 1 - (compute_with_comm - compute) / comm measures it directly.
- ``sequential``: TP with blocking all-reduces (TokenWeaveConfig(enabled=False)).
- ``tokenweave``: TP with the fused reduce-scatter / RMSNorm / all-gather and two overlapped
  micro-batches (TokenWeaveConfig(min_tokens=0)).
- ``tokenweave_ar``: the same split and overlap with all-reduce + RMSNorm instead of the fused
  form (TokenWeaveConfig(fused_norm=False)): gloo's reduce-scatter costs as much as its
  all-reduce, so the fused form moves ~1.5x the bytes' time on CPU.

With ``--link-gbps`` > 0 (default 0.2) four more modes run the same over ``LinkDelay``, which
stretches every collective to the time a ring over a link of that bandwidth takes by sleeping
(no core used): ``comm_link``, ``sequential_link``, ``tokenweave_link``, ``tokenweave_ar_link``.
There f = 1 by construction, so they measure the schedule itself: recovered_link =
(sequential_link - tokenweave_link) / (sequential_link - max(compute, comm_link)).

Derived per length: ideal gain = sequential - max(compute, comm); recovered = (sequential -
tokenweave) / (f * ideal gain), the share of the achievable gain TokenWeave gets (both
variants); a length where tokenweave >= sequential does not pay. TW / seq and recovered are
computed within each round (all terms from the same round) and summarised by their median
over rounds; the ms columns are medians per mode. Per-layer times are the forward's time / layers
(the embedding and head are one collective each). The 1-minute load average is recorded per
round: the 2 cores are shared, so compare modes within a round, not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from engine.parallel import Communicator, Pending, RankedCommunicator, Ready  # noqa: E402

MODES = ("compute", "compute_split", "comm", "compute_with_comm", "sequential", "tokenweave", "tokenweave_ar")
# the same over a free link (LinkDelay): its time needs no core, f = 1 by construction
LINK_MODES = ("comm_link", "sequential_link", "tokenweave_link", "tokenweave_ar_link")


class ComputeOnlyCommunicator(RankedCommunicator):
    """Rank ``rank`` of ``world_size`` with no peers: every collective returns at once a
    tensor of the shape the real one would (reduce-scatter: this rank's rows of its own input;
    all-gather: its input repeated), so the model does exactly its compute."""

    def __init__(self, rank: int, world_size: int):
        super().__init__(rank, world_size, "cpu")

    def _start_all_reduce(self, x: torch.Tensor) -> Pending[torch.Tensor]:
        return Ready(x)

    def _start_reduce_scatter(self, x: torch.Tensor) -> Pending[torch.Tensor]:
        n = x.shape[0] // self._world_size
        return Ready(x[self._rank * n : (self._rank + 1) * n].contiguous())

    def _start_all_gather(self, x: torch.Tensor) -> Pending[torch.Tensor]:
        return Ready(x.repeat(self._world_size, *([1] * (x.dim() - 1))))

    def _start_all_to_all(self, x, send_splits, recv_splits):
        raise NotImplementedError("not used by the TP forward")

    def _start_send(self, x, dst, tag):
        raise NotImplementedError("not used by the TP forward")

    def _start_recv(self, out, src, tag):
        raise NotImplementedError("not used by the TP forward")


class _Due:
    """A Pending that is not done before ``due`` (perf_counter seconds): sleeps out the rest."""

    def __init__(self, inner: Pending[Any], due: float):
        self.inner, self.due = inner, due

    def wait(self) -> Any:
        result = self.inner.wait()
        left = self.due - time.perf_counter()
        if left > 0:
            time.sleep(left)
        return result


class LinkDelay(Communicator):
    """Wraps a real communicator and makes every collective last at least as long as a ring
    over a link of ``gbps`` GB/s would take (all-reduce 2(W-1)/W, reduce-scatter and
    all-gather (W-1)/W of the full tensor's bytes). The extra time is a sleep: it needs no core,
    like a GPU's copy engines or NVLink, so it shows what the schedule hides when
    communication is free to overlap (f = 1), apart from this box's CPU contention."""

    def __init__(self, inner: Communicator, gbps: float):
        self.inner, self.bytes_per_s = inner, gbps * 1e9

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def world_size(self) -> int:
        return self.inner.world_size

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def _after(self, pending: Pending[Any], full_bytes: float, factor: float) -> Pending[Any]:
        w = self.world_size
        return _Due(pending, time.perf_counter() + factor * (w - 1) / w * full_bytes / self.bytes_per_s)

    def _start_all_reduce(self, x: torch.Tensor) -> Pending[torch.Tensor]:
        return self._after(self.inner.all_reduce_async(x), x.numel() * x.element_size(), 2.0)

    def _start_reduce_scatter(self, x: torch.Tensor) -> Pending[torch.Tensor]:
        return self._after(self.inner.reduce_scatter_async(x), x.numel() * x.element_size(), 1.0)

    def _start_all_gather(self, x: torch.Tensor) -> Pending[torch.Tensor]:
        return self._after(self.inner.all_gather_async(x), x.numel() * x.element_size() * self.world_size, 1.0)

    def _start_all_to_all(self, x, send_splits, recv_splits):
        raise NotImplementedError("not used by the TP forward")

    def _start_send(self, x, dst, tag):
        raise NotImplementedError("not used by the TP forward")

    def _start_recv(self, out, src, tag):
        raise NotImplementedError("not used by the TP forward")


def build_full_model(layers: int, seed: int):
    """The random-weight 16/8-head Llama every rank builds identically."""
    from engine.config import ModelConfig, RopeConfig
    from engine.models.llama import DecoderLM

    cfg = ModelConfig(
        architecture="LlamaForCausalLM",
        family="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=layers,
        num_heads=16,
        num_kv_heads=8,
        head_dim=36,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        rope=RopeConfig(theta=100000.0),
    )
    torch.manual_seed(seed)
    model = DecoderLM(cfg, 4096)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.05)
    return model.eval()


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: Any) -> None:
    torch.set_num_threads(1)
    if args.switch_interval_ms > 0:  # how soon a thread waiting for the GIL gets it (default 5 ms)
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    from engine.models.tensor_parallel import TokenWeaveConfig, TPModel
    from engine.runtime.groups import GroupSpec, join_communicator

    spec = GroupSpec("tp-bench", rank, world, "127.0.0.1", port, args.group, 120.0, local_host="127.0.0.1")
    comm = join_communicator(spec)
    full = build_full_model(args.layers, args.seed)
    hidden = full.cfg.hidden_size
    local = ComputeOnlyCommunicator(rank, world)
    models = {
        "compute": TPModel.from_full(full, local, TokenWeaveConfig(enabled=False)),
        "compute_split": TPModel.from_full(full, local, TokenWeaveConfig(min_tokens=0, fused_norm=False)),
        "sequential": TPModel.from_full(full, comm, TokenWeaveConfig(enabled=False)),
        "tokenweave": TPModel.from_full(full, comm, TokenWeaveConfig(min_tokens=0)),
        "tokenweave_ar": TPModel.from_full(full, comm, TokenWeaveConfig(min_tokens=0, fused_norm=False)),
    }
    link = LinkDelay(comm, args.link_gbps) if args.link_gbps > 0 else None
    if link is not None:
        models |= {
            "sequential_link": TPModel.from_full(full, link, TokenWeaveConfig(enabled=False)),
            "tokenweave_link": TPModel.from_full(full, link, TokenWeaveConfig(min_tokens=0)),
            "tokenweave_ar_link": TPModel.from_full(full, link, TokenWeaveConfig(min_tokens=0, fused_norm=False)),
        }
    modes = MODES + (LINK_MODES if link is not None else ())
    del full
    vocab_shard = models["sequential"].plan.vocab_shard
    barrier = torch.zeros(1)

    def prefill(model: TPModel, ids: torch.Tensor) -> None:
        h = model.forward(ids)
        model.compute_logits(h[-1:])

    def comm_only(n: int, via: Communicator = comm) -> None:
        x = torch.ones(n, hidden)
        for _ in range(1 + 2 * args.layers):
            x = via.all_reduce(x)
        via.all_gather(torch.ones(vocab_shard, 1))

    g = torch.Generator().manual_seed(args.seed)
    prompts = {n: torch.randint(0, 49152, (n,), generator=g) for n in args.lengths}
    for n in args.lengths[:1]:  # warm-up: first calls allocate and fault pages in
        for m in ("sequential", "tokenweave", "tokenweave_ar"):
            prefill(models[m], prompts[n])
    rows: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        load = os.getloadavg()[0]
        for n in args.lengths:
            for mode in modes:
                comm.all_reduce(barrier)
                stats = None if mode in ("comm", "comm_link", "compute_with_comm") else models[mode].stats
                waited = 0.0 if stats is None else stats.wait_s
                w0, c0 = time.perf_counter(), time.process_time()
                if mode == "comm":
                    comm_only(n)
                elif mode == "comm_link":
                    assert link is not None
                    comm_only(n, link)
                elif mode == "compute_with_comm":  # the comm-only sequence on a thread meanwhile
                    background = threading.Thread(target=comm_only, args=(n,))
                    background.start()
                    prefill(models["compute"], prompts[n])
                    background.join()
                else:
                    prefill(models[mode], prompts[n])
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                comm.all_reduce(barrier)
                exposed = 0.0 if stats is None else stats.wait_s - waited  # TokenWeave: waits in the schedule
                rows.append(
                    {
                        "round": rnd,
                        "tokens": n,
                        "mode": mode,
                        "wall_s": wall,
                        "cpu_s": cpu,
                        "exposed_wait_s": exposed,
                        "load1": load,
                    }
                )
        if rank == 0:
            print(f"round {rnd + 1}/{args.rounds} done (load {load:.2f})", flush=True)
    out.put((rank, rows))


def _per_round(rows: list[dict[str, Any]], n: int) -> list[dict[str, float]]:
    """Each round's wall times by mode at n tokens (modes of one round ran back to back)."""
    rounds = sorted({r["round"] for r in rows})
    return [{r["mode"]: r["wall_s"] for r in rows if r["tokens"] == n and r["round"] == k} for k in rounds]


def _recovered(seq: float, tw: float, compute: float, comm: float, f: float) -> float | None:
    """(seq - tw) / (f * (seq - max(compute, comm))); None where no gain is achievable."""
    achievable = f * (seq - max(compute, comm))
    return (seq - tw) / achievable if achievable > 0 else None


def _median_or_none(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def summarise(rows: list[dict[str, Any]], layers: int) -> list[dict[str, Any]]:
    """Medians per mode, and per-round ratios (both terms from the same round, so load that hits
    a round hits both) summarised by their median: TW / seq and recovered."""
    out = []
    for n in sorted({r["tokens"] for r in rows}):
        med = {m: statistics.median(r["wall_s"] for r in rows if r["tokens"] == n and r["mode"] == m) for m in MODES}
        comm_cpu = statistics.median(r["cpu_s"] for r in rows if r["tokens"] == n and r["mode"] == "comm")
        f = max(0.0, (med["comm"] - comm_cpu) / med["comm"])
        # interference: how much of the communication's time compute really gets to hide
        both = med["compute_with_comm"] - med["compute"]
        f_interference = min(1.0, max(0.0, 1.0 - both / med["comm"]))
        ideal = med["sequential"] - max(med["compute"], med["comm"])
        rounds = _per_round(rows, n)
        row: dict[str, Any] = {
            "tokens": n,
            **{f"{m}_ms": med[m] * 1e3 for m in MODES},
            **{f"{m}_per_layer_ms": med[m] * 1e3 / layers for m in MODES},
            "comm_cpu_ms": comm_cpu * 1e3,
            "free_fraction": f,
            "free_fraction_interference": f_interference,
            "ideal_gain_ms": ideal * 1e3,
            "achievable_gain_ms": f * ideal * 1e3,
        }
        for tw in ("tokenweave", "tokenweave_ar"):
            ratios = [by[tw] / by["sequential"] for by in rounds]
            exposed = statistics.median(r["exposed_wait_s"] for r in rows if r["tokens"] == n and r["mode"] == tw)
            row |= {
                f"{tw}_exposed_wait_ms": exposed * 1e3,
                f"{tw}_gain_ms": (med["sequential"] - med[tw]) * 1e3,
                f"{tw}_recovered": _median_or_none(
                    [_recovered(by["sequential"], by[tw], by["compute"], by["comm"], f) for by in rounds]
                ),
                f"{tw}_over_sequential_median": statistics.median(ratios),
                f"{tw}_over_sequential_per_round": ratios,
                f"{tw}_pays": statistics.median(ratios) < 1.0,
            }
        if any(r["mode"] == "comm_link" for r in rows):
            lk = {
                m: statistics.median(r["wall_s"] for r in rows if r["tokens"] == n and r["mode"] == m)
                for m in LINK_MODES
            }
            ideal_link = lk["sequential_link"] - max(med["compute"], lk["comm_link"])
            row |= {f"{m}_ms": lk[m] * 1e3 for m in LINK_MODES} | {"ideal_gain_link_ms": ideal_link * 1e3}
            for tw in ("tokenweave_link", "tokenweave_ar_link"):
                row |= {
                    f"{tw}_recovered": _median_or_none(
                        [
                            _recovered(by["sequential_link"], by[tw], by["compute"], by["comm_link"], 1.0)
                            for by in rounds
                        ]
                    ),
                    f"{tw}_over_sequential": statistics.median(by[tw] / by["sequential_link"] for by in rounds),
                }
        out.append(row)
    return out


def table(summary: list[dict[str, Any]]) -> str:
    lines = [
        "| tokens | compute ms | compute split ms | comm ms (CPU ms) | f | f interf. | sequential ms | TokenWeave ms "
        "| TW / seq | TW-allreduce ms | TW-AR / seq | ideal gain ms | f x ideal ms | recovered TW | recovered TW-AR |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.0%}"

    for s in summary:
        lines.append(
            f"| {s['tokens']} | {s['compute_ms']:.1f} | {s['compute_split_ms']:.1f} | {s['comm_ms']:.1f} "
            f"({s['comm_cpu_ms']:.1f}) | {s['free_fraction']:.2f} | {s['free_fraction_interference']:.2f} "
            f"| {s['sequential_ms']:.1f} "
            f"| {s['tokenweave_ms']:.1f} | {s['tokenweave_over_sequential_median']:.3f} "
            f"| {s['tokenweave_ar_ms']:.1f} | {s['tokenweave_ar_over_sequential_median']:.3f} "
            f"| {s['ideal_gain_ms']:.1f} | {s['achievable_gain_ms']:.1f} "
            f"| {pct(s['tokenweave_recovered'])} | {pct(s['tokenweave_ar_recovered'])} |"
        )
    if "comm_link_ms" in summary[0]:
        lines += [
            "",
            "Over the free link (LinkDelay; f = 1):",
            "",
            "| tokens | compute ms | comm ms | sequential ms | TokenWeave ms | TW / seq | TW-allreduce ms "
            "| TW-AR / seq | ideal gain ms | recovered TW | recovered TW-AR |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in summary:
            lines.append(
                f"| {s['tokens']} | {s['compute_ms']:.1f} | {s['comm_link_ms']:.1f} | {s['sequential_link_ms']:.1f} "
                f"| {s['tokenweave_link_ms']:.1f} | {s['tokenweave_link_over_sequential']:.3f} "
                f"| {s['tokenweave_ar_link_ms']:.1f} | {s['tokenweave_ar_link_over_sequential']:.3f} "
                f"| {s['ideal_gain_link_ms']:.1f} | {pct(s['tokenweave_link_recovered'])} "
                f"| {pct(s['tokenweave_ar_link_recovered'])} |"
            )
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], layers: int, group: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.6))
    tokens = [s["tokens"] for s in summary]
    for m, style in (
        ("compute", "o--"),
        ("compute_split", "x--"),
        ("comm", "^--"),
        ("sequential", "s-"),
        ("tokenweave", "D-"),
        ("tokenweave_ar", "v-"),
    ):
        a1.plot(tokens, [s[f"{m}_per_layer_ms"] for s in summary], style, label=m)
    a1.set_xscale("log", base=2)
    a1.set_yscale("log")
    a1.set_xlabel("prompt tokens")
    a1.set_ylabel(f"ms per layer (forward / {layers}, median)")
    a1.set_title(f"TP=2 prefill, {group} group on CPU")
    a1.legend(fontsize=8)
    a2.plot(tokens, [s["tokenweave_over_sequential_median"] for s in summary], "D-", label="TokenWeave / sequential")
    a2.plot(
        tokens, [s["tokenweave_ar_over_sequential_median"] for s in summary], "v-", label="TokenWeave-AR / sequential"
    )
    a2.plot(
        tokens,
        [max(s["compute_ms"], s["comm_ms"]) / s["sequential_ms"] for s in summary],
        "k:",
        label="ideal: max(compute, comm) / sequential",
    )
    a2.plot(
        tokens,
        [1 - s["achievable_gain_ms"] / s["sequential_ms"] for s in summary],
        "g--",
        label="achievable: 1 - f x ideal gain / sequential",
    )
    a2.plot(
        tokens,
        [1 - s["free_fraction_interference"] * s["ideal_gain_ms"] / s["sequential_ms"] for s in summary],
        "r--",
        label="achievable with f by interference",
    )
    if "comm_link_ms" in summary[0]:
        for tw, style in (("tokenweave_link", "D:"), ("tokenweave_ar_link", "v:")):
            a2.plot(tokens, [s[f"{tw}_over_sequential"] for s in summary], style, label=f"{tw} / sequential_link")
        a2.plot(
            tokens,
            [max(s["compute_ms"], s["comm_link_ms"]) / s["sequential_link_ms"] for s in summary],
            "k-.",
            label="free link ideal",
        )
    a2.axhline(1.0, color="grey", lw=0.8)
    a2.set_xscale("log", base=2)
    a2.set_xlabel("prompt tokens")
    a2.set_ylabel("time relative to sequential TP")
    a2.set_title("what overlap recovers")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="64,128,256,512,1024,2048", help="prompt lengths (tokens)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--switch-interval-ms",
        type=float,
        default=0.0,
        help="sys.setswitchinterval in the ranks (0: Python's default, 5 ms)",
    )
    ap.add_argument(
        "--link-gbps",
        type=float,
        default=0.2,
        help="also run over a free link of this many GB/s (LinkDelay; 0: skip). 0.2 makes communication "
        "about a third of compute at 1024 tokens, as TP all-reduces are on GPUs with NVLink",
    )
    ap.add_argument(
        "--group",
        choices=("gloo", "shm"),
        default="gloo",
        help="the TP group's backend: gloo (loopback TCP) or shm (engine/runtime/shm_group.py)",
    )
    ap.add_argument("--quick", action="store_true", help="256 and 1024 tokens, 3 rounds")
    ap.add_argument("--out", default="tensor_parallel", help="results name under benchmarks/results/")
    args = ap.parse_args()
    if args.quick:
        args.lengths, args.rounds = "256,1024", 3
    args.lengths = [int(x) for x in args.lengths.split(",")]

    import multiprocessing as mp

    from benchmarks.common import RESULTS_DIR, machine_description
    from engine.runtime.groups import free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port("127.0.0.1")
    load_start = os.getloadavg()
    procs = [ctx.Process(target=rank_main, args=(r, 2, port, args, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get() for _ in procs)
    for p in procs:
        p.join()
    load_end = os.getloadavg()
    summary = summarise(results[0], args.layers)
    print(table(summary))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    doc = {
        "command": "benchmarks/tensor_parallel.py " + " ".join(sys.argv[1:]),
        "machine": machine_description(),
        "model": "random Llama: hidden 576, 16 q / 8 KV heads (head_dim 36), intermediate 1536, vocab 49152, fp32",
        "layers": args.layers,
        "group": args.group,
        "link_gbps": args.link_gbps,
        "switch_interval_ms": args.switch_interval_ms or 1e3 * sys.getswitchinterval(),
        "world_size": 2,
        "rounds": args.rounds,
        "load_avg_start": load_start,
        "load_avg_end": load_end,
        "summary": summary,
        "runs": results[0],
    }
    (RESULTS_DIR / f"{args.out}.json").write_text(json.dumps(doc, indent=1))
    plot(summary, args.layers, args.group, RESULTS_DIR / f"{args.out}.png")
    print(f"load average start {load_start}, end {load_end}; wrote {RESULTS_DIR / args.out}.{{json,png}}")


if __name__ == "__main__":
    main()
