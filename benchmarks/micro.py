"""Microbenchmarks behind the choices in the engine's hot path (docs/architecture.md cites them).

1. Spawning a batch's items: an anyio task group with a task per item, an ``asyncio.TaskGroup`` with a task
   per item, or the pool of C lanes of ``rlm_async._fanout`` (what ``llm_batch`` uses).
2. The per-attempt timeout: ``anyio.fail_after``, ``asyncio.timeout``, or the scheduler's ``AttemptDeadline``
   with a timer of its own or on a shared ``DeadlineQueue`` (what the scheduler uses), 64 attempts open.
3. An event when nobody listens, when a listener does, and with a JSONL trace file; one event's JSON line.
4. Parsing a response body: ``json.loads`` of the bytes, of the decoded text, and the lean client's ``_parse``.

Every figure is CPU microseconds per item (``time.process_time``), the median of 5 rounds, on this machine.
Run from a checkout: ``.venv/bin/python benchmarks/micro.py [--out benchmarks/results/micro.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from rlm_async._budget import Ledger, Limits
from rlm_async._clients import ChatRequest, ChatResponse
from rlm_async._clients._aiohttp import _parse
from rlm_async._fanout import fan_out
from rlm_async._scheduler import AttemptDeadline, DeadlineQueue, Scheduler
from rlm_async._trace import _ENCODER, Tracer, bound

ROUNDS = 5


class Instant:
    """A client that answers after one pass through the event loop."""

    async def chat(self, request: ChatRequest) -> ChatResponse:
        await asyncio.sleep(0)
        return ChatResponse("ok", 10, 2)

    async def aclose(self) -> None:
        return None


def _request(i: int) -> ChatRequest:
    return ChatRequest("m", ({"role": "user", "content": f"p{i}"},))


async def _cpu_us(fn: Callable[[], Awaitable[None]], items: int) -> float:
    samples = []
    for _ in range(ROUNDS):
        start = time.process_time()
        await fn()
        samples.append((time.process_time() - start) * 1e6 / items)
    return statistics.median(samples)


# -- 1. spawning ----------------------------------------------------------------------------------------
async def spawning(n: int, c: int) -> dict[str, float]:
    def scheduler() -> Scheduler:
        return Scheduler(Instant(), Ledger(Limits(max_calls=None)), Tracer(), max_concurrency=c)

    async def anyio_group() -> None:
        sched = scheduler()

        async def one(i: int) -> None:
            await sched.call(_request(i), depth=1, agent_id="0", reserved=True)

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)

    async def asyncio_group() -> None:
        sched = scheduler()

        async def one(i: int) -> None:
            await sched.call(_request(i), depth=1, agent_id="0", reserved=True)

        async with asyncio.TaskGroup() as tg:
            for i in range(n):
                tg.create_task(one(i))

    async def pool() -> None:
        sched = scheduler()

        async def one(i: int, item: int) -> None:
            await sched.call(_request(i), depth=1, agent_id="0", reserved=True)

        await fan_out(range(n), one, c)

    return {
        "anyio task group, a task each": await _cpu_us(anyio_group, n),
        "asyncio.TaskGroup, a task each": await _cpu_us(asyncio_group, n),
        "pool of C lanes (_fanout)": await _cpu_us(pool, n),
    }


# -- 2. the attempt timeout -----------------------------------------------------------------------------
async def timeouts(n: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()

    async def bare() -> None:
        for _ in range(n):
            await asyncio.sleep(0)

    async def with_anyio() -> None:
        for _ in range(n):
            with anyio.fail_after(600):
                await asyncio.sleep(0)

    async def with_asyncio() -> None:
        for _ in range(n):
            async with asyncio.timeout(600):
                await asyncio.sleep(0)

    async def with_deadline() -> None:
        for _ in range(n):
            with AttemptDeadline(loop, 600):
                await asyncio.sleep(0)

    async def open_64(make: Callable[[], AttemptDeadline]) -> None:
        # 64 attempts open at once, as in a batch at C = 64: each leaves after the next 63 have entered.
        async def attempt(gate: asyncio.Event) -> None:
            with make():
                await gate.wait()

        for _ in range(n // 64):
            gate = asyncio.Event()
            tasks = [asyncio.ensure_future(attempt(gate)) for _ in range(64)]
            await asyncio.sleep(0)
            gate.set()
            await asyncio.gather(*tasks)

    queue = DeadlineQueue(loop, 600)
    base = await _cpu_us(bare, n)
    open_base = await _cpu_us(lambda: open_64(contextlib.nullcontext), n)  # type: ignore[arg-type]
    return {
        "anyio.fail_after": await _cpu_us(with_anyio, n) - base,
        "asyncio.timeout": await _cpu_us(with_asyncio, n) - base,
        "AttemptDeadline": await _cpu_us(with_deadline, n) - base,
        "64 open, a timer each": await _cpu_us(lambda: open_64(lambda: AttemptDeadline(loop, 600)), n) - open_base,
        "64 open, DeadlineQueue": await _cpu_us(lambda: open_64(lambda: AttemptDeadline(loop, 600, queue)), n)
        - open_base,
    }


# -- 3. events ------------------------------------------------------------------------------------------
async def events(n: int) -> dict[str, float]:
    async def emit_all(tracer: Tracer) -> None:
        with bound(run_id="r", agent_id="0", depth=0):
            for i in range(n):
                tracer.emit("call_started", call_id=i, attempt=1)

    with tempfile.TemporaryDirectory() as tmp:
        trace = Tracer(trace_path=Path(tmp) / "t.jsonl")
        figures = {
            "nobody listens": await _cpu_us(lambda: emit_all(Tracer()), n),
            "a listener (on_event)": await _cpu_us(lambda: emit_all(Tracer(listeners=[lambda e: None])), n),
            "a JSONL trace file": await _cpu_us(lambda: emit_all(trace), n),
        }
        trace.close()
    return figures


# -- 4. encoding an event, parsing a response ---------------------------------------------------------------
def _sync_us(fn: Callable[[], object], n: int) -> float:
    samples = []
    for _ in range(ROUNDS):
        start = time.process_time()
        for _ in range(n):
            fn()
        samples.append((time.process_time() - start) * 1e6 / n)
    return statistics.median(samples)


def encoding(n: int) -> dict[str, float]:
    record = {"event": "call_finished", "t": 1.234567, "run_id": "3f9c2a", "agent_id": "0", "depth": 0}
    record.update(call_id=17, attempts=1, prompt_tokens=30, completion_tokens=5, latency_s=0.050123)
    return {
        "json.dumps(default=repr)": _sync_us(lambda: json.dumps(record, default=repr), n),
        "one shared JSONEncoder": _sync_us(lambda: _ENCODER.encode(record), n),
    }


def parsing(n: int) -> dict[str, float]:
    body = {"id": "chatcmpl-sim-17", "object": "chat.completion", "created": 1764500000, "model": "sim-sub",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": '{"key": "k17", "found": true}'},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 14, "completion_tokens": 9, "total_tokens": 23}}  # fmt: skip
    raw = json.dumps(body).encode()
    return {
        "json.loads(bytes)": _sync_us(lambda: json.loads(raw), n),
        "json.loads(bytes.decode())": _sync_us(lambda: json.loads(raw.decode()), n),
        "_parse (the lean client)": _sync_us(lambda: _parse(raw), n),
    }


async def measure() -> dict[str, object]:
    """Every figure, printed as it is measured."""
    results: dict[str, object] = {"python": sys.version.split()[0], "rounds": ROUNDS, "unit": "CPU us per item"}
    for c in (64, 256):
        results[f"spawn N=10000 C={c}"] = await spawning(10_000, c)
    results["attempt timeout, per attempt"] = await timeouts(20_000)
    results["one event"] = await events(20_000)
    results["one event's JSON line"] = encoding(50_000)
    results["parsing a response body"] = parsing(50_000)
    for section, figures in results.items():
        if isinstance(figures, dict):
            print(section)
            for name, value in figures.items():
                print(f"  {name:34s} {value:7.2f} us")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    out = parser.parse_args().out
    figures = asyncio.run(measure())
    if out is not None:
        out.write_text(json.dumps(figures, indent=1) + "\n")
