"""The engine's cost per sub-call against the floor's (a bare aiohttp loop), measured so the ratio can be trusted
on a busy machine.

Issue 13's CPU target compares the engine's CPU per call in an ``llm_batch`` of N = 2,000 with the floor's
(``rlm_async.bench._floor``). CPU time on a shared 2-core machine moves with the load; instruction counts
under ``valgrind --tool=callgrind`` do not. Two modes:

- ``--callgrind``: for each side (``floor``, ``engine``, ``trace``: the engine with a JSONL trace on), run this
  script under callgrind twice, at ``--n`` and at ``--n-base`` calls, and report the *difference* in
  instructions divided by the difference in calls: the marginal instructions per call, free of the fixed
  costs (interpreter start, imports, the simulator's start, the engine's root turn and REPL worker). The
  simulator runs in its own process (not under valgrind); its call latency is ``--call-ms`` ms, long enough
  that the slowed-down process is not CPU-bound (CPU-bound, more responses arrive per loop pass and the
  per-pass costs shrink per call, on both sides alike).
- otherwise: ``--rounds`` rounds, each running the floor and the engine once in turn at ``--n`` calls, and
  CPU ms per call (``time.process_time``) with the ratio, medians.

Both run the same work as ``rlm-async bench``'s ``floor_target`` rows: the default configuration,
``RLM(model, base_url=...)``. Run from a checkout::

    .venv/bin/python benchmarks/floor_cost.py --callgrind --c 64
    .venv/bin/python benchmarks/floor_cost.py --rounds 5 --c 256
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rlm_async._budget import Limits
from rlm_async.bench import _engine_run
from rlm_async.bench._floor import bare_fanout
from rlm_async.sim import LatencyModel, SimConfig, sim_process

SIDES = ("floor", "engine", "trace")


async def _one_side(base_url: str, side: str, n: int, c: int, trace_dir: Path, sandbox: str) -> tuple[float, int, bool]:
    """Run one side once: (CPU seconds, calls, ok)."""
    if side == "floor":
        floor = await bare_fanout(base_url, n, c)
        return floor.cpu_s, floor.calls, floor.ok
    kwargs: dict[str, Any] = {"sandbox": sandbox}
    if side == "trace":
        kwargs["trace_path"] = trace_dir / "trace.jsonl"
    limits = Limits(max_concurrency=c, max_calls=2 * n + 10, max_fanout=max(n, 1), max_depth=2)
    result, cpu_s, _, _ = await _engine_run(base_url, f"Fan out {n} sub-calls", "", limits, **kwargs)
    with contextlib.suppress(FileNotFoundError):
        (trace_dir / "trace.jsonl").unlink()
    return cpu_s, result.stats.calls, result.answer.startswith(f"{n} of {n} right")


async def _run(
    sides: list[str], n: int, c: int, rounds: int, call_s: float, base_url: str | None, sandbox: str
) -> None:
    latency = LatencyModel(call_s, 1e12, 1e12, jitter_sigma=0.0, outlier_rate=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        async with contextlib.AsyncExitStack() as stack:
            if base_url is None:
                sim = await stack.enter_async_context(sim_process(SimConfig(latency=latency, capacity=4096)))
                base_url = sim.base_url
            cpu: dict[str, list[float]] = {side: [] for side in sides}
            for _ in range(rounds):
                for side in sides:
                    cpu_s, calls, ok = await _one_side(base_url, side, n, c, Path(tmp), sandbox)
                    if not ok:
                        raise SystemExit(f"{side}: the run was not right")
                    cpu[side].append(cpu_s * 1000 / calls)
    for side in sides:
        ms = statistics.median(cpu[side])
        ratio = f"  {ms / statistics.median(cpu['floor']):.2f}x the floor" if "floor" in cpu and side != "floor" else ""
        print(f"{side:7s} N={n} C={c}: {ms:.4f} CPU ms/call (median of {rounds}){ratio}")


def _instructions(out: Path) -> int:
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


def _callgrind(sides: list[str], n: int, n_base: int, c: int, call_s: float) -> None:
    """Marginal instructions per call for each side (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp, _sim_in_background(call_s) as base_url:
        per_call: dict[str, float] = {}
        for side in sides:
            counts = []
            for calls in (n_base, n):
                out = Path(tmp) / f"{side}-{calls}.out"
                cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                       __file__, "--sides", side, "--n", str(calls), "--c", str(c), "--rounds", "1",
                       "--base-url", base_url, "--sandbox", "process"]  # fmt: skip
                started = time.perf_counter()
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                counts.append(_instructions(out))
                print(f"  {side} N={calls}: {counts[-1]:,} Ir ({time.perf_counter() - started:.0f} s)", flush=True)
            per_call[side] = (counts[1] - counts[0]) / (n - n_base)
        for side, ir in per_call.items():
            ratio = f"  {ir / per_call['floor']:.3f}x the floor" if "floor" in per_call and side != "floor" else ""
            print(f"{side:7s} C={c}: {ir:,.0f} instructions per call (N {n_base} -> {n}){ratio}")


@contextlib.contextmanager
def _sim_in_background(call_s: float) -> Any:
    """A simulator process outside valgrind, for the runs under it; yields its base URL."""
    code = (
        "import asyncio, sys\n"
        "from rlm_async.sim import LatencyModel, SimConfig, sim_process\n"
        "async def main():\n"
        f"    lat = LatencyModel({call_s!r}, 1e12, 1e12, jitter_sigma=0.0, outlier_rate=0.0)\n"
        "    async with sim_process(SimConfig(latency=lat, capacity=4096)) as sim:\n"
        "        print(sim.base_url, flush=True)\n"
        "        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        if not re.match(r"https?://", base_url):
            raise RuntimeError("the simulator did not start")
        yield base_url
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", default="floor,engine", help=f"comma-separated, of {', '.join(SIDES)}")
    parser.add_argument("--n", type=int, default=2000, help="calls in the batch (default 2000)")
    parser.add_argument("--n-base", type=int, default=200, help="--callgrind: the smaller batch (default 200)")
    parser.add_argument("--c", type=int, default=64, help="max_concurrency (default 64)")
    parser.add_argument("--rounds", type=int, default=5, help="CPU mode: interleaved rounds (default 5)")
    parser.add_argument("--call-ms", type=float, help="simulated latency per call, ms (50; 2000 with --callgrind)")
    parser.add_argument("--callgrind", action="store_true", help="instructions per call under callgrind")
    parser.add_argument("--base-url", help="a running simulator (default: start one)")
    parser.add_argument(
        "--sandbox", default="strict", help="the REPL's sandbox (strict; --callgrind uses process: seccomp fails there)"
    )
    args = parser.parse_args()
    sides = [s for s in args.sides.split(",") if s]
    if any(s not in SIDES for s in sides):
        parser.error(f"--sides takes {', '.join(SIDES)}")
    if args.callgrind:
        _callgrind(sides, args.n, args.n_base, args.c, (args.call_ms or 2000.0) / 1000)
    else:
        asyncio.run(
            _run(sides, args.n, args.c, args.rounds, (args.call_ms or 50.0) / 1000, args.base_url, args.sandbox)
        )


if __name__ == "__main__":
    main()
