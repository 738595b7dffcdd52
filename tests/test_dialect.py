"""The official RLM's dialect (``rlms``): FINAL / FINAL_VAR in the reply text, the older ``answer`` variable,
failures usable as text, SHOW_VARS, the variables line, ``model=`` on rlm_query, and the two fences. Each test
runs in the worker process and in the thread."""

from __future__ import annotations

import pytest

from rlm_async import RLM, ChatRequest, FakeClient, Limits

from .conftest import Script, query_of, repl

pytestmark = pytest.mark.parametrize("sandbox", ["strict", "none"])


async def run(replies: list[str], sandbox: str, **kwargs):
    client = FakeClient(Script({"q": replies, **kwargs.pop("agents", {})}, kwargs.pop("sub", None)))
    rlm = RLM("root-model", sub_model="sub-model", client=client, sandbox=sandbox, **kwargs)
    return await rlm.completion("q", "the context"), client


def told(client: FakeClient, turn: int) -> str:
    """What the model was told after its ``turn``-th reply (0-based): the next request's last message."""
    roots = [r for r in client.requests if query_of(r) == "q"]
    return roots[turn + 1].messages[-1]["content"]


async def test_final_var_of_a_missing_variable_is_told_and_the_run_goes_on(sandbox):
    result, client = await run(["FINAL_VAR(nowhere)", repl("nowhere = 'found'\nFINAL_VAR('nowhere')")], sandbox)
    assert result.answer == "found" and result.stats.calls == 2
    assert "there is no variable named 'nowhere'" in told(client, 0)


async def test_the_older_answer_variable_and_a_rebound_answer_dict(sandbox):
    result, _ = await run([repl("answer = 42"), "FINAL_VAR('answer')"], sandbox)
    assert result.answer == "42"
    result, _ = await run([repl('answer = {"content": "adopted", "ready": True}')], sandbox)
    assert result.answer == "adopted" and result.stats.calls == 1


async def test_final_after_a_code_block_in_the_same_reply(sandbox):
    result, _ = await run([repl("x = 6 * 7") + "\nFINAL_VAR(x)"], sandbox)
    assert result.answer == "42" and result.stats.calls == 1
    result, _ = await run([repl("print('checked')") + "\nFINAL(all good)"], sandbox)
    assert result.answer == "all good"


@pytest.mark.parametrize(("reply", "expected"), [
    (repl("FINAL_VAR(123)"), "123"),
    (repl("totals = {'a': 1}\nFINAL_VAR(totals)"), "{'a': 1}"),
    ("FINAL_VAR(123)", "123"),
])  # fmt: skip
async def test_final_var_of_a_value(sandbox, reply, expected):
    result, _ = await run([reply], sandbox)
    assert result.answer == expected


async def test_show_vars_and_the_variables_line(sandbox):
    result, client = await run([repl("x = 1\nitems = [1, 2]\nprint(SHOW_VARS())"), repl("FINAL('done')")], sandbox)
    assert result.answer == "done"
    seen = told(client, 0)
    assert "REPL variables: x (int), items (list)" in seen
    assert seen.rstrip().endswith("REPL variables: ['x', 'items']")


async def test_a_failed_sub_call_works_in_official_dialect_code(sandbox):
    def sub(prompt: str) -> str:
        if prompt == "bad":
            raise_status = __import__("rlm_async").ProviderStatusError("HTTP 400", status=400)
            raise raise_status
        return prompt.upper()

    code = "rs = llm_query_batched(['ok', 'bad'])\nFINAL('GOT ' + ' | '.join(rs) + f' ({sum(map(is_failure, rs))})')"
    result, _ = await run([repl(code)], sandbox, sub=sub)
    assert result.answer.startswith("GOT OK | Error: status: ") and result.answer.endswith("(1)")


async def test_rlm_query_takes_a_model(sandbox):
    models: list[str] = []
    kid = "FINAL('kid on ' + context[:3])"
    script = Script(
        {"q": [repl("a = rlm_query('abc', model='kid-model')\nb = rlm_query_batched(['xyz'], model='kid-model')\n"
                    "FINAL(a + '/' + b[0])")], "abc": [repl(kid)], "xyz": [repl(kid)]}
    )  # fmt: skip

    async def endpoint(request: ChatRequest):
        models.append(request.model)
        return await script(request)

    rlm = RLM("root-model", sub_model="sub-model", client=FakeClient(endpoint), sandbox=sandbox)
    result = await rlm.completion("q", "ctx")
    assert result.answer == "kid on abc/kid on xyz"
    assert models.count("kid-model") == 2 and models[0] == "root-model"


async def test_rlm_query_at_max_depth_sends_its_prompt_once(sandbox):
    prompts: list[str] = []

    def sub(prompt: str) -> str:
        prompts.append(prompt)
        return "plain"

    result, _ = await run([repl("FINAL(rlm_query('count the words'))")], sandbox, sub=sub, limits=Limits(max_depth=1))
    assert result.answer == "plain" and prompts == ["count the words"]


async def test_python_fences_run_when_there_is_no_repl_block(sandbox):
    reply = "```python\nx = 'from python'\n```\nFINAL_VAR(x)"
    result, _ = await run([reply], sandbox)
    assert result.answer == "from python"
    reply = "Like this:\n```python\nx = 'not run'\n```\n" + repl("x = 'repl ran'") + "\nFINAL_VAR(x)"
    result, _ = await run([reply], sandbox)
    assert result.answer == "repl ran"


async def test_both_dialects_in_one_cell(sandbox):
    """Official names next to ours: in a cell without await every function blocks and returns its answer;
    in a cell with await, every function is awaited (the official names too)."""
    plain = """
a = llm_query('one')
b = llm_batch(['two'])
c = llm_query_batched(['three'])
answer['content'] = ' '.join([a, b[0], c[0]])
"""
    awaited = """
d = await llm_query_batched(['four'])
e = await llm_batch(['five'])
answer['content'] += ' ' + d[0] + ' ' + e[0]
FINAL_VAR('answer')
"""
    result, _ = await run([repl(plain) + "\n" + repl(awaited)], sandbox)
    assert result.answer == "ONE TWO THREE FOUR FIVE"
