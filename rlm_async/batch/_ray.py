"""The Ray path: one coordinator actor leasing the shared capacity, worker actors hosting one engine each,
and the driver that feeds them items and retries the items of workers that died. Imported only with Ray."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from .._budget import Limits
from .._endpoint import RateLimit
from .._errors import ConfigError
from ._items import BatchItem, ItemResult
from ._lease import Capacity, Kind, LeasedEndpoint, LeasedGate, LeaseSizes, LocalLink
from ._runner import Engine, EngineSpec, run_item

try:
    import ray
    from ray import exceptions as ray_errors
    from ray.exceptions import RayActorError
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ConfigError("--ray needs Ray: pip install 'rlm-async[ray]'") from exc

__all__ = ["run_ray"]

#: Ray's failures of a call that say nothing about the item: an object lost with its node or its owner, memory
#: or disk that ran out, a node or raylet that died, a worker process that crashed, an RPC that failed. The item
#: runs again, as when its worker actor dies; anything else is recorded: our code raised in the actor, or
#: ``RaySystemError`` (Ray returns it when the driver cannot deserialize a result, which fails the same way on
#: every try, after paying for the item's model calls each time).
TRANSIENT_RAY_ERRORS: tuple[type[Exception], ...] = (
    ray_errors.ObjectLostError,
    ray_errors.ObjectStoreFullError,
    ray_errors.OutOfMemoryError,
    ray_errors.OutOfDiskError,
    ray_errors.NodeDiedError,
    ray_errors.LocalRayletDiedError,
    ray_errors.WorkerCrashedError,
    ray_errors.RpcError,
)

#: Seconds the driver gives worker actors to cancel their items and give their leases back before it kills them.
CLOSE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Outcome:
    """What a worker actor's ``run`` returns to the driver.

    Attributes:
        result: the item's result; None when the worker could not build its engine.
        stopped: the job's ``max_calls`` / ``max_cost_usd`` stopped the item's run (it is not recorded).
        exhausted: the job's budget has refused one of this worker's attempts (no further item starts).
        setup_error: why the worker could not build its engine (a ConfigError's text: no endpoint configured
            where it runs, a strict sandbox its node cannot provide), or None.
        node: the worker's node (its IP address), with ``setup_error``.
    """

    result: ItemResult | None
    stopped: bool
    exhausted: bool
    setup_error: str | None = None
    node: str | None = None


def _node() -> str:
    try:
        return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
    except Exception:  # pragma: no cover - outside a Ray process
        return "unknown"


def _with_driver_endpoint(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with ``base_url`` and ``api_key`` resolved here, on the driver (from ``OPENAI_BASE_URL`` /
    ``OPENAI_API_KEY`` when not given), so the workers use the driver's endpoint and key whatever their own
    environment holds. Unchanged when a ``client`` is given. The key travels only inside the actors' options;
    it is never logged or written."""
    if options.get("client") is not None:
        return options
    for name, variable in (("base_url", "OPENAI_BASE_URL"), ("api_key", "OPENAI_API_KEY")):
        value = options.get(name) or os.environ.get(variable)
        if value:
            options[name] = value
    return options


class CoordinatorActor(LocalLink):
    """The coordinating actor: a :class:`~rlm_async.batch._lease.Capacity` behind Ray method calls (the same
    calls as :class:`~rlm_async.batch._lease.LocalLink`'s, plus what only the driver asks)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(Capacity(**kwargs))

    def forget(self, worker: str) -> None:
        self.capacity.forget(worker)

    async def stats(self) -> dict[str, Any]:
        return self.capacity.stats()

    async def ping(self) -> str:
        return "coordinator"


class RayLink:
    """A :class:`~rlm_async.batch._lease.CapacityLink` to the coordinator actor (one round trip a lease)."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor

    async def slots(self, worker: str, want: int) -> int:
        return int(await self._actor.slots.remote(worker, want))

    def release(self, worker: str, n: int) -> None:
        self._actor.release.remote(worker, n)  # fire and forget: the actor applies calls in order

    async def tokens(self, model: str, kind: Kind, need: int, want: int) -> int:
        return int(await self._actor.tokens.remote(model, kind, need, want))

    async def reserve_calls(self, want: int) -> int:
        return int(await self._actor.reserve_calls.remote(want))

    async def reserve_usd(self, want: float, debt: float) -> float:
        return float(await self._actor.reserve_usd.remote(want, debt))

    async def give_back(self, calls: int, usd: float) -> None:
        await self._actor.give_back.remote(calls, usd)


