"""The batch pool: items in order, at most C at once, lanes lent while an item backs off, structured cancel."""

from __future__ import annotations

import asyncio

import anyio
import anyio.lowlevel
import pytest

from rlm_async import ChatRequest, FakeClient, Limits, ProviderStatusError, RetryPolicy
from rlm_async._budget import Ledger
from rlm_async._fanout import LANE, fan_out
from rlm_async._scheduler import Scheduler
from rlm_async._trace import Tracer

from .conftest import on_fake_clock


@on_fake_clock
async def test_every_item_once_at_most_c_at_once_with_c_tasks():
    now = peak = 0
    seen: list[int] = []
    tasks: set[int] = set()

    async def handle(index: int, item: str) -> None:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        tasks.add(id(asyncio.current_task()))
        await asyncio.sleep(1)
        seen.append(index)
        now -= 1

    loop = asyncio.get_running_loop()
    started = loop.time()
    await fan_out([f"p{i}" for i in range(100)], handle, lanes=8)
    assert sorted(seen) == list(range(100)) and peak == 8 and len(tasks) == 8
    assert loop.time() - started == pytest.approx(13.0)  # ceil(100 / 8) waves of 1 s


async def test_an_empty_batch_and_fewer_items_than_lanes():
    ran: list[int] = []

    async def handle(index: int, item: int) -> None:
        ran.append(item)

    await fan_out([], handle, lanes=4)
    await fan_out([5, 6], handle, lanes=64)
    assert ran == [5, 6]


@on_fake_clock
async def test_an_item_backing_off_lends_its_lane_and_the_lanes_come_back_to_c():
    """C=2, 6 items of 1 s each; item 0's first attempt is a 429 with Retry-After 10 s. While it waits, the
    other five go through the other lane and the lent one: done at 3 s, not at 5 s as with a lane held idle.
    Item 0 ends at 11 s; at no time are more than 2 attempts in flight."""
    loop = asyncio.get_running_loop()
    failed_once = False
    done_at: dict[str, float] = {}

    async def answer(req: ChatRequest) -> str:
        nonlocal failed_once
        text = req.messages[0]["content"]
        if text == "p0" and not failed_once:
            failed_once = True
            raise ProviderStatusError("429", status=429, headers={"retry-after": "10"})
        await asyncio.sleep(1)
        done_at[text] = loop.time()
        return text

    sched = Scheduler(
        FakeClient(answer), Ledger(Limits(max_calls=None)), Tracer(), max_concurrency=2,
        retry=RetryPolicy(max_retries=1), breaker=None,
    )  # fmt: skip
    lanes_seen: list[int] = []

    async def handle(index: int, prompt: str) -> None:
        await sched.call(ChatRequest("m", ({"role": "user", "content": prompt},)), depth=1, agent_id="0")
        lane = LANE.get()
        assert lane is not None
        lanes_seen.append(lane.running)

    await fan_out([f"p{i}" for i in range(6)], handle, lanes=2)
    assert max(done_at[f"p{i}"] for i in range(1, 6)) == pytest.approx(3.0)
    assert done_at["p0"] == pytest.approx(11.0)
    assert sched.stats().peak_in_flight == 2 and max(lanes_seen) <= 2


async def test_cancelling_the_batch_cancels_every_worker_and_an_escaping_error_is_grouped():
    started = anyio.Event()
    count = 0

    async def hang(index: int, item: int) -> None:
        nonlocal count
        count += 1
        if count == 4:
            started.set()
        await anyio.sleep_forever()

    before = asyncio.all_tasks()
    async with anyio.create_task_group() as tg:
        tg.start_soon(fan_out, list(range(1000)), hang, 4)
        await started.wait()
        tg.cancel_scope.cancel()
    assert asyncio.all_tasks() == before and count == 4

    async def boom(index: int, item: int) -> None:
        if index == 3:
            raise ValueError("engine bug")
        await anyio.lowlevel.checkpoint()

    with pytest.raises(ExceptionGroup) as info:
        await fan_out(list(range(10)), boom, 2)
    assert info.group_contains(ValueError)
