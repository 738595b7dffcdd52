"""What both paths share: building one engine for a job, and running one item through it."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from .._budget import Price
from .._clients import AiohttpClient, ChatClient, ChatRequest, ChatResponse, OpenAIClient
from .._endpoint import Endpoint
from .._engine import RLM
from .._errors import ConfigError
from ._items import BatchItem, ItemResult
from ._lease import JobBudgetExceeded

__all__ = ["EngineSpec", "JobClient", "JobGate", "run_item"]


class JobGate(Protocol):
    """The job's call and USD budgets, as one engine sees them (:class:`~rlm_async.batch._lease.LeasedGate`)."""

    exhausted: bool

    async def before_attempt(self) -> None: ...

    def settle(self, cost_usd: float) -> None: ...


class JobClient:
    """A :class:`~rlm_async.ChatClient` that takes each attempt from the job's budgets before sending it
    through ``inner``, and books each response's USD (the provider's, else from ``prices``, else 0).

    Raises (from ``chat``):
        BudgetExceeded: the job's ``max_calls`` or ``max_cost_usd`` is spent (nothing was sent); the run sees
            it as it sees its own budget stops.
    """

    def __init__(self, inner: ChatClient, gate: JobGate, prices: Mapping[str, Price]) -> None:
        self.inner = inner
        self._gate = gate
        self._prices = dict(prices)

    async def chat(self, request: ChatRequest) -> ChatResponse:
        await self._gate.before_attempt()
        response = await self.inner.chat(request)
        cost = response.cost_usd
        if cost is None:
            price = self._prices.get(request.model)
            cost = price.cost_usd(response.prompt_tokens, response.completion_tokens) if price else 0.0
        self._gate.settle(cost)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __getattr__(self, name: str) -> Any:  # context_windows() and the like, where the inner client has them
        return getattr(self.inner, name)


@dataclass(frozen=True)
class EngineSpec:
    """How to build a job's engine: ``RLM(model, **options)``; picklable, so a Ray worker can build its own.

    Attributes:
        model: the root model.
        options: keyword arguments of :class:`~rlm_async.RLM` (``limits`` are each item's budgets and, through
            ``max_concurrency``, the endpoint's in-flight cap; ``rate_limits`` the endpoint's RPM / TPM).
    """

    model: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def check(self) -> RLM:
        """Build the engine once here, so bad options fail before any item runs.

        Raises:
            ConfigError: what :class:`~rlm_async.RLM` raises for these options.
        """
        return RLM(self.model, **self.options)

    def build(self, gate: JobGate | None, endpoint: Endpoint | None = None) -> Engine:
        """The engine, with its client wrapped by the job's budgets when ``gate`` is given, and its endpoint
        replaced by ``endpoint`` (leased capacity) when given.

        Raises:
            ConfigError: as :meth:`check`.
        """
        options = dict(self.options)
        client: ChatClient | None = options.pop("client", None)
        owned: ChatClient | None = None
        if gate is not None:
            if client is None:
                base_url = options.pop("base_url", None) or os.environ.get("OPENAI_BASE_URL")
                api_key = options.pop("api_key", None) or os.environ.get("OPENAI_API_KEY")
                if not base_url and not api_key:
                    raise ConfigError("no endpoint configured: pass base_url/api_key or set OPENAI_BASE_URL")
                if options.get("http", "aiohttp") == "openai":
                    client = owned = OpenAIClient(base_url=base_url, api_key=api_key or "EMPTY")
                else:
                    url = base_url or "https://api.openai.com/v1"
                    client = owned = AiohttpClient(base_url=url, api_key=api_key or "EMPTY")
            client = JobClient(client, gate, options.get("prices") or {})
        rlm = RLM(self.model, client=client, **options)
        if endpoint is not None:
            rlm.endpoint = endpoint
        return Engine(rlm, owned, gate)


@dataclass
class Engine:
    """One job's engine: the RLM, the client built for it (closed with it), the job's gate."""

    rlm: RLM
    owned: ChatClient | None
    gate: JobGate | None

    @property
    def exhausted(self) -> bool:
        """True once the job's budget refused one of this engine's attempts."""
        return self.gate is not None and self.gate.exhausted

    async def aclose(self) -> None:
        """Close the RLM and the client built for it."""
        await self.rlm.aclose()
        if self.owned is not None:
            await self.owned.aclose()


async def run_item(rlm: RLM, item: BatchItem, attempts: int = 1) -> tuple[ItemResult, bool]:
    """Run one item to an :class:`ItemResult`; never raises but for cancellation.

    Returns:
        The run's result (``status`` ``"done"`` when it answered), or a failed result: ``"bad_input"`` when
        ``context_path`` cannot be read, ``"error"`` when the engine raised (a bad query, a bug); and whether
        the job's ``max_calls`` / ``max_cost_usd`` stopped the run (:class:`JobBudgetExceeded`): such an item
        is not finished and is not recorded, so a rerun with a larger budget runs it. A run stopped by its
        own :class:`~rlm_async.Limits` (``stop_reason`` ``budget:...`` with a plain ``BudgetExceeded``) is
        finished.
    """
    started = time.monotonic()
    try:
        context = await anyio.to_thread.run_sync(item.load_context)
    except OSError as exc:
        reason = f"cannot read context_path {item.context_path!r}: {exc.strerror or exc}"
        return ItemResult.failure(item.id, "bad_input", reason, attempts=attempts), False
    try:
        result = await rlm.completion(item.query, context, metadata={"batch_item": item.id})
    except Exception as exc:
        failure = ItemResult.failure(item.id, "error", f"{type(exc).__name__}: {exc}", attempts=attempts)
        return failure, isinstance(exc, JobBudgetExceeded)
    outcome = ItemResult(
        item.id,
        "done" if result.ok else "failed",
        result.answer,
        result.stop_reason,
        result.usage.total,
        None if result.error is None else f"{type(result.error).__name__}: {result.error}",
        attempts,
        time.monotonic() - started,
    )
    return outcome, not result.ok and isinstance(result.error, JobBudgetExceeded)
