"""The Markdown tables of docs/eval.md from ``results.jsonl`` files, on the items every row of a table shares.

``python -m rlm_async.eval.report [LABEL=]RESULTS[@ENGINE] ...`` reads each file (optionally only one
engine's rows, under a label of your choosing, e.g. ``"rlm_async (one-block example)=out15/results.jsonl"``),
keeps, for each task and length, the item ids that every input holds, and prints one table. Inputs that
name no label are labelled by engine; a path holds no ``=`` or ``@``. Scores and intervals are those of
``rlm-async eval`` (the mean, and a seeded 95% percentile bootstrap, :func:`rlm_async.eval.bootstrap_ci`, over
the rows in file order; p50 is interpolated), so a table can be recomputed from the raw rows.
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
    """Every source's rows, kept only for the item ids that every source holds for the row's task and length.
    A group is a (label, model): one file may hold an engine on two models. A task and length that some
    source lacks is left out.

    Raises:
        ValueError: a source has no rows (a wrong path or engine), or one group holds an item twice.
        OSError: a file cannot be read.
        KeyError: a row lacks ``id``, ``task`` or ``length_tokens``.
    """
    per_source = []
    for source in sources:
        rows = source.rows()
        if not rows:
            what = f" for engine {source.engine!r}" if source.engine else ""
            raise ValueError(f"{source.path} has no rows{what}")
        per_source.append(rows)
    held: list[dict[tuple[str, int], set[str]]] = []
    for rows in per_source:
        ids: dict[tuple[str, int], set[str]] = {}
        seen: set[tuple[str, str, str]] = set()
        for row in rows:
            group = (str(row["engine"]), str(row["model"]), str(row["id"]))
            if group in seen:
                raise ValueError(f"{row['engine']!r} on {row['model']} has item {row['id']} twice")
            seen.add(group)
            ids.setdefault((str(row["task"]), int(row["length_tokens"])), set()).add(str(row["id"]))
        held.append(ids)
    keys = set.intersection(*(set(ids) for ids in held))
    common = {key: set.intersection(*(ids[key] for ids in held)) for key in keys}
    return [
        row for rows in per_source for row in rows
        if str(row["id"]) in common.get((str(row["task"]), int(row["length_tokens"])), set())
    ]  # fmt: skip


def markdown_table(groups: Sequence[GroupSummary], order: Mapping[str, int] | None = None) -> str:
    """The groups as a Markdown table, by task, length, then ``order`` of the engine labels (else by name); the
    engine cell names the model too when the groups hold more than one."""
    order = order or {}
    several_models = len({g.model for g in groups}) > 1  # then each row names its model
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for g in sorted(groups, key=lambda g: (g.task, g.length_tokens, order.get(g.engine, len(order)), g.engine)):
        turns = f"{g.turns / g.turns_n:.1f}" if g.turns is not None and g.turns_n else "-"
        if g.turns_n and g.turns_n < g.n:
            turns += f" ({g.turns_n} items)"
        label = f"{g.engine} ({g.model})" if several_models else g.engine
        stops = ", ".join(f"{reason} {count}" for reason, count in g.stop_reasons.items())
        cells = (
            g.task, f"{g.length_tokens:,}", label.replace("|", "\\|"), str(g.n), f"{g.score:.2f}",
            f"[{g.ci_low:.2f}, {g.ci_high:.2f}]", f"{g.non_empty}/{g.n}", stops, f"{turns} / {g.calls / g.n:.1f}",
            f"{g.prompt_tokens / g.n:,.0f} / {g.completion_tokens / g.n:,.0f}", f"{g.p50_s:.0f}",
        )  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The command. Exit codes: 0 printed; 2 an input with no rows (a wrong path or engine), unreadable or
    malformed rows, or no shared item. Bad arguments exit 2 through argparse's ``SystemExit``."""
    parser = argparse.ArgumentParser(prog="python -m rlm_async.eval.report", description=__doc__.split("\n")[0])
    parser.add_argument("sources", nargs="+", metavar="[LABEL=]RESULTS[@ENGINE]")
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's seed (rlm-async eval's: 0)")
    args = parser.parse_args(argv)
    sources = [Source.parse(spec) for spec in args.sources]
    try:
        rows = shared_rows(sources)
        if not rows:
            raise ValueError("no item is in every input")
        table = markdown_table(summarise(rows, seed=args.seed), {s.label: i for i, s in enumerate(sources) if s.label})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"report: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
