"""End to end through RLM.completion with a scripted fake model: the issue's acceptance checks."""

from __future__ import annotations

import asyncio
import json
import math
import threading

import anyio
import pytest
import structlog

from rlm_async import (
    RLM,
    ChatRequest,
    ChatResponse,
    ConfigError,
    FakeClient,
    Limits,
    LLMCallError,
    Price,
    ProviderStatusError,
    RetryPolicy,
    RLMError,
)

from .conftest import Script, cell_threads, make_rlm, on_fake_clock, printed, query_of, repl


def finish(text: str = "done") -> str:
    return repl(f"FINAL({text!r})")


# -- fan-out and timing -----------------------------------------------------------------------------------
@on_fake_clock
async def test_100_prompt_llm_batch_finishes_within_1_2x_of_two_waves():
    async def sub(prompt: str) -> str:
        await asyncio.sleep(0.2)
        return prompt.upper()

    script = Script(
        {
            "q": [
                repl(
                    """
                    res = await llm_batch([f'p{i}' for i in range(100)])
                    print(sum(r == f'P{i}' for i, r in enumerate(res)))
                    """
                ),
                finish(),
            ]
        },
        sub,
    )
    events: list[dict] = []
    # In-thread REPL: the fake clock would jump past a worker process's start-up timeout while it starts.
    limits = Limits(max_concurrency=64, cell_timeout_s=None)  # the fake clock would run past a cell deadline
    rlm, _ = make_rlm(script, limits=limits, on_event=events.append, sandbox="none")
    result = await rlm.completion("q", "ctx")
    assert result.stop_reason == "answer"
    outputs = [printed(e["output"]) for e in events if e["event"] == "output"]
    assert outputs[0] == "100"
    subs = {e["call_id"] for e in events if e["event"] == "call_queued" and e["call_depth"] == 1}
    start = min(e["t"] for e in events if e["event"] == "call_queued" and e["call_id"] in subs)
    end = max(e["t"] for e in events if e["event"] == "call_finished" and e["call_id"] in subs)
    two_waves = math.ceil(100 / 64) * 0.2
    assert two_waves <= end - start <= 1.2 * two_waves
    assert result.stats.peak_in_flight == 64


class Gauge:
    """The server's view: requests in flight now and at peak, and the depths it saw."""

    def __init__(self) -> None:
        self.now = self.peak = 0

    async def hold(self, seconds: float) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.now -= 1


@on_fake_clock
async def test_peak_in_flight_never_exceeds_the_cap_at_any_depth():
    gauge = Gauge()
    child = [repl("r = await llm_batch([f'{context}-{i}' for i in range(15)])\nFINAL(len(r))")]
    root = [
        repl("kids = await rlm_batch([f'kid {i}' for i in range(4)], [str(i) for i in range(4)])\nprint(kids)"),
        finish(),
    ]
    base = Script({"q": root, "kid": child})

    async def handler(request: ChatRequest):
        await gauge.hold(0.05)
        return await base(request)

    rlm, _client = make_rlm(
        handler, limits=Limits(max_concurrency=3, cell_timeout_s=None), sandbox="none"
    )  # fake clock: in-thread, no cell limit
    result = await rlm.completion("q", "ctx")
    assert result.ok
    assert gauge.peak == 3 and result.stats.peak_in_flight == 3
    assert set(result.usage.by_depth) == {0, 1, 2}
    assert result.usage.by_depth[2].calls == 60


async def test_max_concurrency_1_with_a_depth_5_chain_completes():
    def agent(level: int) -> list[str]:
        if level == 5:
            return [repl("FINAL(f'bottom:{context}')")]
        return [repl(f"r = await rlm_agent('level {level + 1}', context + '>{level + 1}')\nFINAL(r)")]

    script = Script({f"level {d}": agent(d) for d in range(6)})
    rlm, _ = make_rlm(script, limits=Limits(max_concurrency=1, max_depth=6))
    with anyio.fail_after(30):
        result = await rlm.completion("level 0", "0")
    assert result.answer == "bottom:0>1>2>3>4>5"
    assert result.stats.max_depth_reached == 5 and result.stats.agents == 6
    assert result.stats.peak_in_flight == 1


