"""The eval task families on the simulator: scripted-root programs and the rule-based sub-model's answers.

The simulator's ``ScriptedRoot`` and ``RuleBasedSubModel`` (``rlm_async.sim._responders``) ask here before
their generic fallback. The programs solve each family the way an RLM would, through ``llm_batch`` sub-calls,
so an eval's latency, calls and tokens can be measured at any length without a real model:

- S-NIAH: peek; split the text into overlapping chunks of 30,000 characters; one batch asking each chunk for
  the key's value; answer with the first value found.
- OOLONG and OOLONG-Pairs: peek; parse the ``Date || User || Instance`` lines; one batch asking for the labels
  of 100 questions per call; retry failed calls once; compute the answer in the REPL with
  ``rlm_async.eval._answers`` (its source is pasted into the cell).

**Simulator scores measure the plumbing, not intelligence.** The sub-model finds needles by string search
and labels TREC questions with a dozen keyword rules (:func:`classify`), so OOLONG scores on the simulator
reflect those rules' accuracy. The same sub-model also answers whole prompts of the single-call ("plain")
baseline, from whatever part of the context survived truncation.
"""

from __future__ import annotations

import inspect
import re

from ..sim._responders import _OK, _block  # the scripted root's own helpers, shared
from . import _answers
from ._answers import LABELS, oolong_answer, oolong_render, pair_users, pairs_render, parse_line
from ._oolong import parse_question
from ._pairs import spec_for_query

__all__ = ["CHUNK_CHARS", "CLASSIFY_HEAD", "LINES_PER_CALL", "classify", "root_program", "sub_answer"]

#: Characters of haystack per S-NIAH sub-call (plus :data:`OVERLAP`, so a needle never falls between two).
CHUNK_CHARS, OVERLAP = 30_000, 400
#: OOLONG questions labelled per sub-call.
LINES_PER_CALL = 100
#: The head of the labelling sub-prompt; numbered questions follow it.
CLASSIFY_HEAD = (
    "Classify each question below by the kind of answer it asks for, as one of these labels: "
    + ", ".join(LABELS)
    + '. Reply with one line per question, "<number>: <label>", numbering the questions as below.\n\n'
)
_NIAH_HEAD = re.compile(r'^Find the special magic (number|word|uuid) for "([^"]+)" in the text below\.')
_NIAH_QUESTION = re.compile(r"What is the special magic (number|word|uuid) for (.+?) mentioned in the provided text\?")

_TEXT = """
text = context if isinstance(context, str) else "\\n".join(map(str, context))
"""
_ROWS = """
rows = [line for line in text.splitlines() if line.startswith("Date: ")]
"""


def _peek(lines: bool) -> str:
    show = 'print(len(text), "characters;", text.count("\\n") + 1, "lines")\nprint(text[:400])'
    return _block(_TEXT, show, *((_ROWS, 'print(len(rows), "data lines")') if lines else ()))


def _niah_program(kind: str, key: str, batch: str) -> list[str]:
    head = f'Find the special magic {kind} for "{key}" in the text below. Reply with the {kind} only, or NONE.\n\n'
    work = _block(
        _TEXT,
        _OK,
        f"""
        head = {head!r}
        chunks = [text[i : i + {CHUNK_CHARS + OVERLAP}] for i in range(0, len(text), {CHUNK_CHARS})]
        replies = {batch}([head + chunk for chunk in chunks])
        found = [r.strip() for r in replies if _ok(r) and r.strip() and r.strip() != "NONE"]
        print(len(chunks), "chunks;", sum(not _ok(r) for r in replies), "failed;", found[:3])
        value = found[0] if found else "not found"
        answer["content"] = f"The special magic {kind} for {key} mentioned in the provided text is {{value}}."
        answer["ready"] = True
        """,
    )
    return [_peek(False), work]


def _label_program(spec_literal: str, finish: str, batch: str) -> list[str]:
    """Label every line through sub-calls, then ``finish`` (an expression over ``spec`` and ``records``)."""
    work = _block(
        inspect.getsource(_answers),
        _TEXT,
        _ROWS,
        _OK,
        f"""
        parsed = [p for p in (parse_line(line) for line in rows) if p is not None]
        chunks = [parsed[i : i + {LINES_PER_CALL}] for i in range(0, len(parsed), {LINES_PER_CALL})]
        prompts = [{CLASSIFY_HEAD!r} + "\\n".join(f"{{j}}. {{p[2]}}" for j, p in enumerate(c, 1)) for c in chunks]
        replies = {batch}(prompts)
        failed = [i for i, r in enumerate(replies) if not _ok(r)]
        if failed:
            again = {batch}([prompts[i] for i in failed])
            for i, r in zip(failed, again):
                replies[i] = r
        records, unlabelled = [], 0
        for c, r in zip(chunks, replies):
            for p, label in zip(c, parse_labels(r if _ok(r) else "", len(c))):
                if label is None:
                    unlabelled += 1
                else:
                    records.append((p[0], p[1], label))
        spec = {spec_literal}
        answer["content"] = {finish}
        answer["ready"] = True
        print(len(chunks), "calls;", len(records), "labelled;", unlabelled, "unlabelled")
        """,
    )
    return [_peek(True), work]


