"""Both REPLs against a fake host: capture, persistence, errors, reserved names, the two call forms.

Every test that takes the ``session`` fixture runs twice: against the confined worker process (the default
``"strict"`` sandbox) and against the in-thread REPL (``"none"``). Tests of the thread's own mechanics (its
interrupts, a context holding a threading.Event) use ``thread_session``."""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from rlm_async import BudgetExceeded, Sandbox
from rlm_async._repl import ProcessRepl, ThreadRepl, _wire
from rlm_async._sandbox import plan_for

from .conftest import cell_threads


class FakeHost:
    """Upper-cases prompts; prompts starting with "fail" fail; "budget" raises BudgetExceeded with results."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    async def llm_batch(self, prompts, model, max_tokens):
        self.batches.append(list(prompts))
        results = [
            {"ok": False, "kind": "rate_limited", "message": "429 after 3 attempts"}
            if p.startswith("fail")
            else {"ok": True, "text": p.upper()}
            for p in prompts
        ]
        if any(p.startswith("budget") for p in prompts):
            raise BudgetExceeded("max_input_tokens", 100, 120, results=results)
        return results

    async def rlm_batch(self, queries, contexts, model=None):
        return [{"ok": True, "text": f"{q}|{c}"} for q, c in zip(queries, contexts, strict=True)]

    def budget(self):
        return {"calls": 7}


async def thread_session(context="the context", **kwargs) -> ThreadRepl:
    kwargs.setdefault("max_output_chars", 10_000)
    return ThreadRepl(context=context, host=kwargs.pop("host", FakeHost()), **kwargs)


@pytest.fixture(params=["strict", "none"])
def session(request):
    """A factory of REPL sessions of one kind: ``await session(context, **kwargs)``."""

    async def make(context="the context", **kwargs):
        if request.param == "none":
            return await thread_session(context, **kwargs)
        kwargs.setdefault("max_output_chars", 10_000)
        host = kwargs.pop("host", FakeHost())
        return ProcessRepl(context=context, host=host, plan=plan_for(Sandbox("strict")), **kwargs)

    return make


async def test_print_is_captured_per_cell_and_variables_persist(no_leaks, session):
    stdout = sys.stdout
    async with await session() as repl:
        first = await repl.run_cell("x = 41\nprint('hello', x)")
        second = await repl.run_cell("x += 1\nprint(x)\nx * 2")
    assert sys.stdout is stdout
    assert first.output == "hello 41\n" and first.error is None
    assert second.output == "42\n84\n"


async def test_concurrent_sessions_do_not_mix_output(no_leaks, session):
    code = "for i in range(1000):\n    print(context, i)"
    async with await session("A") as a, await session("B") as b:
        results = {}

        async def go(name, repl):
            results[name] = await repl.run_cell(code)

        async with anyio.create_task_group() as tg:
            tg.start_soon(go, "A", a)
            tg.start_soon(go, "B", b)
    for name in "AB":
        lines = results[name].output.splitlines()
        assert lines == [f"{name} {i}" for i in range(1000)]


async def test_long_output_is_cut_with_a_note_keeping_head_and_tail(no_leaks, session):
    async with await session(max_output_chars=1000) as repl:
        result = await repl.run_cell("print('START' + 'x' * 100_000 + 'END')")
    assert result.output.startswith("START") and result.output.rstrip().endswith("END")
    assert "output cut" in result.output and "100,009" in result.output
    assert len(result.output) < 1300


async def test_syntax_error_and_exception_are_shown_and_the_session_goes_on(no_leaks, session):
    async with await session() as repl:
        bad = await repl.run_cell("def f(:\n  pass")
        boom = await repl.run_cell("y = 1\nprint('before')\n{}['missing']")
        after = await repl.run_cell("print(y)")
    assert "SyntaxError" in bad.error
    assert "KeyError: 'missing'" in boom.error and "{}['missing']" in boom.error
    assert "_thread.py" not in boom.error and "_worker.py" not in boom.error  # engine frames are not shown
    assert boom.output == "before\n"
    assert after.output == "1\n"


async def test_reserved_names_are_restored_with_a_note(no_leaks, session):
    async with await session() as repl:
        result = await repl.run_cell("context = 'mine'\nllm_batch = None\nanswer = 'done'")
        check = await repl.run_cell("print(context)\nprint(callable(llm_batch), isinstance(answer, dict), answer)")
    assert any("`context` is reserved" in n for n in result.notes)
    assert any("`llm_batch` is reserved" in n for n in result.notes)
    assert any("answer[" in n for n in result.notes)
    assert check.output == "the context\nTrue True {'content': '', 'ready': False}\n"


async def test_await_form(no_leaks, session):
    async with await session() as repl:
        result = await repl.run_cell(
            "one = await llm_query('a')\nmany = await llm_batch(['b', 'c'])\nkid = await rlm_agent('q', 'ctx')\n"
            "print(one, many, kid)"
        )
    assert result.error is None, result.error
    assert result.output == "A ['B', 'C'] q|ctx\n"


async def test_plain_form_in_a_plain_cell(no_leaks, session):
    async with await session() as repl:
        result = await repl.run_cell(
            "print(llm_query('a'), llm_batch(['b']), llm_query_batched(['c']),"
            " rlm_query('p'), rlm_query_batched(['r']))"
        )
    assert result.error is None, result.error
    assert result.output == "A ['B'] ['C'] p|p ['r|r']\n"


async def test_plain_def_inside_an_async_cell_blocks_only_its_cell(no_leaks, session):
    code = """
