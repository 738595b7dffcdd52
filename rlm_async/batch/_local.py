"""The single-machine path: the items through one engine, ``max_runs`` completions at once. No Ray here."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence

import anyio

from ._items import BatchItem, ItemResult
from ._lease import Capacity, LeasedGate, LeaseSizes, LocalLink
from ._runner import EngineSpec, run_item

__all__ = ["run_local"]


async def run_local(
    todo: Sequence[BatchItem],
    spec: EngineSpec,
    *,
    max_runs: int,
    max_calls: int | None,
    max_cost_usd: float | None,
    on_start: Callable[[str], None] | None = None,
    on_stopped: Callable[[ItemResult], None] | None = None,
) -> AsyncGenerator[ItemResult, None]:
    """Yield each item's result as it finishes. The engine's endpoint (in-flight cap, RPM / TPM, breaker) is
    shared by all the items; the job's ``max_calls`` / ``max_cost_usd`` are counted one call at a time. Once
    the job's budget refuses a call, no further item starts (those left are not yielded), and an item whose
    run it stopped is not yielded either: it goes to ``on_stopped`` (for its usage), unrecorded, so a rerun
    runs it. Closing the iterator cancels the running items."""
    gate = None
    if max_calls is not None or max_cost_usd is not None:
        capacity = Capacity(max_concurrency=1, max_calls=max_calls, max_cost_usd=max_cost_usd)
        sizes = LeaseSizes(calls=1, usd_fraction=1.0)  # one process: no lease needed, take what is there
        gate = LeasedGate(LocalLink(capacity), max_calls=max_calls, max_cost_usd=max_cost_usd, sizes=sizes)
    engine = spec.build(gate)
    pending = deque(todo)
    running: set[asyncio.Task[tuple[ItemResult, bool]]] = set()
    try:
        while pending or running:
            while pending and len(running) < max_runs and not engine.exhausted:
                item = pending.popleft()
                if on_start is not None:
                    on_start(item.id)
                running.add(asyncio.get_running_loop().create_task(run_item(engine.rlm, item)))
            if not running:
                break
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                result, stopped = task.result()
                if not stopped:
                    yield result
                elif on_stopped is not None:
                    on_stopped(result)
    finally:
        for task in running:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*running, return_exceptions=True)
            await engine.aclose()
