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


# -- custom tools --------------------------------------------------------------------------------------------
SECRET_TABLE = {"alice": "sk-live-ALICE-not-for-models", "bob": "42"}


def lookup(user: str) -> str:
    """Reads a table the model never sees."""
    return SECRET_TABLE["bob"] if user == "bob" else "hidden"


async def double(x: int, *, times: int = 2) -> int:
    return x * times


def broken(x):
    raise KeyError(x)


def opaque():
    return object()


TOOLS = {
    "lookup": {"tool": lookup, "description": "look a user up"},
    "double": double,
    "broken": broken,
    "opaque": opaque,
    "table": {"tool": {"a": 1}, "description": "a small table"},
}


@pytest.mark.parametrize("sandbox", ["strict", "none"])
async def test_custom_tools_run_in_the_engine_in_both_call_forms(sandbox):
    plain = "p = lookup('bob')\ntry:\n    broken('k')\nexcept ToolError as e:\n    err = str(e)\n"
    awaited = "d = await double(21)\nt = await double(2, times=5)\n"
    awaited += "FINAL(f\"{p} {d} {t} {table['a']} {err}\")"
    prompts: list[str] = []
    script = Script({"q": [repl(plain) + "\n" + repl(awaited)]})

    async def endpoint(request: ChatRequest):
        prompts.append(request.messages[0]["content"])
        return await script(request)

    rlm = RLM("m", client=FakeClient(endpoint), sandbox=sandbox, custom_tools=TOOLS)
    result = await rlm.completion("q", "ctx")
    assert result.answer == "42 42 10 1 tool 'broken' raised KeyError: 'k'", result.answer
    assert "`lookup(user: str) -> str`: look a user up" in prompts[0]
    assert "`table` (a dict value): a small table" in prompts[0]


async def test_a_tool_result_that_cannot_reach_the_worker_is_a_tool_error():
    code = "try:\n    opaque()\nexcept ToolError as e:\n    FINAL(str(e))"
    rlm = RLM("m", client=FakeClient(Script({"q": [repl(code)]})), custom_tools=TOOLS)
    result = await rlm.completion("q", "ctx")
    assert "returned what cannot reach the REPL" in result.answer


async def test_the_tool_and_its_secrets_stay_out_of_the_worker():
    code = "import gc\nhits = [o for o in gc.get_objects() if isinstance(o, str) and 'ALICE' in o]\nFINAL(len(hits))"
    rlm = RLM("m", client=FakeClient(Script({"q": [repl(code)]})), custom_tools=TOOLS)
    result = await rlm.completion("q", "ctx")
    assert result.answer == "0"


async def test_children_inherit_tools_unless_given_their_own():
    kid = "try:\n    FINAL(await lookup('bob'))\nexcept NameError:\n    FINAL(str(await only_kids(3)))"
    root = "FINAL(await rlm_agent('kid', 'c'))"
    script = Script({"q": [repl(root)], "kid": [repl(kid)]})
    inherited = await RLM("m", client=FakeClient(script), custom_tools=TOOLS).completion("q", "ctx")
    own = await RLM(
        "m", client=FakeClient(script), custom_tools=TOOLS, custom_sub_tools={"only_kids": double}
    ).completion("q", "ctx")
    assert (inherited.answer, own.answer) == ("42", "6")


@pytest.mark.parametrize("tools", [{"llm_query": len}, {"not a name": len}, {"_hidden": len}])
def test_tool_names_are_checked(tools):
    with pytest.raises(ConfigError):
        RLM("m", client=FakeClient(lambda r: "x"), custom_tools=tools)


# -- multi-turn sessions -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sandbox", ["strict", "none"])
async def test_a_session_keeps_the_repl_and_its_variables_across_turns(sandbox):
    first = repl("total = len(context)\nFINAL(total)")
    second = repl(
        "FINAL(f\"{total} {context_0} {context_1} {len(context)} {type(history_0).__name__} {history_0[0]['role']}\")"
    )
    third = repl("FINAL(f'{total} {context} {len(history_1)}')")
    prompts: list[str] = []
    script = Script({"first": [first], "second": [second], "third": [third]})

    async def endpoint(request: ChatRequest):
        prompts.append(request.messages[1]["content"])
        return await script(request)

    rlm = RLM("m", client=FakeClient(endpoint), sandbox=sandbox)
    async with rlm.session() as session:
        r1 = await session.completion("first", "abcd")
        r2 = await session.completion("second", "xyz")
        r3 = await session.completion("third")
    assert (r1.answer, r2.answer) == ("4", "4 abcd xyz 3 list system")
    assert r3.answer.startswith("4 xyz ")
    assert "turn 1 of a session" in prompts[1] and "turn 2 of a session" in prompts[2]
    assert session.turns == 3 and session.usage.calls == 3


