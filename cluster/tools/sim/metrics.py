"""Simulation results: per-request latencies, percentiles, SLO attainment and goodput.

Definitions (seconds of simulated time, per request):
- TTFT = first token - arrival (the first token is sampled by the prefill);
- TPOT = (last token - first token) / (output - 1), requests with >= 2 output tokens;
- E2E = last token - arrival;
- ITL: every gap between consecutive tokens of a request, pooled over requests; decode
  steps contribute their duration once per request in the batch (weighted samples), the
  first decode token its gap from the first token (KV hand-over included);
- a request meets the SLO when it finished with TTFT <= slo_ttft and TPOT <= slo_tpot
  (a one-token request has no TPOT); attainment = such requests / all requests (unfinished
  ones miss), goodput = such requests / arrival window (first -> last arrival), i.e.
  attainment x offered rate; throughput = finished requests / span (first arrival -> last
  finish).
Percentiles are numpy's linear interpolation; the weighted ITL percentile is the smallest
sample whose cumulative weight reaches the fraction.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from cluster.control.routing import RoleSwitch
from cluster.tools.sim.instance import Instance
from cluster.tools.sim.request import SimRequest

QUANTILES = (50, 90, 99)


def stats(xs: np.ndarray) -> dict[str, float]:
    if xs.size == 0:
        return {"mean": float("nan"), **{f"p{q}": float("nan") for q in QUANTILES}}
    out = {"mean": float(xs.mean())}
    for q, v in zip(QUANTILES, np.percentile(xs, QUANTILES)):
        out[f"p{q}"] = float(v)
    return out


def weighted_stats(values: np.ndarray, weights: np.ndarray) -> dict[str, float]:
    if values.size == 0 or weights.sum() == 0:
        return {"mean": float("nan"), **{f"p{q}": float("nan") for q in QUANTILES}}
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    cw = np.cumsum(w)
    total = cw[-1]
    out = {"mean": float((v * w).sum() / total)}
    for q in QUANTILES:
        out[f"p{q}"] = float(v[min(int(np.searchsorted(cw, q / 100 * total)), len(v) - 1)])
    return out


@dataclass
class SimResult:
    workload: str
    config: Any  # SimConfig
    table_source: str
    illustrative: bool  # the step-time table is an estimate, not a measurement
    requests: list[SimRequest]
    instances: list[Instance]
    itl_dt: list[float]
    itl_w: list[float]
    role_switches: list[RoleSwitch]
    num_events: int
    num_preemptions: int
    end_s: float  # simulated time of the last event
    wall_s: float  # wall-clock seconds the run took

    def arrays(self) -> dict[str, np.ndarray]:
        """Per-request columns (NaN where a request never got there)."""
        r = self.requests

        def col(get, dtype=float) -> np.ndarray:
            return np.fromiter((get(q) for q in r), dtype=dtype, count=len(r))

        arrival = col(lambda q: q.arrival)
        first = col(lambda q: q.t_first if q.t_first >= 0 else np.nan)
        done = col(lambda q: q.t_done if q.t_done >= 0 else np.nan)
        output = col(lambda q: q.output, int)
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = np.where(output > 1, (done - first) / np.maximum(output - 1, 1), 0.0)
        tpot[np.isnan(done)] = np.nan
        return {
            "arrival": arrival,
            "prompt": col(lambda q: q.prompt, int),
            "output": output,
            "ttft": first - arrival,
            "tpot": tpot,
            "e2e": done - arrival,
            "transfer": col(lambda q: q.transfer_s if q.t_prefilled >= 0 and q.t_second >= 0 else np.nan),
            "finished": ~np.isnan(done),
            "preemptions": col(lambda q: q.preemptions, int),
        }

    def summary(self, slo_ttft_s: float | None = None, slo_tpot_s: float | None = None) -> dict[str, Any]:
        a = self.arrays()
        fin = a["finished"]
        n = len(self.requests)
        span = float(np.nanmax(a["arrival"] + a["e2e"]) - a["arrival"].min()) if fin.any() else 0.0
        out: dict[str, Any] = {
            "workload": self.workload,
            "instances": {
                "prefill": self.config.num_prefill,
                "decode": self.config.num_decode,
                "mixed": self.config.num_mixed,
            },
            "requests": n,
            "finished": int(fin.sum()),
            "unfinished": int(n - fin.sum()),
            "ttft_s": stats(a["ttft"][~np.isnan(a["ttft"])]),
            "tpot_s": stats(a["tpot"][fin & (a["output"] > 1)]),
            "itl_s": weighted_stats(np.asarray(self.itl_dt), np.asarray(self.itl_w, dtype=float)),
            "e2e_s": stats(a["e2e"][fin]),
            "kv_handover_s": stats(a["transfer"][~np.isnan(a["transfer"])]),
            "span_s": span,
            "throughput_rps": float(fin.sum() / span) if span > 0 else 0.0,
            "output_tokens_per_s": float(a["output"][fin].sum() / span) if span > 0 else 0.0,
            "routes": dict(sorted(Counter(q.reason for q in self.requests if q.reason).items())),
            "role_switches": len(self.role_switches),
            "preemptions": self.num_preemptions,
            "utilization": self.utilization(),
            "sim": {"events": self.num_events, "wall_s": self.wall_s, "simulated_s": self.end_s},
            "illustrative_table": self.illustrative,
        }
        if slo_ttft_s is not None or slo_tpot_s is not None:
            ok = fin.copy()
            if slo_ttft_s is not None:
                ok &= a["ttft"] <= slo_ttft_s
            if slo_tpot_s is not None:
                ok &= (a["output"] <= 1) | (a["tpot"] <= slo_tpot_s)
            good = int(ok.sum())
            window = float(a["arrival"].max() - a["arrival"].min()) if n > 1 else 0.0
            out["slo"] = {
                "ttft_s": slo_ttft_s,
                "tpot_s": slo_tpot_s,
                "attainment": good / n if n else 0.0,
                "goodput_rps": good / window if window > 0 else 0.0,
            }
        return out

    def utilization(self) -> dict[str, float]:
        """Mean fraction of the simulated time each pool's instances spent in steps."""
        if self.end_s <= 0:
            return {}
        by_role: dict[str, list[float]] = {}
        for m in self.instances:
            by_role.setdefault(m.role, []).append(m.busy_s / self.end_s)
        return {role: float(np.mean(v)) for role, v in by_role.items()}


