"""The public entry point :class:`RLM`, and :class:`Run`, the state of one completion."""

from __future__ import annotations

import asyncio
import math
import os
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import anyio
import sniffio

from ._agent import Agent, StopReason
from ._breaker import DEFAULT_BREAKER, CircuitBreaker
from ._budget import Ledger, Limits, Price, Usage
from ._clients import AiohttpClient, ChatClient, ChatRequest, Message, OpenAIClient
from ._compaction import window_for
from ._endpoint import Endpoint, RateLimit
from ._errors import ConfigError, RLMError, RunTimeout
from ._repl import ReplSession, reap_pending
from ._retry import RetryPolicy
from ._sandbox import Sandbox, plan_for
from ._scheduler import Scheduler
from ._session import Session
from ._tools import Tool, normalise_tools
from ._trace import Event, RunEvent, Tracer, bound

__all__ = ["RLM", "RLMResult", "Run", "RunStats"]


@dataclass(frozen=True, slots=True)
class RunStats:
    """What one run did, beyond usage.

    Attributes:
        wall_s: wall-clock seconds from start to end (the makespan).
        calls: model calls admitted (root turns, sub-calls, children's turns); a retry is not a call.
        attempts: HTTP attempts started.
        retries: attempts beyond each call's first.
        failed_calls: calls that ended in a typed failure.
        peak_in_flight: the most attempts in flight at once (never above ``max_concurrency``).
        agents: agents started, the root included.
        max_depth_reached: the deepest agent's depth (0: only the root ran).
        fallbacks: ``rlm_agent`` calls made at ``max_depth`` that ran as plain LLM calls instead.
        queued_s: seconds, summed over calls, waiting for a slot (rate-limit waits included).
        running_s: seconds, summed over attempts, holding a slot.
        circuit_opened: how many times the endpoint's circuit breaker opened during the run.
        stop_reason: the root's (see :data:`~rlm_async.StopReason`).
        turns: the root's model turns begun (at most ``Limits.max_iterations``; a re-asked empty or cut
            reply is part of its turn, a child's turns are not counted).
    """

    wall_s: float
    calls: int
    attempts: int
    retries: int
    failed_calls: int
    peak_in_flight: int
    agents: int
    max_depth_reached: int
    fallbacks: int
    queued_s: float
    running_s: float
    circuit_opened: int
    stop_reason: StopReason
    turns: int = 0


