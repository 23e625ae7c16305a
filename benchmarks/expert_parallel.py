"""Expert parallelism: all-to-all traffic of plain EP vs s-EG vs s-EG + s-TS, ExpertFlow's
cache hit ratio vs LRU / LFU, and EP=1 vs EP=2 throughput. Everything here is SYNTHETIC:
random-weight models, and routing structure planted on purpose (random gates have none).

    .venv/bin/python benchmarks/expert_parallel.py      # ~1.5 min
    # results: benchmarks/results/expert_parallel.json and .png
    .venv/bin/python benchmarks/expert_parallel.py --only-router-prior   # section 5 alone

1. Traffic, measured: a tiny Mixtral with planted gates (expert_router/synthetic.py
   ``build_planted_moe_checkpoint``: 16 experts, top-2, 4 layers, hidden 128, 4 "topics"
   whose tokens route inside a scattered expert group per layer). A routing log of 24
   calibration prompts fits s-EG; 16 held-out topic prompts then run through real EP groups
   (EngineCores on gloo ranks, threads of this process) at EP=2 and 4 under plain EP
   (contiguous placement, requests round robin), s-EG (round robin) and s-EG + s-TS
   (each request on the rank its prompt routing votes for). Bytes are the dispatcher's own
   counters (EPStats: what crosses ranks, dispatch + combine); "local" (for s-TS its
   prediction accuracy) is the share of (token, layer) pairs whose top-2 experts all sat on
   the request's own rank.
2. Traffic, modelled (expert_router/seg.py, sts.py) on a SYNTHETIC routing log
   (PlantedStructure: 64 experts, top-2, 8 layers, 8 groups) at EP=2, 4, 8.
3. Caching: ExpertFlow (path predictor fitted on one log, replayed on a held-out log from
   the same planted model) vs LRU vs LFU at 25 / 50 / 75% of experts, batch 4 sequences per
   step. ExpertFlow prefetches as many experts as the layer just needed (default), or fills
   the whole fast tier ("wide": more hits, many more loads); load time modelled at 25 GB/s (PCIe 4 x16) for the expert size of a ~200M-parameter
   MoE (16 experts of hidden 1024, intermediate 2816, bf16: 17.3 MB each), against
   on-demand loading (every needed expert loaded every time).
4. Scaling: EP=1 (one engine, 1 or 2 torch threads) vs EP=2 (two ranks, 1 thread each, the
   group over gloo and over shared memory, engine/runtime/shm_group.py) tokens/s at equal total cores, on the tiny planted model (plus EP=4: oversubscribes 2
   cores; bytes per round) and on a ~160M-parameter planted-gate Mixtral where expert
   compute dominates (8 experts of hidden 768 x intermediate 2048, 4 layers).
5. Router placement (s-TS in serving, cluster/control/expert_affinity.py): the share of
   generated (token, layer) pairs local to the request's rank when the router places it by the
   calibration log's per-token-id prior, vs round robin and vs the prompt's real routing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from engine import LLM
from engine.llm import build_engine_config
from engine.parallel import Communicator
from engine.request import Request, SamplingParams
from engine.runtime.groups import GroupBackend, GroupSpec, free_port, join_communicator
from expert_router.dispatcher import run_lockstep
from expert_router.expertflow import PathPredictor, simulate
from expert_router.group import build_ep_engine, contiguous_placement
from expert_router.placement import ExpertPlacement
from expert_router.routing_log import record_routing
from expert_router.seg import coactivation_placement, placement_traffic
from expert_router.sts import predict_rank, sts_traffic
from expert_router.synthetic import PlantedStructure, build_planted_moe_checkpoint, planted_log

RESULTS = Path(__file__).parent / "results"
HIDDEN = 128
OPTIONS = {"block_size": 16, "num_blocks": 256, "attention_backend": "sdpa"}
MAX_NEW = 32


def topic_prompts(topics: list[list[int]], n: int, seed: int, length: int = 24) -> list[list[int]]:
    """n prompts, each 90% from one topic's tokens (10% any token)."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        t = r.randrange(len(topics))
        out.append([r.choice(topics[t]) if r.random() < 0.9 else r.randrange(3, 512) for _ in range(length)])
    return out


