"""The engine on uvloop ("uvloop is welcome", RLM's docstring): the per-attempt deadline, whose clean-up path
exists for a loop that orders its callbacks otherwise than asyncio's, and a whole run with a fan-out."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

if sys.platform == "win32":  # uvloop does not run there (nor does the sandbox); a dev dependency elsewhere
    pytest.skip("uvloop does not run on Windows", allow_module_level=True)

import uvloop

from rlm_async import RLM, FakeClient, LLMCallError, RetryPolicy
from rlm_async._clients import ChatRequest

from .conftest import Script, repl
from .test_scheduler import answer_read_although_the_loop_ran_late, request, scheduler


def on_uvloop(main: Callable[[], Awaitable[Any]]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert "uvloop" in type(runner.get_loop()).__module__
        return runner.run(main())


def test_an_answer_that_arrived_before_the_deadline_is_read_on_uvloop_too():
    """tests/test_scheduler.py's case on uvloop, whose order of timers and callbacks the deadline's hops then
    follow. (uvloop running the deadline before the task that has its answer: tests/test_hot_path.py.)"""
    on_uvloop(answer_read_although_the_loop_ran_late)


def test_an_attempt_that_hangs_times_out_on_uvloop_and_leaves_no_timer():
    async def main() -> None:
        async def hang(req: ChatRequest) -> str:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        retry = RetryPolicy(max_retries=1, attempt_timeout_s=0.05, initial_backoff_s=0.01)
        sched, _, _ = scheduler(FakeClient(hang), max_concurrency=1, retry=retry)
        with pytest.raises(LLMCallError) as info:
            await sched.call(request(), depth=0, agent_id="0")
        assert info.value.kind == "timeout" and info.value.attempts == 2
        assert sched._deadlines is not None and len(sched._deadlines) == 0

    on_uvloop(main)


def test_a_run_with_a_fan_out_on_uvloop():
    root = "r = await llm_batch([f'p{i}' for i in range(200)])\nFINAL(str(r == [f'P{i}' for i in range(200)]))"

    async def main() -> None:
        async with RLM("m", client=FakeClient(Script({"q": [repl(root)]}))) as rlm:
            result = await rlm.completion("q", "ctx")
        assert result.answer == "True" and result.usage.calls == 201

    on_uvloop(main)