@dataclass(frozen=True, slots=True)
class RLMResult:
    """The outcome of ``RLM.completion``.

    Attributes:
        answer: the root's answer; after a stop, its partial draft (``answer["content"]``).
        stop_reason: see :data:`~rlm_async.StopReason`.
        usage: tree-wide usage with per-depth, per-agent and per-model breakdowns.
        stats: counters and timings.
        error: why the run stopped early, typed: :class:`~rlm_async.BudgetExceeded`,
            :class:`~rlm_async.RunTimeout`, :class:`~rlm_async.LLMCallError` (``kind``, ``status``, ``model``),
            :class:`~rlm_async.ConfigError`, :class:`~rlm_async.WorkerError` or
            :class:`~rlm_async.EngineError`; None when the run answered.
        run_id: the id bound to every event of the run.
        metadata: what the caller passed to ``completion(metadata=...)``.
        history: the root's conversation with its model (``{"role", "content"}`` dicts, the system prompt
            first), as far as it got.
    """

    answer: str
    stop_reason: StopReason
    usage: Usage
    stats: RunStats
    error: RLMError | None
    run_id: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    history: tuple[Message, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the root produced an answer rather than stopping early."""
        return self.stop_reason in ("answer", "max_iterations")

    def raise_for_status(self) -> RLMResult:
        """Raise :attr:`error` when the run did not answer (in the style of httpx); else return self.

        Raises:
            RLMError: the typed error of a run that stopped early (or an RLMError naming the stop reason).
        """
        if self.ok:
            return self
        raise self.error if self.error is not None else RLMError(f"the run stopped: {self.stop_reason}")


class Run:
    """The state of one completion: one scheduler, one ledger, one tracer, shared by every agent. The
    endpoint's shared state (in-flight cap, rate limiters, breaker) comes from the ``RLM``."""

    def __init__(self, rlm: RLM, client: ChatClient, tracer: Tracer, run_id: str, limits: Limits) -> None:
        self.limits = limits
        self.system_prompt = rlm.system_prompt
        self.tracer = tracer
        self.run_id = run_id
        self.ledger = Ledger(limits, rlm.prices)
        self.scheduler = Scheduler(
            client, self.ledger, tracer, max_concurrency=limits.max_concurrency, retry=rlm.retry, endpoint=rlm.endpoint
        )
        self.fatal: RLMError | None = None
        self.scope = anyio.CancelScope()
        self._model_for = rlm.model_for
        self.temperature = rlm.temperature
        self._sampling = rlm.sampling_for
        self.tools_for = rlm.tools_for
        self.window_for = rlm.window_for
        self.worker_plan = rlm.worker_plan
        self.worker_slots = anyio.Semaphore(limits.max_workers)
        self.started = anyio.current_time()
        self.deadline = None if limits.timeout_s is None else self.started + limits.timeout_s
        self.agents_started = 0
        self.max_depth_reached = 0
        self.fallbacks = 0

    def model_for(self, depth: int) -> str:
        """The model for calls at ``depth``."""
        return self._model_for(depth)

    def request(
        self,
        model: str,
        messages: tuple[Message, ...],
        depth: int,
        *,
        stop: tuple[str, ...] = (),
        max_tokens: int | None = None,
    ) -> ChatRequest:
        """A request at ``depth`` with the run's sampling settings for that depth (``RLM(sampling_args=...)``,
        then ``temperature``); an explicit ``max_tokens`` (a turn cap, a sub-call's own) wins over theirs."""
        sampling = self._sampling(depth)
        temperature = sampling.get("temperature", self.temperature)
        max_tokens = max_tokens if max_tokens is not None else sampling.get("max_tokens")
        return ChatRequest(
            model, messages, max_tokens=max_tokens, stop=stop, temperature=temperature, sampling=sampling
        )

    def fail(self, error: RLMError) -> None:
        """Stop the whole run with ``stop_reason="config_error"``: the endpoint refused its configuration
        (a wrong key, a configured model it does not serve), so every further call would fail alike."""
        if self.fatal is None:
            self.fatal = error
            self.tracer.emit("config_error", error=str(error))
        self.scope.cancel()

    def agent_started(self, depth: int) -> None:
        """Count an agent (its reservation was taken by whoever spawned it)."""
        self.agents_started += 1
        self.max_depth_reached = max(self.max_depth_reached, depth)

    def seconds_left(self) -> float | None:
        """Seconds to the run's deadline, or None without ``timeout_s``."""
        return None if self.deadline is None else max(self.deadline - anyio.current_time(), 0.0)

    def stats(self, stop_reason: StopReason, turns: int) -> RunStats:
        """A snapshot of the run's counters; ``turns``: the root's."""
        s = self.scheduler.stats()
        return RunStats(
            wall_s=anyio.current_time() - self.started,
            calls=s.calls,
            attempts=s.attempts,
            retries=s.retries,
            failed_calls=s.failed_calls,
            peak_in_flight=s.peak_in_flight,
            agents=self.agents_started,
            max_depth_reached=self.max_depth_reached,
            fallbacks=self.fallbacks,
            queued_s=s.queued_s,
            running_s=s.running_s,
            circuit_opened=s.circuit_opened,
            stop_reason=stop_reason,
            turns=turns,
        )


class RLM:
    """A Recursive Language Model engine: async, one bounded scheduler per run shared by the whole call tree.

    Args:
        model: the root model (depth 0).
        sub_model: the model for every depth >= 1 (sub-calls and child agents); default ``model``.
        depth_models: one model per depth, index = depth; depths past the end use the last entry. Overrides
            ``model`` and ``sub_model``.
        base_url: an OpenAI-compatible endpoint, e.g. ``"http://127.0.0.1:8000/v1"``; default
            ``OPENAI_BASE_URL``.
        api_key: default ``OPENAI_API_KEY``; with a base_url and no key, ``"EMPTY"`` (vLLM's convention for
            servers that check none).
        limits: budgets and the concurrency cap (:class:`Limits`).
        retry: the retry policy (:class:`RetryPolicy`, openai-python's by default).
        rate_limits: model name -> :class:`RateLimit` (RPM / TPM).
        circuit_breaker: when a failing endpoint makes calls fail fast (:class:`CircuitBreaker`); None turns
            the breaker off.
        prices: model name -> :class:`Price` (USD per million tokens), for ``usage.cost_usd`` and
            ``Limits.max_cost_usd`` when the provider does not report ``usage.cost``.
        client: a :class:`ChatClient` to use instead of the one ``http`` names (tests, custom transports);
            the caller keeps ownership and closes it.
        http: the client this RLM builds when none is passed: ``"aiohttp"`` (the default,
            :class:`AiohttpClient`: the request on aiohttp alone, at 0.4 of the SDK's CPU per call) or
            ``"openai"`` (:class:`OpenAIClient`, openai-python, for what only it does: Azure authentication,
            organisations, proxies). Both send the same body and raise the same errors (docs/benchmarks.md).
        trace_path: append every event of every run as JSON lines to this file.
        logger: a structlog logger for events (default: the stdlib logger ``"rlm_async"`` at DEBUG).
        on_event: a callable given every event dict (progress bars, metrics).
        system_prompt: replace the built-in system prompt.
        temperature: sampling temperature sent with every call (root turns, sub-calls, children), or None for
            the provider's default. 0 makes a local model's runs repeatable.
        sampling_args: more fields for the request body: one dict for every depth, or a list of dicts, one
            per depth (index = depth; depths past the end use the last). Any chat-completions field
            (``temperature``, ``top_p``, ``max_tokens``, ``seed``, ...) or a server's own (vLLM's and
            llama.cpp's ``top_k``, ``min_p``, ``repeat_penalty``). They win over ``temperature``;
            ``Limits.max_tokens_per_turn`` and a sub-call's own ``max_tokens`` win over theirs.
        custom_tools: name -> a function or a value for the REPL, or ``{"tool": x, "description": "..."}``
            (the official RLM's form), or a :class:`Tool`. A function runs in this process, called through
            the REPL channel (so it can hold a connection or a key model code never sees; ``async def`` is
            awaited, a plain function runs in a thread); it takes and returns plain data (str, numbers,
            lists, dicts, bytes). A value is copied into the REPL. Descriptions are listed in the system
            prompt. A tool that raises raises ``ToolError`` in model code.
        custom_sub_tools: the tools of child agents (depth >= 1); default: ``custom_tools``; ``{}``: none.
        context_windows: model name -> context window, tokens. Models not named use what the endpoint's
            ``GET /models`` reports (vLLM's ``max_model_len``, llama.cpp's per-slot ``n_ctx``; asked once),
            else the published windows in ``rlm_async._compaction.KNOWN_WINDOWS``, else no compaction.
        compaction: when an agent's conversation reaches 85% of its model's window, fold its older turns
            into a summary the model writes, and keep the whole conversation in the REPL variable
            ``history`` (the official RLM's ``compaction``). On by default; False: never.
        sandbox: where model-written code runs (:class:`Sandbox`, or its level as a str): ``"strict"`` (the
            default) runs each agent's REPL in its own worker process confined by every layer this machine
            supports (bubblewrap namespaces, Landlock, seccomp, rlimits, no keys in its environment);
            ``"process"`` in a worker process with rlimits and a scrubbed environment only; ``"none"`` in a
            thread of this process, for trusted code only (docs/security.md).

    Raises:
        ConfigError: no endpoint configured, a bad argument, or ``sandbox="strict"`` on a machine where
            neither bubblewrap nor Landlock can confine the filesystem, or nothing can confine the network
            (``rlm-async doctor`` says which; ``sandbox="process"`` opts down explicitly).

    Use ``async with RLM(...) as rlm: await rlm.completion(...)``; ``completion_sync`` is a blocking
    convenience for scripts.
    """

    def __init__(
        self,
        model: str,
        *,
        sub_model: str | None = None,
        depth_models: Sequence[str] | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        limits: Limits | None = None,
        retry: RetryPolicy | None = None,
        rate_limits: Mapping[str, RateLimit] | None = None,
        circuit_breaker: CircuitBreaker | None = DEFAULT_BREAKER,
        prices: Mapping[str, Price] | None = None,
        client: ChatClient | None = None,
        http: Literal["aiohttp", "openai"] = "aiohttp",
        trace_path: str | Path | None = None,
        logger: Any = None,
        on_event: Callable[[Event], None] | None = None,
        system_prompt: str | None = None,
        temperature: float | None = None,
        sampling_args: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        custom_tools: Mapping[str, Any] | None = None,
        custom_sub_tools: Mapping[str, Any] | None = None,
        context_windows: Mapping[str, int] | None = None,
        compaction: bool = True,
        sandbox: Sandbox | Literal["strict", "process", "none"] = "strict",
    ) -> None:
        if not model or not isinstance(model, str):
            raise ConfigError("model must be a non-empty str")
        if depth_models is not None and (not depth_models or not all(isinstance(m, str) for m in depth_models)):
            raise ConfigError("depth_models must be a non-empty sequence of model names")
        self.model = model
        self.sub_model = sub_model or model
        self.depth_models = tuple(depth_models) if depth_models else None
        self.limits = limits or Limits()
        self.retry = retry or RetryPolicy()
        self.rate_limits = dict(rate_limits or {})
        self.circuit_breaker = circuit_breaker
        self.prices = dict(prices or {})
        self.trace_path = trace_path
        self.logger = logger
        self.on_event = on_event
        self.system_prompt = system_prompt
        if temperature is not None and not 0 <= temperature <= 2:
            raise ConfigError(f"temperature must be in [0, 2], got {temperature!r}")
        self.temperature = temperature
        self.sampling_args = _check_sampling(sampling_args)
        self.context_windows = dict(context_windows or {})
        self._windows_asked = False
        self.compaction = compaction
        self.custom_tools = normalise_tools(custom_tools)
        self.custom_sub_tools = (
            None if custom_sub_tools is None else normalise_tools(custom_sub_tools, "custom_sub_tools")
        )
        self._check_prices(self.limits)
        if http not in ("openai", "aiohttp"):
            raise ConfigError(f"http must be 'openai' or 'aiohttp', got {http!r}")
        self._http = http
        self.endpoint = Endpoint(
            max_concurrency=self.limits.max_concurrency, rate_limits=self.rate_limits, breaker=circuit_breaker
        )
        self.sandbox = Sandbox.coerce(sandbox)
        self.worker_plan = None if self.sandbox.level == "none" else plan_for(self.sandbox)
        self._client = client
        self._owns_client = client is None
        self._base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        self._api_key = api_key or os.environ.get("OPENAI_API_KEY")
        if client is None and not self._base_url and not self._api_key:
            raise ConfigError("no endpoint configured: pass base_url/api_key or set OPENAI_BASE_URL / OPENAI_API_KEY")

    def _check_prices(self, limits: Limits) -> None:
        if limits.max_cost_usd is not None:
            unpriced = sorted({self.model_for(d) for d in range(limits.max_depth + 1)} - set(self.prices))
            if unpriced:
                raise ConfigError(f"max_cost_usd needs a price for every model; missing: {unpriced}")

    async def _discover_windows(self, limits: Limits) -> None:
        """Once per RLM, with compaction on and a model of the run without a known window: ask the endpoint's
        ``GET /models`` (vLLM, llama.cpp and OpenRouter report windows there). Never fails a run."""
        if not self.compaction or self._windows_asked:
            return
        models = {self.model_for(d) for d in range(limits.max_depth + 1)}
        if all(self.window_for(m) is not None for m in models):
            return
        self._windows_asked = True
        ask = getattr(self._ensure_client(), "context_windows", None)
        if ask is None:
            return
        with anyio.move_on_after(10):
            reported = await ask()
            self.context_windows = {**reported, **self.context_windows}  # the user's own table wins

    def window_for(self, model: str) -> int | None:
        """The context window of ``model`` in tokens for compaction, or None (compaction off for it)."""
        return window_for(model, self.context_windows) if self.compaction else None

    def tools_for(self, depth: int) -> Mapping[str, Tool]:
        """The custom tools of an agent at ``depth``: ``custom_tools`` for the root, ``custom_sub_tools`` (when
        given, else ``custom_tools``) below it."""
        if depth == 0 or self.custom_sub_tools is None:
            return self.custom_tools
        return self.custom_sub_tools

    def sampling_for(self, depth: int) -> Mapping[str, Any]:
        """The ``sampling_args`` for calls at ``depth`` (empty when none)."""
        if not self.sampling_args:
            return {}
        return self.sampling_args[min(depth, len(self.sampling_args) - 1)]

    def model_for(self, depth: int) -> str:
        """The model for calls at ``depth`` (root turns are depth 0)."""
        if self.depth_models:
            return self.depth_models[min(depth, len(self.depth_models) - 1)]
        return self.model if depth == 0 else self.sub_model

    async def __aenter__(self) -> RLM:
        self._ensure_client()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client this RLM created (not one passed in), after the REPL workers whose start outlived
        their agent on this event loop are discarded (so that a loop's shutdown does not cut a start short).
        Idempotent."""
        await reap_pending()
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def _ensure_client(self) -> ChatClient:
        if self._client is None:  # no timeout of its own: the scheduler's attempt deadline is the one
            if self._http == "aiohttp":
                base_url = self._base_url or "https://api.openai.com/v1"
                self._client = AiohttpClient(base_url=base_url, api_key=self._api_key or "EMPTY")
            else:
                self._client = OpenAIClient(base_url=self._base_url, api_key=self._api_key or "EMPTY")
        return self._client

    async def completion(
        self,
        query: str,
        context: Any = None,
        *,
        limits: Limits | None = None,
        on_event: Callable[[Event], None] | None = None,
        trace_path: str | Path | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> RLMResult:
        """Answer ``query`` about ``context`` with a root agent whose REPL holds ``context``.

        Args:
            query: the question (str).
            context: the input: a str, bytes, a list, a dict, or any picklable object model code can work
                with. The root model never receives it as tokens, only its metadata.
            limits: this run's budgets, instead of the RLM's. Its ``max_concurrency`` applies to this run
                when lower than the RLM's, which stays the cap across every run (the endpoint's).
            on_event: a callable given every event of this run, besides the RLM's own ``on_event``. A
                callback that raises is logged and left out; it never changes the run's outcome.
            trace_path: append this run's events as JSON lines here (instead of the RLM's ``trace_path``).
            metadata: plain data about the request (ids, tenant), put in the ``run_start`` event and the
                result.

        Returns:
            An :class:`RLMResult`. Budget stops, timeouts, provider failures and configuration errors end the
            run with the partial answer, a ``stop_reason`` and the typed ``error``; they are not raised
            (``result.raise_for_status()`` raises them).

        Raises:
            ConfigError: ``query`` is not a str, ``limits`` needs a price that is missing, or the caller's
                event loop is not asyncio's (the engine runs on asyncio; uvloop is welcome).
            asyncio.CancelledError: when the caller cancels; every descendant task, connection and REPL
                worker is stopped first.
        """
        return await self._complete(
            query, context, limits=limits, on_event=on_event, trace_path=trace_path, metadata=metadata
        )

    def session(self, limits: Limits | None = None) -> Session:
        """A multi-turn session: ``async with rlm.session() as s: await s.completion(q1, ctx1); await
        s.completion(q2)``. The root's REPL and its variables persist across turns; see :class:`Session`.

        Args:
            limits: caps over all the session's turns (calls, tokens, USD); each turn also keeps its own.
        """
        return Session(self, limits)

    async def _complete(
        self,
        query: str,
        context: Any,
        *,
        limits: Limits | None,
        on_event: Callable[[Event], None] | None,
        trace_path: str | Path | None,
        metadata: Mapping[str, Any] | None,
        attach: Callable[[Agent], Awaitable[tuple[ReplSession, str]]] | None = None,
    ) -> RLMResult:
        """:meth:`completion`, and a session's turn: ``attach(root)`` gives the root the session's REPL and a
        note on earlier turns."""
        if not isinstance(query, str):
            raise ConfigError(f"query must be a str, got {type(query).__name__}")
        _require_asyncio()
        _warn_if_swapped(query, context)
        await self._discover_windows(limits or self.limits)
        limits = limits or self.limits
        if limits is not self.limits:
            self._check_prices(limits)
        client = self._ensure_client()
        run_id = uuid.uuid4().hex[:12]
        tracer = Tracer(
            trace_path=trace_path or self.trace_path,
            logger=self.logger,
            listeners=[fn for fn in (self.on_event, on_event) if fn is not None],
            clock=anyio.current_time,
        )
        metadata = dict(metadata or {})
        try:
            with bound(run_id=run_id):
                run = Run(self, client, tracer, run_id, limits)
                tracer.emit(
                    "run_start", model=self.model, sub_model=self.sub_model, limits=limits.describe(),
                    retry=self.retry.describe(), metadata=metadata,
                )  # fmt: skip
                run.ledger.reserve_agents(1)
                root = Agent(run, 0, "0")
                with run.scope, anyio.move_on_after(limits.timeout_s) as deadline:
                    repl, note = await attach(root) if attach is not None else (None, "")
                    outcome = await root.run(query, context, repl=repl, note=note)
                # An agent done before its REPL worker was up left the start to a reaper: a run that ends
                # leaves no task behind (a cancelled one does not wait; RLM.aclose does then).
                await reap_pending()
                error: RLMError | None
                stop_reason: StopReason
                if run.fatal is not None:
                    answer, stop_reason, error = root.draft, "config_error", run.fatal
                elif deadline.cancelled_caught:
                    assert limits.timeout_s is not None
                    answer, stop_reason, error = root.draft, "timeout", RunTimeout("timeout_s", limits.timeout_s)
                else:
                    answer, stop_reason, error = outcome.answer, outcome.stop_reason, outcome.error
                stats = run.stats(stop_reason, root.turns)
                usage = run.ledger.usage()
                tracer.emit(
                    "run_end",
                    stop_reason=stop_reason,
                    wall_s=stats.wall_s,
                    calls=usage.calls,
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    cost_usd=usage.cost_usd,
                    error=None if error is None else str(error),
                )
                return RLMResult(answer, stop_reason, usage, stats, error, run_id, metadata, tuple(root.messages))
        finally:
            tracer.close()

    async def stream(
        self,
        query: str,
        context: Any = None,
        *,
        on_event: Callable[[Event], None] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[RunEvent | RLMResult]:
        """Run a completion and yield its events as they happen, then its :class:`RLMResult` last.

        ``async for item in rlm.stream(query, context): ...`` sees :class:`~rlm_async.RunEvent` items (agent
        start and end, turns, replies, cell code and output, answer drafts, calls started and finished,
        budget stops) and, last, the result. Cancelling the task that iterates cancels the run. To stop
        early by leaving the loop, iterate inside ``contextlib.aclosing(rlm.stream(...))``: closing the
        iterator cancels the run at once (an async generator that is only garbage-collected would be closed
        later, in another task).

        Args:
            query, context: as for :meth:`completion`.
            on_event: also given every event dict, as in :meth:`completion`.
            **kwargs: ``limits``, ``trace_path``, ``metadata``, as for :meth:`completion`.

        Raises:
            The errors of :meth:`completion`.
        """
        send, receive = anyio.create_memory_object_stream[Event](math.inf)
        box: list[RLMResult] = []

        def forward(event: Event) -> None:
            send.send_nowait(event)
            if on_event is not None:
                on_event(event)

        async def run() -> None:
            with send:
                box.append(await self.completion(query, context, on_event=forward, **kwargs))

        closed = False
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            try:
                with receive:
                    async for event in receive:
                        yield RunEvent.from_dict(event)
            except GeneratorExit:  # the consumer closed the iterator (aclosing): stop the run, yield no more
                closed = True
                tg.cancel_scope.cancel()
        if not closed:
            yield box[0]

    def completion_sync(self, query: str, context: Any = None, **kwargs: Any) -> RLMResult:
        """Blocking ``completion`` for scripts: runs its own asyncio event loop, then closes the client.

        Raises:
            ConfigError: when called from a running event loop (use ``await rlm.completion(...)`` there).
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise ConfigError(
                "completion_sync() cannot run inside a running event loop; use `await rlm.completion(...)`"
            )

        async def once() -> RLMResult:
            try:
                return await self.completion(query, context, **kwargs)
            finally:
                await self.aclose()

        return asyncio.run(once())


