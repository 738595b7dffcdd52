"""The scheduler on its own: concurrency, timing (on looptime's fake clock), retries, rate limits, budgets."""

from __future__ import annotations

import asyncio
import math
import time

import anyio
import pytest

from rlm_async import (
    BudgetExceeded,
    ChatRequest,
    ChatResponse,
    FakeClient,
    Limits,
    LLMCallError,
    ProviderConnectionError,
    ProviderStatusError,
    RateLimit,
    RetryPolicy,
)
from rlm_async._budget import Ledger
from rlm_async._scheduler import Scheduler
from rlm_async._trace import Tracer

from .conftest import on_fake_clock


def request(text: str = "hi", model: str = "m") -> ChatRequest:
    return ChatRequest(model, ({"role": "user", "content": text},))


class Sleeps:
    """An injectable backoff sleep that records what it was asked for and does not wait."""

    def __init__(self) -> None:
        self.asked: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)
        await anyio.lowlevel.checkpoint()


def scheduler(client, *, limits: Limits | None = None, **kwargs) -> tuple[Scheduler, Ledger, list[dict]]:
    events: list[dict] = []
    ledger = Ledger(limits or Limits(max_calls=None))
    kwargs.setdefault("max_concurrency", (limits or Limits()).max_concurrency)
    return Scheduler(client, ledger, Tracer(listeners=[events.append]), **kwargs), ledger, events


class Concurrency:
    """Counts requests in flight as the server sees them."""

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.now = self.peak = 0

    async def __call__(self, req: ChatRequest) -> str:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(self.latency_s)
        finally:
            self.now -= 1
        return "ok"


@on_fake_clock
async def test_100_calls_at_concurrency_64_take_two_waves():
    server = Concurrency(0.2)
    sched, _, _ = scheduler(FakeClient(server), max_concurrency=64)
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with anyio.create_task_group() as tg:
        for _ in range(100):
            tg.start_soon(lambda: sched.call(request(), depth=1, agent_id="0"))
    makespan = loop.time() - start
    two_waves = math.ceil(100 / 64) * 0.2
    assert two_waves <= makespan <= 1.2 * two_waves
    assert server.peak == 64 and sched.stats().peak_in_flight == 64


@on_fake_clock
async def test_concurrency_cap_holds_under_retries():
    """Every even prompt fails its first attempt with a 503; the cap holds through the retries."""
    server = Concurrency(1.0)
    failed: set[str] = set()

    async def flaky(req: ChatRequest) -> str:
        prompt = req.messages[0]["content"]
        if int(prompt) % 2 == 0 and prompt not in failed:
            failed.add(prompt)
            raise ProviderStatusError("busy", status=503, headers={"retry-after": "2"})
        return await server(req)

    sched, _, _ = scheduler(FakeClient(flaky), max_concurrency=5)
    async with anyio.create_task_group() as tg:
        for i in range(40):
            tg.start_soon(lambda i=i: sched.call(request(str(i)), depth=1, agent_id="0"))
    assert server.peak == 5 and sched.stats().peak_in_flight == 5
    assert sched.stats().retries == 20 and sched.stats().failed_calls == 0


async def test_retry_after_is_honoured_and_recorded():
    replies = iter(
        [
            ProviderStatusError("slow down", status=429, headers={"retry-after": "3"}),
            ProviderStatusError("slow down", status=429, headers={"retry-after-ms": "1500"}),
            "done",
        ]
    )

    def handler(req: ChatRequest) -> str:
        item = next(replies)
        if isinstance(item, Exception):
            raise item
        return item

    sleeps = Sleeps()
    sched, _, events = scheduler(FakeClient(handler), max_concurrency=2, sleep=sleeps)
    response = await sched.call(request(), depth=0, agent_id="0")
    assert response.text == "done"
    assert sleeps.asked == [3.0, 1.5]
    assert sched.stats().attempts == 3 and sched.stats().retries == 2
    assert [e["wait_s"] for e in events if e["event"] == "call_retried"] == [3.0, 1.5]
    assert [e["attempts"] for e in events if e["event"] == "call_finished"] == [3]


