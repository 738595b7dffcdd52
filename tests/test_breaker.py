"""The circuit breaker on its own (a hand-turned clock) and inside the scheduler (looptime's fake clock)."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from rlm_async import (
    CircuitBreaker,
    CircuitOpenError,
    ConfigError,
    FakeClient,
    LLMCallError,
    ProviderConnectionError,
    ProviderResponseError,
    ProviderStatusError,
    ProviderTimeoutError,
    RetryPolicy,
)
from rlm_async._breaker import Circuit

from .conftest import on_fake_clock
from .test_scheduler import request, scheduler

DOWN = ProviderConnectionError("connection refused")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def circuit(**kwargs) -> tuple[Circuit, Clock]:
    clock = Clock()
    return Circuit(CircuitBreaker(**{"failure_threshold": 3, "reset_timeout_s": 5.0, **kwargs}), clock), clock


def fail(c: Circuit, error: BaseException = DOWN, times: int = 1) -> None:
    for _ in range(times):
        c.record(error, probe=c.before_attempt())


def test_it_opens_after_failures_with_no_success_and_refuses_without_sending():
    c, _ = circuit()
    fail(c, times=2)
    c.record(None, probe=c.before_attempt())  # a success resets the count
    fail(c, times=2)
    assert c.state == "closed"
    fail(c)
    assert c.state == "open" and c.opened == 1
    with pytest.raises(CircuitOpenError, match=r"3 of the last 3 attempts failed with no success; next probe in 5\.00"):
        c.before_attempt()


def test_a_probe_answered_after_another_attempt_closed_the_circuit_still_ends_its_probe():
    # The hot path of record() (a response while closed) must not skip a probe's end: a probe left marked
    # as out would keep the circuit open for good the next time it opens.
    c, clock = circuit()
    slow = c.before_attempt()  # admitted while closed, answers late
    fail(c, times=3)
    clock.now += 5.0
    probe = c.before_attempt()
    assert probe and c.state == "open"
    c.record(None, probe=slow)  # the slow attempt's response closes the circuit first
    assert c.state == "closed"
    c.record(None, probe=probe)
    fail(c, times=3)
    assert c.state == "open"
    clock.now += 5.0
    assert c.state == "half_open" and c.before_attempt() is True


def test_fast_failures_overtaking_slow_successes_in_a_wave_do_not_open_it():
    """Regression: 64 attempts start at once; the 12 that fail come back first (instant 503s), the 52
    successes later. Counting consecutive failures alone opened the circuit on a healthy endpoint (seen in
    the soak); 12 failures of 64 started is under the ratio."""
    c, _ = circuit(failure_threshold=10)
    probes = [c.before_attempt() for _ in range(64)]
    for probe in probes[:12]:
        c.record(ProviderStatusError("503", status=503), probe=probe)
    assert c.state == "closed"
    for probe in probes[12:]:
        c.record(None, probe=probe)
    assert c.state == "closed"


def test_failures_of_attempts_out_before_a_success_count_against_them_too():
    """Regression (the flaky 10,000-call reliability run): 256 attempts out, one success comes back and resets
    the count, then ten instant 5xx among the other 255 arrive. Counting them against only the attempts started
    after the success (none) opened the circuit on a healthy endpoint, and 121 calls failed with
    ``circuit_open``."""
    c, _ = circuit(failure_threshold=10)
    probes = [c.before_attempt() for _ in range(256)]
    c.record(None, probe=probes[0])
    for probe in probes[1:11]:
        c.record(ProviderStatusError("500", status=500), probe=probe)
    assert c.state == "closed"
    for probe in probes[11:128]:  # 127 of the 255 out have failed: under half
        c.record(DOWN, probe=probe)
    assert c.state == "closed"
    c.record(DOWN, probe=probes[128])  # the 128th: half of those at stake since the success
    assert c.state == "open"


def test_a_cancelled_attempt_leaves_the_count_of_attempts_out():
    c, _ = circuit(failure_threshold=2)
    probes = [c.before_attempt() for _ in range(4)]
    for probe in probes[:3]:
        c.abandoned(probe=probe)
    c.record(None, probe=probes[3])  # nothing is out any more: the next two failures are all there is
    fail(c, times=2)
    assert c.state == "open"


def test_half_of_a_wave_failing_opens_it():
    c, _ = circuit(failure_threshold=10)
    probes = [c.before_attempt() for _ in range(40)]
    for probe in probes[:19]:
        c.record(DOWN, probe=probe)
    assert c.state == "closed"
    c.record(DOWN, probe=probes[19])  # 20 of 40 started: the ratio 0.5 is reached
    assert c.state == "open"


@pytest.mark.parametrize(
    "error",
    [
        ProviderStatusError("429", status=429, headers={"retry-after": "1"}),
        ProviderStatusError("404", status=404),
        ProviderResponseError("truncated body"),
    ],
)
def test_pacing_and_request_errors_do_not_count(error):
    c, _ = circuit()
    fail(c, error, times=10)
    assert c.state == "closed"


@pytest.mark.parametrize(
    "error",
    [
        DOWN,
        ProviderTimeoutError("slow"),
        ProviderStatusError("503", status=503),
        ProviderStatusError("500", status=500),
    ],
)
def test_down_slow_and_5xx_count(error):
    c, _ = circuit()
    fail(c, error, times=3)
    assert c.state == "open"


def test_half_open_lets_one_probe_through_and_its_success_closes():
    c, clock = circuit()
    fail(c, times=3)
    clock.now = 5.0
    assert c.state == "half_open"
    assert c.before_attempt() is True
    with pytest.raises(CircuitOpenError, match="a probe is out"):
        c.before_attempt()
    c.record(None, probe=True)
    assert c.state == "closed" and c.before_attempt() is False


def test_a_failed_probe_doubles_the_open_time_up_to_the_cap():
    c, clock = circuit(max_reset_timeout_s=12.0)
    fail(c, times=3)
    for open_for in (10.0, 12.0, 12.0):
        clock.now += 5.0 if open_for == 10.0 else 0.0
        assert c.before_attempt() is True
        c.record(DOWN, probe=True)
        clock.now += open_for - 0.001
        assert c.state == "open"
        clock.now += 0.001
        assert c.state == "half_open"
    c.record(None, probe=c.before_attempt())
    fail(c, times=3)  # after closing, the open time starts over at reset_timeout_s
    clock.now += 5.0
    assert c.state == "half_open"


def test_an_abandoned_probe_lets_the_next_attempt_probe():
    c, clock = circuit()
    fail(c, times=3)
    clock.now = 5.0
    assert c.before_attempt() is True
    c.abandoned(probe=True)
    assert c.before_attempt() is True


@pytest.mark.parametrize(
    "kwargs",
    [
        {"failure_threshold": 0},
        {"failure_ratio": 0},
        {"failure_ratio": 1.5},
        {"reset_timeout_s": 0},
        {"reset_timeout_s": 10, "max_reset_timeout_s": 5},
    ],
)
def test_bad_policies_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        CircuitBreaker(**kwargs)


@on_fake_clock
async def test_a_dead_endpoint_fails_a_whole_batch_fast_without_a_retry_storm():
    """G7: 200 calls at 20 in flight against an endpoint that refuses every connection."""
    up = False

    async def endpoint(req):
        await asyncio.sleep(0.01)
        if not up:
            raise DOWN
        return "fine"

    client = FakeClient(endpoint)
    breaker = CircuitBreaker(failure_threshold=10, reset_timeout_s=5.0)
    sched, _, events = scheduler(client, max_concurrency=20, breaker=breaker, retry=RetryPolicy(max_retries=5))
    errors: list[LLMCallError] = []

    async def one(i: int) -> None:
        try:
            await sched.call(request(f"p{i}"), depth=1, agent_id="0")
        except LLMCallError as exc:
            errors.append(exc)

    started = anyio.current_time()
    async with anyio.create_task_group() as tg:
        for i in range(200):
            tg.start_soon(one, i)
    assert len(errors) == 200
    assert anyio.current_time() - started < 5.0  # every call failed before the first probe was due
    assert len(client.requests) <= 10 + 20  # the threshold, plus what was in flight when it opened
    assert sum(e.kind == "circuit_open" for e in errors) >= 170
    stats = sched.stats()
    assert stats.circuit == "open" and stats.circuit_opened == 1 and stats.attempts == len(client.requests)
    assert 0 <= stats.retries < stats.attempts  # regression: was attempts - calls, negative after refusals

    up = True  # the server is back: after reset_timeout_s a probe closes the circuit
    await asyncio.sleep(5.0)
    assert (await sched.call(request("again"), depth=1, agent_id="0")).text == "fine"
    assert sched.stats().circuit == "closed"
    assert [e["event"] for e in events].count("call_finished") == 1


@on_fake_clock
async def test_without_a_breaker_every_call_spends_its_retries():
    async def endpoint(req):
        raise DOWN

    client = FakeClient(endpoint)
    sched, _, _ = scheduler(client, max_concurrency=20, breaker=None, retry=RetryPolicy(max_retries=2))
    for i in range(5):
        with pytest.raises(LLMCallError, match="connection refused"):
            await sched.call(request(f"p{i}"), depth=1, agent_id="0")
    assert len(client.requests) == 15
