"""The floor: the same HTTP work done by a bare aiohttp loop, and the engine measured against it in the same run.

The floor is what Python and aiohttp alone need for an ``llm_batch`` of N calls at C in flight: one
``aiohttp.ClientSession``, C worker tasks taking the calls in turn (the cheapest spawning, the same the
engine's batches use; benchmarks/micro.py), the engine's exact request body (``ChatRequest(...).body()``
with the scripted root's key-lookup prompts, encoded as the lean client encodes it), and the JSON of each
response parsed. It first makes one call alone, standing for the root turn that every engine run starts
with, so both sides make N + 1 calls, the batch after the one. The engine's wall time covers its whole
run besides: the REPL worker's start, the root turn's larger prompt, the cell, the prompts and results
crossing to the worker; at N = 10 those fixed costs are most of the ratio.

Every timed run, the floor's and the engine's, starts after a full garbage collection (``gc.collect()``, not
timed). Without it, a full collection owed to the allocations of earlier runs (60-110 ms here, 0.03-0.05 ms
a call over 2,001 calls) landed in whichever run came next, a floor run as often as an engine run, and
decided much of the CPU ratio's spread from run to run (docs/benchmarks.md). A run's own collections, full
ones included, still count against it.

Engine rows carry two ratios to the floor measured against the same simulator process in the same run:
CPU milliseconds per call (``cpu_vs_floor``) and wall time (``wall_vs_floor``). The targets (issue 13):
at most 1.2x CPU and 1.05x wall for N = 2,000 at C = 64 and C = 256, in the default configuration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .._budget import Limits
from .._clients import ChatRequest

__all__ = ["FLOOR_ROUNDS", "FloorRun", "bare_fanout", "floor_targets"]

#: Interleaved rounds behind each floor-target median. Five were not enough at C = 64: the floor's makespan
#: alone moves by about 5% from run to run there (1.77-1.87 s in eight runs), and one full run's median of
#: five came out at 1.051x where the others of the session gave 1.009-1.036x.
FLOOR_ROUNDS = 9


@dataclass(frozen=True, slots=True)
class FloorRun:
    """One bare-loop run: ``cpu_s`` of this process, ``wall_s`` seconds, ``calls`` made (N + 1), ``ok`` when
    every response parsed with content."""

    cpu_s: float
    wall_s: float
    calls: int
    ok: bool

    @property
    def cpu_ms_per_call(self) -> float:
        """CPU milliseconds per call."""
        return self.cpu_s * 1000 / self.calls


def key_prompt(i: int) -> str:
    """The scripted root's key-lookup prompt ``i`` (``rlm_async.sim._responders.KEY_PROMPT_EXPR``)."""
    return f'Find the line holding the key "k{i}"\n\nfiller\nkey k{i} found'


async def bare_fanout(base_url: str, n: int, c: int, model: str = "sim-sub") -> FloorRun:
    """One call, then ``n`` calls at ``c`` in flight, on aiohttp alone (see the module docstring)."""
    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json", "Accept": "application/json", "Authorization": "Bearer sim"}
    answered = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def call(i: int) -> None:
            nonlocal answered
            request = ChatRequest(model, ({"role": "user", "content": key_prompt(i)},))
            body = json.dumps(request.body(), ensure_ascii=False).encode("utf-8")
            async with session.post(url, data=body, headers=headers) as response:
                data = json.loads(await response.read()) if response.status == 200 else {}
            choices = data.get("choices") or [{}]
            answered += isinstance(choices[0].get("message", {}).get("content"), str)

        calls = iter(range(n))

        async def worker() -> None:
            for i in calls:
                await call(i)

        gc.collect()  # untimed: a full collection owed to earlier runs must not land in this one
        cpu, wall = time.process_time(), time.perf_counter()
        await call(-1)
        async with asyncio.TaskGroup() as group:
            for _ in range(min(c, n)):
                group.create_task(worker())
        return FloorRun(time.process_time() - cpu, time.perf_counter() - wall, n + 1, answered == n + 1)


EngineRun = Callable[..., Coroutine[Any, Any, Any]]


def floor_limits(n: int, c: int, agents: int = 1) -> Limits:
    """The engine's limits in a floor comparison: C in flight, a batch of N, room for the N + 1 calls twice
    over (retries never decide a run), and ``agents`` agents (the root, plus children where a row has them)."""
    return Limits(max_concurrency=c, max_calls=2 * n + 10, max_fanout=n, max_depth=2, max_agents=agents)


