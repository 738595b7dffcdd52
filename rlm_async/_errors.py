"""The error tree of rlm_async. Every error the engine raises derives from :class:`RLMError`.

::

    RLMError
    ├── ConfigError            bad arguments to RLM, Limits, RetryPolicy or a REPL function (also a ValueError)
    ├── BudgetExceeded         a Limits cap refused work; carries the cap, what was used, and partial results
    ├── ProviderError          one HTTP attempt failed, as the client saw it (the scheduler may retry it)
    │   ├── ProviderStatusError      non-2xx status, with the response headers (Retry-After lives there)
    │   ├── ProviderConnectionError  the connection failed or was reset before a full response
    │   ├── ProviderTimeoutError     the attempt ran past its per-attempt timeout
    │   ├── ProviderResponseError    a 2xx response that is malformed or empty
    │   └── CircuitOpenError         not sent: the circuit breaker is open (the endpoint kept failing)
    ├── LLMCallError           the scheduler's final verdict on one call: retries exhausted or not retryable;
    │                          carries call_id, depth, agent_id, model, status, attempts and the last cause
    ├── RunTimeout             a run passed ``timeout_s``, or a child agent its ``agent_timeout_s``
    ├── EngineError            an unexpected exception inside the engine, kept as ``__cause__``
    ├── ToolError              a custom tool raised (or is unknown, or returned what cannot reach the REPL);
    │                          raised in model code
    └── WorkerError            a REPL worker process could not start, or did not confine itself as the
                               sandbox level requires

:class:`~rlm_async.RLMResult` carries one of these in ``error`` when a run stops early, and
``RLMResult.raise_for_status()`` raises it.

Errors are plain values: constructing one does no I/O and no logging.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "BudgetExceeded",
    "CircuitOpenError",
    "ConfigError",
    "EngineError",
    "LLMCallError",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderResponseError",
    "ProviderStatusError",
    "ProviderTimeoutError",
    "RLMError",
    "RunTimeout",
    "ToolError",
    "WorkerError",
]


class RLMError(Exception):
    """Base class of every error rlm_async raises."""


class ConfigError(RLMError, ValueError):
    """An argument is out of range or of the wrong type (a bad Limits field, an unknown price, ...)."""


class BudgetExceeded(RLMError):
    """A cap in :class:`~rlm_async.Limits` refused work.

    Attributes:
        limit: the name of the Limits field that stopped the work, e.g. ``"max_calls"``, ``"max_fanout"``.
        cap: the configured value of that field (count, tokens, USD or seconds, as the field says).
        used: how much had been used (or, for ``max_fanout``, how large the refused batch was).
        results: for a batch cut short by a token or cost cap, every item's outcome in prompt order
            (answers and typed failures); empty when nothing was started.
    """

    def __init__(self, limit: str, cap: float, used: float, *, detail: str = "", results: Sequence[Any] = ()) -> None:
        self.limit = limit
        self.cap = cap
        self.used = used
        self.results: list[Any] = list(results)
        message = f"budget exceeded: {limit}={_fmt(cap)} (used or asked: {_fmt(used)})"
        super().__init__(f"{message}; {detail}" if detail else message)


def _fmt(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


class ProviderError(RLMError):
    """One HTTP attempt failed, as the client saw it.

    Attributes:
        status: the HTTP status code, or None when no response arrived.
        headers: the response headers, lower-cased names (empty when no response arrived).
    """

    def __init__(self, message: str, *, status: int | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers: dict[str, str] = {k.lower(): v for k, v in (headers or {}).items()}


class ProviderStatusError(ProviderError):
    """The provider answered with a non-2xx status (429, 500, ...)."""


class ProviderConnectionError(ProviderError):
    """The connection failed, or was reset before a complete response arrived."""


class ProviderTimeoutError(ProviderError):
    """The attempt ran past its per-attempt timeout (``RetryPolicy.attempt_timeout_s``)."""


class ProviderResponseError(ProviderError):
    """A 2xx response that cannot be used: truncated or invalid JSON, no choices, no content."""


class LLMCallError(RLMError):
    """One model call failed for good: its retries are spent, or its error is not retryable.

    Attributes:
        kind: a short machine-readable reason: ``"rate_limited"``, ``"status"``, ``"connection"``,
            ``"timeout"``, ``"bad_response"`` or ``"retry_after_too_long"``.
        call_id: the scheduler's id of the call (unique within a run).
        depth: the depth the call ran at (root turns are depth 0).
        agent_id: the agent that made the call.
        model: the model name sent to the provider.
        status: the last HTTP status, or None.
        attempts: how many HTTP attempts were made.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        call_id: int,
        depth: int,
        agent_id: str,
        model: str,
        status: int | None,
        attempts: int,
    ) -> None:
        super().__init__(f"{kind}: {message} (call {call_id}, model {model}, depth {depth}, attempts {attempts})")
        self.kind = kind
        self.call_id = call_id
        self.depth = depth
        self.agent_id = agent_id
        self.model = model
        self.status = status
        self.attempts = attempts


class CircuitOpenError(ProviderError):
    """An attempt was refused without being sent: the circuit breaker is open because the endpoint kept
    failing (see :class:`~rlm_async.CircuitBreaker`). Never retried."""


class WorkerError(RLMError):
    """A REPL worker process could not be started, or reported fewer confinement layers than its sandbox
    level requires (the engine fails closed). The message holds the worker's own last words (stderr)."""


class RunTimeout(RLMError):
    """A run passed ``Limits.timeout_s``, or a child agent its ``Limits.agent_timeout_s``.

    Attributes:
        limit: ``"timeout_s"`` or ``"agent_timeout_s"``.
        seconds: the configured value, seconds.
    """

    def __init__(self, limit: str, seconds: float) -> None:
        super().__init__(f"the {'run' if limit == 'timeout_s' else 'agent'} passed {limit}={seconds:g} s")
        self.limit = limit
        self.seconds = seconds


class EngineError(RLMError):
    """An unexpected exception inside the engine (a bug): the run or agent stopped with what it had. The
    original exception is ``__cause__``; ``traceback`` holds its formatted traceback."""

    def __init__(self, message: str, traceback: str = "") -> None:
        super().__init__(message)
        self.traceback = traceback


class ToolError(RLMError):
    """A custom tool raised, is unknown, or returned a value that cannot reach the REPL. Raised in model code
    at the tool's call; the message names the tool and the original error."""
