"""The scheduler: the one place where concurrency, rate limits, retries and budget admission live.

One scheduler serves a whole run. Every model call of every agent at every depth goes through
:meth:`Scheduler.call`, which in order:

1. reserves the call against ``max_calls`` (unless the caller reserved a whole batch already);
2. per attempt: checks token and USD budgets, waits for the model's RPM / TPM buckets, *then* takes one of
   ``max_concurrency`` slots for exactly one HTTP attempt, asks the circuit breaker, and sends the attempt
   under the per-attempt timeout;
3. settles the usage of every billed response into the ledger;
4. retries per :class:`RetryPolicy`, sleeping *without* a slot, and finally raises a typed
   :class:`LLMCallError` or returns the response.

A call cancelled before its first attempt was sent gives its ``max_calls`` reservation back.

A slot is never held while anything else is awaited, so ``max_concurrency=1`` cannot deadlock a deep tree.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import anyio
from aiolimiter import AsyncLimiter

from ._breaker import DEFAULT_BREAKER, Circuit, CircuitBreaker
from ._budget import Ledger, estimate_tokens
from ._clients import ChatClient, ChatRequest, ChatResponse
from ._errors import (
    BudgetExceeded,
    CircuitOpenError,
    ConfigError,
    LLMCallError,
    ProviderConnectionError,
    ProviderError,
    ProviderResponseError,
    ProviderStatusError,
    ProviderTimeoutError,
)
from ._retry import RetryPolicy
from ._trace import Tracer

__all__ = ["RateLimit", "Scheduler", "SchedulerStats"]


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A provider's rate limit for one model, kept by aiolimiter leaky buckets of one period's capacity.

    Attributes:
        rpm: requests per period (each attempt, retries included, is a request), or None.
        tpm: tokens per period, or None. Each attempt reserves its estimate before it is sent: prompt
            characters / 4 plus ``max_tokens`` when set (OpenAI counts ``max_tokens`` toward TPM).
        period_s: the period in seconds: 60 for RPM / TPM as providers publish them; another value for a
            provider that counts per second, or for a time-scaled simulator.
    """

    rpm: float | None = None
    tpm: float | None = None
    period_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "period_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"RateLimit.{name} must be > 0, got {value!r}")


class _ModelLimiter:
    """aiolimiter leaky buckets (capacity = one minute's worth) for one model's RPM and TPM."""

    def __init__(self, limit: RateLimit) -> None:
        self._rpm = AsyncLimiter(limit.rpm, limit.period_s) if limit.rpm else None
        self._tpm = AsyncLimiter(limit.tpm, limit.period_s) if limit.tpm else None

    async def acquire(self, tokens: int) -> None:
        if self._rpm is not None:
            await self._rpm.acquire()
        if self._tpm is not None:
            await self._tpm.acquire(min(max(tokens, 1), self._tpm.max_rate))


