"""The client protocol: one OpenAI-compatible chat completion per call, no retries, no HTTP in sight."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypedDict

from .._errors import ProviderResponseError

__all__ = [
    "ChatClient",
    "ChatRequest",
    "ChatResponse",
    "Message",
    "cost_value",
    "token_count",
    "windows_from_models",
]


class Message(TypedDict):
    """One chat message, as OpenAI's ``/v1/chat/completions`` takes it."""

    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One chat completion request.

    Attributes:
        model: the model name sent to the provider.
        messages: the conversation, oldest first.
        max_tokens: cap on completion tokens, or None for the provider's default.
        stop: up to 4 stop sequences (OpenAI's limit), or empty.
        temperature: sampling temperature, or None for the provider's default.
        sampling: more body fields, sent as they are (``top_p``, ``seed``, ``presence_penalty``, or a
            server's own such as vLLM's and llama.cpp's ``top_k`` / ``min_p``); the fields above win over
            the same names here.
    """

    model: str
    messages: tuple[Message, ...]
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    temperature: float | None = None
    sampling: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def body(self) -> dict[str, Any]:
        """The JSON body of ``POST /chat/completions`` for this request (fields left unset are not sent)."""
        body: dict[str, Any] = {**self.sampling, "model": self.model, "messages": list(self.messages)}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.stop:
            body["stop"] = list(self.stop)
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return body

    def with_messages(self, messages: tuple[Message, ...]) -> ChatRequest:
        """This request with other messages (what a batch does per prompt; half the CPU of
        ``dataclasses.replace``)."""
        return ChatRequest(self.model, messages, self.max_tokens, self.stop, self.temperature, self.sampling)

    @property
    def prompt_chars(self) -> int:
        """Characters of message content (for the token estimate used by TPM limits)."""
        return sum(len(m["content"]) for m in self.messages)


@dataclass(frozen=True, slots=True)
class ChatResponse:
    """One completed chat response.

    Attributes:
        text: the first choice's message content.
        prompt_tokens: ``usage.prompt_tokens`` as the provider reported it.
        completion_tokens: ``usage.completion_tokens`` as the provider reported it.
        cost_usd: ``usage.cost`` when the provider reports one (OpenRouter does), else None.
        finish_reason: ``"stop"``, ``"length"``, ... or None.
        stop_sequence: the stop sequence that ended the reply, where the server says (vLLM's
            ``choices[0].stop_reason`` when it is a string); None otherwise (OpenAI and llama.cpp do not say).
    """

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None
    finish_reason: str | None = None
    stop_sequence: str | None = None


def token_count(value: Any, name: str) -> int:
    """A usage field of a response (``usage.prompt_tokens``, ...) as tokens; missing or null is 0.

    Args:
        value: the field as the provider sent it.
        name: its name, for the error.

    Raises:
        ProviderResponseError: it is not a non-negative whole number, nor a string of digits (a negative
            count would lower what the budgets see as spent).
    """
    if type(value) is int and value >= 0:  # what nearly every response sends, tested first (the hot path)
        return value
    if value is None:
        return 0
    whole_float = isinstance(value, float) and value.is_integer()
    digits = isinstance(value, str) and value.isascii() and value.isdigit()  # a proxy that sends text numbers
    if whole_float or digits:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProviderResponseError(f"malformed response: {name} is {value!r}, not a token count")
    return value


def cost_value(value: Any) -> float | None:
    """``usage.cost`` of a response (OpenRouter reports one), USD; None when absent or not a number (the
    price table then decides).

    Raises:
        ProviderResponseError: a negative, infinite or NaN cost (it would lower or break what the budgets
            see as spent).
    """
    if value is None or not isinstance(value, int | float) or isinstance(value, bool):  # None: most providers
        return None
    cost = float(value)
    if not math.isfinite(cost) or cost < 0:
        raise ProviderResponseError(f"malformed response: usage.cost is {value!r}, not a cost in USD")
    return cost


def windows_from_models(payload: Any) -> dict[str, int]:
    """Context windows (tokens) from a ``GET /v1/models`` body, where the server reports them: vLLM's
    ``max_model_len``, llama.cpp's ``meta.n_ctx`` (per slot), OpenRouter's ``context_length``."""
    windows: dict[str, int] = {}
    entries = payload.get("data") if isinstance(payload, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        meta: dict[str, Any] = entry["meta"] if isinstance(entry.get("meta"), dict) else {}
        for value in (entry.get("max_model_len"), meta.get("n_ctx"), entry.get("context_length")):
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                windows[entry["id"]] = value
                break
    return windows


class ChatClient(Protocol):
    """What the scheduler needs from a client: one attempt per ``chat`` call, errors as ``ProviderError``.

    ``chat`` must not retry (the scheduler is the one retry layer) and must raise
    ``ProviderStatusError`` / ``ProviderConnectionError`` / ``ProviderTimeoutError`` /
    ``ProviderResponseError`` for failures; cancellation must propagate untouched and close the attempt's
    connection.
    """

    async def chat(self, request: ChatRequest) -> ChatResponse: ...

    async def aclose(self) -> None: ...
