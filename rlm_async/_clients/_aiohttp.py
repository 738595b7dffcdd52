"""The lean client, the default: ``POST /chat/completions`` on aiohttp alone.

openai-python builds an httpx request, merges headers and options, and constructs a pydantic model for every
response: 0.93 ms of CPU per call against this client's 0.38 ms and a bare aiohttp loop's 0.20 ms, for 2,000
calls at 64 in flight (docs/benchmarks.md), so a fan-out through the SDK is CPU-bound long before a 50 ms
endpoint is. This client does the same request with one ``aiohttp`` call and ``json``. It speaks only what the
engine sends (model, messages, max_tokens, stop, temperature, the sampling fields) and reads only what it
needs (the first choice's content, usage, cost); use :class:`~rlm_async.OpenAIClient` (``RLM(http="openai")``)
for what only the SDK does (Azure authentication, organisations, proxies, its typed objects). One test suite
(tests/test_clients.py) holds both to the same request, errors and usage.
"""

from __future__ import annotations

import json
import os
import platform
import ssl
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

import aiohttp
from multidict import CIMultiDict

from .._errors import (
    ConfigError,
    ProviderConnectionError,
    ProviderResponseError,
    ProviderStatusError,
    ProviderTimeoutError,
)
from ._base import ChatRequest, ChatResponse, cost_value, token_count, windows_from_models

__all__ = ["AiohttpClient"]


class AiohttpClient:
    """A :class:`ChatClient` for any OpenAI-compatible ``/chat/completions`` endpoint, on aiohttp.

    Args:
        base_url: e.g. ``"http://127.0.0.1:8000/v1"`` (``/chat/completions`` is appended).
        api_key: sent as ``Authorization: Bearer ...``; None sends none.
        timeout_s: aiohttp's total timeout per request, seconds, or None (the default) for none: inside the
            engine the scheduler's per-attempt deadline (``RetryPolicy.attempt_timeout_s``) is the one timeout.
        connections: the connection pool's size; default 0, no limit of its own (the scheduler's
            ``max_concurrency`` is the bound).
        default_headers: more headers for every request (a gateway's, OpenRouter's ``HTTP-Referer``).

    What it takes from the environment, as openai-python does: ``OPENAI_ORG_ID`` and ``OPENAI_PROJECT_ID``
    (sent as ``OpenAI-Organization`` / ``OpenAI-Project``); the proxy for ``base_url`` from ``HTTPS_PROXY`` /
    ``HTTP_PROXY`` / ``NO_PROXY``, read once here rather than per request; and for HTTPS the trust the SDK's
    transport uses: ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when set, the system's trust store through
    ``truststore`` on macOS and Windows, OpenSSL's default paths elsewhere.

    Raises (from ``chat``): ``ProviderStatusError`` (non-2xx, with headers), ``ProviderTimeoutError``,
    ``ProviderConnectionError`` (refused, reset, cut mid-body), ``ProviderResponseError`` (malformed body, no
    choices, no content), ``ConfigError`` (a request that cannot be encoded as UTF-8 JSON; nothing sent).
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float | None = None,
        connections: int = 0,
        default_headers: Mapping[str, str] | None = None,
    ) -> None:
        if not base_url:
            raise ConfigError("AiohttpClient needs a base_url")
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._models_url = base_url.rstrip("/") + "/models"
        # The session's default headers, so a request sends them without aiohttp merging a mapping of its own
        # into them (0.99 µs a request against 0.15 µs, aiohttp 3.14). Case-insensitive: a later name replaces
        # an earlier one however it is spelt, as it did when they were passed per request.
        self._headers: CIMultiDict[str] = CIMultiDict(
            {"Content-Type": "application/json", "Accept": "application/json"}
        )
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        for variable, header in (("OPENAI_ORG_ID", "OpenAI-Organization"), ("OPENAI_PROJECT_ID", "OpenAI-Project")):
            if os.environ.get(variable):
                self._headers[header] = os.environ[variable]
        for name, value in (default_headers or {}).items():
            self._headers[name] = value
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=None, sock_read=None)
        self._connections = connections
        self._proxy = proxy_for(base_url)
        self._ssl: ssl.SSLContext | bool = _ssl_context() if base_url.startswith("https:") else True
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._connections, ssl=self._ssl)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, proxy=self._proxy, headers=self._headers
            )
        return self._session

    async def chat(self, request: ChatRequest) -> ChatResponse:
        try:
            body = json.dumps(request.body(), ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ConfigError(f"the request is not valid UTF-8 text (a lone surrogate?): {exc}") from exc
        try:
            async with self._open().post(self._url, data=body) as resp:
                raw = await resp.read()
                status = resp.status
                if not 200 <= status < 300:  # the headers are copied only here: Retry-After lives in them
                    message = f"HTTP {status}: {_error_message(raw)}"
                    raise ProviderStatusError(message, status=status, headers=dict(resp.headers))
        except TimeoutError as exc:  # aiohttp's ServerTimeoutError is one too
            raise ProviderTimeoutError(f"timed out: {exc!r}") from exc
        except aiohttp.ClientError as exc:  # refused, reset, disconnected, payload cut short
            raise ProviderConnectionError(f"connection failed: {exc!r}") from exc
        try:
            data = _parse(raw)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError too
            raise ProviderResponseError(f"malformed response: {exc}") from exc
        return _response(data)

    async def context_windows(self) -> dict[str, int]:
        """Context windows (tokens) the server reports in ``GET /models``; {} when it reports none or fails."""
        try:
            async with self._open().get(self._models_url) as resp:
                if resp.status != 200:
                    return {}
                return windows_from_models(await resp.json(content_type=None))
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return {}

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def proxy_for(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``HTTPS_PROXY`` / ``HTTP_PROXY``, ``NO_PROXY``), or None."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy


def _ssl_context() -> ssl.SSLContext:
    """The trust openai-python's transport uses (see the class docstring)."""
    if os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context()  # OpenSSL reads both variables
    if platform.system() in ("Darwin", "Windows"):
        import truststore  # the SDK's transport depends on it there

        return truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    return ssl.create_default_context()


