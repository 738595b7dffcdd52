"""The scheduler: the one place where concurrency, rate limits, retries and budget admission live.

One scheduler serves a whole run; the :class:`~rlm_async._endpoint.Endpoint` it sends through (the in-flight
cap, the RPM / TPM buckets, the circuit breaker) is shared by every run of the same ``RLM``. Every model call
of every agent at every depth goes through :meth:`Scheduler.call`, which in order:

1. reserves the call against ``max_calls`` (unless the caller reserved a whole batch already);
2. per attempt: refuses early when a token or USD budget is spent or the circuit is open (so a refused
   attempt takes no rate-limit token), waits for the model's RPM / TPM buckets, *then* takes a slot of the
   run (when the run has its own lower ``max_concurrency``) and one of the endpoint's for exactly one HTTP
   attempt; with the slot held it checks the token and USD budgets again, counting the estimates of the
   attempts in flight, and holds its own estimate until it settles (the spend checks and the hold only in a run
   with a token or USD cap: ``Ledger.spend_capped``); then it asks the circuit breaker and
   sends the attempt under the per-attempt deadline (:class:`AttemptDeadline`, the one timeout mechanism: the
   clients the engine builds have none of their own);
3. settles the usage of every billed response into the ledger;
4. retries per :class:`RetryPolicy`, sleeping *without* a slot, and finally raises a typed
   :class:`LLMCallError` or returns the response.

A call refused or cancelled before its first attempt was sent gives its ``max_calls`` reservation back.

A slot is never held while anything else is awaited, so ``max_concurrency=1`` cannot deadlock a deep tree.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from ._breaker import DEFAULT_BREAKER, CircuitBreaker
from ._budget import Ledger, estimate_tokens
from ._clients import ChatClient, ChatRequest, ChatResponse
from ._endpoint import Endpoint, RateLimit, Slots
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
from ._fanout import LANE
from ._retry import RetryPolicy
from ._trace import Tracer

# RateLimit lives in _endpoint, re-exported here.
__all__ = ["AttemptDeadline", "DeadlineQueue", "RateLimit", "Scheduler", "SchedulerStats"]


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
        queued_s: seconds, summed over calls, from the call entering the scheduler (for a batch: its lane
            taking the prompt) to the first attempt's slot (rate-limit waits included).
        running_s: seconds, summed over attempts, spent holding a slot.
        circuit: the endpoint's breaker state: ``"closed"``, ``"open"`` or ``"half_open"``.
        circuit_opened: how many times the endpoint's breaker opened since this scheduler was made.
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
        max_concurrency: HTTP attempts in flight at once across the run's tree. With ``endpoint``, a cap of
            the run's own, applied only when lower than the endpoint's; without, the cap of the endpoint
            this scheduler builds for itself.
        retry: the retry policy.
        rate_limits: model name -> RateLimit, for the endpoint built here (ignored with ``endpoint``).
        breaker: the circuit breaker's policy for the endpoint built here (ignored with ``endpoint``).
        endpoint: the shared endpoint state (the ``RLM``'s), or None to build one for this scheduler alone.
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
        endpoint: Endpoint | None = None,
        sleep: SleepFn = anyio.sleep,
        wall_clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._client = client
        self._ledger = ledger
        self._tracer = tracer
        self._retry = retry or RetryPolicy()
        if endpoint is None:
            endpoint = Endpoint(max_concurrency=max_concurrency, rate_limits=rate_limits, breaker=breaker)
        self._endpoint = endpoint
        self._run_slots = Slots(max_concurrency) if max_concurrency < endpoint.max_concurrency else None
        self._run_slots_n = max_concurrency
        self._circuit = endpoint.circuit
        self._opened_before = self._circuit.opened if self._circuit is not None else 0
        self._sleep = sleep
        self._wall = wall_clock
        self._rand = rand
        self._ids = itertools.count(1)
        self._calls = self._attempts = self._retries = self._failed = 0
        self._in_flight = self._peak = 0
        self._queued_s = self._running_s = 0.0
        self._deadlines: DeadlineQueue | None = None

    @property
    def concurrency(self) -> int:
        """The most attempts this run may have in flight: its own cap, or the endpoint's when that is lower."""
        return min(self._run_slots_n, self._endpoint.max_concurrency)

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
            self._circuit.opened - self._opened_before if self._circuit is not None else 0,
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
        loop = asyncio.get_running_loop()
        tracer = self._tracer
        # Asked once a call: whether anyone listens decides its call_queued, call_started and call_finished.
        traced = tracer.active
        state = _CallState(call_id, depth, agent_id, request.model, loop.time(), traced)
        if traced:
            tracer.emit("call_queued", call_id=call_id, model=request.model, call_depth=depth)
        retries = 0
        try:
            # The retry loop, inline: a plain loop rather than tenacity's ``AsyncRetrying`` (which routes every
            # outcome, cancellation included, through a ``concurrent.futures.Future``, about 0.15 ms of CPU a
            # call, and took 1.8 s to cancel 10,000 queued calls where G3 asks for 0.5 s), and in this
            # coroutine rather than one of its own: every coroutine in the chain costs its creation and a
            # frame on each resume of the attempt (docs/architecture.md). The decisions stay in RetryPolicy.
            while True:
                try:
                    response = await self._attempt(request, state, loop)
                    break
                except ProviderError as exc:
                    if retries >= self._retry.max_retries or not self._retry.is_retryable(exc, now=self._wall()):
                        raise
                    retries += 1
                    await self._back_off(retries, exc, state)
        except ProviderError as exc:
            self._failed += 1
            if state.attempts == 0:  # refused unsent (the circuit was open): nothing was spent
                self._ledger.refund_calls(1)
            error = _call_error(exc, state, self._retry, self._wall())
            tracer.emit("call_failed", call_id=call_id, kind=error.kind, error=str(exc))
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
        if traced:
            tracer.emit(
                "call_finished",
                call_id=call_id,
                attempts=state.attempts,
                prompt_tokens=response.prompt_tokens,
                completion_tokens=response.completion_tokens,
                latency_s=round(loop.time() - state.started, 6),
            )
        return response

    def _new_deadlines(self, loop: asyncio.AbstractEventLoop, timeout_s: float | None) -> DeadlineQueue | None:
        """A new deadline queue on ``loop`` for ``timeout_s``, for an attempt the current one does not fit (the
        first, or one on another loop or under another policy); None when there is no deadline, or when the
        current queue still has blocks (a policy changed mid-run, as tests do: its timer must stay)."""
        queue = self._deadlines
        if timeout_s is None or (queue is not None and len(queue)):
            return None
        queue = self._deadlines = DeadlineQueue(loop, timeout_s)
        return queue

    async def _back_off(self, retries: int, exc: ProviderError, state: _CallState) -> None:
        """Sleep before retry number ``retries`` (no slot held), lending a batch's lane meanwhile."""
        wait = self._retry.wait_s(retries, exc, now=self._wall(), rand=self._rand)
        self._tracer.emit("call_retried", call_id=state.call_id, attempt=retries, wait_s=wait, error=str(exc))
        lane = LANE.get()  # a batch's worker lends its lane while it waits (see _fanout)
        if lane is not None:
            lane.lend()
        try:
            await self._sleep(wait)
        finally:
            if lane is not None:
                lane.back()

    async def _attempt(self, request: ChatRequest, state: _CallState, loop: asyncio.AbstractEventLoop) -> ChatResponse:
        """One attempt: the early refusals, the rate limits, the slots, then (slot held) the spend check and
        hold, the breaker's verdict, the counters, the per-attempt deadline; settles a response's usage.

        One coroutine for all of it, and the slots taken without a coroutine when one is free
        (``Slots.try_take``): what were three nested coroutines and two for ``async with slots`` cost their
        creation and a frame on every resume (docs/architecture.md has the measurement)."""
        endpoint, ledger, circuit = self._endpoint, self._ledger, self._circuit
        model = request.model
        capped = ledger.spend_capped  # without a token or USD cap, nothing to check or hold
        if capped:
            ledger.check_priced(model)
            ledger.check_spend()  # early: a refused attempt should not take a rate-limit token
        if circuit is not None:
            circuit.check_open()
        if endpoint.limiters:
            limiter = endpoint.limiters.get(model)
            if limiter is not None:
                await limiter.acquire(estimate_tokens_for(request))
        run_slots, slots = self._run_slots, endpoint.slots
        if run_slots is not None:
            await run_slots.__aenter__()
        try:
            took = slots.try_take()
            if not took:
                await slots.__aenter__()
            try:
                # With the slot held: the spend check and hold, the breaker's verdict, the counters, the deadline.
                hold = None
                if capped:
                    hold = ledger.hold(model, estimate_tokens(request.prompt_chars), request.max_tokens or 0)
                try:
                    probe = circuit.before_attempt() if circuit is not None else False
                except BaseException:
                    if hold is not None:
                        ledger.release(hold)
                    raise
                now = loop.time()
                if state.attempts == 0:
                    self._queued_s += now - state.started
                state.attempts += 1
                self._attempts += 1
                self._retries += state.attempts > 1
                self._in_flight += 1
                endpoint.in_flight += 1
                if self._in_flight > self._peak:
                    self._peak = self._in_flight
                timeout_s = self._retry.attempt_timeout_s
                outcome: BaseException | None = None
                try:
                    if state.traced:  # inside the try: a failing trace file must not leak the hold or probe
                        self._tracer.emit("call_started", call_id=state.call_id, attempt=state.attempts)
                    queue = self._deadlines
                    if queue is None or queue._loop is not loop or queue.timeout_s != timeout_s:  # rare
                        queue = self._new_deadlines(loop, timeout_s)
                    with AttemptDeadline(loop, timeout_s, queue):
                        response = await self._client.chat(request)
                except TimeoutError as exc:
                    outcome = ProviderTimeoutError(f"attempt ran past {timeout_s:g} s", status=None)
                    raise outcome from exc
                except BaseException as exc:
                    outcome = exc
                    raise
                finally:
                    if hold is not None:
                        ledger.release(hold)
                    self._in_flight -= 1
                    endpoint.in_flight -= 1
                    self._running_s += loop.time() - now
                    if circuit is not None:
                        if isinstance(outcome, asyncio.CancelledError):
                            circuit.abandoned(probe=probe)
                        else:
                            circuit.record(outcome, probe=probe)
            finally:
                if took:
                    slots.give_back()
                else:
                    await slots.__aexit__(None, None, None)
        finally:
            if run_slots is not None:
                await run_slots.__aexit__(None, None, None)
        ledger.settle(
            depth=state.depth,
            agent_id=state.agent_id,
            model=model,
            prompt_tokens=response.prompt_tokens,
            completion_tokens=response.completion_tokens,
            cost_usd=response.cost_usd,
        )
        return response


