"""Result files and PNG plots.

A result file holds one run (a ``vllm bench serve``-style dict) or a sweep
(``{"runs": [run, ...]}``). Plots put the request rate on the x axis; a run at rate ``inf``
is placed at its achieved request throughput (that is the load it offered). Every series
(one per result file when comparing) gets one colour:

- ``latency_vs_rate.png``: TTFT, TPOT, ITL and E2E latency, median (solid), p90 (dashed) and
  p99 (dotted) in ms;
- ``goodput_vs_rate.png``: request throughput (solid) and goodput (dashed, when the runs
  had SLOs) in requests/s.

Figures are built with matplotlib's object API on the Agg canvas: no GUI, no global state.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from cluster.tools.bench.metrics import LATENCY_METRICS

TITLES = {"ttft": "time to first token", "tpot": "time per output token", "itl": "inter-token latency"}
TITLES["e2el"] = "end-to-end latency"
STYLES = (("median", "-"), ("p90", "--"), ("p99", ":"))


class ResultFileError(ValueError):
    pass


def save_results(path: str | Path, runs: list[dict]) -> None:
    """One run is written as its dict, several as ``{"runs": [...]}``."""
    data = runs[0] if len(runs) == 1 else {"runs": runs}
    Path(path).write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")  # rate inf is written "inf"


def load_runs(path: str | Path) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ResultFileError(f"cannot read result file {path}: {e}") from None
    runs = data.get("runs") if isinstance(data, dict) and "runs" in data else [data]
    if not isinstance(runs, list) or not runs:
        raise ResultFileError(f"{path}: no runs")
    for i, run in enumerate(runs):
        if not isinstance(run, dict) or "completed" not in run or "request_throughput" not in run:
            raise ResultFileError(f"{path}: run {i} is not a benchmark result (no 'completed'/'request_throughput')")
    return runs


def offered_rate(run: dict) -> float:
    """The run's request rate; for rate 'inf' its achieved request throughput."""
    rate = run.get("request_rate", "inf")
    rate = math.inf if rate in ("inf", None) else float(rate)
    return float(run["request_throughput"]) if math.isinf(rate) else rate


def _series(runs: list[dict]) -> list[dict]:
    return sorted(runs, key=offered_rate)


def new_figure(rows: int, cols: int, size: tuple[float, float]):
    """A figure of rows x cols axes (``axes[row][col]``) on the Agg canvas (also used by
    benchmarks/ scripts, so their plots look like these)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    # fixed margins in inches (matplotlib's layout engines cost seconds per figure)
    w, h = size
    fig.subplots_adjust(left=0.8 / w, right=1 - 0.2 / w, bottom=0.6 / h, top=1 - 0.4 / h, hspace=0.35, wspace=0.22)
    return fig, axes


def plot_latency(series: dict[str, list[dict]], out: Path) -> Path:
    fig, axes = new_figure(2, 2, (11, 8))
    colors = series_colors(len(series))
    for ax, metric in zip(axes.flat, LATENCY_METRICS):
        for (label, runs), color in zip(series.items(), colors):
            runs = _series(runs)
            x = [offered_rate(r) for r in runs]
            for stat, style in STYLES:
                key = f"{stat}_{metric}_ms"
                if all(key in r for r in runs):
                    name = f"{label} {stat}" if len(series) > 1 else stat
                    ax.plot(x, [r[key] for r in runs], linestyle=style, marker="o", color=color, label=name)
        ax.set_title(TITLES[metric])
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    path = out / "latency_vs_rate.png"
    fig.savefig(path, dpi=100)
    return path


def plot_goodput(series: dict[str, list[dict]], out: Path) -> Path:
    fig, axes = new_figure(1, 1, (7, 5))
    ax = axes[0][0]
    for (label, runs), color in zip(series.items(), series_colors(len(series))):
        runs = _series(runs)
        x = [offered_rate(r) for r in runs]
        prefix = f"{label} " if len(series) > 1 else ""
        ax.plot(x, [r["request_throughput"] for r in runs], "-o", color=color, label=f"{prefix}throughput")
        if all(r.get("request_goodput") is not None for r in runs):
            ax.plot(x, [r["request_goodput"] for r in runs], "--s", color=color, label=f"{prefix}goodput")
    ax.set_title("throughput and goodput (requests meeting every SLO)")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("req/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    path = out / "goodput_vs_rate.png"
    fig.savefig(path, dpi=100)
    return path


def series_colors(n: int) -> list:
    """One tab10 colour per series."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def plot_results(series: dict[str, list[dict]], out_dir: str | Path) -> list[Path]:
    """Both plots for ``{label: runs}`` into ``out_dir`` (created); the PNG paths."""
    if not series or not all(series.values()):
        raise ValueError("nothing to plot")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [plot_latency(series, out), plot_goodput(series, out)]


def compare_series(paths: list[str]) -> dict[str, list[dict]]:
    """``{label: runs}`` for several result files; labels are the file names (made unique)."""
    series: dict[str, list[dict]] = {}
    for p in paths:
        label = Path(p).stem
        while label in series:
            label = f"{label}'"
        series[label] = load_runs(p)
    return series
