"""The scheduler's own cost per call, in instructions, with no HTTP under it.

A batch of N prompts goes through ``fan_out`` at C = 64 to a client that answers after one pass through the
event loop (``micro.Instant``), either straight to the client (``--layer client``) or through
``Scheduler.call`` in the default configuration (``--layer scheduler``: the circuit breaker on, the
per-attempt deadline on its queue, no token or USD cap, nobody listening for events). Under
``valgrind --tool=callgrind`` at ``--n-base`` and ``--n`` items, the difference in instructions divided by
the difference in items is the marginal cost per call, free of start-up, and the load of the machine does
not move it. The scheduler's share is the difference of the two layers. Run from a checkout::

    .venv/bin/python benchmarks/scheduler_cost.py            # both layers under callgrind
    .venv/bin/python benchmarks/scheduler_cost.py --layer scheduler --run 2000   # one run, no valgrind
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

from micro import Instant

from rlm_async._budget import Ledger, Limits
from rlm_async._clients import ChatRequest
from rlm_async._fanout import fan_out
from rlm_async._scheduler import Scheduler
from rlm_async._trace import Tracer

LAYERS = ("client", "scheduler")
C = 64


async def _batch(layer: str, n: int) -> None:
    client = Instant()
    ledger = Ledger(Limits(max_concurrency=C, max_calls=10 * n + 10, max_fanout=n))
    scheduler = Scheduler(client, ledger, Tracer(), max_concurrency=C)
    template = ChatRequest("sub", (), 100)
    results: list[object] = [None] * n

    async def one(index: int, prompt: str) -> None:
        request = template.with_messages(({"role": "user", "content": prompt},))
        if layer == "client":
            results[index] = await client.chat(request)
        else:
            results[index] = await scheduler.call(request, depth=1, agent_id="root", reserved=True)

    await fan_out([f"prompt {i}" for i in range(n)], one, C)
    assert all(r is not None for r in results)


def _instructions(out: Path) -> int:
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


def _callgrind(layers: list[str], n_base: int, n: int) -> None:
    per_call: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layer in layers:
            counts = []
            for items in (n_base, n):
                out = Path(tmp) / f"{layer}-{items}.out"
                cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__,
                       "--layer", layer, "--run", str(items)]  # fmt: skip
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                counts.append(_instructions(out))
            per_call[layer] = (counts[1] - counts[0]) / (n - n_base)
            print(f"{layer:9s} {per_call[layer]:,.0f} instructions per call (N {n_base} -> {n}, C = {C})", flush=True)
    if len(per_call) == 2:
        print(f"scheduler's share: {per_call['scheduler'] - per_call['client']:,.0f} instructions per call")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", choices=LAYERS, help="one layer (default: both)")
    parser.add_argument("--run", type=int, metavar="N", help="run one batch of N in this process, no valgrind")
    parser.add_argument("--n-base", type=int, default=2000, help="the smaller batch (default 2000)")
    parser.add_argument("--n", type=int, default=12000, help="the larger batch (default 12000)")
    args = parser.parse_args()
    if args.run is not None:
        asyncio.run(_batch(args.layer or "scheduler", args.run))
    else:
        _callgrind([args.layer] if args.layer else list(LAYERS), args.n_base, args.n)


if __name__ == "__main__":
    main()