async def test_ten_concurrent_children_all_succeed_and_overlap():
    arrived = 0
    all_arrived = anyio.Event()
    base = Script(
        {
            "q": [
                repl(
                    """
                    kids = await rlm_batch([f'child {i}' for i in range(10)], [f'c{i}' for i in range(10)])
                    FINAL('|'.join(kids))
                    """
                )
            ],
            "child": [repl("FINAL(context.upper())")],
        }
    )

    async def handler(request: ChatRequest):
        nonlocal arrived
        query = query_of(request)
        if query and query.startswith("child"):
            arrived += 1
            if arrived == 10:
                all_arrived.set()
            with anyio.fail_after(10):  # every child's first turn is in flight before any is answered
                await all_arrived.wait()
        return await base(request)

    rlm, _ = make_rlm(handler, limits=Limits(max_concurrency=16))
    result = await rlm.completion("q", "ctx")
    assert result.answer == "|".join(f"C{i}" for i in range(10))
    assert result.stats.agents == 11


async def test_a_second_llm_batch_in_the_same_cell_and_in_a_later_turn():
    script = Script(
        {
            "q": [
                repl("a = await llm_batch(['x', 'y'])\nb = await llm_batch(['z'])\nprint(a + b)"),
                repl("c = llm_batch(['w'])\nprint(c)"),
                repl("answer['content'] = ''.join(a + b + c)\nanswer['ready'] = True"),
            ]
        }
    )
    events: list[dict] = []
    rlm, _ = make_rlm(script, on_event=events.append)
    result = await rlm.completion("q", "ctx")
    assert result.answer == "XYZW"
    assert [printed(e["output"]) for e in events if e["event"] == "output"][:2] == ["['X', 'Y', 'Z']", "['W']"]


async def test_usage_is_the_sum_over_all_billed_attempts_including_children():
    billed: list[ChatResponse] = []
    failed_once: set[str] = set()
    base = Script(
        {
            "q": [
                repl("r = await rlm_batch(['kid a', 'kid b'], ['1', '2'])\nx = await llm_batch(['s1', 's2'])\nFINAL(r)")
            ],
            "kid": [repl("y = await llm_batch([context + '!'])\nFINAL(y[0])")],
        }
    )

    async def handler(request: ChatRequest) -> ChatResponse:
        key = request.messages[-1]["content"]
        if key not in failed_once and len(failed_once) < 3:  # three requests fail once: not billed
            failed_once.add(key)
            raise ProviderStatusError("busy", status=503)
        text = await base(request)
        response = ChatResponse(text, prompt_tokens=len(billed) + 10, completion_tokens=len(billed) + 1)
        billed.append(response)
        return response

    rlm, _ = make_rlm(handler, retry=RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.001))
    result = await rlm.completion("q", "ctx")
    assert result.ok and result.stats.retries == 3
    usage = result.usage
    assert usage.calls == len(billed) == 7  # root x1, 2 kids x2 turns-with-subcalls, 2 sub-calls
    assert usage.prompt_tokens == sum(r.prompt_tokens for r in billed)
    assert usage.completion_tokens == sum(r.completion_tokens for r in billed)
    assert sum(t.calls for t in usage.by_agent.values()) == 7
    assert set(usage.by_agent) == {"0", "0.1", "0.2"}
    assert usage.by_depth[2].calls == 2


# -- budgets ---------------------------------------------------------------------------------------------
async def test_max_calls_is_never_exceeded_and_the_partial_answer_is_kept():
    looping = repl("answer['content'] = 'partial'\nwhile True:\n    await llm_batch(['a', 'b', 'c'])")
    rlm, client = make_rlm(Script({"q": [looping]}), limits=Limits(max_calls=10))
    result = await rlm.completion("q", "ctx")
    assert len(client.requests) <= 10
    assert result.stats.calls <= 10
    assert result.stop_reason == "budget:max_calls" and result.answer == "partial"


async def test_budget_exceeded_in_a_cell_can_be_caught_to_finish():
    code = """
try:
    while True:
        await llm_batch(['a', 'b', 'c'])
except BudgetExceeded as e:
    FINAL(f'stopped by {e.limit}')
"""
    rlm, client = make_rlm(Script({"q": [repl(code)]}), limits=Limits(max_calls=8))
    result = await rlm.completion("q", "ctx")
    assert result.answer == "stopped by max_calls" and result.stop_reason == "answer"
    assert len(client.requests) == 7  # one root turn + two batches of three; the third batch was refused whole


