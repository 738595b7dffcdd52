"""The OpenAI-compatible RLM server on aiohttp.web: ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /healthz``, ``GET /metrics``.

A request's last user message is the query. Its context is the ``context`` field of the body (``extra_body``
in the openai SDK) or, when absent, the earlier messages as a transcript. ``model`` names one of the served
RLMs. ``rlm_limits`` (optional) narrows the server's :class:`~rlm_async.Limits` for this request: each field is
capped by the server's. ``stream: true`` answers with server-sent ``chat.completion.chunk`` events: progress
chunks (an empty delta and an ``rlm_event`` field), then the answer, then a last chunk with the finish reason
and the tree-wide ``usage``, then ``data: [DONE]``.

Answers: 200 with the answer (``finish_reason`` ``"stop"``, or ``"length"`` for a budget or timeout stop with
the partial answer); 502 when the model endpoint failed or refused the configuration; 500 for an engine
error; 400, 401, 404, 413 for bad requests; every error in OpenAI's body shape
(``{"error": {"message", "type", "param", "code"}}``). Each body carries an ``rlm`` field with the stop
reason, run id and stats. A client that disconnects cancels its run (the server runs with handler
cancellation).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from aiohttp import web

from .._budget import Limits
from .._engine import RLM, RLMResult
from .._errors import ConfigError
from .._trace import RunEvent
from ._metrics import Metrics

__all__ = ["create_app"]

#: Events forwarded to a streaming client as progress (call-level events would be thousands per run).
PROGRESS_EVENTS = frozenset({"agent_start", "agent_end", "turn", "output", "answer", "budget_stop", "config_error"})
_LIMIT_FIELDS = {f.name for f in fields(Limits)}
_METRICS_KEY: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
_MODELS_KEY: web.AppKey[dict[str, RLM]] = web.AppKey("models", dict)


class APIError(Exception):
    """An error answered in OpenAI's body shape."""

    def __init__(self, status: int, message: str, type_: str, code: str | None = None, rlm: Any = None) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.rlm = status, type_, code, rlm

    def response(self) -> web.Response:
        body: dict[str, Any] = {"error": {"message": str(self), "type": self.type, "param": None, "code": self.code}}
        if self.rlm is not None:
            body["rlm"] = self.rlm
        return web.json_response(body, status=self.status)


def create_app(
    models: Mapping[str, RLM],
    *,
    api_key: str | None = None,
    limits: Limits | None = None,
    max_request_bytes: int = 32 * 2**20,
) -> web.Application:
    """The server as an ``aiohttp.web.Application`` (run it with ``web.run_app(..., handler_cancellation=True)``
    or ``rlm-async serve``).

    Args:
        models: model name (what clients send as ``model``) -> a configured :class:`~rlm_async.RLM` (its root
            and sub-model pair, endpoint, sandbox). Each RLM's endpoint state is shared by all its requests.
            The app closes them on cleanup.
        api_key: the bearer token clients must send (``Authorization: Bearer ...``), or None for none.
        limits: the server's caps for every request (default: each RLM's own ``limits``). A request's
            ``rlm_limits`` can only narrow them.
        max_request_bytes: the largest request body, bytes (default 32 MiB); larger: 413.

    Raises:
        ConfigError: no models.
    """
    if not models:
        raise ConfigError("serve needs at least one model")
    app = web.Application(client_max_size=max_request_bytes, middlewares=[_errors, _auth(api_key)])
    app[_MODELS_KEY] = dict(models)
    app[_METRICS_KEY] = Metrics(lambda: float(sum(rlm.endpoint.in_flight for rlm in models.values())))
    server_limits = limits

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        rlm = app[_MODELS_KEY].get(str(body.get("model")))
        if rlm is None:
            raise APIError(
                404, f"The model `{body.get('model')}` does not exist", "invalid_request_error", "model_not_found"
            )
        query, context = _query_and_context(body)
        run_limits = _request_limits(server_limits or rlm.limits, body.get("rlm_limits"))
        metrics = app[_METRICS_KEY]
        metadata = {"request_id": request.headers.get("X-Request-Id") or secrets.token_hex(8)}
        metrics.requests.inc()
        try:
            if body.get("stream"):
                return await _stream(request, rlm, body["model"], query, context, run_limits, metadata, metrics)
            result = await rlm.completion(
                query, context, limits=run_limits, on_event=metrics.observe, metadata=metadata
            )
            return _answer(body["model"], result)
        finally:
            metrics.requests.dec()

    async def list_models(request: web.Request) -> web.Response:
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "rlm-async"} for name in app[_MODELS_KEY]]
        return web.json_response({"object": "list", "data": data})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics_text(request: web.Request) -> web.Response:
        return web.Response(body=app[_METRICS_KEY].render(), content_type="text/plain", charset="utf-8")

    async def close_models(app: web.Application) -> None:
        for rlm in app[_MODELS_KEY].values():
            await rlm.aclose()

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_text)
    app.on_cleanup.append(close_models)
    return app


# -- requests --------------------------------------------------------------------------------------------
async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except web.HTTPRequestEntityTooLarge:
        raise
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the body is not valid JSON", "invalid_request_error") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", "invalid_request_error")
    return body


