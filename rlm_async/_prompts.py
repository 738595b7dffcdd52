"""Prompt text: the system prompt that teaches the REPL, the first user turn, and the turn formats.

Written for rlm_async (the async functions, the answer dict, typed failures, the budget); the RLM idea and
the ``context`` / ``FINAL`` conventions follow Zhang, Kraska and Khattab, "Recursive Language Models"
(arXiv 2512.24601). The worked example is there because small models write usable ```repl code only when
they have seen one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._guards import wanted

if TYPE_CHECKING:
    from ._guards import AnswerForm
    from ._tools import Tool

__all__ = [
    "STOP_SEQUENCES",
    "compacted_note",
    "context_metadata",
    "final_answer_prompt",
    "first_user_message",
    "missing_final_var",
    "system_prompt",
]

#: Cut a model that starts to invent its own REPL output (our outputs begin with "REPL output"). Small models
#: do it at the very start of a reply too (Qwen2.5-Coder-0.5B), so the label is not anchored to a newline.
STOP_SEQUENCES = ("REPL output", "```output")

_SYSTEM = """\
You are a Recursive Language Model (RLM). You answer a query about an input that is too long to read at once.
The input is NOT in this conversation: it lives in a persistent Python REPL as the variable `context`.
You explore it by writing Python code, and you delegate pieces of it to sub-models.

Write code in fenced blocks that start with ```repl and end with ```. Each block runs in the REPL, in order;
what it prints comes back to you as the next message, starting with "REPL output". Variables persist between
turns. Never write the REPL output yourself: stop after your code block and wait for it.

In the REPL:
- `context`: the input ({context_kind}). Look at it with code: len(context), context[:2000], re.findall, ...
- `query`: the query you are answering, as a str (put it in your sub-model prompts).
- `await llm_batch(prompts)`: send a list of prompt strings to a sub-model, all at once, concurrently;
  returns a list in the same order. This is the fast way to process many chunks: prefer ONE llm_batch over
  many llm_query calls. A sub-model sees only its prompt, so put the chunk text inside the prompt.
- `await llm_query(prompt)`: one prompt, one answer.
- `await rlm_agent(query, context)`: a child RLM with its own REPL holding `context`; use it for a sub-task
  that itself needs exploring. `await rlm_batch(queries, contexts)` runs several children concurrently.{depth_note}
- A sub-call that fails returns a `SubcallFailure` instead of an answer: a str that reads "Error: <kind>:
  <message>", but falsy; `is_failure(x)` is True and `x.kind` / `x.message` say why. Check before you use
  results:
      results = await llm_batch(prompts)
      bad = [i for i, r in enumerate(results) if is_failure(r)]
- `budget()`: what is left of your budget (calls, tokens, USD, seconds, depth). Batches larger than
  {max_fanout} items are refused. When a budget runs out, the call raises `BudgetExceeded`; catch it, keep
  what you have, and finish.
- The plain forms work too: `llm_query(p)`, `llm_query_batched(ps)`, `rlm_query(p)`, `rlm_query_batched(ps)`
  without await, e.g. inside a plain `def`. In async code (any block that uses `await`), always `await` them.
- `answer`: a dict {{"content": "", "ready": False}}. Draft your answer in answer["content"] and revise it as
  you learn more. When you are sure, set answer["ready"] = True: that ends the run and answer["content"] is
  returned. `FINAL(text)` or `FINAL_VAR("variable_name")` do the same in one call. `SHOW_VARS()` lists
  your variables.
- print() output longer than {max_output_chars} characters is cut: keep big results in variables and print
  summaries.

Example:
```repl
print(type(context), len(context))
print(context[:500])
```
(next reply, after reading the output: one block that splits, asks and combines)
```repl
chunks = [context[i:i + 20000] for i in range(0, len(context), 20000)]
prompts = [f"Part {{k + 1}} of {{len(chunks)}} of a longer text:\\n{{c}}\\n\\nFrom this part only, note what "
           f"helps to answer: {{query}}\\nIf nothing in this part helps, reply only: NONE"
           for k, c in enumerate(chunks)]
notes = await llm_batch(prompts)
ok = [n for n in notes if not is_failure(n) and n.strip(" .*'\\"\\n").upper() != "NONE"]
print(len(chunks), "parts,", len(ok), "with notes")
found = "\\n---\\n".join(ok) or "(no part held anything that helps)"
combined = await llm_query(f"Notes from the parts of a text that hold something relevant:\\n{{found}}\\n\\n"
                           f"From these notes, answer: {{query}}")
answer["content"] = combined
print(combined)
```
(next reply, after checking it)
```repl
answer["ready"] = True
```
Adapt it to the query: when you can compute the answer with code (count, filter, sort), do so and check it.

Work in small steps, look at the data before you trust an idea, and verify your answer with code."""


def system_prompt(
    *,
    depth: int,
    max_depth: int,
    max_fanout: int | None,
    max_output_chars: int,
    kind: str,
    tools: Mapping[str, Tool] | None = None,
) -> str:
    """The system prompt for an agent at ``depth`` (children are told when they cannot recurse further),
    with its custom tools listed after the REPL's own functions."""
    can_recurse = depth + 1 < max_depth
    depth_note = (
        ""
        if can_recurse
        else "\n  (At your depth, rlm_agent / rlm_batch run plain sub-model calls: there is no deeper REPL.)"
    )
    text = _SYSTEM.format(
        context_kind=kind,
        depth_note=depth_note,
        max_fanout="unlimited" if max_fanout is None else f"{max_fanout:,}",
        max_output_chars=f"{max_output_chars:,}",
    )
    return text + _tools_section(tools) if tools else text


