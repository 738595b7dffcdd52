"""What describes an endpoint and outlives runs: the in-flight cap, per-model RPM / TPM limiters, the breaker.

One :class:`Endpoint` belongs to an :class:`~rlm_async.RLM` and is shared by every completion it runs, so a
service that serves many requests through one ``RLM`` holds the provider's limits across all of them. What
describes one job (the ledger's budgets, a run's own lower ``max_concurrency``) lives in the run's
:class:`~rlm_async._scheduler.Scheduler`.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import anyio
from aiolimiter import AsyncLimiter

from ._breaker import DEFAULT_BREAKER, Circuit, CircuitBreaker
from ._errors import ConfigError

__all__ = ["Endpoint", "ModelLimiter", "RateLimit", "Slots"]


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


class ModelLimiter:
    """aiolimiter leaky buckets (capacity = one minute's worth) for one model's RPM and TPM."""

    def __init__(self, limit: RateLimit) -> None:
        self._rpm = AsyncLimiter(limit.rpm, limit.period_s) if limit.rpm else None
        self._tpm = AsyncLimiter(limit.tpm, limit.period_s) if limit.tpm else None

    async def acquire(self, tokens: int) -> None:
        if self._rpm is not None:
            await self._rpm.acquire()
        if self._tpm is not None:
            await self._tpm.acquire(min(max(tokens, 1), self._tpm.max_rate))


class Slots:
    """``max_concurrency`` slots handed out first come, first served, as an asyncio semaphore would.

    Waiters sit in an ``OrderedDict`` rather than a deque, so one that is cancelled leaves the queue in O(1):
    anyio's and asyncio's semaphores ``deque.remove`` each cancelled waiter, and cancelling 10,000 queued
    calls cost 0.15 s of that scan alone. Asyncio only, like the rest of the engine.
    """

    def __init__(self, n: int) -> None:
        self._free = n
        self._waiters: OrderedDict[asyncio.Future[None], None] = OrderedDict()
        # try_take / give_back are this class's fast path; a subclass with its own way in or out keeps to it.
        cls = type(self)
        self._fast = all(getattr(cls, name) is getattr(Slots, name) for name in ("__aenter__", "__aexit__", "_release"))

    def try_take(self) -> bool:
        """Take a slot now if one is free and nobody waits, without a coroutine; give it back with
        :meth:`give_back`. False when the caller must ``await __aenter__()`` instead (no slot free, or a
        subclass that hands out slots its own way).

        The scheduler's hot path: ``async with slots`` builds and runs two coroutines per attempt (part of the
        scheduler's saving measured in docs/architecture.md)."""
        if self._free > 0 and self._fast and not self._waiters:
            self._free -= 1
            return True
        return False

    def give_back(self) -> None:
        """Return a slot taken by :meth:`try_take`."""
        if self._waiters:
            self._release()
        else:  # what _release does with nobody waiting, without its call
            self._free += 1

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


class Endpoint:
    """The shared state of one endpoint.

    Args:
        max_concurrency: HTTP attempts in flight at once across every run on this endpoint.
        rate_limits: model name -> :class:`RateLimit`; models not named are not rate limited.
        breaker: the circuit breaker's policy, or None for none.

    Attributes:
        slots: the in-flight cap.
        limiters: model name -> its RPM / TPM buckets.
        circuit: the breaker's state, or None.
        in_flight: attempts in flight now, across runs.
    """

    def __init__(
        self,
        *,
        max_concurrency: int,
        rate_limits: Mapping[str, RateLimit] | None = None,
        breaker: CircuitBreaker | None = DEFAULT_BREAKER,
    ) -> None:
        self.max_concurrency = max_concurrency
        self.slots = Slots(max_concurrency)
        self.limiters = {model: ModelLimiter(limit) for model, limit in (rate_limits or {}).items()}
        self.circuit = Circuit(breaker, anyio.current_time) if breaker is not None else None
        self.in_flight = 0
