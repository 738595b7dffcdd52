"""Issue 16's guardrails for models that slip: the nudge after an empty or cut reply, the finish gate (empty,
early, answer form), the query restated on the last turn, ``query`` in the REPL, and the sub-call cap.

Each is tested here on the fake client and, over real HTTP, on the simulator; tests/test_real_llm.py runs
them against llama.cpp."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from rlm_async import RLM, AiohttpClient, ChatRequest, ChatResponse, Limits
from rlm_async._guards import (
    EARLY_READY_NOTE,
    EMPTY_ANSWER_NOTE,
    FinishGate,
    answer_form,
    cut_reply,
    fits_form,
)
from rlm_async.sim import PROFILES, SimConfig, SimServer

from .conftest import make_rlm, query_of, repl

COUNT_QUERY = "How many of the numbered questions ask about a location? Answer with one number."


# -- the forms a query asks for ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("query", "kind", "text"),
    [
        (COUNT_QUERY, "number", "one number"),
        ("how many data points are 'location'? Give your final answer in the form 'Answer: number'.", "template",
         "Answer: number"),
        ("list all pairs of user IDs in the format (user_id_1, user_id_2), separated by newlines", "template",
         "(user_id_1, user_id_2)"),
        ("What is the special magic number for cake mentioned in the provided text?", "number", "one number"),
        ("What are all the special magic numbers for cake mentioned in the provided text?", "numbers",
         "the numbers only"),
        ("Does the text say the ship sank? Answer yes or no.", "yes/no", "yes or no"),
        ("List all the cities the letters mention.", "list", "a list"),
    ],
)  # fmt: skip
def test_answer_form_reads_the_form_a_query_asks_for(query, kind, text):
    form = answer_form(query)
    assert form is not None and (form.kind, form.text) == (kind, text)


def test_a_query_that_names_no_form_has_none():
    assert answer_form("Summarise the letters of 1862.") is None


def test_fits_form_fails_only_answers_that_plainly_are_not_of_the_form():
    number, template = answer_form(COUNT_QUERY), answer_form("Answer in the form 'Label: answer'.")
    pairs = answer_form("in the format (user_id_1, user_id_2)")
    assert number and template and pairs
    copied = "\n".join(f"{i}. Where is the city of Bordeaux located?" for i in range(60))  # the 1.5B's answer
    assert not fits_form(copied, number)
    assert fits_form("11", number) and fits_form("There are eleven.", number)
    assert not fits_form("I could not tell.", number)
    assert fits_form("Label: location", template) and fits_form("label: LOCATION", template)
    assert not fits_form("location", template)
    assert fits_form("anything at all", pairs)  # a template that starts with a placeholder is not checked


# -- the finish gate -------------------------------------------------------------------------------------
def test_the_gate_refuses_an_empty_finish_once_then_ends_the_agent():
    gate = FinishGate("q")
    first = gate.judge("  ")
    assert (first.action, first.check, first.note) == ("refuse", "empty", EMPTY_ANSWER_NOTE)
    assert gate.judge("").action == "empty"


def test_the_gate_refuses_an_early_finish_once_only_under_refuse():
    refusing, warning = FinishGate("q", early="refuse"), FinishGate("q", early="warn")
    for gate in (refusing, warning):
        gate.cell_ran(printed=True)
    assert refusing.judge("42").action == "refuse"
    assert refusing.judge("42").action == "accept"  # refused once: the second finish stands
    verdict = warning.judge("42")
    assert (verdict.action, verdict.check) == ("accept", "early")


def test_a_finish_is_not_early_when_the_model_saw_output_or_the_cell_printed_nothing():
    silent = FinishGate("q", early="refuse")
    silent.cell_ran(printed=False)
    assert silent.judge("42").action == "accept"
    seen = FinishGate("q", early="refuse")
    seen.cell_ran(printed=True)
    seen.outputs_shown()
    seen.cell_ran(printed=True)
    assert seen.judge("42").action == "accept"


def test_the_gate_refuses_a_misfit_answer_once_and_never_on_the_last_turn():
    gate = FinishGate(COUNT_QUERY)
    long_copy = "x" * 3000
    assert gate.judge(long_copy, last_turn=True).action == "accept"
    assert gate.judge(long_copy).check == "form"
    assert gate.judge(long_copy).action == "accept"  # the model insisted: its answer stands


@pytest.mark.parametrize(
    ("text", "finish", "tokens", "why"),
    [
        ("", "stop", 3, "stop_sequence"),
        ("", "stop", 1, "empty"),
        ("  \n", None, 0, "empty"),
        ("```repl\nx = [1,\n", "length", 512, "length"),
        ("```repl\nx = 1\n```\nprose that ran o", "length", 512, None),
        ("Let me think.", "stop", 4, None),
    ],
)
def test_cut_reply_tells_a_cut_or_empty_reply(text, finish, tokens, why):
    assert cut_reply(text, finish, tokens) == why


# -- the nudge, on the fake client ------------------------------------------------------------------------
def root_turns(replies: list[str | ChatResponse], sub: Callable[[str], str] = str.upper) -> Callable[..., Any]:
    """A handler whose root answers with ``replies`` in order, call by call (not turn by turn: a nudged
    reply adds no assistant message), and whose sub-calls answer ``sub(prompt)``."""
    turns = iter(replies)

    def handler(request: ChatRequest) -> str | ChatResponse:
        if query_of(request) is None:
            return sub(request.messages[0]["content"])
        return next(turns)

    return handler


async def test_an_empty_reply_cut_by_a_stop_sequence_is_nudged_and_does_not_spend_a_turn():
    """Qwen2.5-Coder-0.5B's first reply came back empty (3 completion tokens, finish_reason "stop": it began
    with "REPL output" and the stop sequence cut it), and that turn was lost. With two turns the run still
    peeks and answers."""
    events: list[dict[str, Any]] = []
    replies: list[str | ChatResponse] = [
        ChatResponse("", prompt_tokens=100, completion_tokens=3, finish_reason="stop"),
        repl("print(context[:3])"),
        repl("answer['content'] = 'abc'\nanswer['ready'] = True"),
    ]
    rlm, client = make_rlm(root_turns(replies), limits=Limits(max_iterations=2), sandbox="none")
    result = await rlm.completion("q", "abcdef", on_event=events.append)
    assert (result.answer, result.stop_reason) == ("abc", "answer")
    nudges = [e for e in events if e["event"] == "nudge"]
    assert len(nudges) == 1 and nudges[0]["why"] == "stop_sequence" and nudges[0]["completion_tokens"] == 3
    assert nudges[0]["stop_sequences"] == ["REPL output", "```output"] and nudges[0]["stop_sequence"] is None
    asked_again = client.requests[1].messages
    assert [m["role"] for m in asked_again] == ["system", "user"]  # no empty assistant message
    assert "your reply was empty" in asked_again[-1]["content"] and "'REPL output'" in asked_again[-1]["content"]


async def test_a_reply_cut_by_the_length_limit_inside_a_block_is_not_run_and_is_asked_again():
    cut = "```repl\nprint('ran the cut block')\nrows = [1, 2,"
    replies: list[str | ChatResponse] = [
        ChatResponse(cut, completion_tokens=64, finish_reason="length"),
        repl("answer['content'] = 'done'\nanswer['ready'] = True"),
    ]
    rlm, client = make_rlm(root_turns(replies), limits=Limits(max_iterations=1, max_tokens_per_turn=64), sandbox="none")
    events: list[dict[str, Any]] = []
    result = await rlm.completion("q", "ctx", on_event=events.append)
    assert (result.answer, result.stop_reason) == ("done", "answer")
    second = client.requests[1].messages
    assert second[-2] == {"role": "assistant", "content": cut}
    assert "length limit of 64 tokens" in second[-1]["content"]
    assert [e["code"].strip() for e in events if e["event"] == "code"] == [
        "answer['content'] = 'done'\nanswer['ready'] = True"
    ]


async def test_a_second_empty_reply_is_a_lost_turn_not_another_nudge():
    empty = ChatResponse("", completion_tokens=0, finish_reason="stop")
    replies: list[str | ChatResponse] = [empty, empty, repl("answer['content'] = 'x'\nanswer['ready'] = True")]
    events: list[dict[str, Any]] = []
    rlm, client = make_rlm(root_turns(replies), limits=Limits(max_iterations=2), sandbox="none")
    result = await rlm.completion("q", "ctx", on_event=events.append)
    assert result.stop_reason == "answer" and len(client.requests) == 3
    assert [e["why"] for e in events if e["event"] == "nudge"] == ["empty"]
    assert "No ```repl block found" in client.requests[2].messages[-1]["content"]


# -- the nudge over real HTTP, on the simulator ------------------------------------------------------------
class _MimicRoot:
    """A root that first mimics the REPL's output label (cut by the stop sequence), then works normally."""

    def __init__(self) -> None:
        self.calls = 0

    def respond(self, messages: Any) -> str:
        system = messages[0]["content"] if messages[0]["role"] == "system" else ""
        if "Recursive Language Model" not in system:
            return "sub"
        self.calls += 1
        if self.calls == 1:
            return "REPL output:\n42"
        return repl("answer['content'] = str(len(context))\nanswer['ready'] = True")