async def test_retry_after_over_120_s_is_a_typed_error_without_retry():
    def handler(req: ChatRequest) -> str:
        raise ProviderStatusError("come back later", status=429, headers={"retry-after": "121"})

    sleeps = Sleeps()
    sched, _, _ = scheduler(FakeClient(handler), max_concurrency=2, sleep=sleeps)
    with pytest.raises(LLMCallError) as info:
        await sched.call(request(), depth=2, agent_id="0.1")
    err = info.value
    assert (err.kind, err.attempts, err.status, err.depth, err.agent_id) == ("retry_after_too_long", 1, 429, 2, "0.1")
    assert sleeps.asked == []


@pytest.mark.parametrize(
    ("error", "kind", "attempts"),
    [
        (ProviderStatusError("bad", status=400), "status", 1),
        (ProviderStatusError("down", status=500), "status", 3),
        (ProviderStatusError("limited", status=429), "rate_limited", 3),
        (ProviderConnectionError("reset"), "connection", 3),
    ],
)
async def test_failures_end_in_typed_errors_with_attempt_counts(error, kind, attempts):
    def handler(req: ChatRequest) -> str:
        raise error

    sched, _, _ = scheduler(FakeClient(handler), max_concurrency=2, sleep=Sleeps())
    with pytest.raises(LLMCallError) as info:
        await sched.call(request(), depth=0, agent_id="0")
    assert (info.value.kind, info.value.attempts) == (kind, attempts)
    assert sched.stats().failed_calls == 1


async def test_a_slot_is_not_held_during_backoff():
    """max_concurrency=1: while call A backs off, call B must get the slot and finish."""
    a_backing_off = anyio.Event()
    b_done = anyio.Event()

    async def sleep(seconds: float) -> None:
        a_backing_off.set()
        await b_done.wait()

    def handler(req: ChatRequest) -> str:
        if req.messages[0]["content"] == "A" and not a_backing_off.is_set():
            raise ProviderStatusError("busy", status=503)
        return req.messages[0]["content"]

    sched, _, _ = scheduler(FakeClient(handler), max_concurrency=1, sleep=sleep)
    results = {}

    async def run(name: str) -> None:
        if name == "B":
            await a_backing_off.wait()
        results[name] = (await sched.call(request(name), depth=1, agent_id="0")).text
        if name == "B":
            b_done.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "A")
            tg.start_soon(run, "B")
    assert results == {"A": "A", "B": "B"}


@on_fake_clock
async def test_attempt_timeout_becomes_a_typed_timeout():
    async def hang(req: ChatRequest) -> str:
        await anyio.sleep_forever()
        raise AssertionError

    retry = RetryPolicy(max_retries=1, attempt_timeout_s=5.0)
    sched, _, _ = scheduler(FakeClient(hang), max_concurrency=1, retry=retry, sleep=Sleeps())
    with pytest.raises(LLMCallError) as info:
        await sched.call(request(), depth=0, agent_id="0")
    assert info.value.kind == "timeout" and info.value.attempts == 2


async def test_an_answer_that_arrived_before_the_deadline_is_read_even_when_the_loop_runs_late():
    await answer_read_although_the_loop_ran_late()


