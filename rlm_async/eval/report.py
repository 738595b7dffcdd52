"""The Markdown tables of docs/eval.md from ``results.jsonl`` files, on the items every row of a table shares.

``python -m rlm_async.eval.report [LABEL=]RESULTS[@ENGINE] ...`` reads each file (optionally only one
engine's rows, under a label of your choosing, e.g. ``"rlm_async (one-block example)=out15/results.jsonl"``),
keeps, for each task and length, the item ids that every input holds, and prints one table. Inputs that
name no label are labelled by engine. Scores and intervals are those of ``rlm-async eval`` (the mean, and a
seeded 95% percentile bootstrap, :func:`rlm_async.eval.bootstrap_ci`), so a table can be recomputed from the
raw rows.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._runner import read_results
from ._stats import GroupSummary, summarise

__all__ = ["Source", "main", "markdown_table", "shared_rows"]

COLUMNS = (
    "task", "length", "engine", "n", "score", "95% CI", "non-empty answer", "stop reasons",
    "root turns / calls per item", "tokens in/out per item", "wall s per item (p50)",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Source:
    """One input: ``path`` (a ``results.jsonl``), only ``engine``'s rows when given, shown as ``label``
    (default: each row's engine)."""

    path: Path
    label: str | None = None
    engine: str | None = None

    @classmethod
    def parse(cls, spec: str) -> Source:
        """``[LABEL=]PATH[@ENGINE]``."""
        label, _, rest = spec.rpartition("=") if "=" in spec else (None, "", spec)
        path, _, engine = rest.partition("@")
        return cls(Path(path), label or None, engine or None)

    def rows(self) -> list[dict[str, Any]]:
        """Its rows, filtered and relabelled: ``engine`` holds the label."""
        rows = [r for r in read_results(self.path) if self.engine is None or r["engine"] == self.engine]
        return [{**r, "engine": self.label} for r in rows] if self.label else rows


def shared_rows(sources: Sequence[Source]) -> list[dict[str, Any]]:
    """Every source's rows, kept only for the item ids that every (label, task, length) group holds among
    the groups of that task and length. Raises ValueError when two sources give one label the same item."""
    rows = [row for source in sources for row in source.rows()]
    ids: dict[tuple[str, int], dict[str, set[str]]] = {}
    for row in rows:
        per_label = ids.setdefault((row["task"], int(row["length_tokens"])), {})
        seen = per_label.setdefault(row["engine"], set())
        if row["id"] in seen:
            raise ValueError(f"{row['engine']!r} has item {row['id']} twice: give the sources distinct labels")
        seen.add(row["id"])
    common = {key: set.intersection(*per_label.values()) for key, per_label in ids.items()}
    return [row for row in rows if row["id"] in common[(row["task"], int(row["length_tokens"]))]]


def markdown_table(groups: Sequence[GroupSummary], order: Mapping[str, int] | None = None) -> str:
    """The groups as a Markdown table, by task, length, then ``order`` of the engine labels (else by name)."""
    order = order or {}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for g in sorted(groups, key=lambda g: (g.task, g.length_tokens, order.get(g.engine, len(order)), g.engine)):
        turns = f"{g.turns / g.turns_n:.1f}" if g.turns is not None and g.turns_n else "-"
        if g.turns_n and g.turns_n < g.n:
            turns += f" ({g.turns_n} items)"
        stops = ", ".join(f"{reason} {count}" for reason, count in g.stop_reasons.items())
        cells = (
            g.task, f"{g.length_tokens:,}", g.engine, str(g.n), f"{g.score:.2f}", f"[{g.ci_low:.2f}, {g.ci_high:.2f}]",
            f"{g.non_empty}/{g.n}", stops, f"{turns} / {g.calls / g.n:.1f}",
            f"{g.prompt_tokens / g.n:,.0f} / {g.completion_tokens / g.n:,.0f}", f"{g.p50_s:.0f}",
        )  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The command. Exit codes: 0 printed, 2 bad arguments or unreadable files."""
    parser = argparse.ArgumentParser(prog="python -m rlm_async.eval.report", description=__doc__.split("\n")[0])
    parser.add_argument("sources", nargs="+", metavar="[LABEL=]RESULTS[@ENGINE]")
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's seed (rlm-async eval's: 0)")
    args = parser.parse_args(argv)
    sources = [Source.parse(spec) for spec in args.sources]
    try:
        rows = shared_rows(sources)
    except (OSError, ValueError, KeyError) as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print("report: no item is in every input", file=sys.stderr)
        return 2
    order = {s.label: i for i, s in enumerate(sources) if s.label}
    print(markdown_table(summarise(rows, seed=args.seed), order))
    return 0


if __name__ == "__main__":
    sys.exit(main())
