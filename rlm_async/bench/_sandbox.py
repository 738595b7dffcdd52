"""What the REPL sandbox costs: worker start latency, memory per worker, a sub-call's round trip through the
channel, a large context, and sibling agents' CPU-heavy cells on separate cores (docs/security.md).

Each figure is measured against the in-thread REPL (``sandbox="none"``) in the same run.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

from .._engine import RLM
from .._repl import ProcessRepl, ThreadRepl
from .._sandbox import Sandbox, plan_for
from .._sandbox._layers import probe
from . import Measurement

__all__ = ["sandbox_costs"]

_CONTEXT_CHARS = 4_500_000  # the KJV's size: the main job's context


class _EchoHost:
    """A Host that answers at once, so only the REPL's own cost is measured."""

    async def llm_batch(self, prompts: list[str], model: str | None, max_tokens: int | None) -> list[Any]:
        return [{"ok": True, "text": p} for p in prompts]

    async def rlm_batch(self, queries: list[str], contexts: list[Any], model: str | None = None) -> list[Any]:
        return [{"ok": True, "text": q} for q in queries]

    async def tool(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        return None

    def budget(self) -> dict[str, Any]:
        return {}


def _repl(level: str, context: Any) -> Any:
    if level == "none":
        return ThreadRepl(context=context, host=_EchoHost(), max_output_chars=2000)
    return ProcessRepl(context=context, host=_EchoHost(), plan=plan_for(Sandbox.coerce(level)), max_output_chars=2000)


def _tree_rss_kib(root_pid: int) -> dict[str, int]:
    """Memory (KiB) of ``root_pid`` and every descendant, by process name: ``<name>`` its resident set
    (VmRSS, pages shared with the zygote included) and ``<name>.private`` its own pages (Private_Clean +
    Private_Dirty of /proc/PID/smaps_rollup), which is what one more worker costs."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
                parents[int(entry)] = int(stat.rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    rss: dict[str, int] = {}
    for pid in tree:
        try:
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        name = next(line.split()[1] for line in status if line.startswith("Name:"))
        kib = next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
        rss[name] = rss.get(name, 0) + kib
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        private = sum(int(line.split()[1]) for line in rollup if line.startswith(("Private_Clean:", "Private_Dirty:")))
        rss[f"{name}.private"] = rss.get(f"{name}.private", 0) + private
    return rss


async def _start_latency(level: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        async with _repl(level, "x") as repl:
            await repl.run_cell("pass")
            times.append(time.perf_counter() - started)
    return times


async def _round_trip_us(level: str, n: int) -> float:
    async with _repl(level, "x") as repl:
        await repl.started()
        started = time.perf_counter()
        result = await repl.run_cell(f"for _ in range({n}):\n    llm_query('a')")
        assert result.error is None, result.error
        return (time.perf_counter() - started) / n * 1e6


async def _parallel_cpu_s(level: str, loop_s: float) -> float:
    """Wall seconds for two sibling child agents that each busy-loop ``loop_s`` of CPU time."""
    kid = f"import time\nt = time.thread_time()\nwhile time.thread_time() - t < {loop_s}:\n    pass\nFINAL('ok')"
    root = "r = await rlm_batch(['kid a', 'kid b'], ['a', 'b'])\nFINAL(' '.join(r))"

    async def model(request: Any) -> str:
        first = request.messages[1]["content"]
        code = kid if "Query: kid" in first else root
        return f"```repl\n{code}\n```"

    from .._clients import FakeClient

    async with RLM("m", client=FakeClient(model), sandbox=level) as rlm:  # type: ignore[arg-type]
        started = time.perf_counter()
        result = await rlm.completion("q", "ctx")
        assert result.answer == "ok ok", result
        return time.perf_counter() - started


async def sandbox_costs(quick: bool = False) -> list[Measurement]:
    """One row per figure and sandbox level: ``sandbox_start`` (median seconds to a worker's first cell),
    ``sandbox_call`` (seconds per blocking ``llm_query`` round trip), ``sandbox_context`` (start with a
    4.5 MB context), ``sandbox_cpu_siblings`` (two children each busy for ``loop_s`` of CPU; ideal: one
    ``loop_s``). ``extra`` has the worker's memory (VmRSS KiB by process name) and the layers applied."""
    strict_ok = probe().filesystem and probe().network
    levels = ["strict", "process", "none"] if strict_ok else ["process", "none"]
    n_start, n_calls = (5, 200) if quick else (20, 2000)
    loop_s = 0.5 if quick else 1.0
    big = "x" * _CONTEXT_CHARS
    rows = []

    def row(scenario: str, level: str, wall_s: float, ideal: float | None = None, **extra: Any) -> Measurement:
        params = {"sandbox": level}
        return Measurement(scenario, "rlm_async", params, wall_s, ideal, 0, None, None, None, True, "", extra=extra)

    for level in levels:
        starts = await _start_latency(level, n_start)
        extra: dict[str, Any] = {"max_s": max(starts)}
        if level != "none":
            async with _repl(level, "x") as repl:
                await repl.run_cell("import asyncio, json, re")
                extra["rss_kib"] = _tree_rss_kib(repl.pid)
                extra["layers"] = list(repl.layers)
        rows.append(row("sandbox_start", level, statistics.median(starts), **extra))
        rows.append(row("sandbox_call", level, await _round_trip_us(level, n_calls) / 1e6, calls=n_calls))
        big_starts = []
        for _ in range(3):
            started = time.perf_counter()
            async with _repl(level, big) as repl:
                await repl.run_cell("len(context)")
            big_starts.append(time.perf_counter() - started)
        rows.append(row("sandbox_context", level, statistics.median(big_starts), chars=_CONTEXT_CHARS))
        rows.append(row("sandbox_cpu_siblings", level, await _parallel_cpu_s(level, loop_s), loop_s, loop_s=loop_s))
    return rows