class AttemptDeadline:
    """The per-attempt timeout: ``with AttemptDeadline(loop, timeout_s):`` raises ``TimeoutError`` when the
    block runs past ``timeout_s`` seconds, and never charges the engine's own event-loop lag to the server.

    A plain ``asyncio.timeout`` cancels an attempt whose response arrived before the deadline whenever the
    loop is too busy to read it in time: asyncio polls the sockets, then runs the timers that fell due, and
    only after both resumes the tasks whose data arrived, so the timer's cancellation wins and a loaded engine
    reports a healthy server as slow (and feeds those timeouts to the circuit breaker). anyio's ``fail_after``
    avoids that by re-checking the task's waiter, at 10.3 µs of CPU an attempt against this class's 2.8 µs
    (``asyncio.timeout``: 4.4 µs; benchmarks/micro.py). Here the deadline, when it falls
    due, lets the loop poll once more and resume the tasks that poll woke before it cancels: an answer that
    had arrived by the deadline is read; one still missing times out. The two extra callback hops are paid
    only by attempts that time out; on an idle loop the timeout fires on time.

    Cancellation follows ``asyncio.timeout`` (Python 3.11+): the deadline cancels the task, and on leaving
    the block turns that cancellation, and only that one, into ``TimeoutError`` (``Task.uncancel`` keeps
    count, so a cancellation from outside, say a cancel scope, is passed on untouched). A synchronous
    context manager, so entering one costs no coroutine. ``timeout_s=None`` sets no deadline.

    Args:
        loop: the running loop.
        timeout_s: seconds, or None for no deadline.
        queue: a :class:`DeadlineQueue` of the same ``timeout_s`` to wait on instead of a timer of its own
            (what the scheduler passes); ignored when its ``timeout_s`` or its loop differs.

    Raises:
        TimeoutError: on leaving the block, when the deadline cancelled it.
    """

    __slots__ = (
        "_cancelling", "_expired", "_handle", "_loop", "_queue", "_queued", "_requeued", "_task", "_timeout_s",
        "when",
    )  # fmt: skip

    def __init__(
        self, loop: asyncio.AbstractEventLoop, timeout_s: float | None, queue: DeadlineQueue | None = None
    ) -> None:
        self._loop = loop
        self._timeout_s = timeout_s
        self._queue = queue if queue is not None and timeout_s == queue.timeout_s and queue._loop is loop else None
        self._handle: asyncio.Handle | None = None
        self._task: asyncio.Task[Any] | None = None
        self._expired = self._requeued = self._queued = False
        self.when = 0.0

    def __enter__(self) -> None:
        task = asyncio.current_task(self._loop)
        if task is None:
            raise RuntimeError("AttemptDeadline must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        if self._timeout_s is not None:
            if self._queue is not None:
                self._queue.add(self)
            else:
                self._handle = self._loop.call_later(self._timeout_s, self._due)

    def _due(self) -> None:
        # A timer due now runs in the next loop iteration, after that iteration's socket poll ...
        self._handle = self._loop.call_at(self._loop.time(), self._polled)

    def _polled(self) -> None:
        # ... and call_soon queues the cancellation behind the wake-ups that poll queued.
        self._handle = self._loop.call_soon(self._expire)

    def _expire(self) -> None:
        # An answer already handed to the task but not yet delivered (an event loop that orders its callbacks
        # otherwise, such as uvloop, can get here first): one more hop delivers it; anyio re-checks likewise.
        task = self._task
        if task is None:  # the block was left meanwhile
            return
        waiter = getattr(task, "_fut_waiter", None)
        if waiter is not None and waiter.done() and not self._requeued:
            self._requeued = True
            self._handle = self._loop.call_soon(self._expire)
            return
        self._handle = None
        self._expired = True
        task.cancel()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: object) -> None:
        if self._queued:
            assert self._queue is not None
            self._queue.left(self)
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        task, self._task = self._task, None  # it may wait in the queue a while: it must not keep the task alive
        cancelled = et is not None and issubclass(et, asyncio.CancelledError)
        if self._expired and task is not None and task.uncancel() <= self._cancelling and cancelled:
            raise TimeoutError(f"ran past {self._timeout_s:g} s") from ev