_DECODER = json.JSONDecoder()


def _parse(raw: bytes) -> Any:
    """``json.loads(raw)``, with the common case made cheaper: a body whose first byte is ``{`` and whose second
    is not NUL is one ``json.loads`` would read as UTF-8 (``json.detect_encoding``: a NUL second byte means
    UTF-16-LE or UTF-32-LE without a BOM), so it is decoded as ``json.loads`` would decode it
    (``surrogatepass``) and handed to the decoder, skipping the encoding detection and the argument checks:
    3.1 µs against 3.7 µs for a simulator response (benchmarks/micro.py). Anything else (a BOM, leading
    whitespace, UTF-16 or UTF-32) goes to ``json.loads`` itself, so the value or the error is always its.

    Raises:
        ValueError: not JSON, or not decodable (``UnicodeDecodeError`` is a ``ValueError``).
        RecursionError: nested too deep, as from ``json.loads``.
    """
    if raw[:1] == b"{" and raw[1:2] != b"\x00":
        return _DECODER.decode(raw.decode("utf-8", "surrogatepass"))
    return json.loads(raw)


def _error_message(raw: bytes) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the body's start."""
    try:
        error = json.loads(raw).get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    except (ValueError, AttributeError, RecursionError):
        pass
    return raw[:200].decode("utf-8", "replace")


def _response(data: Any) -> ChatResponse:
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise ProviderResponseError("response has no choices")
    choice: dict[str, Any] = choices[0]
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        finish = choice.get("finish_reason")
        raise ProviderResponseError(f"response has no message content (finish_reason={finish!r})")
    usage = data.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    stop = choice.get("stop_reason")
    return ChatResponse(
        text=content,
        prompt_tokens=token_count(usage.get("prompt_tokens"), "usage.prompt_tokens"),
        completion_tokens=token_count(usage.get("completion_tokens"), "usage.completion_tokens"),
        cost_usd=cost_value(usage.get("cost")),
        finish_reason=choice.get("finish_reason"),
        stop_sequence=stop if isinstance(stop, str) else None,
    )
