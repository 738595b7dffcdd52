"""The simulated OpenAI-compatible server (aiohttp.web): latency, capacity, rate limits, faults, usage.

It simulates latency, load and faults, not intelligence: content comes from a pluggable responder.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hashlib
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web

from .._errors import ConfigError
from .._listen import LISTEN_BACKLOG
from ._faults import FaultPlan
from ._latency import PROFILES, LatencyModel
from ._responders import Responder, SimResponder
from ._tokens import token_counter

__all__ = ["SimConfig", "SimServer", "SimStats"]


@dataclass(frozen=True, slots=True)
class SimConfig:
    """How the simulated provider behaves.

    Attributes:
        latency: the latency model (see ``PROFILES``: ``fast``, ``reasoning``, ``instant``).
        time_scale: every simulated duration (latency, Retry-After, rate-limit windows) is multiplied by this;
            0.01 runs a 1 s request in 10 ms. Usage and fault decisions do not change with it.
        capacity: requests served at once; more wait in a queue, as on vLLM with ``max_num_seqs``.
        faults: fault rates.
        rpm: requests per minute before a 429 (a token bucket of one minute's worth, refilled continuously;
            the minute is scaled), or None.
        tpm: prompt tokens per minute before a 429 (the same kind of bucket), or None.
        seed: makes jitter, outliers and faults reproducible. Each request's draws depend on the seed, its
            body and how many identical bodies came before it, not on arrival order.
        models: model names served by ``/v1/models``.
        strict_models: answer a request for a model not in ``models`` with 404 ``model_not_found``, as
            OpenAI does; by default any model name is served.
    """

    latency: LatencyModel = field(default_factory=lambda: PROFILES["fast"])
    time_scale: float = 1.0
    capacity: int = 256
    faults: FaultPlan = field(default_factory=FaultPlan)
    rpm: float | None = None
    tpm: float | None = None
    seed: int = 0
    models: Sequence[str] = ("sim-root", "sim-sub")
    strict_models: bool = False

    def __post_init__(self) -> None:
        if not self.time_scale > 0 or self.capacity < 1:
            raise ConfigError("SimConfig needs time_scale > 0 and capacity >= 1")


@dataclass(frozen=True, slots=True)
class SimStats:
    """What the server saw.

    Attributes:
        requests: chat requests received (every attempt of every call).
        completed: 200 responses sent with a full body.
        in_flight: requests being served now (past the capacity queue).
        peak_in_flight: the most requests served at once.
        peak_queued: the most requests waiting for capacity at once.
        faults: fault kind -> count (rate-limit 429s from ``rpm`` / ``tpm`` count as ``rate_limit``).
        prompt_tokens: prompt tokens of completed responses.
        completion_tokens: completion tokens of completed responses.
        open_connections: HTTP connections open now (read from `/stats`: not counting the one asking).
        tokenizer: how tokens are counted.
        early_retries: requests that came back sooner than 0.95 of the Retry-After a 429 gave the same
            request body (a client that does not honour Retry-After).
        gc_frozen: objects the serving process has moved out of the garbage collector's reach
            (``gc.get_freeze_count()``); :func:`~rlm_async.sim.sim_process`'s child freezes its startup heap.
    """

    requests: int
    completed: int
    in_flight: int
    peak_in_flight: int
    peak_queued: int
    faults: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    open_connections: int
    tokenizer: str
    early_retries: int = 0
    gc_frozen: int = 0


class SimServer:
    """An OpenAI-compatible chat server on 127.0.0.1: ``/v1/chat/completions``, ``/v1/models``, ``/stats``.

    Use ``async with SimServer(config) as sim:`` and point a client at ``sim.base_url``.
    """

    def __init__(self, config: SimConfig | None = None, responder: Responder | None = None) -> None:
        self.config = config or SimConfig()
        self.responder = responder or SimResponder()
        self.tokenizer, self._count = token_counter()
        self._capacity = asyncio.Semaphore(self.config.capacity)
        self._seen: Counter[str] = Counter()
        self._buckets: dict[str, tuple[float, float]] = {}  # "requests" / "tokens" -> (level, last refill time)
        self._requests = self._completed = self._in_flight = self._peak = 0
        self._queued = self._peak_queued = self._prompt_tokens = self._completion_tokens = 0
        self._faults: Counter[str] = Counter()
        self._plan = self.config.faults
        self._come_back: dict[str, float] = {}  # body digest -> the earliest time a retry is on time
        self._early = 0
        self._active = 0
        self._idle = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    # -- lifecycle ------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        """The aiohttp application (for embedding in another server)."""
        app = web.Application(client_max_size=1 << 30)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/stats", self._stats)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0: any free port); returns the base URL, e.g. ``http://127.0.0.1:8000/v1``.

        The accept queue holds :data:`~rlm_async._listen.LISTEN_BACKLOG` connections, so a fan-out of a few
        hundred connections opened at once is not stalled by dropped SYNs.

        Raises:
            OSError: the address cannot be bound.
        """
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=LISTEN_BACKLOG)
        try:
            await site.start()
        except BaseException:
            await self.stop()  # the runner was set up: leave nothing behind
            raise
        bound = self._runner.addresses[0]
        self.base_url = f"http://{bound[0]}:{bound[1]}/v1"
        return self.base_url

    async def stop(self) -> None:
        """Close every connection and stop serving. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> SimServer:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def stats(self) -> SimStats:
        """A snapshot of what the server saw."""
        server = self._runner.server if self._runner is not None else None
        return SimStats(
            requests=self._requests,
            completed=self._completed,
            in_flight=self._in_flight,
            peak_in_flight=self._peak,
            peak_queued=self._peak_queued,
            faults=dict(self._faults),
            prompt_tokens=self._prompt_tokens,
            completion_tokens=self._completion_tokens,
            open_connections=len(server.connections) if server is not None else 0,
            tokenizer=self.tokenizer,
            early_retries=self._early,
            gc_frozen=gc.get_freeze_count(),
        )

    def set_faults(self, plan: FaultPlan) -> None:
        """Switch the fault plan from now on (a provider that starts or stops failing)."""
        self._plan = plan

    # -- handlers -------------------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "rlm-async-sim"} for m in self.config.models]
        return web.json_response({"object": "list", "data": data})

    async def _stats(self, request: web.Request) -> web.Response:
        stats = self.stats()  # open_connections less this request's own connection
        stats = dataclasses.replace(stats, open_connections=max(stats.open_connections - 1, 0))
        return web.json_response({name: getattr(stats, name) for name in stats.__dataclass_fields__})

    async def wait_idle(self) -> None:
        """Return once no request is being handled (hung ones included: they end when their client leaves)."""
        while self._active:
            self._idle.clear()
            await self._idle.wait()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self._active += 1
        try:
            return await self._handle(request)
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self._requests += 1
        try:
            body = json.loads(raw)
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in body["messages"]]
            model = str(body["model"])
        except (ValueError, KeyError, TypeError):
            return _error(400, "invalid_request_error", "expected JSON with model and messages")
        digest = hashlib.sha256(raw).hexdigest()
        rng = self._rng_for(digest)
        cfg, scale = self.config, self.config.time_scale
        if time.monotonic() < self._come_back.pop(digest, 0.0):
            self._early += 1
        if cfg.strict_models and model not in cfg.models:
            return _error(404, "model_not_found", f"The model `{model}` does not exist.")
        fault = self._plan.draw(rng)
        prompt_tokens = sum(self._count(m["content"]) for m in messages)
        limited = self._rate_limited(prompt_tokens)
        if limited is not None:
            self._faults["rate_limit"] += 1
            return self._retry_after(digest, limited * scale, "rate limit reached for requests")
        if fault is not None:
            self._faults[fault] += 1
        if fault == "429":
            return self._retry_after(digest, self._plan.retry_after_s * scale, "simulated rate limit")
        if fault == "empty":
            return web.json_response({**_completion(model, "", "stop", prompt_tokens, 0), "choices": []})
        if fault in ("500", "503"):
            return _error(int(fault), "server_error", f"simulated {fault}")
        if fault == "reset":  # drop the connection with no response; aiohttp cannot write to it after this
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)
        if fault == "hang":
            await asyncio.Event().wait()  # until the client gives up and aiohttp cancels this handler

        reply = _apply_limits(self.responder.respond(messages), body, self._count)
        text, finish_reason, completion_tokens = reply.text, reply.finish_reason, reply.completion_tokens
        seconds = cfg.latency.sample_s(prompt_tokens, completion_tokens, rng) * scale
        if fault == "spike":
            seconds *= self._plan.spike_factor
        await self._serve(seconds)
        payload = _completion(model, text, finish_reason, prompt_tokens, completion_tokens, reply.stop_sequence)
        if fault == "truncated":
            cut = json.dumps(payload).encode()
            return web.Response(body=cut[: len(cut) // 2], content_type="application/json")
        if fault in ("reset_body", "trickle"):
            return await self._stream_badly(request, payload, fault)
        self._bill(payload)
        return web.json_response(payload)

    async def _stream_badly(self, request: web.Request, payload: dict[str, Any], fault: str) -> web.StreamResponse:
        """Promise the whole body (Content-Length), then send half and drop the connection (``reset_body``),
        or send it in ten pieces over ``trickle_s`` (``trickle``; billed once the last piece is written)."""
        body = json.dumps(payload).encode()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        if fault == "reset_body":
            await response.write(body[: len(body) // 2])
            if request.transport is not None:
                request.transport.abort()
            return response
        step = -(-len(body) // 10)
        pause = self._plan.trickle_s * self.config.time_scale / 10
        for start in range(0, len(body), step):
            await asyncio.sleep(pause)
            await response.write(body[start : start + step])
        await response.write_eof()
        self._bill(payload)
        return response

    def _bill(self, payload: dict[str, Any]) -> None:
        """Count a response whose whole body was sent: the one kind a provider bills."""
        self._completed += 1
        self._prompt_tokens += payload["usage"]["prompt_tokens"]
        self._completion_tokens += payload["usage"]["completion_tokens"]

    async def _serve(self, seconds: float) -> None:
        if self._capacity.locked():  # every slot is taken: this request waits
            self._queued += 1
            self._peak_queued = max(self._peak_queued, self._queued)
            try:
                await self._capacity.acquire()
            finally:
                self._queued -= 1
        else:
            await self._capacity.acquire()  # a free slot: no wait
        self._in_flight += 1
        self._peak = max(self._peak, self._in_flight)
        try:
            await asyncio.sleep(seconds)
        finally:
            self._in_flight -= 1
            self._capacity.release()

    # -- helpers --------------------------------------------------------------------------------------
    def _retry_after(self, digest: str, seconds: float, message: str) -> web.Response:
        seconds = max(seconds, 0.001)
        self._come_back[digest] = time.monotonic() + 0.95 * seconds
        headers = {"retry-after-ms": str(round(seconds * 1000, 3)), "retry-after": str(math.ceil(seconds))}
        return _error(429, "rate_limit_exceeded", message, headers)

    def _rng_for(self, digest: str) -> random.Random:
        self._seen[digest] += 1
        return random.Random(f"{self.config.seed}:{digest}:{self._seen[digest]}")

    def _rate_limited(self, prompt_tokens: int) -> float | None:
        """Seconds (unscaled) until this request fits the RPM / TPM buckets, or None when it fits now.

        Token buckets holding a minute's worth, refilled continuously (a minute is ``60 * time_scale``
        seconds): a burst of up to RPM requests, then RPM per minute, the way providers replenish limits.
        Tokens are charged for the prompt on admission.
        """
        cfg = self.config
        if cfg.rpm is None and cfg.tpm is None:
            return None
        now = time.monotonic()
        minute = 60.0 * cfg.time_scale
        wait = 0.0
        for name, cap, need in (("requests", cfg.rpm, 1.0), ("tokens", cfg.tpm, float(prompt_tokens))):
            if cap is None:
                continue
            level, last = self._buckets.get(name, (cap, now))
            level = min(cap, level + (now - last) * cap / minute)
            self._buckets[name] = (level, now)
            if level < min(need, cap):
                wait = max(wait, (min(need, cap) - level) * minute / cap)
        if wait > 0:
            return wait / cfg.time_scale
        for name, cap, need in (("requests", cfg.rpm, 1.0), ("tokens", cfg.tpm, float(prompt_tokens))):
            if cap is not None:
                level, _ = self._buckets[name]
                self._buckets[name] = (level - min(need, cap), now)
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class _Cut:
    """A reply after the request's limits: its text, finish_reason, the stop sequence that cut it (reported as
    vLLM does, in ``choices[0].stop_reason``) and the tokens generated, the cut stop sequence included (a real
    server generated those tokens before it matched the sequence)."""

    text: str
    finish_reason: str
    stop_sequence: str | None
    completion_tokens: int


def _apply_limits(text: str, body: dict[str, Any], count: Callable[[str], int]) -> _Cut:
    """Cut ``text`` at the earliest stop sequence, then to ``max_tokens`` tokens (finish_reason ``"length"``)."""
    stops = body.get("stop") or []
    found = [(text.find(stop), stop) for stop in ([stops] if isinstance(stops, str) else stops) if stop in text]
    at, stop = min(found) if found else (len(text), None)
    text, generated = text[:at], count(text[: at + len(stop)] if stop else text)
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    if isinstance(max_tokens, int) and max_tokens > 0 and generated > max_tokens:
        lo, hi = 0, len(text)  # the longest prefix within max_tokens, by bisection on its token count
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if count(text[:mid]) <= max_tokens else (lo, mid - 1)
        return _Cut(text[:lo], "length", None, count(text[:lo]))
    return _Cut(text, "stop", stop, generated)


def _completion(
    model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int, stop: str | None = None
) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-sim-{random.getrandbits(48):012x}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "stop_reason": stop,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": kind, "code": status}}, status=status, headers=headers
    )
