"""The production client: openai-python's ``AsyncOpenAI`` on its aiohttp transport, SDK retries off."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
from openai.types.chat import ChatCompletion

from .._errors import (
    ConfigError,
    ProviderConnectionError,
    ProviderResponseError,
    ProviderStatusError,
    ProviderTimeoutError,
)
from ._base import ChatRequest, ChatResponse, cost_value, token_count, windows_from_models

__all__ = ["OpenAIClient"]


class OpenAIClient:
    """A :class:`ChatClient` for any OpenAI-compatible ``/v1/chat/completions`` endpoint.

    Built on ``openai.AsyncOpenAI`` with ``http_client=openai.DefaultAioHttpClient()`` (aiohttp) and
    ``max_retries=0``: the scheduler is the one retry layer, and its per-attempt deadline the one timeout
    (``RetryPolicy.attempt_timeout_s``), so the SDK gets none by default. ``RLM(http="openai")`` builds it;
    the default is the lean :class:`~rlm_async.AiohttpClient` (docs/benchmarks.md says why).

    Args:
        base_url: e.g. ``"http://127.0.0.1:8000/v1"``; None reads ``OPENAI_BASE_URL`` (the SDK's default).
        api_key: None reads ``OPENAI_API_KEY``; local servers accept any non-empty key.
        timeout_s: the SDK's timeout in seconds (httpx's, per phase), or None (the default) for none.

    Raises (from ``chat``): ``ProviderStatusError`` (non-2xx, with headers), ``ProviderTimeoutError``,
    ``ProviderConnectionError``, ``ProviderResponseError`` (malformed body, no choices, no content),
    ``ConfigError`` (a request that cannot be encoded as UTF-8 JSON; nothing was sent).
    """

    def __init__(self, *, base_url: str | None, api_key: str | None, timeout_s: float | None = None) -> None:
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key,
            max_retries=0,
            timeout=timeout_s,
            http_client=openai.DefaultAioHttpClient(timeout=timeout_s),
        )

    async def chat(self, request: ChatRequest) -> ChatResponse:
        try:
            # AsyncOpenAI.post rather than chat.completions.create: the body is already plain JSON, and create()
            # walks it against the SDK's TypedDicts first (0.8 ms of CPU per call, measured here, which caps a
            # single core at about 1,000 calls a second before any HTTP work).
            completion = await self._client.post("/chat/completions", body=request.body(), cast_to=ChatCompletion)
        except openai.APIStatusError as exc:
            raise ProviderStatusError(
                f"HTTP {exc.status_code}: {exc.message}",
                status=exc.status_code,
                headers=dict(exc.response.headers),
            ) from exc
        except openai.APIConnectionError as exc:  # APITimeoutError included
            if _is_timeout(exc):
                raise ProviderTimeoutError(f"timed out: {exc}") from exc
            raise ProviderConnectionError(f"connection failed: {_root_cause(exc)!r}") from exc
        except UnicodeEncodeError as exc:  # a ValueError too: it must be caught first
            raise ConfigError(f"the request is not valid UTF-8 text (a lone surrogate?): {exc}") from exc
        except (openai.APIResponseValidationError, ValueError, RecursionError) as exc:  # JSONDecodeError too
            raise ProviderResponseError(f"malformed response: {exc}") from exc
        return _to_response(completion)

    async def context_windows(self) -> dict[str, int]:
        """Context windows (tokens) the server reports in ``GET /models``; {} when it reports none or fails."""
        try:
            payload = await self._client.get("/models", cast_to=object)
        except (openai.OpenAIError, ValueError):
            return {}
        return windows_from_models(payload)

    async def aclose(self) -> None:
        await self._client.close()


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _root_cause(exc: BaseException) -> BaseException:
    return _causes(exc)[-1]


def _is_timeout(exc: openai.APIConnectionError) -> bool:
    """Whether a connection-class SDK error was really a timeout.

    The SDK's vendored aiohttp transport maps every ``aiohttp.ClientConnectionError`` (a reset, a server that
    hung up) to ``httpx.ConnectTimeout``, so ``APITimeoutError`` alone cannot be trusted: the aiohttp cause
    decides when there is one.
    """
    chain = _causes(exc)
    aiohttp_errors = [e for e in chain if isinstance(e, aiohttp.ClientError)]
    if aiohttp_errors:
        return any(isinstance(e, TimeoutError) for e in aiohttp_errors)
    return isinstance(exc, openai.APITimeoutError) or any(isinstance(e, TimeoutError) for e in chain)


def _to_response(completion: Any) -> ChatResponse:
    choices = getattr(completion, "choices", None)
    if not choices:
        raise ProviderResponseError("response has no choices")
    choice = choices[0]
    content = getattr(getattr(choice, "message", None), "content", None)
    finish = getattr(choice, "finish_reason", None)
    if not isinstance(content, str):
        raise ProviderResponseError(f"response has no message content (finish_reason={finish!r})")
    usage = getattr(completion, "usage", None)
    prompt = token_count(getattr(usage, "prompt_tokens", None), "usage.prompt_tokens")
    completion_tokens = token_count(getattr(usage, "completion_tokens", None), "usage.completion_tokens")
    extra = getattr(usage, "model_extra", None) or {}
    stop = (getattr(choice, "model_extra", None) or {}).get("stop_reason")
    return ChatResponse(
        text=content,
        prompt_tokens=prompt,
        completion_tokens=completion_tokens,
        cost_usd=cost_value(extra.get("cost")),
        finish_reason=finish,
        stop_sequence=stop if isinstance(stop, str) else None,
    )