async def test_the_simulator_reports_the_stop_sequence_that_cut_a_reply_and_the_trace_records_it():
    events: list[dict[str, Any]] = []
    async with SimServer(SimConfig(latency=PROFILES["instant"]), responder=_MimicRoot()) as sim:
        client = AiohttpClient(base_url=sim.base_url, api_key="k")
        async with RLM("sim-root", client=client, limits=Limits(max_iterations=1), sandbox="none") as rlm:
            result = await rlm.completion("q", "abcd", on_event=events.append)
        await client.aclose()
    assert (result.answer, result.stop_reason) == ("4", "answer")
    (nudge,) = [e for e in events if e["event"] == "nudge"]
    assert nudge["why"] == "stop_sequence" and nudge["stop_sequence"] == "REPL output"
    assert nudge["completion_tokens"] > 1


# -- the finish gate in the loop ---------------------------------------------------------------------------
@pytest.mark.parametrize("sandbox", ["strict", "none"])
async def test_an_early_finish_is_refused_once_under_refuse_and_accepted_with_a_warning_under_warn(sandbox):
    peek_and_guess = repl("print(context[:4])\nanswer['content'] = 'guess'\nanswer['ready'] = True")
    confirm = repl("answer['content'] = 'ctx!'\nanswer['ready'] = True")
    events: list[dict[str, Any]] = []
    rlm, client = make_rlm(root_turns([peek_and_guess, confirm]), limits=Limits(early_finish="refuse"), sandbox=sandbox)
    result = await rlm.completion("q", "ctx!", on_event=events.append)
    assert (result.answer, result.stop_reason) == ("ctx!", "answer")
    assert EARLY_READY_NOTE in client.requests[1].messages[-1]["content"]
    assert [e["check"] for e in events if e["event"] == "finish_refused"] == ["early"]
    events.clear()
    rlm, client = make_rlm(root_turns([peek_and_guess]), limits=Limits(early_finish="warn"), sandbox=sandbox)
    result = await rlm.completion("q", "ctx!", on_event=events.append)
    assert (result.answer, result.stop_reason) == ("guess", "answer")
    assert [e["check"] for e in events if e["event"] == "finish_warned"] == ["early"]