async def test_session_limits_cap_all_turns_together():
    script = Script({"q": [repl("r = await llm_batch(['a', 'b'])\nFINAL(len(r))")]})
    rlm = RLM("m", client=FakeClient(script), sandbox="none")
    async with rlm.session(limits=Limits(max_calls=7)) as session:
        first = await session.completion("q", "c")
        second = await session.completion("q")
        assert (first.answer, second.answer) == ("2", "2")
        third = await session.completion("q")  # one call left of 7: the root turn, then the batch is refused
        assert third.stop_reason == "budget:max_calls" or not third.ok
        with pytest.raises(ConfigError, match="used up"):
            await session.completion("q")
    assert session.usage.calls == 7


async def test_a_document_passed_as_the_query_is_warned_about():
    rlm = RLM("m", client=FakeClient(Script({"x": [repl("FINAL(1)")]})), sandbox="none")
    with pytest.warns(UserWarning, match="the query first"):
        await rlm.completion("x" * 50_000)


# -- history compaction --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sandbox", ["strict", "none"])
async def test_a_conversation_near_the_window_is_compacted_instead_of_failing(sandbox):
    """A model with a 4,000-token window (16,000 characters) and turns that print 3,000 characters each:
    without compaction the sixth turn overflows (HTTP 400, as llama.cpp answers); with it the older turns
    are summarised, the full conversation stays in `history`, and the run ends with an answer."""
    from rlm_async import ProviderStatusError
    from rlm_async._compaction import SUMMARY_REQUEST

    turn = repl("n = globals().get('n', 0) + 1\nprint(str(n) * 3000)")
    last = repl("FINAL(f'{n} turns, {len(history)} messages kept')")
    summaries = turns = 0

    async def endpoint(request: ChatRequest):
        nonlocal summaries, turns
        if request.messages[-1]["content"] == SUMMARY_REQUEST:
            summaries += 1
            return "SUMMARY: printed digits; n counts turns"
        if sum(len(m["content"]) for m in request.messages) / 4 > 4000:
            raise ProviderStatusError("HTTP 400: the request exceeds the available context size", status=400)
        turns += 1  # counted here: a compacted conversation no longer tells which turn it is
        return last if turns == 10 else turn

    def rlm(compaction: bool) -> RLM:
        nonlocal turns
        turns = 0
        return RLM(
            "m", client=FakeClient(endpoint), sandbox=sandbox, context_windows={"m": 4000}, compaction=compaction,
            limits=Limits(max_iterations=12),
        )  # fmt: skip

    failed = await rlm(False).completion("q", "ctx")
    assert failed.stop_reason == "config_error" or failed.stop_reason == "llm_error"
    result = await rlm(True).completion("q", "ctx")
    assert result.ok and result.answer.startswith("9 turns,"), result.answer
    assert summaries >= 1
    kept = int(result.answer.split(", ")[1].split()[0])
    assert kept >= 10  # history holds the turns the summary folded


def test_windows_are_read_from_what_servers_report_in_v1_models():
    from rlm_async._clients import windows_from_models

    payload = {
        "data": [
            {"id": "vllm-model", "max_model_len": 32768},
            {"id": "qwen", "meta": {"n_ctx": 8192, "n_ctx_train": 32768}},
            {"id": "routed", "context_length": 200000},
            {"id": "silent"},
            "junk",
        ]
    }
    assert windows_from_models(payload) == {"vllm-model": 32768, "qwen": 8192, "routed": 200000}
    assert windows_from_models({"data": "nope"}) == {} and windows_from_models(None) == {}


async def test_the_engine_asks_the_endpoint_for_unknown_windows_once():
    asked = 0

    class Reporting(FakeClient):
        async def context_windows(self):
            nonlocal asked
            asked += 1
            return {"m": 4000, "other": 10}

    rlm = RLM("m", client=Reporting(Script({"q": [repl("FINAL(1)")]})), sandbox="none", context_windows={"other": 99})
    await rlm.completion("q", "ctx")
    await rlm.completion("q", "ctx")
    assert asked == 1 and rlm.window_for("m") == 4000 and rlm.window_for("other") == 99
