"""Prompt assembly and code-block parsing."""

from __future__ import annotations

import pytest

from rlm_async._agent import parse_code_blocks, parse_text_final
from rlm_async._prompts import context_metadata, first_user_message, system_prompt


@pytest.mark.parametrize(
    ("text", "blocks"),
    [
        ("```repl\nx = 1\n```", ["x = 1\n"]),
        # A reply with ```repl blocks runs those only: its ```python snippet is prose, as in the official RLM.
        ("a\n```python\nprint(1)\n```\nb\n```repl\nprint(2)\n```", ["print(2)\n"]),
        ("```python\nprint(1)\n```\n```py\nprint(2)\n```", ["print(1)\n", "print(2)\n"]),
        ("```py\ny = 2\n```", ["y = 2\n"]),
        ("```repl\ncut off by a stop sequence", ["cut off by a stop sequence"]),
        ("```\nplain fence is prose\n```", []),
        ("```repl\n\n```", []),
        ("no code at all", []),
    ],
)
def test_parse_code_blocks(text, blocks):
    assert parse_code_blocks(text) == blocks


@pytest.mark.parametrize(
    ("text", "final"),
    [
        ("FINAL(42)", ("text", "42")),
        ("Done.\nFINAL(the answer is 42)\n", ("text", "the answer is 42")),
        ("FINAL_VAR(result)", ("var", "result")),
        ("FINAL_VAR('result')", ("var", "result")),
        ("```repl\nFINAL(1)\n```", None),  # inside code it is a function call, not the text form
        ("nothing final here", None),
    ],
)
def test_parse_text_final(text, final):
    assert parse_text_final(text) == final


def test_context_metadata_never_carries_the_whole_context():
    big = "x" * 100_000
    for context in (big, [big, "y"], {"doc": big}):
        meta = context_metadata(context)
        assert len(meta["prefix"]) == 300
        assert big not in first_user_message("q", context)
    assert context_metadata([big, "y"])["item_chars_min_max"] == [1, 100_000]
    assert context_metadata({"a": 1, "b": 2})["keys"] == ["a", "b"]


def test_system_prompt_tells_a_child_at_max_depth_it_cannot_recurse():
    kwargs = {"max_depth": 2, "max_fanout": 1000, "max_output_chars": 20_000, "kind": "a str"}
    assert "no deeper REPL" not in system_prompt(depth=0, **kwargs)
    assert "no deeper REPL" in system_prompt(depth=1, **kwargs)
    assert "is_failure" in system_prompt(depth=0, **kwargs)


async def test_a_block_run_again_is_pointed_out():
    from .conftest import Script, make_rlm, repl

    peek = repl("print(len(context))")
    rlm, client = make_rlm(Script({"q": [peek, repl("print(len(context))\n\n"), repl("FINAL('done')")]}))
    result = await rlm.completion("q", "abc")
    assert result.answer == "done"
    second_output = client.requests[2].messages[-1]["content"]
    assert "you ran this same code in turn 1" in second_output
    assert "same code" not in client.requests[1].messages[-1]["content"]


def example_replies() -> list[str]:
    """The system prompt's worked example, block by block, as a scripted root would write it."""
    prompt = system_prompt(depth=0, max_depth=2, max_fanout=1000, max_output_chars=20_000, kind="a str")
    example = prompt[prompt.index("Example:") : prompt.index("Adapt it to the query")]
    return [f"```repl\n{block}```" for block in parse_code_blocks(example)]


async def test_the_worked_example_runs_as_written_and_drops_parts_with_nothing_to_say():
    """Issue 16: at 32K the 1.5B followed the example into 7 parts, the 6 without the needle made up "7", and the
    combining call took the majority; the 0.5B copied the combine block without the block that defines its
    inputs. The example is now one self-contained block whose parts may answer NONE and are then left out."""
    from .conftest import Script, make_rlm

    replies = example_replies()
    assert len(replies) == 3, "peek; split, ask and combine; ready"
    combine_prompts: list[str] = []

    def sub(prompt: str) -> str:
        if prompt.startswith("Notes from the parts"):
            combine_prompts.append(prompt)
            return "The code is 4417."
        if "code is 4417" in prompt:  # a note that starts like NONE but holds the answer is kept
            return "None of the other lines matter, but the code is 4417."
        return "NONE" if prompt.startswith("Part 1 ") else "**NONE.**"

    haystack = "lorem ipsum dolor sit amet " * 2_000  # 54,000 characters: 3 parts of 20,000
    context = haystack[:30_000] + " The code is 4417. " + haystack[30_000:]
    rlm, _ = make_rlm(Script({"What is the code?": replies}, sub=sub))
    result = await rlm.completion("What is the code?", context)

    assert result.stop_reason == "answer"
    assert result.answer == "The code is 4417."
    assert len(combine_prompts) == 1
    notes = combine_prompts[0].split("\n\nFrom these notes")[0]
    assert notes.count("4417") == 1 and "NONE" not in notes and "---" not in notes


async def test_the_worked_example_tells_the_combining_call_when_no_part_had_anything():
    """Review finding: with every part answering NONE, the combining call got an empty list of notes."""
    from .conftest import Script, make_rlm

    combine_prompts: list[str] = []

    def sub(prompt: str) -> str:
        if prompt.startswith("Notes from the parts"):
            combine_prompts.append(prompt)
            return "No code was found."
        return "NONE"

    rlm, _ = make_rlm(Script({"What is the code?": example_replies()}, sub=sub))
    result = await rlm.completion("What is the code?", "lorem ipsum " * 5_000)
    assert result.answer == "No code was found."
    assert "(no part held anything that helps)" in combine_prompts[0]