async def test_an_answer_that_is_not_of_the_asked_form_is_refused_once_with_a_note():
    """Qwen2.5-Coder-1.5B set its answer to the sub-model's reply, 3,000 characters of the questions copied
    back, where the query asked for one number."""
    copy_back = repl("answer['content'] = context\nanswer['ready'] = True")
    count = repl("answer['content'] = '11'\nanswer['ready'] = True")
    context = "\n".join(f"{i}. Where is Bordeaux?" for i in range(200))
    rlm, client = make_rlm(root_turns([copy_back, count]), sandbox="none")
    result = await rlm.completion(COUNT_QUERY, context)
    assert (result.answer, result.stop_reason) == ("11", "answer")
    note = client.requests[1].messages[-1]["content"]
    assert "the query asks for one number" in note and f"{len(context):,} characters" in note
    rlm, client = make_rlm(root_turns([copy_back, copy_back]), sandbox="none")
    result = await rlm.completion(COUNT_QUERY, context)
    assert (result.answer, result.stop_reason) == (context, "answer")  # insisted: taken at its word


async def test_a_final_in_prose_goes_through_the_same_gate():
    replies = [repl("x = ''") + "\nFINAL_VAR(x)", repl("x = '7'") + "\nFINAL_VAR(x)"]
    rlm, client = make_rlm(root_turns(replies), sandbox="none")
    result = await rlm.completion(COUNT_QUERY, "ctx")
    assert (result.answer, result.stop_reason) == ("7", "answer")
    assert EMPTY_ANSWER_NOTE in client.requests[1].messages[-1]["content"]


