"""One suite, both clients: the lean AiohttpClient (the default) and the OpenAI SDK client (``http="openai"``)
must send the same request and give the same responses, usage and typed errors, against a real HTTP server
on 127.0.0.1 and against the simulator's faults. Every test here runs once per client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest
from aiohttp import web

from rlm_async import (
    RLM,
    AiohttpClient,
    ChatRequest,
    ConfigError,
    Limits,
    LLMCallError,
    OpenAIClient,
    ProviderConnectionError,
    ProviderResponseError,
    ProviderStatusError,
    RetryPolicy,
)
from rlm_async._budget import Ledger
from rlm_async._scheduler import Scheduler
from rlm_async._trace import Tracer
from rlm_async.sim import PROFILES, FaultPlan, SimConfig, SimServer

from .conftest import repl

CLIENTS = {"aiohttp": AiohttpClient, "openai": OpenAIClient}


@pytest.fixture(params=list(CLIENTS))
def http(request: pytest.FixtureRequest) -> str:
    """The client under test, by its ``RLM(http=...)`` name."""
    return str(request.param)


def make(http: str, url: str, api_key: str = "k") -> AiohttpClient | OpenAIClient:
    return CLIENTS[http](base_url=url, api_key=api_key)


def completion(text: str | None, prompt_tokens: int = 11, completion_tokens: int = 3, **usage_extra) -> dict:
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
        self.handler: Callable[[web.Request, dict], Any] | None = None
        self.requests: list[dict] = []
        self.headers: list[Any] = []
        self.models: dict = {"object": "list", "data": []}
        self.url = ""

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(request.headers.copy())  # case-insensitive, as HTTP headers are
        assert self.handler is not None
        return await self.handler(request, body)

    async def list_models(self, request: web.Request) -> web.StreamResponse:
        self.headers.append(request.headers.copy())
        return web.json_response(self.models)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", srv.chat)
    app.router.add_get("/v1/models", srv.list_models)
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


def request(text: str = "hello", **kwargs: Any) -> ChatRequest:
    kwargs.setdefault("max_tokens", 5)
    kwargs.setdefault("stop", ("STOP",))
    return ChatRequest("m", ({"role": "user", "content": text},), **kwargs)


async def one(http: str, url: str, req: ChatRequest | None = None):
    client = make(http, url)
    try:
        return await client.chat(req or request())
    finally:
        await client.aclose()


# -- the request and the response ------------------------------------------------------------------------
async def test_success_maps_text_usage_cost_and_finish_reason(server, http):
    async def ok(req, body):
        return web.json_response(completion(f"echo {body['messages'][0]['content']}", cost=0.25))

    server.handler = ok
    response = await one(http, server.url)
    assert (response.text, response.prompt_tokens, response.completion_tokens) == ("echo hello", 11, 3)
    assert response.cost_usd == 0.25 and response.finish_reason == "stop"


async def test_usage_sent_as_text_digits_or_whole_floats_is_read_and_a_non_number_cost_ignored(server, http):
    async def ok(req, body):
        data = completion("x")
        data["usage"] = {"prompt_tokens": "11", "completion_tokens": 3.0, "cost": "n/a"}
        return web.json_response(data)

    server.handler = ok
    response = await one(http, server.url)
    assert (response.prompt_tokens, response.completion_tokens, response.cost_usd) == (11, 3, None)


async def test_both_clients_send_the_same_body_and_authorization(server):
    async def ok(req, body):
        return web.json_response(completion("x"))

    server.handler = ok
    sent = request("héllo ✓", temperature=0.0, sampling={"top_p": 0.9, "seed": 7, "top_k": 20})
    for http in CLIENTS:
        await one(http, server.url, sent)
    assert server.requests[0] == server.requests[1] == sent.body()
    assert server.requests[0]["messages"][0]["content"] == "héllo ✓"
    assert {h["Authorization"] for h in server.headers} == {"Bearer k"}
    assert {h["Content-Type"] for h in server.headers} == {"application/json"}


@pytest.mark.parametrize(
    ("respond", "error", "status"),
    [
        (
            lambda: web.json_response({"error": {"message": "slow"}}, status=429, headers={"retry-after-ms": "20"}),
            ProviderStatusError,
            429,
        ),
        (lambda: web.json_response({"error": {"message": "boom"}}, status=500), ProviderStatusError, 500),
        (lambda: web.json_response({"error": {"message": "no key"}}, status=401), ProviderStatusError, 401),
        (lambda: web.Response(body=b'{"id": "x", "choi', content_type="application/json"), ProviderResponseError, None),
        (lambda: web.json_response({**completion("x"), "choices": []}), ProviderResponseError, None),
        (lambda: web.json_response(completion(None)), ProviderResponseError, None),
        (  # nested past the JSON decoder's recursion limit: was a bare RecursionError out of chat()
            lambda: web.Response(
                body=b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", content_type="application/json"
            ),
            ProviderResponseError,
            None,
        ),
        (  # usage that is not a number: was a bare ValueError out of chat()
            lambda: web.json_response({**completion("x"), "usage": {"prompt_tokens": "many", "completion_tokens": 3}}),
            ProviderResponseError,
            None,
        ),
        (  # a negative count would lower what the budgets see as spent
            lambda: web.json_response(completion("x", prompt_tokens=-1000)),
            ProviderResponseError,
            None,
        ),
        (  # so would a negative cost
            lambda: web.json_response(completion("x", cost=-5.0)),
            ProviderResponseError,
            None,
        ),
        (  # the SDK client let AttributeError out of chat()
            lambda: web.json_response({**completion("x"), "choices": [1]}),
            ProviderResponseError,
            None,
        ),
        (  # the SDK client took 5 as the text
            lambda: web.json_response(
                {**completion("x"), "choices": [{"index": 0, "message": {"content": 5}, "finish_reason": "stop"}]}
            ),
            ProviderResponseError,
            None,
        ),
    ],
    ids=[
        "429",
        "500",
        "401",
        "truncated",
        "no_choices",
        "null_content",
        "nested_too_deep",
        "usage_not_a_number",
        "usage_negative",
        "cost_negative",
        "choice_not_an_object",
        "content_not_text",
    ],
)
async def test_failures_map_to_the_same_provider_errors(server, http, respond, error, status):
    async def handler(req, body):
        return respond()

    server.handler = handler
    with pytest.raises(error) as info:
        await one(http, server.url)
    assert info.value.status == status
    if status is not None:
        assert str(info.value).startswith(f"HTTP {status}")
    if status == 429:
        assert info.value.headers["retry-after-ms"] == "20"
    assert len(server.requests) == 1  # neither client retries on its own


async def test_a_connection_reset_is_a_connection_error(server, http):
    async def reset(req, body):
        req.transport.close()
        return web.Response()

    server.handler = reset
    with pytest.raises(ProviderConnectionError):
        await one(http, server.url)


async def test_a_refused_connection_and_an_unencodable_prompt(http):
    async with SimServer() as sim:
        url = sim.base_url
    client = make(http, url)
    try:
        with pytest.raises(ProviderConnectionError):
            await client.chat(request())
        with pytest.raises(ConfigError, match="not valid UTF-8"):
            await client.chat(request("caf" + chr(0xDCE9)))
    finally:
        await client.aclose()


async def test_cancelling_a_call_closes_its_connection(server, http):
    arrived, cancelled = anyio.Event(), anyio.Event()

    async def hang(req, body):
        arrived.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()  # aiohttp cancels the handler when the client drops the connection

    server.handler = hang
    client = make(http, server.url)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.chat, request())
            await arrived.wait()
            tg.cancel_scope.cancel()
        with anyio.fail_after(5):
            await cancelled.wait()
    finally:
        await client.aclose()


async def test_context_windows_from_get_models(server, http):
    server.models = {
        "object": "list",
        "data": [
            {"id": "vllm-model", "max_model_len": 32768},
            {"id": "llama", "meta": {"n_ctx": 8192}},
            {"id": "router", "context_length": 128000},
            {"id": "silent"},
        ],
    }
    client = make(http, server.url)
    try:
        assert await client.context_windows() == {"vllm-model": 32768, "llama": 8192, "router": 128000}
    finally:
        await client.aclose()


# -- the simulator's faults -------------------------------------------------------------------------------
#: The typed error each simulated fault becomes, whichever client made the attempt.
FAULT_ERRORS = [
    ("429", ProviderStatusError),
    ("500", ProviderStatusError),
    ("503", ProviderStatusError),
    ("reset", ProviderConnectionError),
    ("truncated", ProviderResponseError),
    ("empty", ProviderResponseError),
    ("reset_body", ProviderConnectionError),
]


@pytest.mark.parametrize(("kind", "error"), FAULT_ERRORS)
async def test_each_simulated_fault_is_the_same_typed_error(http, kind, error):
    config = SimConfig(latency=PROFILES["instant"], faults=FaultPlan({kind: 1.0}, retry_after_s=2.0), time_scale=0.5)
    async with SimServer(config) as sim:
        with pytest.raises(error) as info:
            await one(http, sim.base_url, ChatRequest("sim-sub", ({"role": "user", "content": "hello there"},)))
        assert sim.stats().faults == {kind: 1}
    if kind == "429":
        assert info.value.headers["retry-after-ms"] == "1000.0" and info.value.headers["retry-after"] == "1"
        assert info.value.status == 429 and "simulated rate limit" in str(info.value)
    if kind in ("500", "503"):
        assert info.value.status == int(kind)


async def test_a_hang_is_timed_out_by_the_scheduler_alone_and_its_connection_closed(http):
    """The clients carry no timeout of their own: the scheduler's attempt deadline is the one that fires."""
    config = SimConfig(latency=PROFILES["instant"], faults=FaultPlan({"hang": 1.0}))
    async with SimServer(config) as sim:
        client = make(http, sim.base_url)
        retry = RetryPolicy(max_retries=1, attempt_timeout_s=0.2, initial_backoff_s=0.01)
        sched = Scheduler(client, Ledger(Limits()), Tracer(), max_concurrency=2, retry=retry)
        try:
            with pytest.raises(LLMCallError) as info:
                await sched.call(ChatRequest("sim-sub", ({"role": "user", "content": "hi"},)), depth=0, agent_id="0")
        finally:
            await client.aclose()
        assert info.value.kind == "timeout" and info.value.attempts == 2
        with anyio.fail_after(5):
            await sim.wait_idle()  # aiohttp cancels a handler when its client drops the connection
        assert sim.stats().faults == {"hang": 2}