async def answer_read_although_the_loop_ran_late() -> None:
    """The engine's own loop lag is not the server's slowness: the answer is there 20 ms into a 100 ms attempt,
    but the loop is stuck until 300 ms, past the deadline. A plain ``asyncio.timeout`` runs its timer after the
    wake-up is queued and cancels the attempt; the deadline lets the loop deliver what arrived first. (Also
    run on uvloop: tests/test_uvloop.py.)"""
    loop = asyncio.get_running_loop()
    sent = asyncio.Event()

    async def answer_at_20_ms(req: ChatRequest) -> str:
        answered: asyncio.Future[str] = loop.create_future()
        loop.call_later(0.02, answered.set_result, "on time")
        sent.set()
        return await answered

    def stuck_loop(until: float) -> None:
        while time.perf_counter() < until:  # a CPU-bound stretch of the engine: the loop cannot run
            pass

    retry = RetryPolicy(max_retries=0, attempt_timeout_s=0.1)
    sched, _, _ = scheduler(FakeClient(answer_at_20_ms), max_concurrency=1, retry=retry)
    call = asyncio.ensure_future(sched.call(request(), depth=0, agent_id="0"))
    await sent.wait()
    loop.call_soon(stuck_loop, time.perf_counter() + 0.3)
    assert (await call).text == "on time"
    assert sched.stats().failed_calls == 0


@on_fake_clock
async def test_an_answer_still_missing_after_the_loop_has_polled_times_out():
    """...while one that had not come by the deadline still times out, on the dot (fake clock)."""
    loop = asyncio.get_running_loop()

    async def answer_at(req: ChatRequest) -> str:
        answered: asyncio.Future[str] = loop.create_future()
        loop.call_later(float(req.messages[0]["content"]), answered.set_result, "late")
        return await answered

    sched, _, _ = scheduler(FakeClient(answer_at), max_concurrency=1, retry=RetryPolicy(0, attempt_timeout_s=5.0))
    started = loop.time()
    with pytest.raises(LLMCallError) as info:
        await sched.call(request("5.001"), depth=0, agent_id="0")
    assert info.value.kind == "timeout" and loop.time() - started == pytest.approx(5.0, abs=1e-6)
    assert (await sched.call(request("4.999"), depth=0, agent_id="0")).text == "late"


async def test_cancellation_is_never_retried_or_wrapped():
    started = anyio.Event()

    async def hang(req: ChatRequest) -> str:
        started.set()
        await anyio.sleep_forever()
        raise AssertionError

    sleeps = Sleeps()
    sched, _, _ = scheduler(FakeClient(hang), max_concurrency=1, sleep=sleeps)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: sched.call(request(), depth=0, agent_id="0"))
        await started.wait()
        tg.cancel_scope.cancel()
    stats = sched.stats()
    assert (stats.attempts, stats.retries, stats.in_flight, stats.failed_calls) == (1, 0, 0, 0)
    assert sleeps.asked == []


async def test_usage_is_settled_for_every_billed_attempt():
    replies = iter([ProviderStatusError("busy", status=503), ChatResponse("x", 7, 3), ChatResponse("y", 11, 5)])

    def handler(req: ChatRequest) -> ChatResponse:
        item = next(replies)
        if isinstance(item, Exception):
            raise item
        return item

    sched, ledger, _ = scheduler(FakeClient(handler), max_concurrency=1, sleep=Sleeps())
    await sched.call(request(), depth=0, agent_id="0")
    await sched.call(request(), depth=1, agent_id="0")
    usage = ledger.usage()
    assert (usage.calls, usage.prompt_tokens, usage.completion_tokens) == (2, 18, 8)
    assert usage.by_depth[0].prompt_tokens == 7 and usage.by_depth[1].prompt_tokens == 11


async def test_spent_budget_refuses_before_sending_and_refunds_the_call():
    client = FakeClient(lambda req: ChatResponse("x", 100, 1))
    sched, ledger, _ = scheduler(client, limits=Limits(max_calls=5, max_input_tokens=100))
    await sched.call(request(), depth=0, agent_id="0")
    with pytest.raises(BudgetExceeded) as info:
        await sched.call(request(), depth=0, agent_id="0")
    assert info.value.limit == "max_input_tokens"
    assert len(client.requests) == 1 and ledger.calls_reserved == 1