def run_ranks(fn, world: int, timeout_s: float = 1200.0) -> list:
    """fn(rank) on ``world`` threads at once -> results by rank."""
    with ThreadPoolExecutor(world) as pool:
        futures = [pool.submit(fn, r) for r in range(world)]
        return [f.result(timeout=timeout_s) for f in futures]


def group_comms(world: int, backend: GroupBackend = "gloo", timeout_s: float = 120.0) -> list[Communicator]:
    """One group of ``world`` ranks (threads of this process): loopback gloo, or "shm"
    (engine/runtime/shm_group.py)."""
    port = free_port("127.0.0.1")

    def join(r: int) -> Communicator:
        return join_communicator(GroupSpec("ep-bench", r, world, "127.0.0.1", port, backend, timeout_s, "127.0.0.1"))

    return run_ranks(join, world)


def run_group(
    ckpt: str,
    world: int,
    prompts,
    placement,
    ranks_of,
    threads: int = 1,
    max_new: int = MAX_NEW,
    backend: GroupBackend = "gloo",
) -> dict:
    torch.set_num_threads(threads)
    comms = group_comms(world, backend)
    params = SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
    built = run_ranks(lambda r: build_ep_engine(build_engine_config(ckpt, **OPTIONS), comms[r], placement), world)

    def rank(r: int):
        engine, dispatcher = built[r]
        reqs = [Request(f"p{i}", list(p), params) for i, p in enumerate(prompts) if ranks_of[i] == r]
        for q in reqs:
            engine.add_request(q)
        run_lockstep(engine, dispatcher)
        return {q.request_id: list(q.output_token_ids) for q in reqs}

    t0 = time.perf_counter()
    outs = run_ranks(rank, world, timeout_s=1200.0)
    wall = time.perf_counter() - t0
    stats = [d.stats for _, d in built]
    tokens = sum(s.tokens for s in stats)  # (token, MoE layer) pairs routed
    nl = len(placement.layers)
    remote = sum(s.dispatch_bytes + s.combine_bytes for s in stats)
    pairs = sum(s.pairs for s in stats)
    tokens_out = {k: v for o in outs for k, v in o.items()}
    return {
        "world": world,
        "bytes_per_token": remote / (tokens / nl),
        "distinct_ranks_per_token": pairs / tokens,
        "remote_rows_per_token_layer": sum(s.remote_pairs for s in stats) / tokens,
        "local_fraction": sum(s.local_tokens for s in stats) / tokens,
        "rounds": max(s.rounds for s in stats),
        "bytes_per_round": remote / max(max(s.rounds for s in stats), 1),
        "wall_s": wall,
        "generated_tokens_per_s": len(prompts) * max_new / wall,
        "tokens": tokens_out,
    }


def traffic_measured(ckpt: str, topics, worlds=(2, 4)) -> list[dict]:
    calib = record_routing(ckpt, topic_prompts(topics, 24, seed=1), max_tokens=16)
    prompts = topic_prompts(topics, 16, seed=2)
    prompt_log = record_routing(ckpt, prompts, max_tokens=1)
    want = [
        o.token_ids
        for o in LLM(ckpt, skip_tokenizer_init=True, **OPTIONS).generate(
            prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
        )
    ]
    rows = []
    for world in worlds:
        cfg = build_engine_config(ckpt, **OPTIONS).model
        seg = coactivation_placement(calib, world)
        sts_ranks, load = [], np.zeros(world)
        for seq in prompt_log.sequences():
            cap = 1.5 * (load.sum() + 1) / world
            r = predict_rank(seg, prompt_log.layers, seq, load + np.where(load >= cap, 1e9, 0))
            load[r] += 1
            sts_ranks.append(r)
        rr = [i % world for i in range(len(prompts))]
        for mode, placement, ranks_of in (
            ("plain EP", contiguous_placement(cfg, world), rr),
            ("s-EG", seg, rr),
            ("s-EG + s-TS", seg, sts_ranks),
        ):
            row = run_group(ckpt, world, prompts, placement, ranks_of)
            got = [row["tokens"][f"p{i}"] for i in range(len(prompts))]
            row["equal_to_local"] = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w)) / sum(map(len, want))
            del row["tokens"]
            row["mode"] = mode
            row["load_avg"] = os.getloadavg()[0]
            print(
                f"  EP={world} {mode}: {row['bytes_per_token']:.0f} B/token, distinct ranks "
                f"{row['distinct_ranks_per_token']:.3f}, local {row['local_fraction']:.3f}, equal {row['equal_to_local']:.3f}, "
                f"wall {row['wall_s']:.2f}s, load {row['load_avg']:.1f}",
                flush=True,
            )
            rows.append(row)
    return rows


