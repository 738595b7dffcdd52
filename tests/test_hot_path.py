"""The hot path's shortcuts (issue 13's CPU target) behave exactly as the longer ways they replace."""

from __future__ import annotations

import asyncio
import json

import anyio
import pytest

from rlm_async import ChatRequest, FakeClient, Limits, LLMCallError, RetryPolicy
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
    tracer.emit("tool_call", value=odd, text="é\n", number=1.5, nested={"a": [1, None]})
    tracer.close()
    (line,) = path.read_text(encoding="utf-8").splitlines()
    assert line == json.dumps(seen[0], default=repr)
    assert json.loads(line)["value"] == repr(odd)


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