# -- inside the engine -------------------------------------------------------------------------------------
async def test_rlm_builds_the_client_http_names_and_aiohttp_by_default():
    async with SimServer(SimConfig(latency=PROFILES["instant"])) as sim:
        for http, cls in [(None, AiohttpClient), ("aiohttp", AiohttpClient), ("openai", OpenAIClient)]:
            kwargs = {} if http is None else {"http": http}
            async with RLM("sim-root", sub_model="sim-sub", base_url=sim.base_url, api_key="k", **kwargs) as rlm:
                assert type(rlm._client) is cls
                result = await rlm.completion("Fan out 12 sub-calls", "")
            assert result.answer == "12 of 12 right"
    with pytest.raises(ConfigError):
        RLM("m", base_url="http://x", http="httpx")  # type: ignore[arg-type]


async def test_the_engine_over_http_retries_a_429_and_counts_usage_exactly(server, http):
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
        "root", base_url=server.url, api_key="k", http=http, limits=Limits(max_concurrency=4),
        retry=RetryPolicy(max_retries=2),
    ) as rlm:  # fmt: skip
        result = await rlm.completion("q", "ctx")
    assert result.answer == "ok" and result.stats.retries == 1
    assert result.usage.calls == len(served) == 10
    assert result.usage.prompt_tokens == sum(u["prompt_tokens"] for u in served)
    assert result.usage.completion_tokens == sum(u["completion_tokens"] for u in served)


