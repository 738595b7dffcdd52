"""Capacity leased from one coordinator: the endpoint's in-flight cap, RPM / TPM, and the job's call and USD
budgets, held across many engines.

:class:`Capacity` is the coordinator's state (on Ray it lives in one actor; on one machine it is a plain
object). An engine borrows from it through a :class:`CapacityLink` in small batches, *leases*, so a call does
not cost a round trip to the coordinator:

- **slots** (the in-flight cap): :class:`LeasedSlots` asks for up to ``LeaseSizes.slots`` at once when its own
  are busy, hands a freed slot straight to a local waiter, and gives idle slots back (at once beyond one
  lease, the rest after ``LeaseSizes.linger_s``). The coordinator never has more than ``max_concurrency``
  slots out, so the cap holds exactly; each worker holds at most ``ceil(max_concurrency / live workers)``.
- **requests and tokens** (RPM / TPM): :class:`LeasedModelLimiter` takes its attempts' requests and token
  estimates from a local pool, refilled from the coordinator's bucket (one period's worth, refilled
  continuously, as aiolimiter's) a lease at a time: ``min(LeaseSizes.requests, rpm / (4 * workers))`` requests,
  ``min(LeaseSizes.tokens, tpm / (4 * workers))`` tokens, at least 1. Tokens granted but not yet sent are the
  only overshoot: in any window, at most one lease per worker more than one engine with the same
  :class:`~rlm_async.RateLimit` would send, so at most a quarter of one period's limit (docs/scale-out.md).
- **the job's calls and USD** (:class:`LeasedGate`): calls are reserved ``LeaseSizes.calls`` at a time and
  never exceeded (a worker may be refused while others hold unspent calls, at most one lease each); USD is
  reserved in leases of ``max_cost_usd * LeaseSizes.usd_fraction`` and measured after each response, so the
  overshoot is what the attempts in flight are billed, as within one run.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from .._breaker import DEFAULT_BREAKER, CircuitBreaker
from .._endpoint import Endpoint, ModelLimiter, RateLimit, Slots
from .._errors import BudgetExceeded, ConfigError, EngineError

__all__ = [
    "Capacity",
    "CapacityLink",
    "JobBudgetExceeded",
    "LeaseSizes",
    "LeasedEndpoint",
    "LeasedGate",
    "LeasedModelLimiter",
    "LeasedSlots",
    "LocalLink",
]

Kind = Literal["rpm", "tpm"]


@dataclass(frozen=True, slots=True)
class LeaseSizes:
    """How much capacity a worker borrows from the coordinator at once (docs/scale-out.md has the bounds).

    Attributes:
        slots: in-flight slots per lease (also capped by the worker's share of ``max_concurrency``).
        requests: RPM requests per lease, at most ``rpm / (4 * workers)`` (at least 1).
        tokens: TPM tokens per lease, at most ``tpm / (4 * workers)`` (at least one attempt's estimate).
        calls: the job's ``max_calls`` reserved per lease.
        usd_fraction: the job's ``max_cost_usd`` reserved per lease, as a fraction of it.
        linger_s: seconds a worker keeps up to one lease of idle slots before it gives them back.
    """

    slots: int = 4
    requests: int = 8
    tokens: int = 8192
    calls: int = 16
    usd_fraction: float = 0.01
    linger_s: float = 0.05

    def __post_init__(self) -> None:
        for name in ("slots", "requests", "tokens", "calls"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"LeaseSizes.{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not 0 < self.usd_fraction <= 1 or not self.linger_s >= 0:
            raise ConfigError("LeaseSizes needs 0 < usd_fraction <= 1 and linger_s >= 0")


class Capacity:
    """The coordinator's ledger of the shared capacity. Asyncio only; one event loop.

    Args:
        max_concurrency: HTTP attempts in flight at once across every worker.
        rate_limits: model name -> :class:`~rlm_async.RateLimit`, held across every worker.
        workers: how many workers share it (for each one's share of slots and the lease sizes).
        max_calls: the job's model calls (requests sent, retries included), or None.
        max_cost_usd: the job's USD, or None.
        sizes: the lease sizes (:class:`LeaseSizes`; its defaults when None).
        clock: seconds, monotonic; default the running loop's ``time``.
        sleep: waits for a rate bucket to refill (seconds); default ``asyncio.sleep``.

    Raises:
        ConfigError: ``max_concurrency`` or ``workers`` below 1, or a negative job budget.
    """

    def __init__(
        self,
        *,
        max_concurrency: int,
        rate_limits: Mapping[str, RateLimit] | None = None,
        workers: int = 1,
        max_calls: int | None = None,
        max_cost_usd: float | None = None,
        sizes: LeaseSizes | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if max_concurrency < 1 or workers < 1:
            raise ConfigError("Capacity needs max_concurrency >= 1 and workers >= 1")
        if (max_calls is not None and max_calls < 0) or (max_cost_usd is not None and max_cost_usd < 0):
            raise ConfigError("the job's max_calls and max_cost_usd must be >= 0")
        self.max_concurrency = max_concurrency
        self.rate_limits = dict(rate_limits or {})
        self.workers = workers
        self.max_calls = max_calls
        self.max_cost_usd = max_cost_usd
        self.sizes = sizes or LeaseSizes()
        self._clock = clock
        self._sleep = sleep
        self.held: defaultdict[str, int] = defaultdict(int)
        self.out = 0
        self.peak_out = 0
        self.forgotten: set[str] = set()
        self._slot_waiters: list[tuple[str, int, asyncio.Future[int]]] = []
        self._buckets: dict[tuple[str, Kind], list[float]] = {}  # -> [level, last refill]
        self._bucket_locks: defaultdict[tuple[str, Kind], asyncio.Lock] = defaultdict(asyncio.Lock)
        self.calls_reserved = 0
        self.usd_reserved = 0.0

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    @property
    def share(self) -> int:
        """The most slots one worker may hold: ``ceil(max_concurrency / live workers)``."""
        live = max(self.workers - len(self.forgotten), 1)
        return math.ceil(self.max_concurrency / live)

    def lease_for(self, model: str, kind: Kind) -> int:
        """The lease of ``kind`` for ``model``: the size asked, at most a quarter of the limit per worker."""
        limit = self.rate_limits[model]
        cap = limit.rpm if kind == "rpm" else limit.tpm
        assert cap is not None
        size = self.sizes.requests if kind == "rpm" else self.sizes.tokens
        return max(1, min(size, int(cap / (4 * self.workers))))

    # -- slots --------------------------------------------------------------------------------------------
    async def slots(self, worker: str, want: int) -> int:
        """Grant ``worker`` between 1 and ``min(want, LeaseSizes.slots)`` slots, waiting (first come, first
        served among the workers that may take one) while none is free or it holds its share. Returns 0 for a
        worker that was forgotten."""
        if worker in self.forgotten:
            return 0
        if not self._slot_waiters and self._may_take(worker):
            return self._grant(worker, want)
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        entry = (worker, want, waiter)
        self._slot_waiters.append(entry)
        self._serve()  # those ahead may be waiting for their share only
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(worker, waiter.result())  # granted as the caller left: take the slots back
            elif entry in self._slot_waiters:
                self._slot_waiters.remove(entry)
            raise

    def _may_take(self, worker: str) -> bool:
        return self.out < self.max_concurrency and self.held[worker] < self.share

    def _grant(self, worker: str, want: int) -> int:
        grant = min(max(want, 1), self.sizes.slots, self.max_concurrency - self.out, self.share - self.held[worker])
        self.held[worker] += grant
        self.out += grant
        self.peak_out = max(self.peak_out, self.out)
        return grant

    def _serve(self) -> None:
        for entry in list(self._slot_waiters):
            worker, want, waiter = entry
            if waiter.done():
                self._slot_waiters.remove(entry)
            elif worker in self.forgotten:
                self._slot_waiters.remove(entry)
                waiter.set_result(0)
            elif self._may_take(worker):
                self._slot_waiters.remove(entry)
                waiter.set_result(self._grant(worker, want))
            if self.out >= self.max_concurrency:
                break

    def release(self, worker: str, n: int) -> None:
        """Take back ``n`` of ``worker``'s slots."""
        if worker in self.forgotten:
            return
        n = min(n, self.held[worker])
        self.held[worker] -= n
        self.out -= n
        self._serve()

    def forget(self, worker: str) -> None:
        """A worker is gone (its process died): its slots come back, and it gets no more."""
        if worker in self.forgotten:
            return
        self.out -= self.held.pop(worker, 0)
        self.forgotten.add(worker)
        self._serve()

    # -- rate limits -------------------------------------------------------------------------------------
    async def tokens(self, model: str, kind: Kind, need: int, want: int) -> int:
        """Grant at least ``need`` (clamped to the limit) and at most ``max(need, lease)`` requests or tokens of
        ``model``'s ``kind`` bucket, waiting until the bucket holds ``need``.

        Raises:
            ConfigError: ``model`` has no such limit.
        """
        limit = self.rate_limits.get(model)
        cap = None if limit is None else (limit.rpm if kind == "rpm" else limit.tpm)
        if limit is None or cap is None:
            raise ConfigError(f"no {kind} limit for model {model!r}")
        need = min(max(need, 1), int(cap)) if cap >= 1 else 1
        want = min(max(want, need), max(need, self.lease_for(model, kind)))
        key = (model, kind)
        async with self._bucket_locks[key]:
            bucket = self._buckets.setdefault(key, [float(cap), self._now()])
            while True:
                now = self._now()
                bucket[0] = min(float(cap), bucket[0] + (now - bucket[1]) * cap / limit.period_s)
                bucket[1] = now
                if bucket[0] >= need:
                    break
                await self._sleep((need - bucket[0]) * limit.period_s / cap)
            grant = min(want, int(bucket[0]))
            bucket[0] -= grant
            return grant

    # -- the job's budgets -------------------------------------------------------------------------------
    def reserve_calls(self, want: int) -> int:
        """Reserve up to ``want`` of the job's calls; 0 when they are spent (or there is no cap: then ``want``)."""
        if self.max_calls is None:
            return want
        grant = max(0, min(want, self.max_calls - self.calls_reserved))
        self.calls_reserved += grant
        return grant

    def reserve_usd(self, want: float, debt: float = 0.0) -> float:
        """Book ``debt`` (USD a worker spent beyond its reservation), then reserve up to ``want`` USD; 0.0 when
        the job's USD are spent (``want`` when there is no cap)."""
        self.usd_reserved += max(debt, 0.0)
        if self.max_cost_usd is None:
            return want
        grant = max(0.0, min(want, self.max_cost_usd - self.usd_reserved))
        self.usd_reserved += grant
        return grant

    def give_back(self, calls: int, usd: float) -> None:
        """Return a worker's unspent reservations (at its end), or book its debt (``usd`` < 0)."""
        self.calls_reserved -= max(calls, 0)
        self.usd_reserved -= usd

    def stats(self) -> dict[str, Any]:
        """The coordinator's counters: slots out now and at peak, the job's calls and USD reserved."""
        return {
            "out": self.out,
            "peak_out": self.peak_out,
            "calls_reserved": self.calls_reserved,
            "usd_reserved": self.usd_reserved,
            "forgotten": sorted(self.forgotten),
        }


class CapacityLink(Protocol):
    """How a worker reaches the coordinator's :class:`Capacity` (in-process, or a Ray actor)."""

    async def slots(self, worker: str, want: int) -> int: ...

    def release(self, worker: str, n: int) -> None: ...

    async def tokens(self, model: str, kind: Kind, need: int, want: int) -> int: ...

    async def reserve_calls(self, want: int) -> int: ...

    async def reserve_usd(self, want: float, debt: float) -> float: ...

    async def give_back(self, calls: int, usd: float) -> None: ...


class LocalLink:
    """A :class:`CapacityLink` to a :class:`Capacity` in this process (one machine, and tests)."""

    def __init__(self, capacity: Capacity) -> None:
        self.capacity = capacity

    async def slots(self, worker: str, want: int) -> int:
        return await self.capacity.slots(worker, want)

    def release(self, worker: str, n: int) -> None:
        self.capacity.release(worker, n)

    async def tokens(self, model: str, kind: Kind, need: int, want: int) -> int:
        return await self.capacity.tokens(model, kind, need, want)

    async def reserve_calls(self, want: int) -> int:
        return self.capacity.reserve_calls(want)

    async def reserve_usd(self, want: float, debt: float) -> float:
        return self.capacity.reserve_usd(want, debt)

    async def give_back(self, calls: int, usd: float) -> None:
        self.capacity.give_back(calls, usd)


class LeasedSlots(Slots):
    """The in-flight cap as slots leased from the coordinator; the scheduler uses it as it uses
    :class:`~rlm_async._endpoint.Slots` (``async with slots:`` for one attempt). First come, first served
    among this worker's attempts.

    Args:
        link: the coordinator.
        worker: this worker's name there.
        sizes: the lease sizes.
    """

    def __init__(self, link: CapacityLink, worker: str, sizes: LeaseSizes) -> None:
        super().__init__(0)
        self._link = link
        self._worker = worker
        self._sizes = sizes
        self.held = 0
        self.busy = 0
        self.leases = 0
        self._queue: OrderedDict[asyncio.Future[None], None] = OrderedDict()
        self._refill: asyncio.Task[None] | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._closed = False

    async def __aenter__(self) -> None:
        if self._closed:
            raise EngineError("the leased slots are closed")
        if self.held > self.busy and not self._queue:
            self.busy += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._queue[waiter] = None
        if self._refill is None or self._refill.done():
            self._refill = asyncio.get_running_loop().create_task(self._refill_loop())
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a slot just as it was cancelled: pass it on
            else:
                self._queue.pop(waiter, None)
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._release()

    def _release(self) -> None:
        self.busy -= 1
        self._hand_out()
        self._give_back_idle()

    def _hand_out(self) -> None:
        while self._queue and self.held > self.busy:
            waiter, _ = self._queue.popitem(last=False)
            if not waiter.done():
                self.busy += 1
                waiter.set_result(None)

    def _give_back_idle(self) -> None:
        idle = self.held - self.busy
        if self._queue or idle <= 0:
            return
        if idle > self._sizes.slots:  # never more than one lease idle
            self._return(idle - self._sizes.slots)
        if self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(self._sizes.linger_s, self._lingered)

    def _lingered(self) -> None:
        self._linger = None
        idle = self.held - self.busy
        if idle > 0 and not self._queue:
            self._return(idle)

    def _return(self, n: int) -> None:
        self.held -= n
        self._link.release(self._worker, n)

    async def _refill_loop(self) -> None:
        try:
            while self._queue:
                got = await self._link.slots(self._worker, min(self._sizes.slots, len(self._queue)))
                if got == 0:
                    raise EngineError(f"the coordinator no longer leases to worker {self._worker!r}")
                self.leases += 1
                self.held += got
                self._hand_out()
                self._give_back_idle()
        except Exception as exc:  # the coordinator is gone: fail the waiters rather than hang them
            error = exc if isinstance(exc, EngineError) else EngineError(f"leasing slots failed: {exc!r}")
            while self._queue:
                waiter, _ = self._queue.popitem(last=False)
                if not waiter.done():
                    waiter.set_exception(error)

    async def aclose(self) -> None:
        """Stop leasing and give every idle slot back. Idempotent."""
        self._closed = True
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._refill is not None and not self._refill.done():
            self._refill.cancel()
            await asyncio.gather(self._refill, return_exceptions=True)
        idle = self.held - self.busy
        if idle > 0:
            self._return(idle)


class LeasedModelLimiter(ModelLimiter):
    """One model's RPM / TPM, taken from pools refilled a lease at a time from the coordinator's buckets.

    Args:
        link: the coordinator.
        model: the model name.
        limit: the model's limit (the coordinator holds the same).
        sizes: the lease sizes asked for (the coordinator may grant less).
    """

    def __init__(self, link: CapacityLink, model: str, limit: RateLimit, sizes: LeaseSizes) -> None:
        super().__init__(RateLimit())
        self._link = link
        self._model = model
        self._limit = limit
        self._sizes = sizes
        self._left: dict[Kind, int] = {"rpm": 0, "tpm": 0}
        self._locks: dict[Kind, asyncio.Lock] = {"rpm": asyncio.Lock(), "tpm": asyncio.Lock()}
        self.leases = 0

    async def acquire(self, tokens: int) -> None:
        """Take one request and ``tokens`` (clamped to the TPM limit) from the pools, refilling them as needed."""
        if self._limit.rpm is not None:
            await self._take("rpm", 1, self._sizes.requests)
        if self._limit.tpm is not None:
            await self._take("tpm", min(max(tokens, 1), int(self._limit.tpm)), self._sizes.tokens)

    async def _take(self, kind: Kind, need: int, lease: int) -> None:
        while self._left[kind] < need:
            async with self._locks[kind]:
                short = need - self._left[kind]
                if short <= 0:
                    break
                self._left[kind] += await self._link.tokens(self._model, kind, short, max(short, lease))
                self.leases += 1
        self._left[kind] -= need


class LeasedEndpoint(Endpoint):
    """An :class:`~rlm_async._endpoint.Endpoint` whose in-flight cap and RPM / TPM are leased from a
    coordinator, so they hold across every engine that leases from it. The circuit breaker stays per engine.

    Args:
        link: the coordinator.
        worker: this engine's name there.
        max_concurrency: the cap across all engines (the scheduler sizes batches by it).
        rate_limits: model name -> :class:`~rlm_async.RateLimit` (the coordinator's).
        breaker: this engine's circuit breaker policy, or None.
        sizes: the lease sizes.
    """

    def __init__(
        self,
        link: CapacityLink,
        worker: str,
        *,
        max_concurrency: int,
        rate_limits: Mapping[str, RateLimit] | None = None,
        breaker: CircuitBreaker | None = DEFAULT_BREAKER,
        sizes: LeaseSizes | None = None,
    ) -> None:
        super().__init__(max_concurrency=max_concurrency, breaker=breaker)
        sizes = sizes or LeaseSizes()
        self.leased_slots = LeasedSlots(link, worker, sizes)
        self.slots = self.leased_slots
        self.limiters = {m: LeasedModelLimiter(link, m, lim, sizes) for m, lim in (rate_limits or {}).items()}

    async def aclose(self) -> None:
        """Give the idle slots back and stop leasing."""
        await self.leased_slots.aclose()


class JobBudgetExceeded(BudgetExceeded):
    """The job's ``max_calls`` or ``max_cost_usd`` (not the run's own :class:`~rlm_async.Limits`) refused an
    attempt. A run it stops ends with ``stop_reason`` ``budget:<limit>`` as for its own caps; the batch tells
    the two apart by this type (``RLMResult.error``), and leaves an item the job's budget stopped unrecorded,
    for a rerun with a larger budget."""


class LeasedGate:
    """The job's call and USD budgets for one engine, reserved from the coordinator a lease at a time.

    Args:
        link: the coordinator.
        max_calls: the job's cap (for the error's text), or None.
        max_cost_usd: the job's cap, or None.
        sizes: the lease sizes.

    Attributes:
        exhausted: True once the job's budget refused this engine.
    """

    def __init__(
        self, link: CapacityLink, *, max_calls: int | None, max_cost_usd: float | None, sizes: LeaseSizes
    ) -> None:
        self._link = link
        self.max_calls = max_calls
        self.max_cost_usd = max_cost_usd
        self._calls_chunk = sizes.calls
        self._usd_chunk = (max_cost_usd or 0.0) * sizes.usd_fraction
        self._calls_left = 0
        self._usd_left = 0.0
        self._lock = asyncio.Lock()
        self.exhausted = False

    async def before_attempt(self) -> None:
        """Take one of the job's calls and check its USD, before an attempt is sent.

        The call is taken only once both checks pass with no await in between: a refill that waits on the
        coordinator lets other attempts run, and they must not spend the call this one saw.

        Raises:
            JobBudgetExceeded: the job's ``max_calls`` or ``max_cost_usd`` is spent.
        """
        while not self._may_send():
            async with self._lock:
                if self.max_calls is not None and self._calls_left <= 0:
                    self._calls_left += await self._link.reserve_calls(self._calls_chunk)
                    if self._calls_left <= 0:
                        self.exhausted = True
                        spent = "the job's calls are spent"
                        raise JobBudgetExceeded("max_calls", self.max_calls, self.max_calls, detail=spent)
                if self.max_cost_usd is not None and self._usd_left <= 0:
                    debt, self._usd_left = -self._usd_left, 0.0
                    self._usd_left += await self._link.reserve_usd(self._usd_chunk, debt)
                    if self._usd_left <= 0:
                        self.exhausted = True
                        spent = "the job's USD are spent"
                        raise JobBudgetExceeded("max_cost_usd", self.max_cost_usd, self.max_cost_usd, detail=spent)
        if self.max_calls is not None:
            self._calls_left -= 1

    def _may_send(self) -> bool:
        calls_ok = self.max_calls is None or self._calls_left > 0
        return calls_ok and (self.max_cost_usd is None or self._usd_left > 0)

    def settle(self, cost_usd: float) -> None:
        """Count one response's USD."""
        self._usd_left -= cost_usd

    async def aclose(self) -> None:
        """Give back unspent calls and USD, and book any USD spent beyond the reservations."""
        calls, usd = max(self._calls_left, 0), self._usd_left
        self._calls_left, self._usd_left = 0, 0.0
        if calls or usd:
            await self._link.give_back(calls, usd)