class DeadlineQueue:
    """The deadlines of many :class:`AttemptDeadline` blocks of the same ``timeout_s`` on one loop, on one timer.

    Blocks of one length entered in turn fall due in the same turn (the loop's clock never goes back), so a
    FIFO queue with one timer, set for its oldest open block, replaces a timer per attempt: entering is an
    append, leaving marks the block closed. A timer per attempt (``loop.call_later``, then ``cancel``) costs a
    ``TimerHandle``, a context copy, a heap push, and the heap's clean-ups of cancelled handles: 2.8 µs of CPU
    an attempt against 1.1 µs on the queue, with 64 open (benchmarks/micro.py).
    What happens at a deadline is the block's own (:meth:`AttemptDeadline._due`), the same either way.

    Closed blocks leave from the front when the timer fires, and the queue is rebuilt without them when they
    are more than half of it, so an attempt that runs long at the front cannot make it grow without bound;
    when none is open the queue empties and its timer is cancelled. Event-loop only, like the scheduler.

    Args:
        loop: the loop whose clock (``loop.time()``, seconds) and timer it uses; only its blocks may join.
        timeout_s: the deadline of every block on it, in seconds from the block's entry.
    """

    __slots__ = ("_closed", "_handle", "_items", "_loop", "timeout_s")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self._loop = loop
        self.timeout_s = timeout_s
        self._items: deque[AttemptDeadline] = deque()
        self._handle: asyncio.TimerHandle | None = None
        self._closed = 0  # closed blocks still in the queue

    def __len__(self) -> int:
        return len(self._items)

    def add(self, deadline: AttemptDeadline) -> None:
        """Queue an entered block; its deadline is ``timeout_s`` from now."""
        deadline.when = self._loop.time() + self.timeout_s
        deadline._queued = True
        self._items.append(deadline)
        if self._handle is None:
            self._handle = self._loop.call_at(deadline.when, self._fire, deadline.when)

    def left(self, deadline: AttemptDeadline) -> None:
        """A queued block was left before its deadline fell due."""
        deadline._queued = False
        self._closed += 1
        items = self._items
        if self._closed == len(items):  # none open: no timer is needed (nor left behind for a fake clock)
            items.clear()
            self._closed = 0
            if self._handle is not None:
                self._handle.cancel()
                self._handle = None
        elif self._closed > 32 and 2 * self._closed > len(items):
            self._items = deque(d for d in items if d._queued)
            self._closed = 0

    def _fire(self, armed_for: float) -> None:
        """The timer: every open block due by now (or by ``armed_for``, the loop time the timer was set for,
        which the loop may run up to a clock tick early) falls due; the timer is set again for the next open
        block."""
        self._handle = None
        due_by = max(self._loop.time(), armed_for)
        items = self._items
        while items:
            first = items[0]
            if not first._queued:
                items.popleft()
                self._closed -= 1
                continue
            if first.when > due_by:
                break
            items.popleft()
            first._queued = False
            first._due()
        if items:
            when = items[0].when
            self._handle = self._loop.call_at(when, self._fire, when)


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
    traced: bool
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
