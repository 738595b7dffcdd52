"""``rlm_async.batch``: many completions through one engine, or across a Ray cluster; results to a file."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from .._budget import UsageTotals
from .._errors import ConfigError
from ._items import BatchItem, ItemResult, coerce_items
from ._lease import LeaseSizes
from ._local import run_local
from ._runner import EngineSpec
from ._store import ResultStore

__all__ = ["BatchReport", "batch", "ray_batch"]

#: ``max_runs`` unless told otherwise: completions running at once per engine.
DEFAULT_MAX_RUNS = 8
#: ``max_item_attempts`` unless told otherwise: tries per item when Ray workers die under it.
DEFAULT_ITEM_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class BatchReport:
    """What one ``batch`` call did.

    Attributes:
        results: the results of the items run this time, in the order they finished.
        done: items run this time that answered.
        failed: items run this time that did not (their ``stop_reason`` and ``error`` say why).
        skipped: items the results file already held (finished by an earlier run), not run again.
        not_run: items neither finished nor recorded: the job's ``max_calls`` / ``max_cost_usd`` ran out
            before they started or stopped them as they ran (``stopped``), or on Ray no worker was left; a
            rerun with the same ``out`` runs them.
        usage: usage summed over ``results`` (calls, tokens, USD); what the items in ``stopped`` spent is in
            ``stopped_usage``.
        wall_s: seconds the call took.
        stopped: items the job's ``max_calls`` / ``max_cost_usd`` stopped while they ran (counted in
            ``not_run``: not recorded, so a rerun with a larger budget runs them). An item stopped by its own
            per-run budget (``limits``) is finished: it is in ``failed`` with ``stop_reason`` ``budget:...``.
        stopped_usage: what the ``stopped`` items spent (the job's budget counted it).
    """

    results: tuple[ItemResult, ...]
    done: int
    failed: int
    skipped: int
    not_run: int
    usage: UsageTotals
    wall_s: float
    stopped: int = 0
    stopped_usage: UsageTotals = field(default_factory=UsageTotals)

    def summary(self) -> dict[str, Any]:
        """The report without the results, as JSON values (``rlm-async batch --json`` prints this)."""
        u = self.usage
        return {
            "done": self.done,
            "failed": self.failed,
            "skipped": self.skipped,
            "not_run": self.not_run,
            "stopped_by_budget": self.stopped,
            "calls": u.calls,
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "cost_usd": u.cost_usd,
            "wall_s": round(self.wall_s, 3),
        }


def _check(
    max_runs: int,
    max_calls: int | None,
    max_cost_usd: float | None,
    max_item_attempts: int,
    workers: int | None,
    worker_cpus: float,
) -> None:
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"workers must be an int >= 1 or None, got {workers!r}")
    if not isinstance(worker_cpus, int | float) or not worker_cpus > 0:
        raise ConfigError(f"worker_cpus must be > 0, got {worker_cpus!r}")
    if not isinstance(max_runs, int) or max_runs < 1:
        raise ConfigError(f"max_runs must be an int >= 1, got {max_runs!r}")
    if max_calls is not None and (not isinstance(max_calls, int) or max_calls < 0):
        raise ConfigError(f"max_calls must be an int >= 0 or None, got {max_calls!r}")
    if max_cost_usd is not None and (not isinstance(max_cost_usd, int | float) or not max_cost_usd >= 0):
        raise ConfigError(f"max_cost_usd must be >= 0 or None, got {max_cost_usd!r}")
    if not isinstance(max_item_attempts, int) or max_item_attempts < 1:
        raise ConfigError(f"max_item_attempts must be an int >= 1, got {max_item_attempts!r}")


def _spec(model: str, options: Mapping[str, Any], max_cost_usd: float | None) -> EngineSpec:
    spec = EngineSpec(model, dict(options))
    rlm = spec.check()
    if max_cost_usd is not None:
        models = {rlm.model_for(d) for d in range(rlm.limits.max_depth + 1)}
        if missing := sorted(models - set(rlm.prices)):
            raise ConfigError(f"the job's max_cost_usd needs a price for every model; missing: {missing}")
    return spec


async def _results(
    items: Iterable[BatchItem | Mapping[str, Any]],
    model: str,
    *,
    out: str | Path | None,
    max_runs: int,
    ray: str | None,
    workers: int | None,
    worker_cpus: float,
    max_calls: int | None,
    max_cost_usd: float | None,
    max_item_attempts: int,
    lease: LeaseSizes | None,
    on_start: Callable[[str], None] | None,
    on_skipped: Callable[[int], None] | None,
    on_result: Callable[[ItemResult], None] | None,
    options: Mapping[str, Any],
    on_stopped: Callable[[ItemResult], None] | None = None,
) -> AsyncGenerator[ItemResult, None]:
    """The job's results as they are recorded: each appended to ``out`` (when given), then passed to
    ``on_result``, then yielded. A result whose line was written as the job was cancelled still reaches
    ``on_result``, so counts kept there match the file."""
    _check(max_runs, max_calls, max_cost_usd, max_item_attempts, workers, worker_cpus)
    every = coerce_items(items)
    spec = _spec(model, options, max_cost_usd)
    store = ResultStore(out) if out is not None else None
    try:
        todo = [item for item in every if store is None or item.id not in store]
        if on_skipped is not None:
            on_skipped(len(every) - len(todo))
        if ray is None:
            source = run_local(
                todo,
                spec,
                max_runs=max_runs,
                max_calls=max_calls,
                max_cost_usd=max_cost_usd,
                on_start=on_start,
                on_stopped=on_stopped,
            )
        else:
            from ._ray import run_ray  # Ray only on this path

            source = run_ray(
                todo,
                spec,
                address=ray,
                workers=workers,
                worker_cpus=worker_cpus,
                max_runs=max_runs,
                max_calls=max_calls,
                max_cost_usd=max_cost_usd,
                max_item_attempts=max_item_attempts,
                sizes=lease or LeaseSizes(),
                on_start=on_start,
                on_stopped=on_stopped,
            )
        async with contextlib.aclosing(source) as results:
            async for result in results:
                if store is not None and not await _record(store, result, on_result):
                    continue  # the file already holds this id: never twice
                if on_result is not None:
                    on_result(result)
                yield result
    finally:
        if store is not None:
            store.close()


async def _record(store: ResultStore, result: ItemResult, on_result: Callable[[ItemResult], None] | None) -> bool:
    """Append ``result`` to ``store`` in a thread. Cancelled meanwhile (Ctrl-C), the write goes on in its
    thread: wait for it (closing the store does), and report the result if it landed, then re-raise."""
    try:
        return await anyio.to_thread.run_sync(store.append, result)
    except BaseException:
        store.close()  # waits for the line being written
        if on_result is not None and store.finished.get(result.id) is result:
            on_result(result)
        raise


async def batch(
    items: Iterable[BatchItem | Mapping[str, Any]],
    model: str,
    *,
    out: str | Path | None = None,
    max_runs: int = DEFAULT_MAX_RUNS,
    ray: str | None = None,
    workers: int | None = None,
    worker_cpus: float = 1.0,
    max_calls: int | None = None,
    max_cost_usd: float | None = None,
    max_item_attempts: int = DEFAULT_ITEM_ATTEMPTS,
    lease: LeaseSizes | None = None,
    on_result: Callable[[ItemResult], None] | None = None,
    on_start: Callable[[str], None] | None = None,
    on_skipped: Callable[[int], None] | None = None,
    on_stopped: Callable[[ItemResult], None] | None = None,
    **rlm_options: Any,
) -> BatchReport:
    """Run many completions, each item ``RLM(model, **rlm_options).completion(item.query, item.context)``,
    and return when all have finished.

    On this machine by default: one engine, ``max_runs`` completions at once sharing its endpoint (the
    in-flight cap ``limits.max_concurrency``, ``rate_limits``, the circuit breaker). With ``ray``, across a Ray
    cluster (:func:`ray_batch`). Each result is appended to ``out`` as it finishes; a rerun with the same
    ``out`` skips the ids already there.

    Args:
        items: :class:`BatchItem` s, or dicts with ``id``, ``query`` and ``context`` or ``context_path``.
        model: the root model.
        out: the results file (JSON lines, see :class:`ItemResult`), or None to keep results in memory only.
        max_runs: completions at once per engine (default :data:`DEFAULT_MAX_RUNS`, 8).
        ray: None for this machine; ``"auto"`` (a running cluster), ``"local"`` (start one here), or a
            cluster address (``"ray://host:10001"``, ``"host:6379"``) to run on Ray (needs ``rlm-async[ray]``).
            The workers get ``base_url`` and ``api_key`` as resolved here (from ``OPENAI_BASE_URL`` /
            ``OPENAI_API_KEY`` when not given), not from their own environment.
        workers: Ray worker actors, one engine each (default: the cluster's CPUs / ``worker_cpus``).
        worker_cpus: CPUs each Ray worker actor reserves (default 1).
        max_calls: the job's model calls (HTTP requests, retries included) across every item, or None.
        max_cost_usd: the job's USD across every item, or None; needs ``prices`` for every model.
        max_item_attempts: on Ray, tries per item when workers die under it, then ``"worker_lost"``, or when
            Ray fails the call for a cause outside the item (an object lost with its node, memory that ran out:
            ``_ray.TRANSIENT_RAY_ERRORS``), then ``"error"`` (default 3).
        lease: on Ray, the lease sizes (:class:`LeaseSizes`; docs/scale-out.md).
        on_result: called with each result as it is recorded.
        on_start: called with each item's id as it starts.
        on_skipped: called once with how many items the results file already held.
        on_stopped: called with the would-be result (``stop_reason`` ``budget:...``, its usage) of each item
            the job's ``max_calls`` / ``max_cost_usd`` stopped as it ran; it is not recorded.
        **rlm_options: :class:`~rlm_async.RLM`'s keyword arguments (``base_url``, ``api_key``, ``limits`` for
            each item's budgets, ``rate_limits``, ``prices``, ``sandbox``, ...).

    Returns:
        A :class:`BatchReport`.

    Raises:
        ConfigError: a bad item (two with one id, a missing query), a bad argument (``workers`` below 1,
            ``worker_cpus`` not above 0, ...) or RLM option, the job's
            ``max_cost_usd`` without prices, a results file that is not one or that another batch is writing,
            ``ray`` without Ray installed, or on Ray a worker that cannot build its engine (see
            :func:`ray_batch`).
        asyncio.CancelledError: when cancelled; running items are cancelled, finished ones stay in ``out``.
    """
    started = time.monotonic()
    skipped = [0]
    results: list[ItemResult] = []
    stopped: list[ItemResult] = []
    items = list(items)

    def count_skipped(k: int) -> None:
        skipped[0] = k
        if on_skipped is not None:
            on_skipped(k)

    def record(result: ItemResult) -> None:
        results.append(result)
        if on_result is not None:
            on_result(result)

    def count_stopped(result: ItemResult) -> None:
        stopped.append(result)
        if on_stopped is not None:
            on_stopped(result)

    source = _results(
        items,
        model,
        out=out,
        max_runs=max_runs,
        ray=ray,
        workers=workers,
        worker_cpus=worker_cpus,
        max_calls=max_calls,
        max_cost_usd=max_cost_usd,
        max_item_attempts=max_item_attempts,
        lease=lease,
        on_start=on_start,
        on_skipped=count_skipped,
        on_result=record,
        options=rlm_options,
        on_stopped=count_stopped,
    )
    async with contextlib.aclosing(source) as stream:
        async for _ in stream:
            pass
    usage = sum((r.usage for r in results), UsageTotals())
    done = sum(r.status == "done" for r in results)
    total = len(items)
    return BatchReport(
        tuple(results),
        done,
        len(results) - done,
        skipped[0],
        total - skipped[0] - len(results),
        usage,
        time.monotonic() - started,
        len(stopped),
        sum((r.usage for r in stopped), UsageTotals()),
    )


def ray_batch(
    items: Iterable[BatchItem | Mapping[str, Any]],
    model: str,
    *,
    address: str = "auto",
    out: str | Path | None = None,
    max_runs: int = DEFAULT_MAX_RUNS,
    workers: int | None = None,
    worker_cpus: float = 1.0,
    max_calls: int | None = None,
    max_cost_usd: float | None = None,
    max_item_attempts: int = DEFAULT_ITEM_ATTEMPTS,
    lease: LeaseSizes | None = None,
    on_start: Callable[[str], None] | None = None,
    **rlm_options: Any,
) -> AsyncGenerator[ItemResult, None]:
    """Run many completions across a Ray cluster; an async iterator of results as they finish (each already
    appended to ``out`` when given). ``async with contextlib.aclosing(ray_batch(...)) as results: async for r
    in results: ...``; closing it early cancels the running items and keeps what finished.

    Each Ray worker actor hosts one engine (its event loop, its REPL workers) running ``max_runs`` items at
    once. The endpoint's in-flight cap (``limits.max_concurrency``) and ``rate_limits`` hold across the
    cluster, leased from one coordinator actor (docs/scale-out.md: the lease sizes and the overshoot they
    allow), as do the job's ``max_calls`` and ``max_cost_usd``. An item whose worker dies is retried on
    another, up to ``max_item_attempts`` tries, then recorded failed (``"worker_lost"``); so is an item whose
    call Ray failed for a cause outside it (then ``"error"``). An item the job's
    ``max_calls`` / ``max_cost_usd`` stops is neither yielded nor recorded (a rerun runs it). When this call
    started Ray (``address="local"``, or no cluster was connected yet), it shuts it down at the end.

    Args:
        address: ``"auto"`` (a running cluster; the default), ``"local"`` (start one here), or an address.
        The others: as for :func:`batch`.

    Raises:
        ConfigError: as :func:`batch`; also when Ray is not installed (``pip install 'rlm-async[ray]'``) or
            the cluster cannot be reached (raised when iteration starts), or when a worker cannot build its
            engine (no endpoint where it runs, a strict sandbox its node cannot provide: the message names the
            worker, its node and why; the job stops and the items not finished stay unrecorded).
    """
    return _results(
        items,
        model,
        out=out,
        max_runs=max_runs,
        ray=address,
        workers=workers,
        worker_cpus=worker_cpus,
        max_calls=max_calls,
        max_cost_usd=max_cost_usd,
        max_item_attempts=max_item_attempts,
        lease=lease,
        on_start=on_start,
        on_skipped=None,
        on_result=None,
        options=rlm_options,
    )