async def test_a_batch_over_max_fanout_is_refused_before_anything_is_sent():
    code = "try:\n    await llm_batch(['p'] * 100_000)\nexcept BudgetExceeded as e:\n    FINAL(f'{e.limit} {e.used}')"
    rlm, client = make_rlm(Script({"q": [repl(code)]}), limits=Limits(max_fanout=1000))
    result = await rlm.completion("q", "ctx")
    assert result.answer == "max_fanout 100000"
    assert len(client.requests) == 1  # the root's one turn; no sub-call was sent
    assert result.stats.calls == 1


async def test_max_agents_is_reserved_before_children_start():
    code = """
try:
    await rlm_batch(['kid'] * 5, ['c'] * 5)
except BudgetExceeded as e:
    print(e.limit)
r = await rlm_batch(['kid'] * 2, ['c'] * 2)
FINAL(r)
"""
    script = Script({"q": [repl(code)], "kid": [finish("k")]})
    rlm, _ = make_rlm(script, limits=Limits(max_agents=3))
    result = await rlm.completion("q", "ctx")
    assert result.answer == "['k', 'k']" and result.stats.agents == 3


async def test_at_max_depth_rlm_agent_falls_back_to_a_plain_call():
    script = Script(
        {
            "q": [repl("r = await rlm_agent('kid', 'ctx')\nFINAL(r)")],
            "kid": [repl("r = await rlm_agent('grandkid', 'deep')\nFINAL(r)")],
        },
        sub=lambda p: f"plain:{p.splitlines()[0]}",
    )
    events: list[dict] = []
    rlm, _ = make_rlm(script, limits=Limits(max_depth=2), on_event=events.append)
    result = await rlm.completion("q", "ctx")
    assert result.answer == "plain:grandkid"
    assert result.stats.fallbacks == 1 and result.stats.max_depth_reached == 1
    assert [e["child_depth"] for e in events if e["event"] == "agent_fallback"] == [2]
    assert result.usage.by_depth[2].calls == 1


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        (Limits(max_input_tokens=300), "budget:max_input_tokens"),
        (Limits(max_output_tokens=50), "budget:max_output_tokens"),
        (Limits(max_cost_usd=0.0005), "budget:max_cost_usd"),
    ],
)
async def test_token_and_cost_caps_overshoot_at_most_by_what_was_in_flight(limits, reason):
    code = "answer['content'] = 'so far'\nwhile True:\n    await llm_batch(['a'] * 4)"
    script = Script({"q": [repl(code)]}, sub=lambda p: ChatResponse("x", prompt_tokens=40, completion_tokens=10))

    async def handler(request: ChatRequest):
        result = await script(request)
        return result if isinstance(result, ChatResponse) else ChatResponse(result, 40, 10)

    prices = {"root-model": Price(1.0, 1.0), "sub-model": Price(1.0, 1.0)}
    rlm, _ = make_rlm(handler, limits=limits, prices=prices)
    result = await rlm.completion("q", "ctx")
    assert result.stop_reason == reason and result.answer == "so far"
    in_flight = 4  # one batch of 4 may be in flight when the cap is reached
    if limits.max_input_tokens:
        assert result.usage.prompt_tokens <= limits.max_input_tokens + in_flight * 40
    if limits.max_output_tokens:
        assert result.usage.completion_tokens <= limits.max_output_tokens + in_flight * 10
    if limits.max_cost_usd:
        assert result.usage.cost_usd <= limits.max_cost_usd + in_flight * 50e-6


async def never(prompt: str) -> str:
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


# Real time, not the fake clock: the fake clock jumps to the deadline while the loop waits on a cell's thread,
# before the cell has written its draft.
async def test_run_timeout_keeps_the_partial_answer(no_leaks):
    code = "answer['content'] = 'half done'\nawait llm_query('slow')"
    rlm, _ = make_rlm(Script({"q": [repl(code)]}, never), limits=Limits(timeout_s=0.5))
    result = await rlm.completion("q", "ctx")
    assert (result.stop_reason, result.answer) == ("timeout", "half done")
    assert 0.5 <= result.stats.wall_s < 5
    assert cell_threads() == []


