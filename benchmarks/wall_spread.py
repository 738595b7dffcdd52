"""Run-to-run spread of the makespan: back-to-back pairs of the floor and the engine, one run each.

``floor_targets.py`` reports medians of nine rounds; this prints every run, so outliers show: for each pair,
the floor's and the engine's makespan, the engine's retries and CPU ms per call, and the garbage
collections of each generation during the engine's run (the benchmark's own ``gc.collect()`` before timing
is one generation-2 collection), and, on Linux, the kernel's listen-queue overflows and SYN retransmits
during the pair (``/proc/net/netstat``: a full accept queue drops a SYN, which the client resends after
its 1 s initial retransmission timeout, RFC 6298). The default configuration, N = 2,000 (``--n``) at
C = 256 (``--c``), against the simulator and limits of ``floor_targets``. Run from a checkout::

    .venv/bin/python benchmarks/wall_spread.py --pairs 12
"""

from __future__ import annotations

import argparse
import asyncio
import gc
from pathlib import Path
from typing import Any

from rlm_async.bench import BenchConfig, _engine_run
from rlm_async.bench._floor import bare_fanout, floor_limits
from rlm_async.sim import sim_process


def _tcp_counters() -> tuple[int, int] | None:
    """``(ListenOverflows, TCPSynRetrans)`` of this network namespace since it was made; None where
    ``/proc/net/netstat`` is absent."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split(), values.split(), strict=True))
            return int(row["ListenOverflows"]), int(row["TCPSynRetrans"])
    return None


async def _pairs(pairs: int, n: int, c: int) -> None:
    collections: list[int] = []

    def count(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.callbacks.append(count)
    async with sim_process(BenchConfig().sim_config()) as sim:  # the simulator floor_targets runs against
        for i in range(pairs):
            before = _tcp_counters()
            floor = await bare_fanout(sim.base_url, n, c)
            collections.clear()
            limits = floor_limits(n, c)
            result, cpu_s, _, _ = await _engine_run(sim.base_url, f"Fan out {n} sub-calls", "", limits)
            stats = result.stats
            gens = "/".join(str(collections.count(g)) for g in (0, 1, 2))
            after = _tcp_counters()
            tcp = (
                f"  listen overflows {after[0] - before[0]}  SYN retransmits {after[1] - before[1]}"
                if before is not None and after is not None
                else ""
            )
            print(
                f"{i + 1:3d}  floor {floor.wall_s:.3f} s  engine {stats.wall_s:.3f} s  "
                f"({stats.wall_s / floor.wall_s:.3f}x)  retries {stats.retries}  "
                f"CPU {cpu_s * 1000 / stats.calls:.3f} ms/call  gc gen0/1/2 {gens}{tcp}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=12, help="floor/engine pairs (default 12)")
    parser.add_argument("--n", type=int, default=2000, help="calls in the batch (default 2000)")
    parser.add_argument("--c", type=int, default=256, help="max_concurrency (default 256)")
    args = parser.parse_args()
    asyncio.run(_pairs(args.pairs, args.n, args.c))


if __name__ == "__main__":
    main()