_NOT_SAMPLING = frozenset({"model", "messages", "stream", "stream_options", "n", "stop", "tools"})


def _check_sampling(
    args: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
) -> tuple[dict[str, Any], ...]:
    """``sampling_args`` as one dict per depth.

    Raises:
        ConfigError: not a dict or a list of dicts with str keys, or a key the engine sets itself.
    """
    if args is None:
        return ()
    per_depth = [args] if isinstance(args, Mapping) else list(args)
    if not per_depth:
        raise ConfigError("sampling_args must be a dict, or a non-empty list of dicts (one per depth)")
    for one in per_depth:
        if not isinstance(one, Mapping) or not all(isinstance(k, str) for k in one):
            raise ConfigError(f"sampling_args must hold dicts with str keys, got {one!r}"[:200])
        if taken := sorted(_NOT_SAMPLING & set(one)):
            raise ConfigError(f"sampling_args cannot set {taken}: the engine sets them")
    return tuple(dict(one) for one in per_depth)


#: A query this long next to a much shorter context is most likely a document passed first.
_SWAPPED_QUERY_CHARS = 10_000


def _warn_if_swapped(query: str, context: Any) -> None:
    """Warn (``UserWarning``) when the query looks like the document: the official ``rlms`` takes the context
    first (``completion(prompt, root_prompt)``), rlm_async the query first, so a port can swap them."""
    context_chars = len(context) if isinstance(context, str | bytes | list | tuple | dict) else 0
    if len(query) > _SWAPPED_QUERY_CHARS and context_chars * 10 < len(query):
        warnings.warn(
            f"the query is {len(query):,} characters and the context {context_chars:,}: rlm_async takes "
            "completion(query, context), the query first (the official rlms takes the context first); the "
            "root model sees the whole query as tokens",
            UserWarning,
            stacklevel=4,
        )


def _require_asyncio() -> None:
    """The engine runs on asyncio (its scheduler and REPL channel use asyncio primitives).

    Raises:
        ConfigError: under another async library (trio through anyio, for example).
    """
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        library = "none"
    if library != "asyncio":
        raise ConfigError(
            f"rlm_async runs on asyncio (uvloop is welcome), not {library}: call it from an asyncio event loop"
        )