async def test_max_iterations_ends_with_one_last_call_for_the_answer():
    script = Script({"q": [repl("answer['content'] = 'draft'"), "the final answer"]})

    def handler(request: ChatRequest) -> str:
        if "no turns left" in request.messages[-1]["content"]:
            assert "draft" in request.messages[-1]["content"]
            return "the final answer"
        return repl("answer['content'] = 'draft'")

    rlm, client = make_rlm(handler, limits=Limits(max_iterations=3))
    result = await rlm.completion("q", "ctx")
    assert (result.stop_reason, result.answer) == ("max_iterations", "the final answer")
    assert len(client.requests) == 4 and result.stats.turns == 3  # the answer's own call is not a turn
    del script


async def test_the_official_text_forms_of_final_work():
    script = Script({"q": [repl("total = 6 * 7"), "The result is ready.\nFINAL_VAR(total)"]})
    rlm, _ = make_rlm(script)
    result = await rlm.completion("q", "ctx")
    assert (result.answer, result.stats.turns) == ("42", 2)
    rlm, _ = make_rlm(Script({"q": ["FINAL(forty-two)"]}))
    assert (await rlm.completion("q", "ctx")).answer == "forty-two"


async def test_the_root_model_never_sees_the_context():
    secret = "NEEDLE-" + "x" * 5000
    rlm, client = make_rlm(Script({"q": [repl("print(len(context))"), finish()]}))
    await rlm.completion("q", secret)
    first = client.requests[0]
    joined = "\n".join(m["content"] for m in first.messages)
    assert secret not in joined and '"length_chars": 5007' in joined
    assert first.model == "root-model" and first.stop


# -- isolation, cancellation, events ------------------------------------------------------------------------
async def test_a_blocking_cell_does_not_stall_a_sibling_agents_calls(no_leaks):
    gate = threading.Event()
    answered = 0

    def sub(prompt: str) -> str:
        nonlocal answered
        answered += 1
        if answered == 5:
            gate.set()  # only reachable if the worker's calls run while the blocker's cell blocks
        return "ok"

    script = Script(
        {
            "q": [repl("r = await rlm_batch(['blocker', 'worker'], [context, 'w'])\nFINAL(r)")],
            "blocker": [
                repl("import time\nreleased = context['gate'].wait(20)\nFINAL('released' if released else 'stalled')")
            ],
            "worker": [repl("r = await llm_batch(['a'] * 5)\nFINAL(len(r))")],
        },
        sub,
    )
    rlm, _ = make_rlm(script, sandbox="none")  # a threading.Event as context: the in-thread REPL only
    result = await rlm.completion("q", {"gate": gate})
    assert result.answer == "['released', '5']"


async def test_cancelling_mid_run_leaves_no_tasks_or_threads(no_leaks):
    all_in_flight = anyio.Event()
    entered = closed = 0

    async def sub(prompt: str) -> str:
        nonlocal entered, closed
        entered += 1
        if entered == 12:
            all_in_flight.set()
        try:
            await anyio.sleep_forever()
        finally:
            closed += 1
        return ""

    script = Script(
        {
            "q": [repl("await rlm_batch(['kid'] * 3, ['c'] * 3)")],
            "kid": [repl("r = await llm_batch(['x'] * 4)")],
        },
        sub,
    )
    rlm, _ = make_rlm(script)
    before = asyncio.all_tasks()
    async with anyio.create_task_group() as tg:
        tg.start_soon(rlm.completion, "q", "ctx")
        await all_in_flight.wait()
        tg.cancel_scope.cancel()
    assert closed == 12
    assert asyncio.all_tasks() == before
    assert cell_threads() == []


async def test_events_go_to_structlog_and_jsonl_with_context(tmp_path):
    trace = tmp_path / "trace.jsonl"
    script = Script({"q": [repl("r = await rlm_agent('kid', 'c')\nFINAL(r)")], "kid": [finish("k")]})
    rlm, _ = make_rlm(script, trace_path=trace, logger=structlog.get_logger(), retry=RetryPolicy(attempt_timeout_s=7.0))
    with structlog.testing.capture_logs() as logs:
        result = await rlm.completion("q", "ctx")
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    names = {r["event"] for r in records}
    assert {
        "run_start",
        "agent_start",
        "turn",
        "code",
        "output",
        "call_queued",
        "call_started",
        "call_finished",
        "agent_end",
        "run_end",
    } <= names
    assert all(r["run_id"] == result.run_id for r in records)
    assert records[0]["event"] == "run_start" and records[0]["limits"] == rlm.limits.describe()
    assert records[0]["retry"] == RetryPolicy(attempt_timeout_s=7.0).describe() == {
        "max_retries": 2, "initial_backoff_s": 0.5, "max_backoff_s": 8.0, "jitter": 0.25,
        "max_retry_after_s": 120.0, "attempt_timeout_s": 7.0,
    }  # fmt: skip
    kid = [r for r in records if r.get("agent_id") == "0.1"]
    assert kid and all(r["depth"] == 1 for r in kid)
    assert [log["event"] for log in logs] == [r["event"] for r in records]
    assert all(log.get("run_id") == result.run_id for log in logs)