def _tools_section(tools: Mapping[str, Tool]) -> str:
    lines = [
        "",
        "",
        "Custom tools in the REPL (functions run outside it: call them like llm_query, with await in async code):",
    ]
    for name, tool in tools.items():
        about = f": {tool.description}" if tool.description else ""
        if tool.callable:
            lines.append(f"- `{name}{tool.signature()}`{about}")
        else:
            lines.append(f"- `{name}` (a {type(tool.value).__name__} value){about}")
    lines.append("A tool that fails raises `ToolError`.")
    return "\n".join(lines)


def context_metadata(context: Any, prefix_chars: int = 300) -> dict[str, Any]:
    """What the model is told about ``context``: type, length in characters, item count, a short prefix.

    Lengths: a str's ``len``; for bytes, the byte count (the prefix is the ``repr`` of the first bytes); for a
    list or tuple, the characters of ``str()`` of its items (with the shortest and longest item); for a dict,
    the characters of its JSON (``default=str``) and its first 20 keys. The prefix is the first
    ``prefix_chars`` characters of that same text, with any character that UTF-8 cannot encode (a lone
    surrogate from ``errors="surrogateescape"``) written as a backslash escape.
    """
    meta: dict[str, Any] = {"type": type(context).__name__}
    if isinstance(context, bytes | bytearray | memoryview):
        meta["length_bytes"] = len(context)
        meta["prefix"] = repr(bytes(context[:prefix_chars]))
        return meta
    if isinstance(context, list | tuple):
        items = [str(x) for x in context]
        lengths = [len(x) for x in items]
        text = "\n".join(items[:50])
        meta.update(
            items=len(items),
            length_chars=sum(lengths),
            item_chars_min_max=[min(lengths, default=0), max(lengths, default=0)],
        )
    else:
        if isinstance(context, dict):
            text = json.dumps(context, default=str)
            meta.update(items=len(context), keys=[str(k) for k in list(context)[:20]])
        else:
            text = "" if context is None else str(context)
        meta["length_chars"] = len(text)
    meta["prefix"] = text[:prefix_chars].encode("utf-8", "backslashreplace").decode("utf-8")
    return meta


def describe_kind(context: Any) -> str:
    """A few words on the context's type for the system prompt."""
    if isinstance(context, str):
        return f"a str of {len(context):,} characters"
    if isinstance(context, list | tuple):
        return f"a list of {len(context):,} items"
    if isinstance(context, dict):
        return f"a dict with {len(context):,} keys"
    if isinstance(context, bytes | bytearray | memoryview):
        return f"{type(context).__name__} of {len(context):,} bytes (binary: decode or search it as bytes)"
    return f"a {type(context).__name__}"


def first_user_message(query: str, context: Any) -> str:
    """The first user turn: the query and the context's metadata, never the context itself."""
    meta = json.dumps(context_metadata(context), ensure_ascii=False, indent=1)
    return (
        f"Query: {query}\n\n"
        f"The variable `context` in your REPL holds the input. Metadata (the input itself is not shown):\n{meta}\n\n"
        "Start by looking at `context` with code in a ```repl block."
    )


def format_outputs(outputs: list[str]) -> str:
    """The user turn after a model turn: each cell's output, labelled."""
    if len(outputs) == 1:
        return f"REPL output:\n{outputs[0]}"
    return "\n\n".join(f"REPL output (block {i}):\n{out}" for i, out in enumerate(outputs, 1))


def repeated_code_note(first_turn: int) -> str:
    """Appended to the output of a block the model already ran: small models otherwise repeat their first
    step every turn (seen with Qwen2.5-Coder-0.5B at temperature 0)."""
    return (
        f"\n[note: you ran this same code in turn {first_turn}; its output was already shown. Take the next "
        'step, or set answer["content"] and answer["ready"] = True.]'
    )


NO_CODE_MESSAGE = (
    "No ```repl block found. Write Python in a ```repl block to explore `context`, or set "
    'answer["content"] and answer["ready"] = True in a ```repl block to finish.'
)


def final_answer_prompt(draft: str, query: str, form: AnswerForm | None = None) -> str:
    """The last call at max_iterations: asks for the answer as plain text, restating the query and the form it
    asks for (small models otherwise echo the instruction's last words back as their answer)."""
    note = f'Your current draft (answer["content"]):\n{draft}\n\n' if draft else ""
    return (
        f"You have no turns left and cannot run code any more. {note}"
        f"Write your final answer in plain text to the query: {query}{wanted(query, form)}"
    )


def missing_final_var(name: str) -> str:
    """What the model is told when its reply ends with ``FINAL_VAR(name)`` and no such variable exists (the
    run goes on, as in the official RLM)."""
    return (
        f"FINAL_VAR({name}): there is no variable named {name!r} in the REPL, so the run did not end. "
        "Assign it in a ```repl block first (SHOW_VARS() lists your variables), or write FINAL(your answer)."
    )


def compacted_note(summary: str) -> str:
    """Appended to the first user message when the turns after it were folded into a summary."""
    return (
        "\n\nYour earlier turns were summarised to fit your context window (the full conversation is in the "
        "REPL variable `history`, a list of role/content dicts; your REPL variables are all still there).\n"
        f"Summary of your earlier turns:\n{summary.strip()}"
    )