def root_program(query: str, asynchronous: bool) -> list[str] | None:
    """The scripted root's turns for an eval query (S-NIAH, OOLONG or OOLONG-Pairs), in rlm_async's dialect
    (``await llm_batch``) or the official ``rlms`` one (``llm_query_batched``); None for any other query."""
    batch = "await llm_batch" if asynchronous else "llm_query_batched"
    if m := _NIAH_QUESTION.search(query):
        return _niah_program(m.group(1), m.group(2), batch)
    if (spec := parse_question(query)) is not None:
        return _label_program(repr(spec), "oolong_render(spec, oolong_answer(spec, records))", batch)
    if (pairs := spec_for_query(query)) is not None:
        return _label_program(repr(pairs), "pairs_render(pair_users(spec, records))", batch)
    return None


_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (label, re.compile(pattern))
    for label, pattern in (
        ("abbreviation", r"\b(stand for|stands for|abbreviat\w*|acronym)\b|^what does [a-z.]{2,8} mean"),
        ("human being", r"^(who|whom|whose)\b|^(what|which|name the) (person|man|woman|actor|actress|president|"
                        r"king|queen|author|writer|singer|artist|player|company|team|group)\b"),
        ("location", r"^where\b|^(what|which|name the) (country|city|state|continent|river|mountain|ocean|island|"
                     r"capital|province|county|lake|sea|place|town|nation)\b"),
        ("numeric value", r"^(how (many|much|long|far|old|tall|big|fast|hot|cold|large|deep|high|wide|heavy|often))"
                          r"\b|^when\b|^(what|which) (year|date|day|month|percentage|percent|number|population|"
                          r"temperature|age|time|speed|distance)\b|^what is the (population|temperature|speed|"
                          r"distance|size|height|length|weight|age|cost|price)\b"),
        ("description and abstract concept", r"^(why|how)\b|^(define|describe)\b|^what (is|are|was|were) (a|an|the)?"
                                             r"\s*\w+\s*\?$|\bmean\b|^what causes\b"),
    )
)  # fmt: skip


def classify(question: str) -> str:
    """The simulator's TREC coarse label for ``question``: the first keyword rule that matches (abbreviation,
    human being, location, numeric value, description), else ``"entity"``. A stand-in for a model, not a
    classifier anyone should use."""
    q = question.strip().lower()
    return next((label for label, rule in _RULES if rule.search(q)), "entity")


def _label_reply(body: str) -> str:
    out = []
    for line in body.splitlines():
        m = re.match(r"^(\d+)\. (.*)$", line)
        if m:
            out.append(f"{m.group(1)}: {classify(m.group(2))}")
    return "\n".join(out)


def _records(text: str) -> list[_answers.Record]:
    parsed = (parse_line(line) for line in text.splitlines())
    return [(p[0], p[1], classify(p[2])) for p in parsed if p is not None]


def sub_answer(prompt: str) -> str | None:
    """The rule-based sub-model's reply to an eval prompt, or None for any other prompt.

    Recognised: the S-NIAH chunk prompt (the value found by string search, or ``NONE``), the labelling prompt
    (``<n>: <label>`` per question, from :func:`classify`), and a whole single-call prompt ending in an
    S-NIAH, OOLONG or OOLONG-Pairs question (answered from the text it holds).
    """
    head, _, body = prompt.partition("\n\n")
    if m := _NIAH_HEAD.match(head):
        return _needle(body, m.group(1), m.group(2)) or "NONE"
    if prompt.startswith(CLASSIFY_HEAD):
        return _label_reply(prompt[len(CLASSIFY_HEAD) :])
    last = prompt.rstrip().rsplit("\n", 1)[-1]
    if m := _NIAH_QUESTION.fullmatch(last.strip()):
        value = _needle(prompt, m.group(1), m.group(2))
        return (
            f"The special magic {m.group(1)} for {m.group(2)} mentioned in the provided text is {value or 'unknown'}."
        )
    if (spec := parse_question(last)) is not None:
        return oolong_render(spec, oolong_answer(spec, _records(prompt)))
    if (pairs := spec_for_query(last)) is not None:
        return pairs_render(pair_users(pairs, _records(prompt)))
    return None


def _needle(text: str, kind: str, key: str) -> str | None:
    m = re.search(rf"One of the special magic {kind}s for {re.escape(key)} is: (.+?)\.(?:\s|$)", text)
    return m.group(1) if m else None