def _query_and_context(body: dict[str, Any]) -> tuple[str, Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise APIError(400, "messages must be a non-empty list of message objects", "invalid_request_error")
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None or not isinstance(messages[last_user].get("content"), str):
        raise APIError(
            400, "the last user message (a str content) is the query; there is none", "invalid_request_error"
        )
    query = messages[last_user]["content"]
    if "context" in body:
        return query, body["context"]
    earlier = messages[:last_user]
    return query, "\n\n".join(f"{m.get('role')}: {m.get('content')}" for m in earlier)


def _request_limits(server: Limits, requested: Any) -> Limits:
    """The server's limits, narrowed by a request's ``rlm_limits`` (each field capped by the server's)."""
    if requested is None:
        return server
    if not isinstance(requested, dict) or set(requested) - _LIMIT_FIELDS:
        unknown = sorted(set(requested) - _LIMIT_FIELDS) if isinstance(requested, dict) else requested
        raise APIError(400, f"rlm_limits: unknown fields {unknown}", "invalid_request_error")
    merged = server.describe()
    for name, value in requested.items():
        cap = merged[name]
        merged[name] = value if cap is None or not isinstance(value, int | float) else min(value, cap)
    try:
        return Limits(**merged)
    except ConfigError as exc:
        raise APIError(400, f"rlm_limits: {exc}", "invalid_request_error") from None


# -- answers ---------------------------------------------------------------------------------------------
def _rlm_info(result: RLMResult) -> dict[str, Any]:
    s = result.stats
    return {
        "stop_reason": result.stop_reason,
        "run_id": result.run_id,
        "error": None if result.error is None else str(result.error),
        "stats": {"wall_s": s.wall_s, "calls": s.calls, "agents": s.agents, "peak_in_flight": s.peak_in_flight},
        "cost_usd": result.usage.cost_usd,
    }


def _usage(result: RLMResult) -> dict[str, int]:
    u = result.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total.total_tokens,
    }


def _finish_reason(result: RLMResult) -> str:
    """``"stop"`` for an answer (an empty one too: ``rlm.stop_reason`` says ``"empty_answer"``), ``"length"``
    for a budget or timeout stop; raises APIError otherwise."""
    if result.ok or result.stop_reason == "empty_answer":
        return "stop"
    if result.stop_reason.startswith("budget:") or result.stop_reason == "timeout":
        return "length"
    if result.stop_reason in ("llm_error", "config_error"):
        raise APIError(
            502, f"the model endpoint failed: {result.error}", "upstream_error", result.stop_reason, _rlm_info(result)
        )
    raise APIError(500, f"the run failed: {result.error}", "server_error", result.stop_reason, _rlm_info(result))


def _answer(model: str, result: RLMResult) -> web.Response:
    finish = _finish_reason(result)
    message = {"role": "assistant", "content": result.answer}
    return web.json_response(
        {
            "id": f"chatcmpl-{result.run_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": _usage(result),
            "rlm": _rlm_info(result),
        }
    )


async def _stream(
    request: web.Request,
    rlm: RLM,
    model: str,
    query: str,
    context: Any,
    limits: Limits,
    metadata: dict[str, Any],
    metrics: Metrics,
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    chunk_id, created = f"chatcmpl-{secrets.token_hex(6)}", int(time.time())

    async def send(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> None:
        chunk = {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            **extra,
        }
        await response.write(f"data: {json.dumps(chunk, default=str)}\n\n".encode())

    await send({"role": "assistant", "content": ""})
    async for item in rlm.stream(query, context, limits=limits, on_event=metrics.observe, metadata=metadata):
        if isinstance(item, RunEvent):
            if item.event in PROGRESS_EVENTS:
                data = {k: (v[:1000] if isinstance(v, str) else v) for k, v in item.data.items()}
                event = {"event": item.event, "t": item.t, "agent_id": item.agent_id, "depth": item.depth, **data}
                await send({}, rlm_event=event)
            continue
        try:
            finish = _finish_reason(item)
        except APIError as exc:
            error = {"message": str(exc), "type": exc.type, "param": None, "code": exc.code}
            await response.write(f"data: {json.dumps({'error': error, 'rlm': exc.rlm})}\n\n".encode())
            break
        await send({"content": item.answer})
        await send({}, finish, usage=_usage(item), rlm=_rlm_info(item))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


# -- middlewares -----------------------------------------------------------------------------------------
@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except APIError as exc:
        return exc.response()
    except web.HTTPException as exc:
        type_ = "invalid_request_error" if exc.status < 500 else "server_error"
        code = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}.get(exc.status)
        return APIError(exc.status, exc.reason, type_, code).response()


def _auth(api_key: str | None) -> Any:
    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        if api_key is not None and request.path != "/healthz":
            given = request.headers.get("Authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise APIError(
                    401,
                    "missing or wrong API key (Authorization: Bearer ...)",
                    "invalid_request_error",
                    "invalid_api_key",
                )
        return await handler(request)  # type: ignore[no-any-return]

    return check
