"""The benchmark's PNG plots (matplotlib, Agg backend: no screen needed)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._trace import Event

if TYPE_CHECKING:
    from . import Measurement


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_speedups(rows: list[Measurement], path: Path) -> None:
    """Speedup over C=1 against max_concurrency, one line per N that has a C=1 baseline; speedup = C dashed
    (the most a cap of C allows)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_n: dict[int, list[Measurement]] = defaultdict(list)
    for r in rows:
        by_n[r.params["N"]].append(r)
    for n, runs in sorted(by_n.items()):
        runs = sorted((r for r in runs if r.speedup is not None), key=lambda r: r.params["C"])
        if runs:
            ax.plot([r.params["C"] for r in runs], [r.speedup for r in runs], marker="o", label=f"N = {n:,}")
    all_c = sorted({r.params["C"] for r in rows})
    ax.plot(all_c, all_c, linestyle="--", color="grey", label="speedup = C")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("max_concurrency (C)")
    ax.set_ylabel("speedup over C = 1")
    ax.set_title("llm_batch fan-out through the engine (simulator, fixed latency)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_timeline(events: list[Event], path: Path) -> None:
    """A Gantt chart of HTTP attempts per agent (one row per agent, bars from call_started to its end)."""
    plt = _pyplot()
    starts: dict[int, tuple[float, str]] = {}
    bars: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for e in events:
        if e["event"] == "call_started":
            starts[e["call_id"]] = (e["t"], str(e.get("agent_id", "?")))
        elif e["event"] in ("call_finished", "call_failed") and e["call_id"] in starts:
            t0, agent = starts.pop(e["call_id"])
            bars[agent].append((t0, e["t"] - t0))
    agents = sorted(bars, key=lambda a: [int(x) for x in a.split(".")] if a.replace(".", "").isdigit() else [0])
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.28 * len(agents) + 1)))
    for row, agent in enumerate(agents):
        ax.broken_barh(bars[agent], (row - 0.4, 0.8))
    ax.set_yticks(range(len(agents)), labels=agents, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("agent (dotted path from the root)")
    ax.set_title("model calls per agent: recursive fan-out, k = 10, depth = 2")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