def router_prior(ckpt: str, topics, worlds=(2, 4), n_prompts: int = 32) -> list[dict]:
    """What the ROUTER can do before any forward (cluster/control/expert_affinity.py): place each
    held-out request by the calibration log's per-token-id prior of its prompt tokens, vs the
    usual policy (equal loads: round robin) and vs voting with the prompt's real routing (what
    a prefill would know). Scored on the tokens after the prompt: the share of (token, layer)
    pairs whose top-2 experts all sit on the request's rank, under the s-EG placement."""
    from cluster.control.expert_affinity import ExpertAffinity
    from cluster.control.routing import WorkerLoad
    from expert_router.sts import capped_rank, rank_votes
    from expert_router.token_prior import TokenPrior

    calib = record_routing(ckpt, topic_prompts(topics, 24, seed=1), max_tokens=16)
    prompts = topic_prompts(topics, n_prompts, seed=2)
    held = record_routing(ckpt, prompts, max_tokens=MAX_NEW)  # prompt + generated, per sequence
    prior = TokenPrior.fit(calib)
    rows = []
    for world in worlds:
        seg = coactivation_placement(calib, world)
        affinity = ExpertAffinity("ep", seg, prior)
        picks: dict[str, list[int]] = {"round robin (usual policy)": [], "router prior": [], "prompt routing": []}
        counts = {m: np.zeros(world) for m in picks}
        for i, (prompt, seq) in enumerate(zip(prompts, held.sequences())):
            loads = [
                WorkerLoad(f"ep-{r}", "decode", pending_requests=int(counts["router prior"][r])) for r in range(world)
            ]
            chosen = {
                "round robin (usual policy)": i % world,
                "router prior": int(affinity.choose(loads, prompt).worker_id.rsplit("-", 1)[1]),
                "prompt routing": capped_rank(
                    rank_votes(seg, held.layers, seq[: len(prompt)]), counts["prompt routing"]
                ),
            }
            for m, r in chosen.items():
                picks[m].append(r)
                counts[m][r] += 1
        for mode, ranks in picks.items():
            local = pairs = 0
            for r, prompt, seq in zip(ranks, prompts, held.sequences()):
                rest = seq[len(prompt) :].astype(np.int64)  # [n, L, k], the generated tokens
                for li, layer in enumerate(held.layers):
                    owners = np.array(seg.owners[layer])[rest[:, li]]  # [n, k]
                    local += int((owners == r).all(axis=1).sum())
                    pairs += owners.shape[0]
            agree = np.mean([a == b for a, b in zip(ranks, picks["prompt routing"])])
            row = {
                "world": world,
                "mode": mode,
                "local_fraction": local / pairs,
                "agrees_with_prompt_routing": float(agree),
                "max_rank_requests": float(counts[mode].max() / counts[mode].sum()),
                "load_avg": os.getloadavg()[0],
            }
            print(
                f"  EP={world} {mode}: local {row['local_fraction']:.3f}, same rank as prompt routing "
                f"{row['agrees_with_prompt_routing']:.2f}, busiest rank {row['max_rank_requests']:.2f}",
                flush=True,
            )
            rows.append(row)
    return rows


def traffic_modelled() -> list[dict]:
    st = PlantedStructure(num_experts=64, top_k=2, num_layers=8, num_groups=8, stickiness=0.9)
    train, _ = planted_log(st, 60, 40, seed=3)
    test, _ = planted_log(st, 40, 40, seed=3, sample_seed=4)
    rows = []
    for world in (2, 4, 8):
        con = ExpertPlacement.contiguous(64, world, test.layers)
        seg = coactivation_placement(train, world)
        for mode, placement, sts in (("plain EP", con, False), ("s-EG", seg, False), ("s-EG + s-TS", seg, True)):
            t = sts_traffic(test, placement, hidden=4096, dtype_bytes=2, prefix=8, sts=sts)
            d = placement_traffic(test, placement, hidden=4096, dtype_bytes=2)
            rows.append(
                {
                    "world": world,
                    "mode": mode,
                    "bytes_per_token": t.bytes_per_token,
                    "distinct_ranks_per_token": d.distinct_ranks_per_token,
                    "local_fraction": t.local_fraction,
                    "max_rank_requests": t.max_rank_requests,
                    "max_rank_load": d.max_rank_load,
                }
            )
    return rows