def test_completion_sync_for_scripts():
    rlm, _client = make_rlm(Script({"q": [finish("sync")]}))
    assert rlm.completion_sync("q", "ctx").answer == "sync"


@pytest.mark.parametrize(
    ("sandbox", "note"), [("strict", "cell was killed after 0.2 s"), ("none", "time limit of 0.2 s")]
)
async def test_a_cell_past_its_time_limit_is_reported_and_the_agent_goes_on(no_leaks, sandbox, note):
    script = Script({"q": [repl("while True:\n    pass"), finish("recovered")]})
    events: list[dict] = []
    rlm, _ = make_rlm(script, limits=Limits(cell_timeout_s=0.2), on_event=events.append, sandbox=sandbox)
    result = await rlm.completion("q", "ctx")
    assert result.answer == "recovered"
    assert note in next(e["output"] for e in events if e["event"] == "output")


@pytest.mark.parametrize("sandbox", ["strict", "none"])
async def test_a_cell_waiting_on_its_sub_calls_is_not_timed_out_by_them(no_leaks, sandbox):
    """Regression: cell_timeout_s (0.3 s here, 120 s by default) was wall time, so a batch whose calls took
    longer (a 1,000-call batch of real calls, or here two waves of 0.4 s calls) was killed with its results.
    The clock stops while the cell's sub-calls are in flight; a cell that spins afterwards is still stopped."""

    async def slow(prompt: str) -> str:
        await asyncio.sleep(0.4)  # the fake model's latency
        return prompt.upper()

    code = "r = await llm_batch(['a', 'b', 'c', 'd'])\nprint(r)\ns = await llm_query('e')\nFINAL(str(r) + s)"
    spin = "await llm_query('x')\nwhile True:\n    pass"
    script = Script({"q": [repl(code)], "spin": [repl(spin), finish("stopped")]}, sub=slow)
    limits = Limits(cell_timeout_s=0.3, max_concurrency=2)
    rlm, _ = make_rlm(script, limits=limits, sandbox=sandbox)
    result = await rlm.completion("q", "ctx")
    assert result.answer == "['A', 'B', 'C', 'D']E", result
    events: list[dict] = []
    result = await rlm.completion("spin", "ctx", on_event=events.append)
    assert result.answer == "stopped"
    output = next(e["output"] for e in events if e["event"] == "output")
    assert "0.3 s" in output


@on_fake_clock
async def test_a_cancelled_batch_gives_back_the_calls_it_never_started():
    """Regression: a batch reserves its N calls up front and its C lanes start them in turn; when the batch is
    cancelled (here its child agent runs past agent_timeout_s), the calls no lane reached were never given
    back, so a 1,000-prompt batch stopped after its first wave spent the run's max_calls for good."""

    async def hang(prompt: str) -> str:
        await asyncio.sleep(3600)
        raise AssertionError

    script = Script(
        {
            "q": [repl("r = await rlm_agent('kid', 'c')\nFINAL(str(budget()['calls']))")],
            "kid": [repl("await llm_batch([str(i) for i in range(1000)])")],
        },
        sub=hang,
    )
    limits = Limits(max_calls=1010, max_concurrency=4, agent_timeout_s=5, cell_timeout_s=None)
    rlm, client = make_rlm(script, limits=limits, sandbox="none")
    result = await rlm.completion("q", "ctx")
    # The root's turn, the kid's turn, and the calls its 4 lanes started: 4, or fewer when the fake clock
    # reaches the timeout while the kid's cell thread is still starting (the loop looks idle meanwhile; seen
    # on a busy machine). Either way every call no lane reached is given back.
    sent = len(client.requests)
    assert 2 <= sent <= 6 and result.answer == str(1010 - sent), (sent, result.answer)


