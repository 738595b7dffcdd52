"""rlm-async serve: the real openai SDK against the server, backed by RLMs over the simulator."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import sys

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from rlm_async import RLM, ConfigError, Limits, RateLimit
from rlm_async._listen import LISTEN_BACKLOG
from rlm_async.cli import main as cli_main
from rlm_async.serve import create_app, run
from rlm_async.sim import PROFILES, SimConfig, SimServer

from .conftest import worker_processes

KEY = "serve-test-key"
NOTES = "\n".join(f"line {i}: the quick brown fox" for i in range(300))


@pytest.fixture
async def sim():
    async with SimServer(SimConfig(latency=PROFILES["instant"])) as server:
        yield server


async def serving(sim: SimServer, **rlm_kwargs):
    rlm = RLM("sim-root", sub_model="sim-sub", base_url=sim.base_url, api_key="sim", http="aiohttp", **rlm_kwargs)
    server = TestServer(create_app({"rlm": rlm}, api_key=KEY), host="127.0.0.1")
    await server.start_server()
    return server, rlm


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def sdk(server: TestServer, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=key, max_retries=0)


async def test_the_openai_sdk_gets_an_answer_with_tree_wide_usage(sim):
    server, _ = await serving(sim)
    client = sdk(server)
    try:
        reply = await client.chat.completions.create(
            model="rlm", messages=[{"role": "user", "content": "Summarise these notes"}], extra_body={"context": NOTES}
        )
        models = await client.models.list()
    finally:
        await client.close()
        await server.close()
    assert reply.choices[0].message.content.endswith("chunks noted")
    assert reply.choices[0].finish_reason == "stop"
    stats = sim.stats()
    assert reply.usage.prompt_tokens == stats.prompt_tokens  # every call of the tree, root turns included
    assert reply.usage.completion_tokens == stats.completion_tokens
    assert reply.model_extra["rlm"]["stop_reason"] == "answer"
    assert [m.id for m in models.data] == ["rlm"]


async def test_streaming_sends_progress_then_the_answer_then_usage(sim):
    server, _ = await serving(sim)
    client = sdk(server)
    try:
        stream = await client.chat.completions.create(
            model="rlm",
            messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "Summarise these notes"}],
            extra_body={"context": NOTES},
            stream=True,
        )
        chunks = [chunk async for chunk in stream]
    finally:
        await client.close()
        await server.close()
    events = [c.model_extra["rlm_event"]["event"] for c in chunks if (c.model_extra or {}).get("rlm_event")]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert events[0] == "agent_start" and "turn" in events and "answer" in events
    assert text.endswith("chunks noted")
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].usage.total_tokens > 0


async def test_the_context_defaults_to_the_earlier_messages(sim):
    server, _ = await serving(sim)
    client = sdk(server)
    try:
        reply = await client.chat.completions.create(
            model="rlm",
            messages=[{"role": "user", "content": NOTES}, {"role": "assistant", "content": "ok"},
                      {"role": "user", "content": "Summarise"}],
        )  # fmt: skip
    finally:
        await client.close()
        await server.close()
    assert reply.choices[0].message.content.endswith("chunks noted")


async def test_auth_errors_and_limits_are_openai_style(sim):
    server, _ = await serving(sim)
    anonymous, client = sdk(server, key="wrong"), sdk(server)
    try:
        with pytest.raises(openai.AuthenticationError) as denied:
            await anonymous.chat.completions.create(model="rlm", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="rlm", messages=[{"role": "assistant", "content": "hi"}])
        capped = await client.chat.completions.create(
            model="rlm",
            messages=[{"role": "user", "content": "Summarise these notes"}],
            extra_body={"context": NOTES, "rlm_limits": {"max_calls": 2, "max_concurrency": 10_000}},
        )
        async with aiohttp.ClientSession() as http:
            health = await http.get(server.make_url("/healthz"))  # no key needed
            too_big = await http.post(
                server.make_url("/v1/chat/completions"), data=io.BytesIO(b"x" * (33 * 2**20)),
                headers={"Authorization": f"Bearer {KEY}"},
            )  # fmt: skip
            too_big_body = await too_big.json()
    finally:
        await anonymous.close()
        await client.close()
        await server.close()
    assert denied.value.status_code == 401 and denied.value.code == "invalid_api_key"
    assert unknown.value.code == "model_not_found"
    assert capped.choices[0].finish_reason == "length"
    assert capped.model_extra["rlm"]["stop_reason"] == "budget:max_calls"
    assert health.status == 200
    assert too_big.status == 413 and too_big_body["error"]["code"] == "request_too_large"


def test_no_key_means_loopback_only(monkeypatch, capsys):
    rlm = RLM("m", base_url="http://127.0.0.1:9/v1", api_key="x")
    with pytest.raises(ConfigError, match="without an API key"):
        run({"rlm": rlm}, host="0.0.0.0")
    monkeypatch.delenv("RLM_ASYNC_SERVE_API_KEY", raising=False)
    assert cli_main(["serve", "--sim", "--host", "0.0.0.0"]) == 2  # the command asks the same question
    assert "without an API key" in capsys.readouterr().err


async def test_two_hundred_concurrent_requests_share_the_endpoints_cap_and_rpm():
    """200 requests at once through one server: the simulator, limited to 120 requests a (scaled) minute of
    0.6 s, never has to answer 429, and never sees more than the cap of 8 in flight."""
    minute = 0.6
    sim = SimServer(SimConfig(latency=PROFILES["instant"], rpm=120, time_scale=minute / 60))
    await sim.start()
    limits = {"sim-root": RateLimit(rpm=30, period_s=minute), "sim-sub": RateLimit(rpm=70, period_s=minute)}
    server, _ = await serving(sim, limits=Limits(max_concurrency=8), rate_limits=limits)
    client = sdk(server)
    fds_before = len(os.listdir("/proc/self/fd"))
    try:

        async def one(i: int) -> str:
            reply = await client.chat.completions.create(
                model="rlm", messages=[{"role": "user", "content": "Summarise"}], extra_body={"context": f"doc {i}"}
            )
            return reply.choices[0].message.content

        answers = list(await asyncio.gather(*(one(i) for i in range(100))))
        rss_warm, fds_warm = rss_mb(), len(os.listdir("/proc/self/fd"))
        answers += await asyncio.gather(*(one(i) for i in range(100, 200)))
        rss_end, fds_end = rss_mb(), len(os.listdir("/proc/self/fd"))
        async with aiohttp.ClientSession() as http:
            text = await (
                await http.get(server.make_url("/metrics"), headers={"Authorization": f"Bearer {KEY}"})
            ).text()
    finally:
        await client.close()
        await server.close()
        stats = sim.stats()
        await sim.stop()
    assert len(answers) == 200 and all(a.endswith("chunks noted") for a in answers)
    assert stats.peak_in_flight <= 8  # the cap held across 200 runs, at the endpoint
    assert stats.faults.get("rate_limit", 0) == 0 and stats.requests == stats.completed  # and so did RPM
    metrics = {
        s.name + str(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples
    }
    assert metrics["rlm_runs_total[('stop_reason', 'answer')]"] == 200
    assert metrics["rlm_requests_in_progress[]"] == 0 and metrics["rlm_calls_in_flight[]"] == 0
    assert metrics["rlm_calls_total[]"] == stats.completed
    assert metrics["rlm_tokens_total[('type', 'prompt')]"] == stats.prompt_tokens
    # File descriptors flat over the load: after the first 100 requests both sides of the SDK's keep-alive
    # pool are open (about 2 x 100 sockets, server and client in this process); the next 100 reuse them.
    assert fds_end <= fds_warm + 16, (fds_before, fds_warm, fds_end)
    assert rss_end < rss_warm * 1.2, (rss_warm, rss_end)  # and memory
    assert worker_processes(grace_s=5) == []


async def test_a_client_that_disconnects_cancels_its_run():
    started = asyncio.Event()
    async with SimServer(SimConfig(latency=PROFILES["instant"])) as slow_sim:
        server, rlm = await serving(slow_sim, limits=Limits(cell_timeout_s=None))

        original = rlm.completion

        async def watched(*args, **kwargs):
            started.set()
            return await original(*args, **kwargs)

        rlm.completion = watched  # type: ignore[method-assign]
        body = {"model": "rlm", "messages": [{"role": "user", "content": "Summarise"}], "context": "x" * 10}
        async with aiohttp.ClientSession() as http:
            request = asyncio.ensure_future(
                http.post(
                    server.make_url("/v1/chat/completions"), json=body, headers={"Authorization": f"Bearer {KEY}"}
                )
            )
            await started.wait()
            request.cancel()  # the client hangs up mid-run
            with pytest.raises(asyncio.CancelledError):
                await request
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                text = await (
                    await http.get(server.make_url("/metrics"), headers={"Authorization": f"Bearer {KEY}"})
                ).text()
                if "rlm_requests_in_progress 0.0" in text:
                    break
                await asyncio.sleep(0.05)
        await server.close()
    assert "rlm_requests_in_progress 0.0" in text
    assert rlm.endpoint.in_flight == 0
    assert worker_processes(grace_s=5) == []


def test_both_servers_listen_with_a_deep_accept_queue(monkeypatch):
    """``serve.run`` and ``rlm-async serve`` ask ``listen(2)`` for LISTEN_BACKLOG, not aiohttp's 128: a burst
    of new clients past 128 had its SYNs dropped and waited 1 s each (tests/test_sim.py proves the effect)."""
    calls: list[dict] = []

    def fake_run_app(app, **kwargs):
        if asyncio.iscoroutine(app):
            app.close()
        calls.append(kwargs)

    monkeypatch.setattr(web, "run_app", fake_run_app)
    run({"rlm": RLM("sim-root", base_url="http://127.0.0.1:9/v1", api_key="unused")})  # never connects
    assert cli_main(["serve", "--sim", "--port", "0"]) == 0
    assert [kwargs["backlog"] for kwargs in calls] == [LISTEN_BACKLOG, LISTEN_BACKLOG]


async def test_sigterm_lets_running_requests_finish_then_exits():
    """The CLI server: SIGTERM while a request is running; the request still gets its answer, then the
    server exits by itself."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rlm_async.cli", "serve", "--sim", "--port", str(port), "--api-key", KEY,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(600):  # wait for it to listen
                try:
                    await http.get(f"{base}/healthz")
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            body = {"model": "rlm", "messages": [{"role": "user", "content": "Summarise"}], "context": NOTES * 20}
            request = asyncio.ensure_future(http.post(f"{base}/v1/chat/completions", json=body, headers=auth))
            for _ in range(600):
                text = await (await http.get(f"{base}/metrics", headers=auth)).text()
                if "rlm_requests_in_progress 1.0" in text:
                    break
                await asyncio.sleep(0.02)
            assert "rlm_requests_in_progress 1.0" in text  # the request is running as the signal comes
            proc.send_signal(signal.SIGTERM)
            response = await request
            reply = await response.json()
        assert response.status == 200 and reply["choices"][0]["message"]["content"].endswith("chunks noted")
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
