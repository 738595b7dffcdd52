"""Bad input (docs/reliability.md): huge, binary and undecodable contexts, unknown models, malformed and empty
provider responses, and model code that misbehaves. Each gets a clear error or a recovery, and the run keeps
what it has. (Empty contexts: test_engine; exceptions, syntax errors and renamed functions: test_repl.)"""

from __future__ import annotations

import json

import pytest

from rlm_async import RLM, Limits, RetryPolicy
from rlm_async._prompts import context_metadata, first_user_message
from rlm_async.sim import PROFILES, FaultPlan, SimConfig, SimServer

from .conftest import Script, cell_threads, make_rlm, repl
from .test_reliability import ROOT, RootHere, key_batch

#: Finish with the draft, or with "done" when there is none (an empty finish is refused: issue 16's guard).
FINISH = repl("answer['content'] = answer['content'] or 'done'\nanswer['ready'] = True")


async def test_a_100_million_character_context_stays_out_of_the_prompt(no_leaks):
    context = "x" * 100_000_000
    code = "answer['content'] = f'{len(context):,} {context[-3:]}'\nanswer['ready'] = True"
    rlm, client = make_rlm(Script({"q": [repl(code)]}))
    result = await rlm.completion("q", context)
    assert result.answer == "100,000,000 xxx"
    assert sum(len(m["content"]) for m in client.requests[0].messages) < 10_000


@pytest.mark.parametrize("context", [bytes(range(256)) * 1000, bytearray(b"\x00\xff" * 10)])
async def test_a_binary_context_is_described_as_bytes_and_searchable(context, no_leaks):
    code = "answer['content'] = str(context.count(b'\\xff'))\nanswer['ready'] = True"
    rlm, client = make_rlm(Script({"q": [repl(code)]}))
    result = await rlm.completion("q", context)
    assert result.answer == str(context.count(b"\xff"))
    first = client.requests[0].messages[1]["content"]
    assert '"length_bytes"' in first and "\\\\x00" in first


def test_an_undecodable_context_gives_metadata_that_encodes():
    context = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")
    message = first_user_message("q", context)
    message.encode("utf-8")  # would raise UnicodeEncodeError on a lone surrogate
    assert context_metadata(context)["prefix"] == "caf\\udce9 \\udcff"


async def test_a_prompt_that_cannot_be_sent_is_a_typed_failure_and_nothing_is_sent():
    code = """
    r = await llm_query("caf" + chr(0xDCE9))
    answer['content'] = f"{r.kind}: {r.message[:40]}"
    answer['ready'] = True
    """
    async with SimServer(SimConfig(latency=PROFILES["instant"])) as sim:
        client = RootHere(Script({"q": [repl(code)]}), sim.base_url)
        try:
            result = await RLM(ROOT, sub_model="sim-sub", client=client).completion("q", "")
        finally:
            await client.aclose()
        assert sim.stats().requests == 0
    assert result.answer.startswith("config: the request is not valid UTF-8")


async def test_an_unknown_model_is_a_typed_failure_for_a_sub_call_and_a_clear_stop_for_the_root():
    code = """
    r = await llm_query("hello", model="gpt-nonexistent")
    answer['content'] = f"{r.kind}: {r.message}"
    answer['ready'] = True
    """
    async with SimServer(SimConfig(latency=PROFILES["instant"], strict_models=True)) as sim:
        client = RootHere(Script({"q": [repl(code)]}), sim.base_url)
        try:
            result = await RLM(ROOT, sub_model="sim-sub", client=client).completion("q", "")
            assert result.answer.startswith("status:") and "HTTP 404" in result.answer
            assert "The model `gpt-nonexistent` does not exist" in result.answer
            unknown_root = await RLM("gpt-nonexistent", client=client.http).completion("q", "")
        finally:
            await client.aclose()
    assert unknown_root.stop_reason == "config_error" and unknown_root.error.status == 404
    assert unknown_root.stats.attempts == 1  # a 404 is not retried


@pytest.mark.parametrize("fault", ["truncated", "empty"])
async def test_malformed_and_empty_responses_are_typed_failures_after_retries(fault):
    config = SimConfig(latency=PROFILES["instant"], faults=FaultPlan({fault: 1.0}))
    async with SimServer(config) as sim:
        client = RootHere(Script({"q": [repl(key_batch(4))]}), sim.base_url)
        retry = RetryPolicy(max_retries=1, initial_backoff_s=0.01)
        try:
            result = await RLM(ROOT, sub_model="sim-sub", client=client, retry=retry).completion("q", "")
        finally:
            await client.aclose()
        assert sim.stats().requests == 8
    assert json.loads(result.answer)["failed"] == {"bad_response": 4}


async def test_a_root_turn_that_keeps_failing_ends_the_run_with_the_draft_and_why():
    config = SimConfig(latency=PROFILES["instant"], faults=FaultPlan({"truncated": 1.0}))
    script = Script({"q": [repl("answer['content'] = 'so far'"), FINISH]})
    async with SimServer(config) as sim:
        client = RootHere(script, sim.base_url)
        try:

            async def flaky_root(request):
                # the first root turn from the script, every later one from the broken server
                if len(request.messages) > 2:
                    return await client.http.chat(request.__class__("sim-root", request.messages))
                return await client.root.chat(request)

            client.chat = flaky_root  # type: ignore[method-assign]
            retry = RetryPolicy(max_retries=1, initial_backoff_s=0.01)
            result = await RLM(ROOT, client=client, retry=retry).completion("q", "")
        finally:
            await client.aclose()
    assert (result.stop_reason, result.answer) == ("llm_error", "so far")
    assert "malformed response" in str(result.error)


async def test_megabytes_of_printing_reach_the_model_cut_to_max_output_chars(no_leaks):
    events: list[dict] = []
    script = Script({"q": [repl("for i in range(200_000):\n    print('line', i, 'x' * 20)"), FINISH]})
    rlm, client = make_rlm(script, limits=Limits(max_output_chars=5_000), on_event=events.append)
    result = await rlm.completion("q", "")
    assert result.ok
    shown = client.requests[1].messages[-1]["content"]
    assert len(shown) < 5_500 and "output cut" in shown and "line 199999" in shown


async def test_model_code_that_deletes_the_repl_functions_gets_them_back(no_leaks):
    code = "del llm_query, llm_batch, rlm_agent, answer"
    check = "r = await llm_query('hi')\nanswer['content'] = r\nanswer['ready'] = True"
    rlm, client = make_rlm(Script({"q": [repl(code), repl(check)]}))
    result = await rlm.completion("q", "")
    assert result.answer == "HI"
    note = client.requests[1].messages[-1]["content"]
    assert "`llm_query` is reserved" in note


@pytest.mark.parametrize(
    ("sandbox", "note"),
    [("strict", "cell was killed after 0.3 s; the REPL was restarted"), ("none", "time limit of 0.3 s")],
)
async def test_a_cell_that_never_returns_is_a_timeout_and_the_agent_goes_on(no_leaks, sandbox, note):
    script = Script({"q": [repl("while True:\n    pass"), repl("answer['content'] = 'after'"), FINISH]})
    rlm, client = make_rlm(script, limits=Limits(cell_timeout_s=0.3), sandbox=sandbox)
    result = await rlm.completion("q", "")
    assert result.answer == "after"
    assert note in client.requests[1].messages[-1]["content"]
    assert cell_threads() == []