def summarise(text):
    return llm_query("sum: " + text)

parts = await llm_batch(["x", "y"])
print([summarise(p) for p in parts])
"""
    async with await session() as repl:
        result = await repl.run_cell(code)
    assert result.error is None, result.error
    assert result.output == "['SUM: X', 'SUM: Y']\n"


async def test_gather_over_comprehensions_and_async_defs(no_leaks, session):
    code = """
import asyncio
a = await asyncio.gather(*[llm_query(p) for p in ["a", "b"]])
b = await asyncio.gather(*(llm_query(p) for p in ["c"]))
async def twice(p):
    first = await llm_query(p)
    return first + llm_query(p)   # a plain call inside async code without await: not run
print(a, b)
"""
    async with await session() as repl:
        result = await repl.run_cell(code)
    assert result.error is None, result.error
    assert result.output == "['A', 'B'] ['C']\n"
    assert result.notes == ()


async def test_an_unawaited_call_in_async_code_is_reported(no_leaks, session):
    async with await session() as repl:
        result = await repl.run_cell("await llm_query('a')\nx = llm_query('b')\nprint(x)")
    assert "not awaited yet" in result.output
    assert any("never awaited" in n for n in result.notes)


async def test_failures_are_typed_and_falsy_and_usable_as_text(no_leaks, session):
    code = """
res = await llm_batch(["ok", "fail this"])
print(res[0], bool(res[1]), is_failure(res[1]), isinstance(res[1], SubcallFailure), res[1].kind)
print('GOT ' + res[1])
print(' | '.join(res))
print(is_failure(res[0]), is_failure('Error: looks like one'))
"""
    async with await session() as repl:
        result = await repl.run_cell(code)
    assert result.error is None, result.error
    assert result.output == (
        "OK False True True rate_limited\n"
        "GOT Error: rate_limited: 429 after 3 attempts\n"
        "OK | Error: rate_limited: 429 after 3 attempts\n"
        "False False\n"
    )


async def test_budget_exceeded_is_raised_in_the_cell_with_partial_results(no_leaks, session):
    code = """
try:
    await llm_batch(["fine", "budget"])
except BudgetExceeded as e:
    print(e.limit, e.results[0], is_failure(e.results[1]) or e.results[1])
