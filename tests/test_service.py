"""One RLM serving many concurrent completions, as a service uses it: limits shared across runs, exact budgets
under concurrency, refunds, isolated callbacks, typed outcomes, context propagation, the asyncio contract."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars

import anyio
import pytest

from rlm_async import (
    RLM,
    ChatRequest,
    ChatResponse,
    CircuitBreaker,
    ConfigError,
    FakeClient,
    Limits,
    LLMCallError,
    Price,
    ProviderStatusError,
    RateLimit,
    RetryPolicy,
    RLMResult,
    RunEvent,
    RunTimeout,
)

from .conftest import Script, on_fake_clock, repl, worker_processes

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class Gauge:
    """Requests the endpoint holds now and at peak."""

    def __init__(self) -> None:
        self.now = self.peak = self.total = 0

    async def hold(self, seconds: float) -> None:
        self.now += 1
        self.total += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.now -= 1


BATCH = repl("r = await llm_batch([f'p{i}' for i in range(4)])\nFINAL(len(r))")


@on_fake_clock
async def test_the_in_flight_cap_holds_across_concurrent_completions():
    gauge = Gauge()
    script = Script({"q": [BATCH]})

    async def endpoint(request: ChatRequest):
        await gauge.hold(0.1)
        return await script(request)

    rlm = RLM("m", client=FakeClient(endpoint), limits=Limits(max_concurrency=4, cell_timeout_s=None), sandbox="none")
    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(rlm.completion, "q", "ctx")
    assert gauge.total == 20 * 5  # a root turn and four sub-calls each
    assert gauge.peak == 4


@on_fake_clock
async def test_a_run_may_carry_a_lower_cap_of_its_own():
    gauge = Gauge()
    script = Script({"q": [repl("r = await llm_batch([f'p{i}' for i in range(12)])\nFINAL(len(r))")]})

    async def endpoint(request: ChatRequest):
        await gauge.hold(0.1)
        return await script(request)

    rlm = RLM("m", client=FakeClient(endpoint), limits=Limits(max_concurrency=64, cell_timeout_s=None), sandbox="none")
    result = await rlm.completion("q", "ctx", limits=Limits(max_concurrency=3, cell_timeout_s=None))
    assert result.answer == "12" and gauge.peak == 3 and result.stats.peak_in_flight == 3


@on_fake_clock
async def test_rpm_holds_across_completions():
    sent: list[float] = []
    script = Script({"q": [BATCH]})

    async def endpoint(request: ChatRequest):
        sent.append(anyio.current_time())
        return await script(request)

    limit = RateLimit(rpm=10, period_s=60)
    rlm = RLM(
        "m",
        client=FakeClient(endpoint),
        rate_limits={"m": limit},
        limits=Limits(cell_timeout_s=None),
        sandbox="none",
    )
    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(rlm.completion, "q", "ctx")
    assert len(sent) == 25  # a root turn and four sub-calls each
    # A bucket of one period's capacity: the first 10 at once, then one every 6 s.
    assert sent[-1] - sent[0] >= (25 - 10) * 6 - 1e-6


async def test_the_breaker_opens_for_the_endpoint_not_per_run():
    attempts = 0

    async def down(request: ChatRequest):
        nonlocal attempts
        attempts += 1
        raise ProviderStatusError("HTTP 500", status=500)

    rlm = RLM(
        "m",
        client=FakeClient(down),
        retry=RetryPolicy(max_retries=4, initial_backoff_s=0.001, max_backoff_s=0.001),
        circuit_breaker=CircuitBreaker(failure_threshold=10, reset_timeout_s=60),
        sandbox="none",
    )
    results = [await rlm.completion("q", "ctx") for _ in range(20)]
    assert all(r.stop_reason == "llm_error" for r in results)
    assert attempts <= 10  # 20 runs x 5 attempts without a shared breaker
    assert results[-1].error.kind == "circuit_open"
    assert rlm.endpoint.circuit.opened == 1


@pytest.mark.parametrize(
    ("cap", "field", "per_call"),
    [
        ({"max_output_tokens": 20}, "completion_tokens", 10),
        ({"max_input_tokens": 200}, "prompt_tokens", 100),
        ({"max_cost_usd": 0.02}, "cost_usd", 0.01),
    ],
)
async def test_token_and_cost_caps_overshoot_at_most_what_is_in_flight(cap, field, per_call):
    """50 sub-calls at max_concurrency=2: the cap is checked when an attempt takes its slot, counting what
    the attempts in flight hold, so at most the two in flight go past it (it was 25x the cap before)."""

    async def endpoint(request: ChatRequest):
        if request.messages[0]["role"] == "system":
            code = "try:\n    r = await llm_batch([f'p{i}' for i in range(50)])\nexcept BudgetExceeded as e:\n"
            code += "    r = e.results\nFINAL(sum(not is_failure(x) for x in r))"
            return ChatResponse(repl(code), prompt_tokens=0, completion_tokens=0, cost_usd=0.0)
        await asyncio.sleep(0.001)
        return ChatResponse("ok", prompt_tokens=100, completion_tokens=10, cost_usd=0.01)

    rlm = RLM("m", client=FakeClient(endpoint), sandbox="none", prices={"m": Price(1, 1)})
    limits = Limits(max_concurrency=2, **cap)
    result = await rlm.completion("q", "ctx", limits=limits)
    sub = result.usage.by_depth[1]
    cap_value = next(iter(cap.values()))
    assert getattr(sub, field) <= cap_value + 2 * per_call + 1e-9
    assert 0 < int(result.answer or 0) <= cap_value / per_call + 2


async def test_a_call_refused_by_the_open_circuit_gives_its_reservation_back():
    async def down(request: ChatRequest):
        raise ProviderStatusError("HTTP 503", status=503)

    rlm = RLM(
        "m",
        client=FakeClient(down),
        retry=RetryPolicy(max_retries=0),
        circuit_breaker=CircuitBreaker(failure_threshold=1, reset_timeout_s=60),
        sandbox="none",
    )
    first = await rlm.completion("q", "ctx", limits=Limits(max_calls=5))
    refused = await rlm.completion("q", "ctx", limits=Limits(max_calls=5))
    assert first.error.kind == "status" and refused.error.kind == "circuit_open"
    assert refused.stats.attempts == 0 and refused.usage.calls == 0


async def test_a_raising_callback_is_logged_and_changes_nothing(caplog):
    def broken(event):
        raise RuntimeError("my dashboard is down")

    rlm = RLM("m", client=FakeClient(Script({"q": [BATCH]})), sandbox="none", on_event=broken)
    result = await rlm.completion("q", "ctx", limits=Limits(max_calls=6))
    assert result.stop_reason == "answer" and result.answer == "4"
    assert "my dashboard is down" in caplog.text


# -- typed outcomes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [401, 403, 404])
async def test_a_wrong_key_or_model_for_sub_calls_is_a_config_error_not_an_answer(status):
    async def endpoint(request: ChatRequest):
        if request.model == "misspelled-sub":
            raise ProviderStatusError(f"HTTP {status}", status=status)
        code = "r = await llm_batch(['a', 'b'])\nanswer['content'] = f'{sum(map(bool, r))} of 2 right'\n"
        return repl(code + "answer['ready'] = True")

    rlm = RLM("m", sub_model="misspelled-sub", client=FakeClient(endpoint), sandbox="none")
    result = await rlm.completion("q", "ctx")
    assert result.stop_reason == "config_error" and not result.ok
    assert isinstance(result.error, LLMCallError) and result.error.status == status
    assert result.error.model == "misspelled-sub"
    with pytest.raises(LLMCallError):
        result.raise_for_status()


async def test_a_timeout_is_typed_and_an_answer_passes_raise_for_status():
    async def slow(request: ChatRequest):
        await asyncio.sleep(10)

    rlm = RLM("m", client=FakeClient(slow), sandbox="none")
    result = await rlm.completion("q", "ctx", limits=Limits(timeout_s=0.05))
    assert result.stop_reason == "timeout" and isinstance(result.error, RunTimeout)
    ok = await RLM("m", client=FakeClient(Script({"q": [repl("FINAL(1)")]})), sandbox="none").completion("q")
    assert ok.raise_for_status() is ok


def test_completion_sync_inside_a_running_loop_names_the_await_form():
    rlm = RLM("m", client=FakeClient(lambda r: "x"), sandbox="none")

    async def inside() -> None:
        with pytest.raises(ConfigError, match=r"await rlm.completion"):
            rlm.completion_sync("q")

    asyncio.run(inside())


def test_another_async_library_is_refused_at_entry():
    trio = pytest.importorskip("trio", reason="trio is not installed: the backend check needs it to run")
    rlm = RLM("m", client=FakeClient(lambda r: "x"), sandbox="none")

    async def under_trio() -> None:
        with pytest.raises(ConfigError, match="runs on asyncio"):
            await rlm.completion("q")

    trio.run(under_trio)


# -- per-call options and context ----------------------------------------------------------------------------
async def test_per_call_limits_events_and_metadata():
    events: list[dict] = []
    rlm = RLM("m", client=FakeClient(Script({"q": [BATCH]})), sandbox="none", limits=Limits(max_calls=100))
    result = await rlm.completion("q", "ctx", limits=Limits(max_calls=3), on_event=events.append, metadata={"id": 7})
    assert result.stop_reason == "budget:max_calls" and result.metadata == {"id": 7}
    assert events[0]["event"] == "run_start" and events[0]["metadata"] == {"id": 7}


@pytest.mark.parametrize("sandbox", ["strict", "none"])
async def test_the_callers_contextvars_reach_every_client_call_and_event(sandbox):
    seen: set[str] = set()
    script = Script(
        {"q": [repl("r = await llm_batch(['a', 'b'])\nk = await rlm_agent('kid', 'c')\nFINAL(k)")], "kid": [BATCH]}
    )

    async def endpoint(request: ChatRequest):
        seen.add(request_id.get())
        return await script(request)

    in_events: set[str] = set()
    rlm = RLM("m", client=FakeClient(endpoint), sandbox=sandbox)
    request_id.set("req-42")
    result = await rlm.completion("q", "ctx", on_event=lambda e: in_events.add(request_id.get()))
    assert result.answer == "4"
    assert seen == {"req-42"} and in_events == {"req-42"}


# -- streaming -----------------------------------------------------------------------------------------------
async def test_stream_yields_typed_events_then_the_result():
    script = Script(
        {"q": [repl("answer['content'] = 'draft'\nr = await llm_batch(['a', 'b'])"), repl("FINAL('done')")]}
    )
    rlm = RLM("m", client=FakeClient(script), sandbox="none")
    items = [item async for item in rlm.stream("q", "ctx", metadata={"id": 1})]
    *events, result = items
    assert isinstance(result, RLMResult) and result.answer == "done" and result.metadata == {"id": 1}
    assert all(isinstance(e, RunEvent) for e in events)
    names = [e.event for e in events]
    assert names[0] == "run_start" and names[-1] == "run_end"
    assert {"agent_start", "turn", "code", "output", "call_started", "call_finished", "agent_end"} <= set(names)
    drafts = [(e.data["content"], e.data["ready"]) for e in events if e.event == "answer"]
    assert drafts == [("draft", False), ("done", True)]
    assert all(e.run_id == result.run_id for e in events)


@pytest.mark.parametrize("how", ["cancel", "aclose"])
async def test_leaving_the_stream_cancels_the_run(how):
    started = anyio.Event()

    async def endpoint(request: ChatRequest):
        if request.messages[0]["role"] == "system":
            return repl("r = await llm_batch(['never'] * 3)")
        started.set()
        await anyio.sleep_forever()

    rlm = RLM("m", client=FakeClient(endpoint), sandbox="strict")
    seen: list[str] = []
    if how == "cancel":
        async with anyio.create_task_group() as tg:

            async def consume() -> None:
                async for item in rlm.stream("q", "ctx"):
                    seen.append(item.event)

            tg.start_soon(consume)
            await started.wait()
            tg.cancel_scope.cancel()
    else:
        async with contextlib.aclosing(rlm.stream("q", "ctx")) as events:
            async for item in events:
                seen.append(item.event)
                if item.event == "call_started":
                    break
    assert "run_end" not in seen and "call_started" in seen
    assert worker_processes(grace_s=5) == []
