"""``rlm-async serve``: RLMs behind an OpenAI-compatible HTTP API (aiohttp.web), for services in any language.

:func:`create_app` builds the ``aiohttp.web.Application``; :func:`run` serves it with graceful shutdown.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Coroutine, Mapping
from typing import Any

from aiohttp import web

from .._engine import RLM
from .._errors import ConfigError
from .._listen import LISTEN_BACKLOG
from ._app import create_app

__all__ = ["create_app", "is_loopback", "run"]


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(
    models: Mapping[str, RLM],
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    api_key: str | None = None,
    shutdown_timeout_s: float = 30.0,
    max_request_bytes: int = 32 * 2**20,
) -> None:
    """Serve until SIGINT or SIGTERM; then stop accepting, let running completions finish for up to
    ``shutdown_timeout_s`` seconds, cancel the rest, and close the RLMs.

    Raises:
        ConfigError: no ``api_key`` with a ``host`` that is not loopback (an open RLM would spend your
            provider budget for anyone who finds it).
    """
    refuse_open_exposure(host, api_key)
    serve_app(create_app(models, api_key=api_key, max_request_bytes=max_request_bytes), host, port, shutdown_timeout_s)


def refuse_open_exposure(host: str, api_key: str | None) -> None:
    """Refuse to serve without an API key anywhere but loopback (``run`` and ``rlm-async serve`` both ask).

    Raises:
        ConfigError: ``api_key`` is None and ``host`` is not loopback.
    """
    if api_key is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve on {host} without an API key: pass --api-key or set RLM_ASYNC_SERVE_API_KEY"
        )


def serve_app(
    app: web.Application | Coroutine[Any, Any, web.Application], host: str, port: int, shutdown_timeout_s: float
) -> None:
    """Serve ``app`` (or the application a coroutine builds on the server's loop) until SIGINT or SIGTERM:
    handlers are cancelled when their client hangs up, running requests get ``shutdown_timeout_s`` seconds
    to finish, and the accept queue holds :data:`~rlm_async._listen.LISTEN_BACKLOG` connections."""
    web.run_app(
        app,
        host=host,
        port=port,
        shutdown_timeout=shutdown_timeout_s,
        handler_cancellation=True,
        backlog=LISTEN_BACKLOG,
        print=None,
    )