@pytest.mark.parametrize("sandbox", ["strict", "none"])
async def test_a_finish_with_an_empty_answer_is_refused_once_then_ends_the_run_as_empty_answer(no_leaks, sandbox):
    """Qwen2.5-Coder-0.5B printed a peek and set answer["ready"] in the same cell, and the run "answered" with
    nothing. The first empty finish is refused with a note (the draft is kept, ready is reset); a model that
    then answers finishes normally; a second empty finish ends the agent with stop_reason "empty_answer"."""
    peek_and_finish = repl("print(context[:5])\nanswer['ready'] = True")
    answered = repl("answer['content'] = '42'\nanswer['ready'] = True")
    script = Script({"q": [peek_and_finish, answered], "twice": [peek_and_finish]})
    rlm, client = make_rlm(script, sandbox=sandbox)
    result = await rlm.completion("q", "ctx here")
    assert (result.answer, result.stop_reason, result.ok) == ("42", "answer", True)
    shown = client.requests[1].messages[-1]["content"]
    assert "ctx h" in shown and 'answer["content"] is empty' in shown
    result = await rlm.completion("twice", "ctx here")
    assert (result.answer, result.stop_reason, result.ok) == ("", "empty_answer", False)
    assert len(client.requests) == 4  # the "q" run's two turns, then two refused finishes
    with pytest.raises(RLMError, match="empty_answer"):
        result.raise_for_status()


async def test_models_per_depth():
    script = Script({"q": [repl("r = await rlm_agent('kid', 'c')\nFINAL(r)")], "kid": [repl("FINAL(llm_query('x'))")]})
    client = FakeClient(script)
    rlm = RLM("root", depth_models=["d0", "d1", "d2"], client=client)
    await rlm.completion("q", "ctx")
    seen = [(query_of(r) or r.messages[0]["content"], r.model) for r in client.requests]
    assert seen == [("q", "d0"), ("kid", "d1"), ("x", "d2")]
    rlm = RLM("root", sub_model="small", client=FakeClient(script))
    await rlm.completion("q", "ctx")
    assert [r.model for r in rlm._client.requests] == ["root", "small", "small"]


async def test_empty_batches_and_an_empty_context():
    code = "a = await llm_batch([])\nb = await rlm_batch([], [])\nFINAL(f'{a}{b}{len(context)}')"
    rlm, client = make_rlm(Script({"q": [repl(code)]}))
    result = await rlm.completion("q", "")
    assert result.answer == "[][]0" and len(client.requests) == 1


async def test_a_failing_endpoint_ends_the_run_with_llm_error_and_the_draft():
    def handler(request: ChatRequest) -> str:
        if len(request.messages) > 2:
            raise ProviderStatusError("down", status=503)
        return repl("answer['content'] = 'draft'")

    rlm, _ = make_rlm(handler, retry=RetryPolicy(max_retries=1, initial_backoff_s=0.001))
    result = await rlm.completion("q", "ctx")
    assert (result.stop_reason, result.answer) == ("llm_error", "draft")
    assert str(result.error) == "status: down (call 2, model root-model, depth 0, attempts 2)"
    assert isinstance(result.error, LLMCallError) and result.error.kind == "status"
    assert result.stats.failed_calls == 1 and result.stats.retries == 1


async def test_no_endpoint_and_no_client_is_a_config_error(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="no endpoint"):
        RLM("m")
    with pytest.raises(ConfigError, match="price"):
        RLM("m", client=FakeClient(lambda r: ""), limits=Limits(max_cost_usd=1.0))


async def test_a_child_past_its_agent_timeout_is_a_typed_failure_and_the_parent_goes_on(no_leaks):
    parent = """
    r = await rlm_agent('kid', 'c')
    answer['content'] = f"{r.kind}|{r.partial}|{r.message}"
    answer['ready'] = True
    """
    kid = "answer['content'] = 'kid draft'\nawait llm_query('slow')"
    script = Script({"q": [repl(parent)], "kid": [repl(kid)]}, never)
    rlm, _ = make_rlm(script, limits=Limits(agent_timeout_s=0.5))
    result = await rlm.completion("q", "ctx")
    assert result.answer == "timeout|kid draft|the agent passed agent_timeout_s=0.5 s"
    assert 0.5 <= result.stats.wall_s < 5
    assert cell_threads() == []
