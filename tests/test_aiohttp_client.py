"""AiohttpClient against the simulator over real HTTP: usage, a refused connection, an unencodable prompt, and
cancellation closing the connection. Each fault's typed error is tested for both clients in test_sim."""

from __future__ import annotations

import anyio
import pytest

from rlm_async import (
    RLM,
    AiohttpClient,
    ChatRequest,
    ConfigError,
    ProviderConnectionError,
)
from rlm_async.sim import PROFILES, LatencyModel, SimConfig, SimServer

from . import test_sim
from .test_sim import req


async def one_call(sim: SimServer, request: ChatRequest | None = None):
    return await test_sim.one_call(sim, request, AiohttpClient)


async def test_a_response_with_usage_and_the_request_fields_sent():
    async with SimServer(SimConfig(latency=PROFILES["instant"])) as sim:
        response = await one_call(sim, req("Reply with the word LEAF", max_tokens=1, stop=("zzz",), temperature=0))
        stats = sim.stats()
    assert response.text and response.finish_reason in ("stop", "length")
    assert (response.prompt_tokens, response.completion_tokens) == (stats.prompt_tokens, stats.completion_tokens)
    assert response.completion_tokens <= 1


async def test_a_refused_connection_and_an_unencodable_prompt():
    async with SimServer() as sim:
        url = sim.base_url
    client = AiohttpClient(base_url=url)
    try:
        with pytest.raises(ProviderConnectionError):
            await client.chat(req())
        with pytest.raises(ConfigError, match="not valid UTF-8"):
            await client.chat(req("caf" + chr(0xDCE9)))
    finally:
        await client.aclose()


async def test_cancelling_an_attempt_closes_its_connection():
    slow = LatencyModel(ttft_s=600.0, jitter_sigma=0.0, outlier_rate=0.0)
    async with SimServer(SimConfig(latency=slow)) as sim:
        client = AiohttpClient(base_url=sim.base_url)
        try:
            with anyio.move_on_after(0.3):
                await client.chat(req())
            with anyio.fail_after(5):
                await sim.wait_idle()  # the server's handler was cancelled: it saw the connection close
        finally:
            await client.aclose()


async def test_rlm_http_aiohttp_builds_this_client():
    async with SimServer(SimConfig(latency=PROFILES["instant"])) as sim:
        rlm = RLM("sim-root", sub_model="sim-sub", base_url=sim.base_url, api_key="k", http="aiohttp")
        async with rlm:
            assert isinstance(rlm._client, AiohttpClient)
            result = await rlm.completion("Fan out 12 sub-calls", "")
    assert result.answer == "12 of 12 right"
    with pytest.raises(ConfigError):
        RLM("m", base_url="http://x", http="httpx")  # type: ignore[arg-type]