def format_summary(s: dict[str, Any]) -> str:
    """A human-readable table of ``SimResult.summary()``."""
    inst = s["instances"]
    lines = [
        f"workload {s['workload']}: {s['requests']} requests, {s['finished']} finished, "
        f"{s['unfinished']} unfinished; instances prefill={inst['prefill']} decode={inst['decode']} "
        f"mixed={inst['mixed']}",
        "",
        f"{'metric':<16}{'mean':>11}{'p50':>11}{'p90':>11}{'p99':>11}",
    ]
    for key, label in (
        ("ttft_s", "TTFT (ms)"),
        ("tpot_s", "TPOT (ms)"),
        ("itl_s", "ITL (ms)"),
        ("e2e_s", "E2E (ms)"),
        ("kv_handover_s", "KV hand-over"),
    ):
        v = s[key]
        lines.append(f"{label:<16}" + "".join(f"{v[k] * 1e3:>11.2f}" for k in ("mean", "p50", "p90", "p99")))
    lines += [
        "",
        f"throughput {s['throughput_rps']:.2f} req/s, {s['output_tokens_per_s']:.0f} output tok/s "
        f"over {s['span_s']:.1f} s",
        f"routes {s['routes']}, role switches {s['role_switches']}, preemptions {s['preemptions']}",
        "utilization " + ", ".join(f"{k} {v:.0%}" for k, v in s["utilization"].items()),
    ]
    if "slo" in s:
        slo = s["slo"]
        parts = []
        if slo["ttft_s"] is not None:
            parts.append(f"TTFT <= {slo['ttft_s'] * 1e3:g} ms")
        if slo["tpot_s"] is not None:
            parts.append(f"TPOT <= {slo['tpot_s'] * 1e3:g} ms")
        lines.append(
            f"SLO ({', '.join(parts)}): attainment {slo['attainment']:.1%}, goodput {slo['goodput_rps']:.2f} req/s"
        )
    sim = s["sim"]
    lines.append(f"simulated {sim['simulated_s']:.1f} s in {sim['wall_s']:.2f} s wall ({sim['events']} events)")
    if s.get("illustrative_table"):
        lines.append("note: the step-time table is ILLUSTRATIVE (an estimate, not a measurement)")
    return "\n".join(lines)