class WorkerActor:
    """A worker actor: one engine (its event loop is the actor's, its REPL workers its children), built on
    the first item, with capacity leased from the coordinator."""

    def __init__(
        self,
        name: str,
        coordinator: Any,
        spec: EngineSpec,
        max_concurrency: int,
        rate_limits: dict[str, RateLimit],
        max_calls: int | None,
        max_cost_usd: float | None,
        sizes: LeaseSizes,
    ) -> None:
        self._name = name
        self._link = RayLink(coordinator)
        self._spec = spec
        self._cap = max_concurrency
        self._rate_limits = rate_limits
        self._max_calls = max_calls
        self._max_cost_usd = max_cost_usd
        self._sizes = sizes
        self._engine: Engine | None = None
        self._endpoint: LeasedEndpoint | None = None
        self._gate: LeasedGate | None = None
        self._lock: asyncio.Lock | None = None

    async def _ensure(self) -> Engine:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._engine is None:
                breaker = self._spec.options.get("circuit_breaker", "default")
                kwargs: dict[str, Any] = {} if breaker == "default" else {"breaker": breaker}
                endpoint = LeasedEndpoint(
                    self._link,
                    self._name,
                    max_concurrency=self._cap,
                    rate_limits=self._rate_limits,
                    sizes=self._sizes,
                    **kwargs,
                )
                gate = None
                if self._max_calls is not None or self._max_cost_usd is not None:
                    gate = LeasedGate(
                        self._link, max_calls=self._max_calls, max_cost_usd=self._max_cost_usd, sizes=self._sizes
                    )
                try:
                    self._engine = self._spec.build(gate, endpoint)
                except BaseException:
                    await endpoint.aclose()
                    raise
                self._endpoint, self._gate = endpoint, gate
            return self._engine

    async def run(self, item: BatchItem, attempts: int) -> Outcome:
        """Run one item; an :class:`Outcome` (with ``setup_error`` and no result when this worker cannot
        build its engine: the driver stops the job rather than record every item as failed)."""
        try:
            engine = await self._ensure()
        except Exception as exc:
            return Outcome(None, False, False, f"{type(exc).__name__}: {exc}", _node())
        result, stopped = await run_item(engine.rlm, item, attempts)
        return Outcome(result, stopped, engine.exhausted)

    async def close(self) -> None:
        """Close the engine and give the leases back."""
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.aclose()
        if self._endpoint is not None:
            await self._endpoint.aclose()
        if self._gate is not None:
            await self._gate.aclose()

    async def ping(self) -> str:
        return self._name