class _Slots:
    """``max_concurrency`` slots handed out first come, first served, as an asyncio semaphore would.

    Waiters sit in an ``OrderedDict`` rather than a deque, so one that is cancelled leaves the queue in O(1):
    anyio's and asyncio's semaphores ``deque.remove`` each cancelled waiter, and cancelling 10,000 queued
    calls cost 0.15 s of that scan alone. Asyncio only, like the rest of the engine.
    """

    def __init__(self, n: int) -> None:
        self._free = n
        self._waiters: OrderedDict[asyncio.Future[None], None] = OrderedDict()

    async def __aenter__(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[waiter] = None
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a slot just as it was cancelled: pass the slot on
            else:
                self._waiters.pop(waiter, None)
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._release()

    def _release(self) -> None:
        while self._waiters:
            waiter, _ = self._waiters.popitem(last=False)
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """A snapshot of the scheduler's counters.

    Attributes:
        calls: calls admitted (each may take several attempts).
        attempts: HTTP attempts started.
        retries: attempts sent after a call's first (an attempt the circuit breaker refused was not sent).
        failed_calls: calls that ended in ``LLMCallError`` or were refused by a token or USD budget.
        in_flight: attempts holding a slot now.
        peak_in_flight: the most attempts that ever held slots at once.
        queued_s: seconds, summed over calls, from admission to the first attempt's slot (rate-limit waits
            included).
        running_s: seconds, summed over attempts, spent holding a slot.
        circuit: the breaker's state: ``"closed"``, ``"open"`` or ``"half_open"``.
        circuit_opened: how many times the breaker opened.
    """

    calls: int
    attempts: int
    retries: int
    failed_calls: int
    in_flight: int
    peak_in_flight: int
    queued_s: float
    running_s: float
    circuit: str = "closed"
    circuit_opened: int = 0


SleepFn = Callable[[float], Awaitable[None]]


class Scheduler:
    """Admission, limits, dispatch and retries for every model call of one run.

    Args:
        client: the chat client (one attempt per ``chat``).
        ledger: the run's budget ledger.
        tracer: where call events go.
        max_concurrency: slots, i.e. HTTP attempts in flight at once across the tree.
        retry: the retry policy.
        rate_limits: model name -> RateLimit; models not named are not rate limited.
        breaker: the circuit breaker's policy (default :class:`CircuitBreaker`), or None for none.
        sleep: the backoff sleep (seconds); injectable for tests, default ``anyio.sleep``.
        wall_clock: Unix seconds, for Retry-After dates; injectable, default ``time.time``.
        rand: uniform [0, 1) source for backoff jitter; injectable.
    """

    def __init__(
        self,
        client: ChatClient,
        ledger: Ledger,
        tracer: Tracer,
        *,
        max_concurrency: int,
        retry: RetryPolicy | None = None,
        rate_limits: Mapping[str, RateLimit] | None = None,
        breaker: CircuitBreaker | None = DEFAULT_BREAKER,
        sleep: SleepFn = anyio.sleep,
        wall_clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._client = client
        self._ledger = ledger
        self._tracer = tracer
        self._retry = retry or RetryPolicy()
        self._slots = _Slots(max_concurrency)
        self._limiters = {model: _ModelLimiter(limit) for model, limit in (rate_limits or {}).items()}
        self._circuit = Circuit(breaker, anyio.current_time) if breaker is not None else None
        self._sleep = sleep
        self._wall = wall_clock
        self._rand = rand
        self._ids = itertools.count(1)
        self._calls = self._attempts = self._retries = self._failed = 0
        self._in_flight = self._peak = 0
        self._queued_s = self._running_s = 0.0

    def stats(self) -> SchedulerStats:
        """A frozen snapshot of the counters."""
        return SchedulerStats(
            self._calls,
            self._attempts,
            self._retries,
            self._failed,
            self._in_flight,
            self._peak,
            self._queued_s,
            self._running_s,
            self._circuit.state if self._circuit is not None else "closed",
            self._circuit.opened if self._circuit is not None else 0,
        )

    async def call(self, request: ChatRequest, *, depth: int, agent_id: str, reserved: bool = False) -> ChatResponse:
        """Run one model call to completion: admission, limits, attempts, retries, accounting.

        Args:
            request: what to send.
            depth: the call's depth (an agent at depth d makes its own turns at d, its sub-calls at d + 1).
            agent_id: the agent making the call (for usage breakdowns and errors).
            reserved: True when the caller already reserved this call against ``max_calls``.

        Returns:
            The response of the successful attempt.

        Raises:
            BudgetExceeded: ``max_calls`` (when not reserved), ``max_input_tokens``, ``max_output_tokens`` or
                ``max_cost_usd`` refused the call before an attempt was sent; the reservation is refunded.
            ConfigError: ``max_cost_usd`` is set and the model has no price.
            LLMCallError: the last attempt failed and no retry is left or allowed (``kind="circuit_open"``
                when the circuit breaker refused it unsent).
        """
        if not reserved:
            self._ledger.reserve_calls(1)
        call_id = next(self._ids)
        self._calls += 1
        started = anyio.current_time()
        state = _CallState(call_id, depth, agent_id, request.model, started)
        self._tracer.emit("call_queued", call_id=call_id, model=request.model, call_depth=depth)
        try:
            response = await self._with_retries(request, state)
        except ProviderError as exc:
            self._failed += 1
            error = _call_error(exc, state, self._retry, self._wall())
            self._tracer.emit("call_failed", call_id=call_id, kind=error.kind, error=str(exc))
            raise error from exc
        except (BudgetExceeded, ConfigError):
            if state.attempts == 0:
                self._ledger.refund_calls(1)
            self._failed += 1
            raise
        except anyio.get_cancelled_exc_class():
            if state.attempts == 0:
                self._ledger.refund_calls(1)
            raise
        self._tracer.emit(
            "call_finished",
            call_id=call_id,
            attempts=state.attempts,
            prompt_tokens=response.prompt_tokens,
            completion_tokens=response.completion_tokens,
            latency_s=round(anyio.current_time() - started, 6),
        )
        return response

    async def _with_retries(self, request: ChatRequest, state: _CallState) -> ChatResponse:
        """Attempts until one succeeds, the policy declines the error, or ``max_retries`` retries are spent.

        A plain loop rather than tenacity's ``AsyncRetrying``: tenacity routes every outcome, cancellation
        included, through a ``concurrent.futures.Future`` (a lock apiece) and re-inspects its callbacks per
        call, about 0.15 ms of CPU a call; cancelling 10,000 queued calls took 1.8 s that way (G3 asks for
        0.5 s). The decisions stay in :class:`RetryPolicy`.
        """
        retries = 0
        while True:
            try:
                return await self._attempt(request, state)
            except ProviderError as exc:
                if retries >= self._retry.max_retries or not self._retry.is_retryable(exc, now=self._wall()):
                    raise
                retries += 1
                wait = self._retry.wait_s(retries, exc, now=self._wall(), rand=self._rand)
                self._tracer.emit("call_retried", call_id=state.call_id, attempt=retries, wait_s=wait, error=str(exc))
                await self._sleep(wait)

    async def _attempt(self, request: ChatRequest, state: _CallState) -> ChatResponse:
        self._ledger.check_spend()
        self._ledger.check_priced(request.model)
        limiter = self._limiters.get(request.model)
        if limiter is not None:
            await limiter.acquire(estimate_tokens_for(request))
        async with self._slots:
            probe = self._circuit.before_attempt() if self._circuit is not None else False
            now = anyio.current_time()
            if state.attempts == 0:
                self._queued_s += now - state.started
            state.attempts += 1
            self._attempts += 1
            self._retries += state.attempts > 1
            self._in_flight += 1
            self._peak = max(self._peak, self._in_flight)
            self._tracer.emit("call_started", call_id=state.call_id, attempt=state.attempts)
            outcome: BaseException | None = None
            try:
                with anyio.fail_after(self._retry.attempt_timeout_s):
                    response = await self._client.chat(request)
            except TimeoutError as exc:
                outcome = ProviderTimeoutError(f"attempt ran past {self._retry.attempt_timeout_s:g} s", status=None)
                raise outcome from exc
            except BaseException as exc:
                outcome = exc
                raise
            finally:
                self._in_flight -= 1
                self._running_s += anyio.current_time() - now
                if self._circuit is not None:
                    if isinstance(outcome, anyio.get_cancelled_exc_class()):
                        if probe:
                            self._circuit.probe_abandoned()
                    else:
                        self._circuit.record(outcome, probe=probe)
        self._ledger.settle(
            depth=state.depth,
            agent_id=state.agent_id,
            model=request.model,
            prompt_tokens=response.prompt_tokens,
            completion_tokens=response.completion_tokens,
            cost_usd=response.cost_usd,
        )
        return response


def estimate_tokens_for(request: ChatRequest) -> int:
    """The TPM reservation of one attempt: prompt characters / 4, plus ``max_tokens`` when set."""
    return estimate_tokens(request.prompt_chars) + (request.max_tokens or 0)


@dataclass(slots=True)
class _CallState:
    call_id: int
    depth: int
    agent_id: str
    model: str
    started: float
    attempts: int = 0


def _call_error(exc: ProviderError, state: _CallState, policy: RetryPolicy, now: float) -> LLMCallError:
    if isinstance(exc, CircuitOpenError):
        kind = "circuit_open"
    elif isinstance(exc, ProviderStatusError):
        if policy.retry_after_too_long(exc, now=now):
            kind = "retry_after_too_long"
        else:
            kind = "rate_limited" if exc.status == 429 else "status"
    elif isinstance(exc, ProviderTimeoutError):
        kind = "timeout"
    elif isinstance(exc, ProviderConnectionError):
        kind = "connection"
    elif isinstance(exc, ProviderResponseError):
        kind = "bad_response"
    else:
        kind = "provider"
    return LLMCallError(
        kind,
        str(exc),
        call_id=state.call_id,
        depth=state.depth,
        agent_id=state.agent_id,
        model=state.model,
        status=exc.status,
        attempts=state.attempts,
    )
