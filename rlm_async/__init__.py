"""rlm_async: Recursive Language Models with awaitable sub-calls over one bounded, tree-wide scheduler."""

from ._agent import AgentResult, StopReason
from ._breaker import CircuitBreaker
from ._budget import Limits, Price, Usage, UsageTotals
from ._clients import AiohttpClient, ChatClient, ChatRequest, ChatResponse, FakeClient, Message, OpenAIClient
from ._endpoint import RateLimit
from ._engine import RLM, RLMResult, RunStats
from ._errors import (
    BudgetExceeded,
    CircuitOpenError,
    ConfigError,
    EngineError,
    LLMCallError,
    ProviderConnectionError,
    ProviderError,
    ProviderResponseError,
    ProviderStatusError,
    ProviderTimeoutError,
    RLMError,
    RunTimeout,
    ToolError,
    WorkerError,
)
from ._repl import SubcallFailure
from ._retry import RetryPolicy, parse_retry_after
from ._sandbox import Sandbox
from ._scheduler import SchedulerStats
from ._tools import Tool
from ._trace import EventName, RunEvent
from .batch import BatchItem, BatchReport, ItemResult, LeaseSizes, batch, ray_batch

__all__ = [
    "RLM",
    "AgentResult",
    "AiohttpClient",
    "BatchItem",
    "BatchReport",
    "BudgetExceeded",
    "ChatClient",
    "ChatRequest",
    "ChatResponse",
    "CircuitBreaker",
    "CircuitOpenError",
    "ConfigError",
    "EngineError",
    "EventName",
    "FakeClient",
    "ItemResult",
    "LLMCallError",
    "LeaseSizes",
    "Limits",
    "Message",
    "OpenAIClient",
    "Price",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderResponseError",
    "ProviderStatusError",
    "ProviderTimeoutError",
    "RLMError",
    "RLMResult",
    "RateLimit",
    "RetryPolicy",
    "RunEvent",
    "RunStats",
    "RunTimeout",
    "Sandbox",
    "SchedulerStats",
    "StopReason",
    "SubcallFailure",
    "Tool",
    "ToolError",
    "Usage",
    "UsageTotals",
    "WorkerError",
    "batch",
    "parse_retry_after",
    "ray_batch",
]