def init_ray(**kwargs: Any) -> None:
    """``ray.init(**kwargs)``, keeping this process's SIGTERM handler: ``ray.init`` installs one that calls
    ``sys.exit`` wherever the main thread is, which would skip the command's clean stop (exit 143, the
    summary, the running items cancelled)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(**kwargs)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _connect(address: str) -> bool:
    """Connect to (or start) Ray; True when this call started it (and so shuts it down)."""
    if ray.is_initialized():
        return False
    try:
        if address == "local":
            init_ray(address="local", include_dashboard=False, log_to_driver=False)  # not RAY_ADDRESS's cluster
        else:
            init_ray(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from None
    return True


async def run_ray(
    todo: Sequence[BatchItem],
    spec: EngineSpec,
    *,
    address: str,
    workers: int | None,
    worker_cpus: float,
    max_runs: int,
    max_calls: int | None,
    max_cost_usd: float | None,
    max_item_attempts: int,
    sizes: LeaseSizes,
    on_start: Callable[[str], None] | None = None,
    on_stopped: Callable[[ItemResult], None] | None = None,
) -> AsyncGenerator[ItemResult, None]:
    """Yield each item's result as it finishes, across the cluster (see :func:`rlm_async.batch.ray_batch`).
    An item the job's budget stopped goes to ``on_stopped``, not yielded.

    Raises:
        ConfigError: a worker cannot build its engine (which worker, on which node, and why); the job stops,
            and the items not finished are left unrecorded.
    """
    owns = _connect(address)
    job = uuid.uuid4().hex[:8]
    coordinator: Any = None
    handles: dict[str, Any] = {}
    inflight: dict[asyncio.Future[Any], tuple[str, BatchItem, int, Any]] = {}
    try:
        cpus = ray.cluster_resources().get("CPU", 1)  # type: ignore[no-untyped-call]
        n = workers or max(1, int(cpus // max(worker_cpus, 1e-9)))
        options = _with_driver_endpoint(dict(spec.options))
        cap = (options.get("limits") or Limits()).max_concurrency
        rate_limits = dict(options.pop("rate_limits", None) or {})
        worker_spec = type(spec)(spec.model, options)
        coordinator = (
            ray.remote(CoordinatorActor)
            .options(name=f"rlm-batch-{job}-coordinator", num_cpus=0, max_concurrency=10_000)
            .remote(
                max_concurrency=cap,
                rate_limits=rate_limits,
                workers=n,
                max_calls=max_calls,
                max_cost_usd=max_cost_usd,
                sizes=sizes,
            )
        )
        worker_cls = ray.remote(WorkerActor)
        for i in range(n):
            name = f"rlm-batch-{job}-worker-{i}"
            handles[name] = worker_cls.options(
                name=name, num_cpus=worker_cpus, max_concurrency=max_runs + 8, max_restarts=0
            ).remote(name, coordinator, worker_spec, cap, rate_limits, max_calls, max_cost_usd, sizes)
        live = dict(handles)
        load = dict.fromkeys(handles, 0)
        pending: deque[tuple[BatchItem, int, str | None]] = deque((item, 0, None) for item in todo)
        exhausted = False
        while True:
            while pending and live and not exhausted:
                chosen = pick_worker(load, live, max_runs, avoid=pending[0][2])
                if chosen is None:
                    break
                item, tries, _ = pending.popleft()
                ref = live[chosen].run.remote(item, tries + 1)
                inflight[asyncio.wrap_future(ref.future())] = (chosen, item, tries + 1, ref)
                load[chosen] += 1
                if on_start is not None and tries == 0:  # a retry is the same item still running
                    on_start(item.id)
            if not inflight:
                break
            done, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
            setup_failed: str | None = None
            for future in done:
                name, item, tries, _ref = inflight.pop(future)
                load[name] -= 1
                try:
                    outcome: Outcome = future.result()
                except RayActorError as exc:
                    if name in live:  # dead, or unreachable but alive: killed before its slots are freed
                        handle = live.pop(name)
                        with contextlib.suppress(Exception):
                            ray.kill(handle)
                        coordinator.forget.remote(name)
                    if tries < max_item_attempts:
                        pending.appendleft((item, tries, None))  # with no worker left: not run, for a rerun
                        continue
                    why = f"the Ray worker died on each of {tries} tries: {type(exc).__name__}"
                    outcome = Outcome(ItemResult.failure(item.id, "worker_lost", why, attempts=tries), False, False)
                except TRANSIENT_RAY_ERRORS as exc:  # the worker lives on: the item goes back in the queue
                    if tries < max_item_attempts:
                        pending.appendleft((item, tries, name))  # to another worker where there is one
                        continue
                    why = f"Ray failed the call on each of {tries} tries: {type(exc).__name__}: {exc}"
                    outcome = Outcome(ItemResult.failure(item.id, "error", why, attempts=tries), False, False)
                except Exception as exc:  # the actor call itself failed (not the run: run_item never raises)
                    failure = ItemResult.failure(item.id, "error", f"{type(exc).__name__}: {exc}")
                    outcome = Outcome(failure, False, False)
                if outcome.setup_error is not None:
                    setup_failed = setup_failed or (
                        f"Ray worker {name!r} on node {outcome.node} cannot build its engine: {outcome.setup_error}"
                    )
                    continue  # not recorded: the job stops below, and a rerun runs the item
                exhausted = exhausted or outcome.exhausted
                if outcome.result is None:  # pragma: no cover - only with setup_error
                    continue
                if outcome.stopped:  # the job's budget stopped it: not finished, not recorded
                    if on_stopped is not None:
                        on_stopped(outcome.result)
                    continue
                yield outcome.result
            if setup_failed is not None:
                raise ConfigError(
                    f"{setup_failed}. The job stopped; the items not finished are not recorded (fix the "
                    "worker's setup, e.g. pass base_url / api_key, or sandbox='process' where the node cannot "
                    "confine code, and rerun with the same out)"
                )
    finally:
        for _, _, _, ref in inflight.values():
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        for future in inflight:
            future.cancel()
        await _shut_down(handles, coordinator, owns)


def pick_worker(load: Mapping[str, int], live: Collection[str], max_runs: int, avoid: str | None) -> str | None:
    """The least-loaded worker in ``live`` with a run slot free (``load`` < ``max_runs``), any but ``avoid``
    while another has one: an item that a transient Ray error failed on ``avoid`` (a lost object, memory that
    ran out, a crashed process) tries another worker, since that one may be dying. None when none is free."""
    free = [name for name in live if load[name] < max_runs]
    others = [name for name in free if name != avoid]
    return min(others or free, key=lambda name: load[name], default=None)


async def _shut_down(handles: dict[str, Any], coordinator: Any, owns: bool) -> None:
    """Close every worker (its running items are cancelled, its leases given back), then kill the actors."""
    closing = [asyncio.wrap_future(h.close.remote().future()) for h in handles.values()]
    if closing:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await asyncio.wait(closing, timeout=CLOSE_TIMEOUT_S)
    for future in closing:
        future.cancel()
    actors = [*handles.values(), *([coordinator] if coordinator is not None else [])]
    for actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor)
    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
        await _gone(actors, CLOSE_TIMEOUT_S)
    if owns:
        ray.shutdown()


async def _gone(actors: list[Any], timeout_s: float) -> None:
    """Wait (at most ``timeout_s``) until every actor is dead: ``ray.kill`` only asks, and a caller that
    lists the cluster's actors right after the job must not find the job's still there."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while actors and loop.time() < deadline:
        pings = [(asyncio.wrap_future(a.ping.remote().future()), a) for a in actors]
        await asyncio.wait([p for p, _ in pings], timeout=max(deadline - loop.time(), 0))
        actors = [a for p, a in pings if not (p.done() and isinstance(p.exception(), RayActorError))]
        for p, _ in pings:
            p.cancel()
        if actors:
            await asyncio.sleep(0.01)  # a poll interval, not an ordering: the loop ends when each ping fails
