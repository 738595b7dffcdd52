"""Print a results.json of ``rlm-async bench`` as the Markdown table docs/benchmarks.md and README.md carry.

``.venv/bin/python benchmarks/table.py [benchmarks/results/results.json]``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = ("scenario", "engine", "params", "wall s", "speedup", "/ideal", "CPU ms/call", "CPU/floor", "wall/floor",
           "peak", "RSS MiB", "ok")  # fmt: skip


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def rows(results: list[dict[str, Any]]) -> list[str]:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        params = " ".join(f"{k}={v}" for k, v in r["params"].items())
        cells = [
            r["scenario"], r["engine"], params, fmt(r["wall_s"], ".3f"), fmt(r["speedup"], ".1f"),
            fmt(r["ideal_ratio"], ".2f"), fmt(r["cpu_ms_per_call"], ".3f"), fmt(r.get("cpu_vs_floor"), ".2f"),
            fmt(r.get("wall_vs_floor"), ".3f"), fmt(r["peak_in_flight"], "d"), fmt(r["peak_rss_mb"], ".0f"),
            "yes" if r["ok"] else "no",
        ]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return out


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/results.json")
    print("\n".join(rows(json.loads(path.read_text())["results"])))