async def floor_targets(
    base_url: str, engine_run: EngineRun, measure: Callable[..., Any], *, n: int = 2000, reps: int = FLOOR_ROUNDS
) -> list[Any]:
    """The targets' grid: N = ``n`` at C = 64 and 256, ``reps`` rounds, each round running the floor and every
    engine configuration once, in turn (so drift on a shared machine hits all alike); medians per row.

    Engine configurations: the default (``RLM(model, base_url=...)``), the SDK client (``http="openai"``), the
    default with a JSONL trace on (what events cost when someone listens), and, at C = 64, a child-agent
    fan-out for comparison (``rlm_batch`` of ``min(n // 10, 100)`` children, each a turn in its own REPL
    worker and one call; 100 is ``Limits.max_agents``' default).

    Args:
        engine_run: ``bench._engine_run``.
        measure: ``bench._measure``.

    Returns:
        ``Measurement`` rows: a ``floor`` row and the engine rows with ``cpu_vs_floor`` and ``wall_vs_floor``
        (ratios of the medians), each engine row's ``extra`` holding every round's own ratios
        (``cpu_vs_floor_rounds``, ``wall_vs_floor_rounds``: the engine's run over that round's floor run).
    """
    rows = []
    k = max(min(n // 10, 100), 1)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.jsonl"
        configs: list[tuple[str, str, dict[str, Any]]] = [
            ("default", f"Fan out {n} sub-calls", {}),
            ("http=openai", f"Fan out {n} sub-calls", {"http": "openai"}),
            ("trace_on", f"Fan out {n} sub-calls", {"trace_path": trace}),
        ]
        for c in (64, 256):
            floors: list[FloorRun] = []
            runs: dict[str, list[Any]] = {name: [] for name, _, _ in configs}
            children: list[tuple[str, str, dict[str, Any]]] = (
                [("rlm_batch", f"Recursive fan-out k={k} depth=1", {})] if c == 64 else []
            )
            runs.update({name: [] for name, _, _ in children})
            for _ in range(reps):
                floors.append(await bare_fanout(base_url, n, c))
                for name, query, kwargs in configs + children:
                    runs[name].append(await engine_run(base_url, query, "", floor_limits(n, c, k + 1), **kwargs))
                    trace.unlink(missing_ok=True)
            floor_cpu = statistics.median(f.cpu_ms_per_call for f in floors)
            floor_wall = statistics.median(f.wall_s for f in floors)
            rows.append(_floor_row(n, c, floor_cpu, floor_wall, all(f.ok for f in floors)))
            for name, _, _ in configs + children:
                right = f"{k} of {k} chains" if name == "rlm_batch" else f"{n} of {n} right"
                each = [measure("floor_target", {"N": n, "C": c, "config": name}, None, r, right) for r in runs[name]]
                # Each round's own ratios (the engine's run over that round's floor run), so the spread behind
                # the medians is on record: at C = 64 the floor's makespan alone moves by about 5% run to run.
                extra: dict[str, Any] = {**each[0].extra, "reps": reps}
                extra["cpu_vs_floor_rounds"] = [
                    round(e.cpu_ms_per_call / f.cpu_ms_per_call, 3) for e, f in zip(each, floors, strict=True)
                ]
                if name != "rlm_batch":
                    extra["wall_vs_floor_rounds"] = [
                        round(e.wall_s / f.wall_s, 3) for e, f in zip(each, floors, strict=True)
                    ]
                cpu_ms = statistics.median(r.cpu_ms_per_call for r in each)
                wall_s = statistics.median(r.wall_s for r in each)
                rows.append(
                    dataclasses.replace(
                        each[0],
                        cpu_ms_per_call=cpu_ms,
                        wall_s=wall_s,
                        ok=all(r.ok for r in each),
                        extra=extra,
                        cpu_vs_floor=cpu_ms / floor_cpu,
                        wall_vs_floor=None if name == "rlm_batch" else wall_s / floor_wall,
                    )
                )
    return rows


def _floor_row(n: int, c: int, cpu_ms: float, wall_s: float, ok: bool) -> Any:
    from . import Measurement

    return Measurement(
        "floor_target", "floor", {"N": n, "C": c, "config": "bare aiohttp"}, wall_s, None, n + 1, cpu_ms,
        c, None, ok, "", cpu_vs_floor=1.0, wall_vs_floor=1.0,
    )  # fmt: skip