async def test_the_lean_client_takes_org_project_and_extra_headers_as_the_sdk_does(server, monkeypatch):
    async def ok(req, body):
        return web.json_response(completion("x"))

    server.handler = ok
    monkeypatch.setenv("OPENAI_ORG_ID", "org-1")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-2")
    for http in CLIENTS:
        await one(http, server.url)
    extra = {"X-Title": "rlm", "authorization": "Bearer gateway"}  # a header named again, in other case
    client = AiohttpClient(base_url=server.url, api_key="k", default_headers=extra)
    try:
        await client.chat(request())
        assert await client.context_windows() == {}  # GET /models sends them too
    finally:
        await client.aclose()
    for headers in server.headers:
        assert (headers["OpenAI-Organization"], headers["OpenAI-Project"]) == ("org-1", "proj-2")
    for headers in server.headers[-2:]:
        assert headers["X-Title"] == "rlm"
        assert headers.getall("Authorization") == ["Bearer gateway"]  # the later one replaces, once


def test_the_lean_client_reads_the_proxy_from_the_environment_once(monkeypatch):
    from rlm_async._clients._aiohttp import proxy_for

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    assert proxy_for("https://api.openai.com/v1") == "http://proxy.internal:3128"
    assert proxy_for("http://127.0.0.1:8000/v1") is None
    assert AiohttpClient(base_url="https://api.openai.com/v1")._proxy == "http://proxy.internal:3128"
