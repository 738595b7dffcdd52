"""Issue 13's floor targets alone: the ``floor_target`` rows of ``rlm-async bench``, without the rest of the suite.

The same call the full suite makes (``rlm_async.bench._floor.floor_targets``: N = 2,000 at C = 64 and 256, each
round running the floor and every configuration once in turn, medians), against the same simulator (50 ms a
call, in a child process). About three minutes here with the default 9 rounds. Run from a checkout::

    .venv/bin/python benchmarks/floor_targets.py [--reps 9] [--out benchmarks/results/floor_targets.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from dataclasses import asdict
from pathlib import Path

from rlm_async.bench import BenchConfig, Measurement, _engine_run, _measure
from rlm_async.bench._floor import FLOOR_ROUNDS, floor_targets
from rlm_async.sim import sim_process


async def run(reps: int = FLOOR_ROUNDS) -> list[Measurement]:
    """The floor-target rows, ``reps`` rounds."""
    async with sim_process(BenchConfig().sim_config()) as sim:
        rows: list[Measurement] = await floor_targets(sim.base_url, _engine_run, _measure, reps=reps)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=FLOOR_ROUNDS, help=f"interleaved rounds (default {FLOOR_ROUNDS})")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    load = os.getloadavg()
    rows = asyncio.run(run(args.reps))
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; after: {os.getloadavg()[0]:.2f}")
    print("| C | config | CPU ms/call | CPU/floor | wall s | wall/floor | ok |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        wall_ratio = "-" if r.wall_vs_floor is None else f"{r.wall_vs_floor:.3f}"
        print(f"| {r.params['C']} | {r.params['config']} | {r.cpu_ms_per_call:.3f} | {r.cpu_vs_floor:.2f} "
              f"| {r.wall_s:.3f} | {wall_ratio} | {'yes' if r.ok else 'no'} |")  # fmt: skip
    if args.out is not None:
        payload = {
            "command": f"benchmarks/floor_targets.py --reps {args.reps}",
            "load_average_before": load,
            "results": [asdict(r) for r in rows],
        }
        args.out.write_text(json.dumps(payload, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