def caching() -> list[dict]:
    expert_bytes = 3 * 1024 * 2816 * 2
    load_s = expert_bytes / 25e9
    rows = []
    for name, st in (
        ("synthetic E=16 L=4", PlantedStructure(num_experts=16, top_k=2, num_layers=4, num_groups=4)),
        ("synthetic E=64 L=8", PlantedStructure(num_experts=64, top_k=2, num_layers=8, num_groups=8)),
    ):
        train, _ = planted_log(st, 60, 40, seed=5)
        test, _ = planted_log(st, 24, 40, seed=5, sample_seed=6)
        pred = PathPredictor(train)
        needed_per_token = None
        for frac in (0.25, 0.5, 0.75):
            slots = int(st.num_experts * frac)
            row = {"log": name, "fraction": frac, "slots": slots}
            for policy in ("lru", "lfu", "expertflow"):
                s = simulate(test, slots, policy, pred if policy == "expertflow" else None, batch=4)
                row[f"{policy}_hit"] = s.hit_ratio
                row[f"{policy}_loads_per_token"] = s.loads / test.num_tokens
                row[f"{policy}_stall_ms_per_token"] = s.misses * load_s * 1e3 / test.num_tokens
                if policy == "expertflow":
                    row["prefetch_accuracy"] = s.prefetch_accuracy
                needed_per_token = (s.hits + s.misses) / test.num_tokens
            s = simulate(test, slots, "expertflow", pred, batch=4, prefetch=False)
            row["expertflow_noprefetch_hit"] = s.hit_ratio
            s = simulate(test, slots, "expertflow", pred, batch=4, prefetch_width=slots)
            row["expertflow_wide_hit"] = s.hit_ratio
            row["expertflow_wide_loads_per_token"] = s.loads / test.num_tokens
            row["expertflow_wide_prefetch_accuracy"] = s.prefetch_accuracy
            row["on_demand_stall_ms_per_token"] = needed_per_token * load_s * 1e3
            rows.append(row)
            print(
                f"  {name} {int(frac * 100)}%: hit EF {row['expertflow_hit']:.3f} (no prefetch "
                f"{row['expertflow_noprefetch_hit']:.3f}, wide {row['expertflow_wide_hit']:.3f}) LRU {row['lru_hit']:.3f} LFU {row['lfu_hit']:.3f}; "
                f"prefetch acc {row['prefetch_accuracy']:.3f}",
                flush=True,
            )
    return rows


