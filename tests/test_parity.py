"""What the official RLM has beyond its dialect: max_errors and sampling_args per depth."""

from __future__ import annotations

import pytest

from rlm_async import RLM, BudgetExceeded, ChatRequest, ConfigError, FakeClient, Limits

from .conftest import Script, query_of, repl


@pytest.mark.parametrize("sandbox", ["strict", "none"])
async def test_max_errors_stops_after_consecutive_failed_turns_with_the_draft(sandbox):
    replies = [repl("answer['content'] = 'draft'\n1 / 0"), "no code here", repl("{}['missing']"), repl("FINAL('x')")]
    rlm = RLM("m", client=FakeClient(Script({"q": replies})), sandbox=sandbox, limits=Limits(max_errors=3))
    result = await rlm.completion("q", "ctx")
    assert result.stop_reason == "budget:max_errors" and result.answer == "draft"
    assert isinstance(result.error, BudgetExceeded) and result.error.limit == "max_errors"
    assert result.stats.calls == 3


async def test_a_good_turn_resets_the_error_count():
    replies = [repl("1 / 0"), repl("x = 1"), repl("1 / 0"), repl("FINAL('made it')")]
    rlm = RLM("m", client=FakeClient(Script({"q": replies})), sandbox="none", limits=Limits(max_errors=2))
    result = await rlm.completion("q", "ctx")
    assert result.answer == "made it"


async def test_sampling_args_per_depth_reach_the_request_body():
    bodies: list[tuple[str, dict]] = []
    script = Script({"q": [repl("r = await llm_query('p', max_tokens=7)\nFINAL(r)")]})

    async def endpoint(request: ChatRequest):
        bodies.append(("root" if query_of(request) else "sub", request.body()))
        return await script(request)

    rlm = RLM(
        "m",
        client=FakeClient(endpoint),
        sandbox="none",
        temperature=0.5,
        sampling_args=[{"top_p": 0.9, "seed": 1, "max_tokens": 300}, {"temperature": 0.0, "top_k": 20}],
        limits=Limits(max_tokens_per_turn=100),
    )
    result = await rlm.completion("q", "ctx")
    assert result.answer == "P"
    (_, root), (_, sub) = bodies[0], bodies[1]
    assert (root["top_p"], root["seed"], root["temperature"], root["max_tokens"]) == (0.9, 1, 0.5, 100)
    assert (sub["temperature"], sub["top_k"], sub["max_tokens"]) == (0.0, 20, 7)
    assert "top_p" not in sub


@pytest.mark.parametrize("bad", [{"model": "x"}, {"messages": []}, [], [{"temperature": 1}, "top_p"], {1: 2}])
def test_sampling_args_that_the_engine_owns_are_refused(bad):
    with pytest.raises(ConfigError):
        RLM("m", client=FakeClient(lambda r: "x"), sampling_args=bad)