@on_fake_clock
async def test_rpm_limit_spaces_requests():
    """rpm=6: a bucket of 6 drains at one request per 10 s, so 12 requests need about 60 s."""
    sched, _, _ = scheduler(FakeClient(lambda r: "ok"), max_concurrency=64, rate_limits={"m": RateLimit(rpm=6)})
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with anyio.create_task_group() as tg:
        for _ in range(12):
            tg.start_soon(lambda: sched.call(request(), depth=1, agent_id="0"))
    assert 59.0 <= loop.time() - start <= 61.0


@on_fake_clock
async def test_tpm_limit_reserves_the_token_estimate():
    """tpm=1000, each request estimated at 250 + 250 tokens: a minute's bucket holds 2, then one per 30 s."""
    sched, _, _ = scheduler(FakeClient(lambda r: "ok"), max_concurrency=64, rate_limits={"m": RateLimit(tpm=1000)})
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with anyio.create_task_group() as tg:
        for _ in range(4):
            req = ChatRequest("m", ({"role": "user", "content": "x" * 1000},), max_tokens=250)
            tg.start_soon(lambda req=req: sched.call(req, depth=1, agent_id="0"))
    assert 59.0 <= loop.time() - start <= 61.0


@on_fake_clock
async def test_calls_cancelled_before_their_first_attempt_give_their_reservation_back():
    """G2: 10 calls reserved, 1 slot; cancelling them while 9 still wait for the slot refunds those 9 (the one
    that was sent keeps its reservation)."""

    async def slow(req):
        await asyncio.sleep(60)
        return "late"

    sched, ledger, _ = scheduler(FakeClient(slow), limits=Limits(max_calls=10), max_concurrency=1)
    ledger.reserve_calls(10)
    with anyio.move_on_after(1):
        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(lambda i=i: sched.call(request(f"p{i}"), depth=1, agent_id="0", reserved=True))
    assert ledger.remaining()["calls"] == 9
    assert sched.stats().attempts == 1


async def test_slots_are_first_come_first_served_and_a_cancelled_waiter_loses_nothing():
    from rlm_async._endpoint import Slots as _Slots

    slots = _Slots(2)
    order: list[int] = []
    release = anyio.Event()

    async def hold(i: int) -> None:
        async with slots:
            order.append(i)
            await release.wait()

    async with anyio.create_task_group() as tg:
        scopes = []
        for i in range(8):
            scope = anyio.CancelScope()
            scopes.append(scope)

            async def run(i: int = i, scope: anyio.CancelScope = scope) -> None:
                with scope:
                    await hold(i)

            tg.start_soon(run)
            await anyio.lowlevel.checkpoint()
        await anyio.wait_all_tasks_blocked()
        assert order == [0, 1]
        for i in (2, 4, 5):  # queued waiters leave the queue
            scopes[i].cancel()
        await anyio.wait_all_tasks_blocked()
        release.set()
    assert order == [0, 1, 3, 6, 7]
    async with slots, slots:  # both slots came back
        pass


async def test_a_waiter_cancelled_as_it_is_handed_a_slot_passes_the_slot_on():
    """asyncio's own race (a plain ``task.cancel()`` landing after the slot was handed over); anyio's cancel
    scopes avoid it by not cancelling a task whose wait is already over, so this test uses bare tasks."""
    from rlm_async._endpoint import Slots as _Slots

    slots = _Slots(1)
    got: list[str] = []

    async def take(name: str) -> None:
        async with slots:
            got.append(name)

    await slots.__aenter__()
    first = asyncio.ensure_future(take("first"))
    second = asyncio.ensure_future(take("second"))
    await anyio.wait_all_tasks_blocked()
    await slots.__aexit__(None, None, None)  # the slot goes to "first" ...
    first.cancel()  # ... which is cancelled before it runs: "second" must get the slot
    await asyncio.gather(first, second, return_exceptions=True)
    assert got == ["second"] and first.cancelled()
