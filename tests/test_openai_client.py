"""The OpenAI SDK client (aiohttp transport) against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import anyio
import pytest
from aiohttp import web

from rlm_async import (
    RLM,
    ChatRequest,
    Limits,
    OpenAIClient,
    ProviderConnectionError,
    ProviderResponseError,
    ProviderStatusError,
    RetryPolicy,
)

from .conftest import repl

Handler = Callable[[web.Request], "web.StreamResponse"]


def completion(text: str, prompt_tokens: int = 11, completion_tokens: int = 3, **usage_extra) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            **usage_extra,
        },
    }


class Server:
    """A chat-completions endpoint on 127.0.0.1 whose behaviour a test sets per request."""

    def __init__(self) -> None:
        self.handler: Callable[[web.Request, dict], web.StreamResponse] | None = None
        self.requests: list[dict] = []
        self.cancelled = anyio.Event()
        self.url = ""

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        assert self.handler is not None
        return await self.handler(request, body)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", srv.chat)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    srv.url = f"http://127.0.0.1:{port}/v1"
    try:
        yield srv
    finally:
        await runner.cleanup()


def request(text: str = "hello") -> ChatRequest:
    return ChatRequest("m", ({"role": "user", "content": text},), max_tokens=5, stop=("STOP",))


async def test_success_maps_text_usage_and_cost(server):
    async def ok(req, body):
        return web.json_response(completion(f"echo {body['messages'][0]['content']}", cost=0.25))

    server.handler = ok
    client = OpenAIClient(base_url=server.url, api_key="k")
    try:
        response = await client.chat(request())
    finally:
        await client.aclose()
    assert (response.text, response.prompt_tokens, response.completion_tokens) == ("echo hello", 11, 3)
    assert response.cost_usd == 0.25 and response.finish_reason == "stop"
    sent = server.requests[0]
    assert sent["max_tokens"] == 5 and sent["stop"] == ["STOP"] and sent["model"] == "m"


@pytest.mark.parametrize(
    ("respond", "error", "status"),
    [
        (
            lambda: web.json_response({"error": {"message": "slow"}}, status=429, headers={"retry-after-ms": "20"}),
            ProviderStatusError,
            429,
        ),
        (lambda: web.json_response({"error": {"message": "boom"}}, status=500), ProviderStatusError, 500),
        (lambda: web.Response(body=b'{"id": "x", "choi', content_type="application/json"), ProviderResponseError, None),
        (lambda: web.json_response({**completion("x"), "choices": []}), ProviderResponseError, None),
    ],
)
async def test_failures_map_to_provider_errors(server, respond, error, status):
    async def handler(req, body):
        return respond()

    server.handler = handler
    client = OpenAIClient(base_url=server.url, api_key="k")
    try:
        with pytest.raises(error) as info:
            await client.chat(request())
    finally:
        await client.aclose()
    assert info.value.status == status
    if status == 429:
        assert info.value.headers["retry-after-ms"] == "20"
    assert len(server.requests) == 1  # the SDK made no retry of its own


async def test_connection_reset_is_a_connection_error(server):
    async def reset(req, body):
        req.transport.close()
        return web.Response()

    server.handler = reset
    client = OpenAIClient(base_url=server.url, api_key="k")
    try:
        with pytest.raises(ProviderConnectionError):
            await client.chat(request())
    finally:
        await client.aclose()


async def test_cancelling_a_call_closes_its_connection(server):
    arrived = anyio.Event()

    async def hang(req, body):
        arrived.set()
        try:
            await anyio.sleep_forever()
        finally:
            server.cancelled.set()  # aiohttp cancels the handler when the client drops the connection

    server.handler = hang
    client = OpenAIClient(base_url=server.url, api_key="k")
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.chat, request())
            await arrived.wait()
            tg.cancel_scope.cancel()
        with anyio.fail_after(5):
            await server.cancelled.wait()
    finally:
        await client.aclose()


async def test_the_engine_over_http_retries_429_and_counts_usage(server):
    """A whole run over real HTTP: root turns, a fanned-out batch, one 429 with Retry-After, exact usage."""
    served: list[dict] = []
    limited_once = False

    async def handler(req, body):
        nonlocal limited_once
        messages = body["messages"]
        if messages[0]["role"] == "system":
            turn = sum(m["role"] == "assistant" for m in messages)
            text = [repl("r = await llm_batch([f'n{i}' for i in range(8)])\nprint(r)"), repl("FINAL('ok')")][turn]
        else:
            if not limited_once:
                limited_once = True
                return web.json_response({"error": {"message": "slow"}}, status=429, headers={"retry-after-ms": "10"})
            text = messages[0]["content"].upper()
        reply = completion(text, prompt_tokens=len(json.dumps(messages)), completion_tokens=len(text))
        served.append(reply["usage"])
        return web.json_response(reply)

    server.handler = handler
    async with RLM(
        "root", base_url=server.url, api_key="k", limits=Limits(max_concurrency=4), retry=RetryPolicy(max_retries=2)
    ) as rlm:
        result = await rlm.completion("q", "ctx")
    assert result.answer == "ok" and result.stats.retries == 1
    assert result.usage.calls == len(served) == 10
    assert result.usage.prompt_tokens == sum(u["prompt_tokens"] for u in served)
    assert result.usage.completion_tokens == sum(u["completion_tokens"] for u in served)