# -- the last turn ----------------------------------------------------------------------------------------
async def test_the_last_turn_restates_the_query_and_its_form():
    replies = [repl("print(len(context))"), repl("x = 1"), "The answer is 11."]
    rlm, client = make_rlm(root_turns(replies), limits=Limits(max_iterations=2), sandbox="none")
    result = await rlm.completion(COUNT_QUERY, "ctx")
    assert (result.answer, result.stop_reason) == ("The answer is 11.", "max_iterations")
    before_last = client.requests[1].messages[-1]["content"]
    assert "this is your last turn to run code" in before_last and COUNT_QUERY in before_last
    assert "Answer with one number." in before_last
    final_prompt = client.requests[2].messages[-1]["content"]
    assert COUNT_QUERY in final_prompt and final_prompt.endswith("Answer with one number.")
    assert result.history[-1] == {"role": "assistant", "content": "The answer is 11."}


async def test_the_form_is_added_when_the_query_does_not_end_by_stating_it_and_after_a_reply_without_code():
    """Seen on the 0.5B: the turn before the last had no code (it wrote "14" in prose), and the restatement
    was only added after a reply whose code ran."""
    query = "How many cities does it name? Be brief."
    replies = [repl("x = 1"), "14", "14"]
    rlm, client = make_rlm(root_turns(replies), limits=Limits(max_iterations=2), sandbox="none")
    await rlm.completion(query, "ctx")
    before_last = client.requests[1].messages[-1]["content"]
    assert before_last.startswith("REPL output") and "Be brief. Answer with one number. Put" in before_last
    rlm, client = make_rlm(root_turns(["14", "14", "14"]), limits=Limits(max_iterations=2), sandbox="none")
    await rlm.completion(query, "ctx")
    before_last = client.requests[1].messages[-1]["content"]
    assert before_last.startswith("No ```repl block found") and "Answer with one number." in before_last
    assert client.requests[2].messages[-1]["content"].endswith("Be brief. Answer with one number.")


async def test_a_query_with_no_form_is_restated_without_one():
    replies = [repl("x = 1"), repl("x = 2"), "done"]
    rlm, client = make_rlm(root_turns(replies), limits=Limits(max_iterations=2), sandbox="none")
    await rlm.completion("Summarise it.", "ctx")
    assert (
        client.requests[1]
        .messages[-1]["content"]
        .endswith(
            'The query is: Summarise it. Put your answer in answer["content"] and set answer["ready"] = True in this '
            "turn.]"
        )
    )


# -- query in the REPL, the sub-call cap ------------------------------------------------------------------
@pytest.mark.parametrize("sandbox", ["strict", "none"])
async def test_the_query_is_the_repl_variable_query(sandbox):
    rlm, _ = make_rlm(root_turns([repl("FINAL(query.upper())")]), sandbox=sandbox)
    result = await rlm.completion("which city?", "ctx")
    assert result.answer == "WHICH CITY?"


async def test_a_session_turn_sees_its_own_query():
    replies = [repl("FINAL(query)"), repl("FINAL(query + '!')")]
    rlm, _ = make_rlm(root_turns(replies), sandbox="none")
    async with rlm.session() as session:
        assert (await session.completion("first", "ctx")).answer == "first"
        assert (await session.completion("second")).answer == "second!"


async def test_a_custom_tool_named_query_keeps_its_name_in_a_run_and_in_a_session():
    tools = {"query": {"tool": "the tool's value", "description": "a value named query"}}
    rlm, _ = make_rlm(root_turns([repl("FINAL(query)")] * 2), sandbox="none", custom_tools=tools)
    assert (await rlm.completion("q", "ctx")).answer == "the tool's value"
    async with rlm.session() as session:
        assert (await session.completion("q", "ctx")).answer == "the tool's value"


async def test_sub_calls_carry_max_tokens_per_subcall_unless_the_call_sets_its_own():
    code = "a = await llm_query('x')\nb = await llm_query('y', max_tokens=7)\nFINAL(a + b)"
    rlm, client = make_rlm(root_turns([repl(code)]), limits=Limits(max_tokens_per_subcall=256), sandbox="none")
    await rlm.completion("q", "ctx")
    assert [r.max_tokens for r in client.requests if query_of(r) is None] == [256, 7]


def test_the_small_model_profile_caps_sub_calls():
    limits = Limits.small_model()
    assert limits.max_tokens_per_subcall == 1024
    with pytest.raises(Exception, match="early_finish"):
        Limits(early_finish="never")  # type: ignore[arg-type]