"""
    async with await session() as repl:
        result = await repl.run_cell(code)
        plain = await repl.run_cell("llm_batch(['budget'])")
    assert result.output == "max_input_tokens FINE BUDGET\n"
    assert "BudgetExceeded" in plain.error


async def test_bad_arguments_are_type_errors_in_the_cell(no_leaks, session):
    async with await session() as repl:
        one = await repl.run_cell("llm_batch('just one prompt')")
        two = await repl.run_cell("llm_batch(['a', 3])")
        three = await repl.run_cell("rlm_batch(['a', 'b'], ['only one'])")
    assert "TypeError" in one.error and "llm_query" in one.error
    assert "prompts[1] is int" in two.error
    assert "2 queries but 1 contexts" in three.error


async def test_final_and_final_var_and_budget(no_leaks, session):
    async with await session() as repl:
        await repl.run_cell("print(budget())")
        assert repl.answer() == ("", False)
        await repl.run_cell("result = 42\nFINAL_VAR('result')")
        assert repl.answer() == ("42", True)
    async with await session() as repl:
        await repl.run_cell("FINAL('done')")
        assert repl.answer() == ("done", True)
    async with await session() as repl:
        await repl.run_cell('answer["content"] = "draft"')
        assert repl.answer() == ("draft", False)


async def test_a_blocking_cell_does_not_block_the_event_loop(no_leaks):
    gate = threading.Event()
    ticks = 0
    async with await thread_session({"gate": gate}) as repl:

        async def ticker() -> None:
            nonlocal ticks
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
                ticks += 1
            gate.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            result = await repl.run_cell("context['gate'].wait(30)\nprint('released')")
    assert ticks == 20 and result.output == "released\n"


async def test_cell_timeout_interrupts_a_cpu_loop_and_the_agent_goes_on(no_leaks):
    async with await thread_session(cell_timeout_s=0.2) as repl:
        slow = await repl.run_cell("n = 0\nwhile True:\n    n += 1")
        after = await repl.run_cell("print(n > 0)")
    assert slow.timed_out and any("time limit" in n for n in slow.notes)
    assert after.output == "True\n"
    assert repl.abandoned_threads == 0


async def test_cancelling_a_cell_stops_its_thread(no_leaks):
    started = threading.Event()
    async with await thread_session({"started": started}) as repl, anyio.create_task_group() as tg:
        tg.start_soon(repl.run_cell, "context['started'].set()\nwhile True:\n    pass")
        await anyio.to_thread.run_sync(started.wait, 10)
        tg.cancel_scope.cancel()
    assert cell_threads() == []


async def test_cancelling_a_cell_cancels_the_sub_calls_it_awaits(no_leaks, session):
    entered = anyio.Event()
    cancelled = anyio.Event()

    class HangingHost(FakeHost):
        async def llm_batch(self, prompts, model, max_tokens):
            entered.set()
            try:
                await anyio.sleep_forever()
            finally:
                cancelled.set()

    async with await session(host=HangingHost()) as repl, anyio.create_task_group() as tg:
        tg.start_soon(repl.run_cell, "llm_query('never answered')")
        await entered.wait()
        tg.cancel_scope.cancel()
    assert cancelled.is_set()


async def test_a_sub_call_made_while_its_cell_is_being_stopped_is_refused(no_leaks):
    """Regression: a call submitted after the stop had cancelled the scopes it saw used to hang the cell's
    thread (blocked in its own loop, out of reach of the asynchronous interrupt) until it was abandoned."""
    started, go = threading.Event(), threading.Event()

    class LateRepl(ThreadRepl):
        async def _interrupt(self, thread, done):
            go.set()  # the cell calls llm_query now, while the stop is under way
            await super()._interrupt(thread, done)

    class HangingHost(FakeHost):
        async def llm_batch(self, prompts, model, max_tokens):
            await anyio.sleep_forever()

    code = "context['started'].set()\ncontext['go'].wait()\ntry:\n    await llm_query('late')\nexcept Exception:\n"
    code += "    context['refused'] = True"
    context = {"started": started, "go": go}
    repl = LateRepl(context=context, host=HangingHost(), max_output_chars=1000)
    async with repl, anyio.create_task_group() as tg:
        tg.start_soon(repl.run_cell, code)
        await anyio.to_thread.run_sync(started.wait, 10)
        tg.cancel_scope.cancel()
    assert context.get("refused") and repl.abandoned_threads == 0


@pytest.mark.parametrize("code", ["import os\nos.getcwd()", "import sys\nsys.stdout.write('')"])
async def test_the_process_state_is_left_alone(code, no_leaks, session):
    import os

    cwd, stdout = os.getcwd(), sys.stdout
    async with await session() as repl:
        await repl.run_cell(code)
    assert (os.getcwd(), sys.stdout) == (cwd, stdout)


async def process_session(**kwargs) -> ProcessRepl:
    kwargs.setdefault("max_output_chars", 10_000)
    return ProcessRepl(context="c", host=FakeHost(), plan=plan_for(Sandbox("strict")), **kwargs)


async def test_a_long_answer_reaches_the_engine_whole_when_it_fits_a_frame(no_leaks):
    """Regression: the worker cut every answer to 2,097,152 characters (its worst case of 6 bytes of JSON a
    character), so a 6.4 M-character OOLONG-Pairs answer arrived cut and scored F1 0.38 instead of 0.84."""
    async with await process_session() as repl:
        result = await repl.run_cell("answer['content'] = '(12, 345)\\n' * 700_000")
        streamed = repl.answer()[0]
        done = await repl.run_cell("answer['ready'] = True")
    assert result.error is None and not result.notes, result
    assert streamed == "(12, 345)\n" * 700_000 and len(streamed) == 7_000_000
    assert done.error is None and repl.answer() == (streamed, True)


async def test_an_answer_too_long_for_a_frame_is_cut_to_fit_with_a_note(no_leaks):
    async with await process_session() as repl:
        result = await repl.run_cell("answer['content'] = 'é' * 1_000_000 + '\\x01' * 4_000_000")
        content, _ = repl.answer()
    assert result.error is None
    frame = _wire.MAX_FRAME_BYTES  # the longest prefix that fits what the cell's message leaves of a frame
    assert _wire.encoded_size(content) <= frame - 4096 < _wire.encoded_size(content + "\x01") + 1000
    assert content.startswith("é" * 1_000_000)
    assert [n for n in result.notes if 'answer["content"] was cut to' in n and "of its 5,000,000" in n], result


async def test_a_restart_cancelled_mid_fork_is_gone_before_when_gone_calls_back(monkeypatch, no_leaks):
    """Regression: ``_restart`` awaited its start inline, so a run cancelled while the zygote forked the new
    worker left that fork to finish (and be killed) from the fork thread, while ``when_gone`` called back at
    once: the agent gave its ``max_workers`` slot back with the worker still starting."""
    import os

    from rlm_async._repl import _zygote

    plan = plan_for(Sandbox("strict"))
    if not _zygote.uses_zygote(plan):
        pytest.skip("workers are spawned, not forked, on this machine (bubblewrap without Landlock)")
    real_fork = _zygote.Zygote.fork
    forks: list[str] = []
    in_fork, let_go = threading.Event(), threading.Event()

    def slow_fork(self: Any, channel: Any, config: Any) -> Any:
        forks.append(config["spool"])
        if len(forks) == 2:  # the restart's
            in_fork.set()
            assert let_go.wait(60)
        return real_fork(self, channel, config)

    monkeypatch.setattr(_zygote.Zygote, "fork", slow_fork)
    spool_left: list[bool] = []
    gone = asyncio.Event()
    async with ProcessRepl(context="c", host=FakeHost(), plan=plan, max_output_chars=10_000) as repl:
        assert (await repl.run_cell("x = 1")).error is None
        cell = asyncio.get_running_loop().create_task(repl.run_cell("import os; os._exit(3)"))
        assert await anyio.to_thread.run_sync(in_fork.wait, 60)
        cell.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cell

    def on_gone() -> None:
        spool_left.append(os.path.exists(forks[1]))
        gone.set()

    repl.when_gone(on_gone)
    let_go.set()  # before asserting: a failed test must not leave the fork thread waiting
    assert not gone.is_set(), "when_gone called back while the restart's fork was still under way"
    with anyio.fail_after(60):
        await gone.wait()
    assert spool_left == [False]
