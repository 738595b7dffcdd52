"""The eval's plot: mean score against context length, one line per (task, engine, model)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from ._stats import GroupSummary

__all__ = ["plot_scores"]


def plot_scores(groups: Sequence[GroupSummary], path: Path) -> Path | None:
    """Write a PNG of score (with its 95% bootstrap interval as error bars) against length in tokens (log 2
    axis), one line per (task, engine, model); returns ``path``, or None when matplotlib is not installed
    (``pip install 'rlm-async[eval]'``) or there is nothing to plot. Uses the Agg backend: no screen needed."""
    if not groups:
        return None
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[tuple[str, str, str], list[GroupSummary]] = defaultdict(list)
    for g in groups:
        lines[(g.task, g.engine, g.model)].append(g)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for (task, engine, model), members in sorted(lines.items()):
        members.sort(key=lambda g: g.length_tokens)
        xs = [g.length_tokens for g in members]
        ys = [100 * g.score for g in members]
        err = [[100 * (g.score - g.ci_low) for g in members], [100 * (g.ci_high - g.score) for g in members]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"{task} · {engine} · {model}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("score (%): accuracy, or F1 for OOLONG-Pairs")
    ax.set_title("score against context length (bars: 95% bootstrap interval)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