def scaling(ckpt: str, topics, worlds=(2, 4), n_prompts: int = 16, max_new: int = MAX_NEW) -> list[dict]:
    prompts = topic_prompts(topics, n_prompts, seed=7)
    params = SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
    rows = []
    for _ in range(2):  # alternate, best of 2
        for threads in (1, 2):
            torch.set_num_threads(threads)
            llm = LLM(ckpt, skip_tokenizer_init=True, **OPTIONS)
            llm.generate(prompts[:2], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))  # warm up
            t0 = time.perf_counter()
            llm.generate(prompts, params)
            wall = time.perf_counter() - t0
            rows.append(
                {
                    "world": 1,
                    "threads": threads,
                    "tokens_per_s": len(prompts) * max_new / wall,
                    "load_avg": os.getloadavg()[0],
                }
            )
        cfg = build_engine_config(ckpt, **OPTIONS).model
        for world in worlds:
            ranks_of = [i % world for i in range(n_prompts)]
            for backend in ("gloo", "shm"):
                placement = contiguous_placement(cfg, world)
                r = run_group(ckpt, world, prompts, placement, ranks_of, max_new=max_new, backend=backend)
                rows.append(
                    {
                        "world": world,
                        "threads": 1,
                        "group": backend,
                        "tokens_per_s": r["generated_tokens_per_s"],
                        "bytes_per_round": r["bytes_per_round"],
                        "load_avg": os.getloadavg()[0],
                    }
                )
    best: dict[tuple[int, int, str], dict] = {}
    for r in rows:
        key = (r["world"], r["threads"], r.get("group", "-"))
        if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
            best[key] = r
    for (w, threads, group), r in sorted(best.items()):
        line = f"  EP={w} x {threads} thread(s), group {group}: {r['tokens_per_s']:.0f} tok/s"
        print(f"{line} (load {r['load_avg']:.1f})", flush=True)
    return list(best.values())


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    modes = ["plain EP", "s-EG", "s-EG + s-TS"]
    worlds = sorted({r["world"] for r in result["traffic_measured"]})
    width = 0.25
    for i, mode in enumerate(modes):
        vals = [
            next(r["bytes_per_token"] for r in result["traffic_measured"] if r["world"] == w and r["mode"] == mode)
            for w in worlds
        ]
        ax.bar([x + i * width for x in range(len(worlds))], vals, width, label=mode)
    ax.set_xticks([x + width for x in range(len(worlds))], [f"EP={w}" for w in worlds])
    ax.set_ylabel("cross-rank bytes per token (measured)")
    ax.set_title("SYNTHETIC planted-gate Mixtral: all-to-all traffic")
    ax.legend()
    ax = axes[1]
    for log in sorted({r["log"] for r in result["caching"]}):
        rows = [r for r in result["caching"] if r["log"] == log]
        x = [r["fraction"] * 100 for r in rows]
        for policy, style in (("expertflow", "-o"), ("lru", "--s"), ("lfu", ":^")):
            ax.plot(x, [r[f"{policy}_hit"] for r in rows], style, label=f"{policy} ({log})")
    ax.set_xlabel("fast-tier slots (% of experts)")
    ax.set_ylabel("hit ratio")
    ax.set_title("SYNTHETIC routing logs: expert cache hit ratio")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(RESULTS / "expert_parallel.json"))
    ap.add_argument(
        "--only-router-prior",
        action="store_true",
        help="only the router's s-TS placement accuracy (results/expert_parallel_router_prior.json)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    result: dict = {"load_avg_start": os.getloadavg()}
    ckpt, topics = build_planted_moe_checkpoint(
        str(Path(os.environ.get("TMPDIR", "/tmp")) / "splitserve_planted_moe"),
        hidden_size=HIDDEN,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    print("router placement from the token prior (planted-gate model):", flush=True)
    result["router_prior"] = router_prior(ckpt, topics)
    if args.only_router_prior:
        result["load_avg_end"] = os.getloadavg()
        out = RESULTS / "expert_parallel_router_prior.json"
        out.write_text(json.dumps(result, indent=2, default=float) + "\n")
        print(f"wrote {out}")
        return
    print("traffic (measured, planted-gate model):", flush=True)
    result["traffic_measured"] = traffic_measured(ckpt, topics)
    print("traffic (modelled, synthetic log E=64, hidden 4096 bf16):", flush=True)
    result["traffic_modelled"] = traffic_modelled()
    for r in result["traffic_modelled"]:
        print(
            f"  EP={r['world']} {r['mode']}: {r['bytes_per_token']:.0f} B/token, distinct "
            f"{r['distinct_ranks_per_token']:.3f}, local {r['local_fraction']:.3f}"
        )
    print("caching (synthetic logs):", flush=True)
    result["caching"] = caching()
    print("scaling (planted-gate model):", flush=True)
    result["scaling"] = scaling(ckpt, topics)
    print("scaling (planted-gate Mixtral, 8 experts of hidden 768 x 2048, ~160M parameters):", flush=True)
    large, large_topics = build_planted_moe_checkpoint(
        str(Path(os.environ.get("TMPDIR", "/tmp")) / "splitserve_planted_moe_160m"),
        num_experts=8,
        num_topics=4,
        hidden_size=768,
        intermediate_size=2048,
        num_attention_heads=12,
        num_key_value_heads=4,
    )
    result["scaling_large"] = scaling(large, large_topics, worlds=(2,), n_prompts=8, max_new=16)
    result["load_avg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
