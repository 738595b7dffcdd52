"""Fan-out of one batch: a pool of lanes draining the items, not a task per item.

``llm_batch`` of N prompts at a concurrency cap of C used to start N tasks, N - C of which waited on the
scheduler's slots. Here ``min(N, C)`` worker tasks take the items in order, one at a time each, in an
``asyncio.TaskGroup`` (structured: cancelling the batch cancels its workers; an error in one cancels the
others, as with any task group). For 10,000 items through the scheduler with an in-process fake client,
the CPU per item was (``benchmarks/micro.py``, results in benchmarks/results/micro.json, this 2-core machine):

=============================  =======  =======
primitive                       C=64     C=256
=============================  =======  =======
anyio task group, a task each   77 µs    76 µs
asyncio.TaskGroup, a task each  38 µs    37 µs
this pool                       13 µs    15 µs
=============================  =======  =======

Most of the difference is the garbage collector walking 10,000 live tasks and coroutines, and the slot
hand-offs of the waiting ones; the pool keeps C of each alive.

A lane must not idle while its item backs off before a retry (a Retry-After of 30 s would hold it for
30 s). The scheduler tells the pool, through :data:`LANE`, when a call starts and ends such a wait: the
worker lends its lane (another worker starts on the next item), and when the wait ends the worker over the
count retires after its item. So at most C items of a batch are ever between backoffs, as with a task each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Generic, TypeVar

__all__ = ["LANE", "Lanes", "fan_out"]

T = TypeVar("T")

#: The pool of the task running now, when that task is one of its workers; else None. The scheduler calls
#: ``lend()`` before a backoff sleep and ``back()`` after it.
LANE: ContextVar[Lanes[object] | None] = ContextVar("rlm_async_lane", default=None)


async def fan_out(items: Sequence[T], handle: Callable[[int, T], Awaitable[None]], lanes: int) -> None:
    """Await ``handle(index, item)`` for every item, in item order, at most ``lanes`` at once (items backing
    off before a retry not counted).

    Args:
        items: the batch.
        handle: what to do with one item; it should catch its own errors (an escaping exception cancels the
            rest of the batch and is raised in an ``ExceptionGroup``, as ``asyncio.TaskGroup`` does).
        lanes: the concurrency cap, >= 1 (the scheduler's ``concurrency``).

    Raises:
        ExceptionGroup: an exception escaped ``handle``.
        asyncio.CancelledError: the batch was cancelled (every worker is cancelled and awaited first).
    """
    if not items:
        return
    async with asyncio.TaskGroup() as group:
        pool: Lanes[T] = Lanes(items, handle, max(lanes, 1), group)
        for _ in range(min(pool.lanes, len(items))):
            pool.spawn()


class Lanes(Generic[T]):
    """The state of one batch's pool. Event-loop only, so it needs no lock."""

    __slots__ = ("_group", "_handle", "_items", "_next", "lanes", "running")

    def __init__(
        self,
        items: Sequence[T],
        handle: Callable[[int, T], Awaitable[None]],
        lanes: int,
        group: asyncio.TaskGroup,
    ) -> None:
        self._items = items
        self._handle = handle
        self._group = group
        self._next = 0
        self.lanes = lanes
        self.running = 0  # workers holding a lane: started and not backing off

    def spawn(self) -> None:
        """Start one more worker (it takes the next item)."""
        self._group.create_task(self._worker())
        self.running += 1

    async def _worker(self) -> None:
        LANE.set(self)  # type: ignore[arg-type]  # this task's own context
        items, handle = self._items, self._handle
        try:
            while self._next < len(items):
                index = self._next
                self._next += 1
                await handle(index, items[index])
                if self.running > self.lanes:  # a lender came back while its lane was out: one of us retires
                    break
        finally:
            self.running -= 1

    def lend(self) -> None:
        """The calling worker's item backs off before a retry: its lane goes to a new worker, if any item is
        left."""
        self.running -= 1
        if self.running < self.lanes and self._next < len(self._items):
            self.spawn()

    def back(self) -> None:
        """The calling worker's backoff ended: it holds a lane again (one worker retires if that is one too
        many)."""
        self.running += 1
