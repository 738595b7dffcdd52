"""Shared helpers: a scripted fake model that plays the root and answers sub-calls, and leak checks."""

from __future__ import annotations

import asyncio
import functools
import os
import re
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import looptime
import pytest

from rlm_async import RLM, ChatRequest, ChatResponse, FakeClient, Limits

_QUERY = re.compile(r"^Query: (.*)$", re.MULTILINE)


def repl(code: str) -> str:
    """A model turn holding one ```repl block."""
    return f"```repl\n{textwrap.dedent(code).strip()}\n```"


def query_of(request: ChatRequest) -> str | None:
    """The agent query of a root-loop request, or None for a plain sub-call."""
    if request.messages[0]["role"] != "system":
        return None
    m = _QUERY.search(request.messages[1]["content"])
    return m.group(1) if m else None


def turn_of(request: ChatRequest) -> int:
    """0 for an agent's first turn, 1 for its second, ..."""
    return sum(1 for m in request.messages if m["role"] == "assistant")


SubFn = Callable[[str], "str | ChatResponse | Awaitable[str | ChatResponse]"]


class Script:
    """A fake model: agents[query] is the list of replies an agent with that query gives, turn by turn (the
    last repeats); sub(prompt) answers plain sub-calls (default: the prompt upper-cased)."""

    def __init__(self, agents: dict[str, list[str]], sub: SubFn | None = None) -> None:
        self.agents = agents
        self.sub: SubFn = sub or (lambda p: p.upper())

    async def __call__(self, request: ChatRequest) -> str | ChatResponse:
        query = query_of(request)
        if query is None:
            result = self.sub(request.messages[0]["content"])
            if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
                result = await result
            return result
        for key, replies in self.agents.items():
            if query.startswith(key):
                return replies[min(turn_of(request), len(replies) - 1)]
        raise AssertionError(f"no script for agent query {query!r}")


def printed(rendered: str) -> str:
    """A cell's rendered output without its last ``REPL variables: [...]`` line: what the cell printed."""
    return rendered.split("\nREPL variables: ")[0]


def on_fake_clock(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """Run an async test on looptime's fast-forwarding event loop: ``asyncio.sleep(60)`` takes no real time,
    and the loop clock reads as if it had. For timing assertions that cannot flake on a loaded machine."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        loop = looptime.new_event_loop(start=0.0)
        try:
            return loop.run_until_complete(fn(*args, **kwargs))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    return wrapper


def make_rlm(script: Callable[[ChatRequest], Any], **kwargs: Any) -> tuple[RLM, FakeClient]:
    client = FakeClient(script)
    limits = kwargs.pop("limits", Limits())
    return RLM("root-model", sub_model="sub-model", client=client, limits=limits, **kwargs), client


def cell_threads(grace_s: float = 1.0) -> list[threading.Thread]:
    """REPL cell threads still alive after ``grace_s``: a finished cell signals the engine from the last lines
    of its thread, so the thread may outlive that signal by a moment."""
    threads = [t for t in threading.enumerate() if t.name.startswith("rlm-cell-")]
    for t in threads:
        t.join(timeout=grace_s)
    return [t for t in threads if t.is_alive()]


def worker_processes(grace_s: float = 0.0) -> list[int]:
    """Pids of live REPL worker processes (named ``rlm-worker``; the zygote they fork from is ``rlm-zygote``
    and is kept) descended from this process, after waiting up to ``grace_s`` for them to go."""
    deadline = time.monotonic() + grace_s
    while True:
        parents, names = {}, {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            head, _, tail = stat.rpartition(b")")
            parents[int(entry)] = int(tail.split()[1])
            names[int(entry)] = head.partition(b"(")[2]
            if tail.split()[0] == b"Z":
                names[int(entry)] = b"<zombie>"
        mine, frontier = set(), [os.getpid()]
        while frontier:
            pid = frontier.pop()
            children = [c for c, p in parents.items() if p == pid and c not in mine]
            mine.update(children)
            frontier.extend(children)
        found = sorted(pid for pid in mine if names.get(pid) == b"rlm-worker")
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)


def worker_spools(grace_s: float = 0.0) -> list[str]:
    """Workers' spool folders (``w-*``) left in the live zygotes' spools, after waiting up to ``grace_s`` for
    them to go. A worker that was never forked from a zygote (``/tmp/rlm-repl-*``) is not looked for."""
    from rlm_async._repl import _zygote

    deadline = time.monotonic() + grace_s
    while True:
        left = sorted(str(p) for z in list(_zygote._zygotes.values()) for p in z.spool.glob("w-*"))
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


@pytest.fixture
def no_leaks():
    """After the test: no REPL thread or worker process alive, and no worker's spool folder left of those
    the test made (one left by an earlier test is that test's to answer for)."""
    before = set(worker_spools())
    yield
    assert cell_threads(grace_s=5) == []
    assert worker_processes(grace_s=5) == []
    deadline = time.monotonic() + 5
    while (left := sorted(set(worker_spools()) - before)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == []


REAL_LLM_TIMEOUT_S = 600


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A ``real_llm`` test runs a model on the CPU, a few calls of up to a minute each when the 2-core machine
    is busy: pyproject's 120 s per test cut five of them short while an eval shared the cores. They get
    :data:`REAL_LLM_TIMEOUT_S` unless they set their own."""
    for item in items:
        if item.get_closest_marker("real_llm") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(REAL_LLM_TIMEOUT_S))
