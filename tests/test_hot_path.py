"""The hot path's shortcuts (issue 13's CPU target) behave exactly as the longer ways they replace."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random

import anyio
import pytest

from rlm_async import (
    ChatRequest,
    CircuitBreaker,
    FakeClient,
    Limits,
    LLMCallError,
    ProviderStatusError,
    RetryPolicy,
)
from rlm_async._budget import Ledger
from rlm_async._clients._aiohttp import _parse
from rlm_async._endpoint import Endpoint, Slots
from rlm_async._scheduler import AttemptDeadline, DeadlineQueue, Scheduler
from rlm_async._trace import Tracer

from .conftest import on_fake_clock


def request(text: str = "hi") -> ChatRequest:
    return ChatRequest("m", ({"role": "user", "content": text},))


@pytest.mark.parametrize(
    "raw",
    [
        b'{"choices": [{"message": {"content": "ok"}}]}',
        b' {"a": 1}',  # leading whitespace: json.loads' own way
        "\ufeff{}".encode(),  # a UTF-8 BOM
        '{"a": "\u00e9"}'.encode("utf-16"),  # UTF-16, which json.loads detects
        b'{"a": "\xed\xa0\x80"}',  # an encoded lone surrogate: json.loads decodes with surrogatepass
        b"{",  # truncated
        b'{"a": \xff}',  # not UTF-8
        b"[1, 2]",
        b"",
        '{"a": "\u00e9"}'.encode("utf-16-le"),  # UTF-16-LE without a BOM: json.loads detects it by the NUL
        '{"a": 1}'.encode("utf-32-le"),  # likewise UTF-32-LE
        b"{\x00}",  # three bytes: json.loads reads these as UTF-8
        b'{"a": NaN, "b": Infinity, "c": -Infinity}',
        b'{"a": 1, "a": 2}',  # duplicate keys: the last wins
        b'{"a": "\\ud800\\udc00 \\udfff"}',  # escaped surrogates, paired and lone
        pytest.param(b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, id="nested-too-deep"),  # RecursionError
    ],
)
def test_the_clients_json_parse_is_json_loads(raw: bytes) -> None:
    def outcome(parse):  # the value (compared by its repr, for NaN), or the exception's type and text
        try:
            return repr(parse(raw))
        except (ValueError, RecursionError) as exc:
            return type(exc), str(exc)

    assert outcome(_parse) == outcome(json.loads)


async def test_try_take_takes_a_free_slot_and_never_jumps_the_queue() -> None:
    slots = Slots(1)
    assert slots.try_take()
    assert not slots.try_take()  # none free
    got: list[str] = []

    async def waiter(name: str) -> None:
        async with slots:
            got.append(name)
            await anyio.lowlevel.checkpoint()

    task = asyncio.ensure_future(waiter("queued"))
    await anyio.wait_all_tasks_blocked()
    slots.give_back()  # handed to the waiter, not freed
    assert not slots.try_take()
    await task
    assert got == ["queued"]
    assert slots.try_take()  # the waiter gave it back
    slots.give_back()


async def test_a_slots_subclass_with_its_own_enter_is_always_entered_through_it() -> None:
    class Counted(Slots):
        def __init__(self, n: int) -> None:
            super().__init__(n)
            self.entered = self.exited = 0

        async def __aenter__(self) -> None:
            self.entered += 1
            await super().__aenter__()

        async def __aexit__(self, *exc_info: object) -> None:
            self.exited += 1
            await super().__aexit__(*exc_info)

    counted = Counted(2)
    assert not counted.try_take()  # its own __aenter__ must see every attempt
    endpoint = Endpoint(max_concurrency=2)
    endpoint.slots = counted

    async def answer(req: ChatRequest) -> str:
        await asyncio.sleep(0)
        return "ok"

    ledger = Ledger(Limits(max_calls=None))
    sched = Scheduler(FakeClient(answer), ledger, Tracer(), max_concurrency=2, endpoint=endpoint)
    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(lambda i=i: sched.call(request(f"p{i}"), depth=1, agent_id="0"))
    assert counted.entered == counted.exited == 5
    assert sched.stats().peak_in_flight == 2


async def test_a_slots_subclass_with_only_its_own_exit_is_always_left_through_it() -> None:
    class CountedExits(Slots):
        exited = 0

        async def __aexit__(self, *exc_info: object) -> None:
            self.exited += 1
            await super().__aexit__(*exc_info)

    counted = CountedExits(2)
    assert not counted.try_take()  # give_back would pass its __aexit__ by
    endpoint = Endpoint(max_concurrency=2)
    endpoint.slots = counted
    ledger = Ledger(Limits(max_calls=None))
    sched = Scheduler(FakeClient(lambda req: "ok"), ledger, Tracer(), max_concurrency=2, endpoint=endpoint)
    for i in range(3):
        await sched.call(request(f"p{i}"), depth=1, agent_id="0")
    assert counted.exited == 3


async def test_a_run_cap_below_the_endpoints_holds_and_every_slot_comes_back() -> None:
    endpoint = Endpoint(max_concurrency=8)
    now = peak = 0

    async def answer(req: ChatRequest) -> str:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        await asyncio.sleep(0.001)
        now -= 1
        return "ok"

    ledger = Ledger(Limits(max_calls=None))
    sched = Scheduler(FakeClient(answer), ledger, Tracer(), max_concurrency=2, endpoint=endpoint)
    async with anyio.create_task_group() as tg:
        for i in range(12):
            tg.start_soon(lambda i=i: sched.call(request(f"p{i}"), depth=1, agent_id="0"))
    assert peak == 2 and sched.stats().calls == 12
    assert all(endpoint.slots.try_take() for _ in range(8)) and not endpoint.slots.try_take()


def test_a_trace_line_is_what_json_dumps_with_repr_writes(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    seen: list[dict] = []
    tracer = Tracer(trace_path=path, listeners=[seen.append], clock=lambda: 0.0)
    odd = object()
    tracer.emit(
        "tool_call",
        value=odd,
        text="é\n\ud800",
        number=1.5,
        nested={"a": [1, None, (2, odd)], 3: float("nan"), None: float("-inf"), 1.5: True},
    )
    tracer.close()
    (line,) = path.read_text(encoding="utf-8").splitlines()
    assert line == json.dumps(seen[0], default=repr)
    assert json.loads(line)["value"] == repr(odd)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_deadline_that_falls_due_after_the_answer_was_handed_over_lets_it_through(loop_kind):
    """The answer is set on what the attempt awaits, but the task has not run yet to take it, when the
    deadline expires: an event loop that orders its callbacks otherwise than asyncio's (uvloop) can get there.
    The deadline lets the task take its answer instead of cancelling it (which would lose it)."""
    factory = asyncio.new_event_loop
    if loop_kind == "uvloop":
        import uvloop  # a dev dependency (not on Windows, where uvloop does not run)

        factory = uvloop.new_event_loop

    async def main() -> str:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[str] = loop.create_future()
        deadline = AttemptDeadline(loop, 100.0)

        async def attempt() -> str:
            with deadline:
                return await answer

        task = asyncio.ensure_future(attempt())
        await asyncio.sleep(0)  # the attempt now waits on `answer`
        answer.set_result("the answer")  # its wake-up is queued ...
        deadline._expire()  # ... and the deadline expires before it runs
        return await task

    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(main()) == "the answer"


@on_fake_clock
async def test_attempts_sharing_one_deadline_queue_each_time_out_on_their_own_deadline():
    """Six attempts started a second apart, 5 s deadlines on one timer: those whose answer comes later than
    5 s time out exactly 5 s after they started, the others answer; then no timer is left behind."""
    loop = asyncio.get_running_loop()
    answer_after = [1.0, 6.0, 4.5, 5.5, 0.5, 7.0]  # the server's delay for the attempt started at second i

    async def answer(req: ChatRequest) -> str:
        answered: asyncio.Future[str] = loop.create_future()
        loop.call_later(float(req.messages[0]["content"]), answered.set_result, "ok")
        return await answered

    retry = RetryPolicy(max_retries=0, attempt_timeout_s=5.0)
    sched = Scheduler(FakeClient(answer), Ledger(Limits(max_calls=None)), Tracer(), max_concurrency=6, retry=retry)
    ended: dict[int, tuple[str, float]] = {}

    async def one(i: int) -> None:
        await asyncio.sleep(i)
        try:
            await sched.call(request(str(answer_after[i])), depth=1, agent_id="0")
            ended[i] = ("ok", loop.time())
        except LLMCallError as exc:
            ended[i] = (exc.kind, loop.time())

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(one, i)
    for i, delay in enumerate(answer_after):
        kind, at = ended[i]
        assert kind == ("ok" if delay < 5.0 else "timeout"), (i, ended[i])
        assert at == pytest.approx(i + min(delay, 5.0), abs=1e-6), (i, ended[i])
    queue = sched._deadlines
    assert queue is not None and len(queue) == 0 and queue._handle is None


@on_fake_clock
async def test_a_long_attempt_at_the_front_does_not_let_the_deadline_queue_grow():
    loop = asyncio.get_running_loop()

    async def answer(req: ChatRequest) -> str:
        answered: asyncio.Future[str] = loop.create_future()
        loop.call_later(float(req.messages[0]["content"]), answered.set_result, "ok")
        return await answered

    retry = RetryPolicy(max_retries=0, attempt_timeout_s=60.0)
    sched = Scheduler(FakeClient(answer), Ledger(Limits(max_calls=None)), Tracer(), max_concurrency=4, retry=retry)
    longest = 0

    async def quick_ones() -> None:
        nonlocal longest
        for _ in range(2000):
            await sched.call(request("0.01"), depth=1, agent_id="0")
            assert sched._deadlines is not None
            longest = max(longest, len(sched._deadlines))

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: sched.call(request("59"), depth=1, agent_id="0"))  # open all along, at the front
        await asyncio.sleep(0)
        tg.start_soon(quick_ones)
    assert longest <= 2 * 33 and sched.stats().failed_calls == 0


async def test_a_deadline_of_another_length_than_the_queues_keeps_its_own_timer():
    loop = asyncio.get_running_loop()
    queue = DeadlineQueue(loop, 5.0)
    with AttemptDeadline(loop, 7.0, queue):
        assert len(queue) == 0
    with AttemptDeadline(loop, 5.0, queue):
        assert len(queue) == 1
    assert len(queue) == 0


async def test_a_deadline_queue_of_another_loop_is_not_joined():
    other = asyncio.new_event_loop()
    try:
        queue = DeadlineQueue(other, 5.0)
        with AttemptDeadline(asyncio.get_running_loop(), 5.0, queue):
            assert len(queue) == 0  # its timer would run on the other loop
    finally:
        other.close()


@on_fake_clock
async def test_timeouts_cancellations_retries_and_probes_on_one_deadline_queue_leave_nothing_behind():
    """300 calls through a run cap of 4 below an endpoint's 8, some answering late (5 s deadlines), some 503
    with a Retry-After (all of them from 20 s to 30 s), some cancelled from outside mid-attempt or while
    queued, the breaker opening and probing: every attempt that timed out did so exactly 5 s after it
    started, none that answered in time did, and afterwards no slot, hold, in-flight count, queue entry or
    timer is left."""

    loop = asyncio.get_running_loop()
    rng = random.Random(13)
    attempts: list[tuple[float, float, float, str]] = []  # (started, ended, the server's delay, how it ended)
    timeouts = 0

    async def server(req: ChatRequest) -> str:
        started = loop.time()
        delay = -1.0 if 20 <= started < 30 else rng.choice([0.5, 1.5, 4.5, 4.999, 5.001, 6.0, -1.0])  # -1: a 503
        if delay < 0:
            attempts.append((started, started, delay, "503"))
            raise ProviderStatusError("busy", status=503, headers={"retry-after": "1"})
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            attempts.append((started, loop.time(), delay, "cancelled"))
            raise
        attempts.append((started, loop.time(), delay, "answered"))
        return "ok"

    def on_event(event: dict) -> None:
        nonlocal timeouts
        if "ran past" in str(event.get("error", "")):
            timeouts += 1

    endpoint = Endpoint(max_concurrency=8, breaker=CircuitBreaker(failure_threshold=6, reset_timeout_s=2.0))
    ledger = Ledger(Limits(max_calls=None, max_input_tokens=10**9))
    retry = RetryPolicy(max_retries=2, attempt_timeout_s=5.0)
    tracer = Tracer(listeners=[on_event])
    sched = Scheduler(FakeClient(server), ledger, tracer, max_concurrency=4, endpoint=endpoint, retry=retry)

    async def one(i: int) -> None:
        await asyncio.sleep(rng.uniform(0, 60))
        with anyio.move_on_after(rng.uniform(0.1, 20) if i % 3 == 0 else math.inf):
            with contextlib.suppress(LLMCallError):
                await sched.call(request(f"p{i}"), depth=1, agent_id="0")

    async with anyio.create_task_group() as tg:
        for i in range(300):
            tg.start_soon(one, i)

    timed_out = [a for a in attempts if a[3] == "cancelled" and a[1] - a[0] == pytest.approx(5.0, abs=1e-9)]
    assert len(timed_out) == timeouts > 0
    assert all(delay > 5.0 for _, _, delay, _ in timed_out)
    assert all(end - start <= 5.0 + 1e-9 for start, end, _, _ in attempts)
    assert all(end - start == pytest.approx(delay) for start, end, delay, how in attempts if how == "answered")
    assert any(how == "cancelled" and end - start < 5.0 for start, end, _, how in attempts)  # from outside
    assert endpoint.circuit is not None and endpoint.circuit.opened > 0
    stats = sched.stats()
    assert stats.in_flight == endpoint.in_flight == 0 and stats.attempts == len(attempts)
    assert ledger.held.prompt_tokens == ledger.held.completion_tokens == 0
    assert sched._run_slots is not None
    for slots, n in ((endpoint.slots, 8), (sched._run_slots, 4)):
        assert not slots._waiters and all(slots.try_take() for _ in range(n)) and not slots.try_take()
    queue = sched._deadlines
    assert queue is not None and len(queue) == 0 and queue._handle is None


@on_fake_clock
async def test_a_policy_changed_mid_run_times_each_attempt_out_on_its_own_length():
    """Attempts of 5 s open on the queue when the policy turns to 2 s: the 2 s ones keep timers of their own
    until the 5 s ones are gone, then the queue is rebuilt for 2 s; each times out on its own length."""
    loop = asyncio.get_running_loop()

    async def never(req: ChatRequest) -> str:
        await asyncio.sleep(3600)
        return "late"

    sched = Scheduler(
        FakeClient(never),
        Ledger(Limits(max_calls=None)),
        Tracer(),
        max_concurrency=8,
        retry=RetryPolicy(0, attempt_timeout_s=5.0),
    )
    ended: dict[str, float] = {}

    async def one(name: str, start: float) -> None:
        await asyncio.sleep(start)
        began = loop.time()
        with pytest.raises(LLMCallError, match="ran past"):
            await sched.call(request(name), depth=1, agent_id="0")
        ended[name] = loop.time() - began

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, "five", 0.0)
        await asyncio.sleep(1.0)
        sched._retry = RetryPolicy(0, attempt_timeout_s=2.0)
        tg.start_soon(one, "two-aside", 0.0)  # starts at 1 s, while "five" is open on the 5 s queue
        tg.start_soon(one, "two-queued", 5.0)  # starts at 6 s: the 5 s queue is empty by then
    assert ended == pytest.approx({"five": 5.0, "two-aside": 2.0, "two-queued": 2.0}, abs=1e-9)
    queue = sched._deadlines
    assert queue is not None and queue.timeout_s == 2.0 and len(queue) == 0 and queue._handle is None
