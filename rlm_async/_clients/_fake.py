"""An in-process fake model, the way httpx's ``MockTransport(handler)`` works: a function answers each call."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from .._budget import estimate_tokens
from ._base import ChatRequest, ChatResponse

__all__ = ["FakeClient", "Handler"]

Handler = Callable[[ChatRequest], "ChatResponse | str | Awaitable[ChatResponse | str]"]


class FakeClient:
    """A :class:`ChatClient` whose answers come from ``handler(request)``.

    The handler returns a ``ChatResponse``, or a ``str`` (wrapped with token counts estimated at 4 characters
    a token), sync or async, and may raise ``ProviderError`` subclasses to simulate faults. ``requests``
    records every request in arrival order.
    """

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.requests: list[ChatRequest] = []
        self.closed = False

    async def chat(self, request: ChatRequest) -> ChatResponse:
        self.requests.append(request)
        result = self._handler(request)
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, ChatResponse):
            return result
        prompt = estimate_tokens(request.prompt_chars)
        return ChatResponse(result, prompt_tokens=prompt, completion_tokens=estimate_tokens(len(result)))

    async def aclose(self) -> None:
        self.closed = True
