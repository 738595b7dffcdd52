"""Guardrails on how an agent's turns and its run end, for models that slip (issue 16).

Small open models (Qwen2.5-Coder 0.5B and 1.5B on llama.cpp, docs/eval.md) end runs in ways a strong model
rarely does: an empty reply, a cell that sets ``answer["ready"]`` before the model has read a single output,
an answer that is a copy of the input when the query asked for one number. The engine cannot make them
right, but it decides what such a slip costs. This module holds those decisions, free of I/O:

- :func:`answer_form`: the form of answer a query asks for (a number, numbers, yes or no, a list, or a
  template written out in the query, such as ``in the form 'Answer: number'``), read from its wording;
- :func:`fits_form`: whether an answer could be of that form (a loose test: it only catches the answers
  that plainly are not);
- :class:`FinishGate`: whether a finish ends the agent, or is refused once with a note that says why.

Nothing here names a task or a benchmark: the forms are the ones queries state in plain words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["EARLY_READY_NOTE", "AnswerForm", "FinishGate", "Verdict", "answer_form", "fits_form", "form_note"]


@dataclass(frozen=True, slots=True)
class AnswerForm:
    """The form of answer a query asks for.

    Attributes:
        kind: ``"template"`` (the query writes the form out, in quotes), ``"number"``, ``"numbers"``,
            ``"yes/no"`` or ``"list"``.
        text: how the form is said to the model: the template itself, or a few words ("one number").
    """

    kind: Literal["template", "number", "numbers", "yes/no", "list"]
    text: str


_TEMPLATE = re.compile(r"\bin the (?:form|format)\s*(?:of\s*)?[:]?\s*(['\"`])(.+?)\1", re.IGNORECASE | re.DOTALL)
_TEMPLATE_PAREN = re.compile(r"\bin the (?:form|format)\s*(?:of\s*)?[:]?\s*(\([^)]*\))", re.IGNORECASE)
_ONE_NUMBER = re.compile(
    r"\bhow (?:many|much)\b|\b(?:answer|reply|respond)\w* with (?:one|a single|a|the|only the|just the|only a) "
    r"(?:number|integer|count)\b|\bwhat is the (?:[\w-]+ ){0,4}(?:number|count|total)\b",
    re.IGNORECASE,
)
_MANY_NUMBERS = re.compile(r"\bwhat are (?:all )?the (?:[\w-]+ ){0,4}numbers\b", re.IGNORECASE)
_YES_NO = re.compile(r"\byes (?:or|/) no\b|\byes/no\b", re.IGNORECASE)
_LIST = re.compile(r"\b(?:list|enumerate|name) (?:all|every|each)\b|\banswer with a list\b", re.IGNORECASE)
_DIGIT = re.compile(r"\d")
_NUMBER_WORD = re.compile(
    r"\b(?:zero|none|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|"
    r"sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety|hundred)\b",
    re.IGNORECASE,
)
_YES_OR_NO_WORD = re.compile(r"\b(?:yes|no)\b", re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z]{2,}")

#: An answer of one number (or yes or no) longer than this is not one: it is prose or a copy of the input.
ONE_VALUE_MAX_CHARS = 300
#: An answer of a few numbers longer than this is a copy of the input, not the numbers.
FEW_VALUES_MAX_CHARS = 2_000


def answer_form(query: str) -> AnswerForm | None:
    """The form of answer ``query`` asks for in plain words, or None when it names none.

    A template the query writes out in quotes (``in the form 'Label: answer'``) or in brackets
    (``in the format (user_id_1, user_id_2)``) comes first, then one number ("how many", "answer with one
    number", "what is the ... number"), several numbers ("what are all the ... numbers"), yes or no, and a
    list ("list all ...").
    """
    if m := _TEMPLATE.search(query):
        return AnswerForm("template", m.group(2).strip())
    if m := _TEMPLATE_PAREN.search(query):
        return AnswerForm("template", m.group(1).strip())
    if _MANY_NUMBERS.search(query):
        return AnswerForm("numbers", "the numbers only")
    if _ONE_NUMBER.search(query):
        return AnswerForm("number", "one number")
    if _YES_NO.search(query):
        return AnswerForm("yes/no", "yes or no")
    if _LIST.search(query):
        return AnswerForm("list", "a list")
    return None


def fits_form(answer: str, form: AnswerForm) -> bool:
    """Whether ``answer`` could be of ``form``. Loose on purpose: it fails only answers that plainly are not.

    - ``number``: a digit or a number word, in at most :data:`ONE_VALUE_MAX_CHARS` characters;
    - ``numbers``: a digit, in at most :data:`FEW_VALUES_MAX_CHARS` characters;
    - ``yes/no``: the word yes or no among the first :data:`ONE_VALUE_MAX_CHARS` characters;
    - ``template``: the template's first literal word, when it starts with one (``Answer`` of
      ``'Answer: number'``), appears in the answer; a template that starts with a placeholder always fits;
    - ``list``: always (a list has too many shapes to check).
    """
    text = answer.strip()
    if form.kind == "number":
        return len(text) <= ONE_VALUE_MAX_CHARS and bool(_DIGIT.search(text) or _NUMBER_WORD.search(text))
    if form.kind == "numbers":
        return len(text) <= FEW_VALUES_MAX_CHARS and bool(_DIGIT.search(text))
    if form.kind == "yes/no":
        return bool(_YES_OR_NO_WORD.search(text[:ONE_VALUE_MAX_CHARS]))
    if form.kind == "template":
        lead = form.text.split(":", 1)[0] if ":" in form.text else ""
        if not _WORD.fullmatch(lead.strip()):
            return True
        return lead.strip().lower() in text.lower()
    return True


def form_note(form: AnswerForm, answer: str) -> str:
    """What a model is told when its answer does not fit ``form``."""
    what = f"in the form '{form.text}'" if form.kind == "template" else form.text
    return (
        f'[note: the query asks for {what}, but answer["content"] is {len(answer.strip()):,} characters that '
        f'do not look like it. Put only the answer, {what}, in answer["content"], then set '
        'answer["ready"] = True. (Setting it again unchanged keeps this answer.)]'
    )


def wanted(query: str, form: AnswerForm | None) -> str:
    """The sentence that asks for ``query``'s form, such as ``" Answer with one number."`` (with a leading
    space), when its last sentence does not already state it; else ``""``."""
    if form is None:
        return ""
    ending = re.split(r"(?<=[.?!])\s+", query.strip())[-1]
    if form.text.lower() in ending.lower():
        return ""
    return f" Answer {f'in the form {form.text!r}' if form.kind == 'template' else 'with ' + form.text}."


def restate(query: str, form: AnswerForm | None) -> str:
    """The reminder on an agent's last turn with the REPL: the query, and its form when it asks for one."""
    return (
        f"[note: this is your last turn to run code. The query is: {query}{wanted(query, form)} Put your answer "
        'in answer["content"] and set answer["ready"] = True in this turn.]'
    )


EMPTY_ANSWER_NOTE = (
    '[note: answer["ready"] was set to True but answer["content"] is empty, so the run is not finished. Look '
    'at the output above, put your answer in answer["content"], then set answer["ready"] = True.]'
)

EARLY_READY_NOTE = (
    '[note: answer["ready"] was set before you had seen any output of your code, so the run is not finished '
    'yet. Read the output above: if answer["content"] is right, set answer["ready"] = True again; if not, fix '
    "it first.]"
)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What becomes of a finish.

    Attributes:
        action: ``"accept"`` (the agent ends with its answer), ``"refuse"`` (it goes on; ``note`` is shown to
            the model), or ``"empty"`` (it ends with ``stop_reason="empty_answer"``).
        check: which check refused it (``"empty"``, ``"early"`` or ``"form"``), or for an accepted finish the
            check that only warned (``"early"``), else None.
        note: the text the model is shown with the refusal.
    """

    action: Literal["accept", "refuse", "empty"]
    check: str | None = None
    note: str = ""


@dataclass
class FinishGate:
    """Judges each finish of one agent (``answer["ready"] = True``, ``FINAL``, ``FINAL_VAR``).

    Each check refuses a finish once, with a note; a model that finishes the same way again is taken at its
    word, except an empty answer, which ends the agent with ``stop_reason="empty_answer"`` the second time
    and is never reported as an answer. The checks, in order:

    - ``empty``: nothing in the answer (Qwen2.5-Coder-0.5B printed a peek and set ready in one cell);
    - ``early``: the finish came from a reply whose code printed (or raised) before the model had seen any
      output at all: it wrote its first look at the data and its answer at once, so the answer cannot rest
      on that look. With ``early="refuse"`` it is refused once; with ``"warn"`` it is accepted with
      ``check="early"`` in the verdict, for the trace (the measurement behind each profile's choice is in
      docs/eval.md). A first reply that computes its answer without printing anything is not early;
    - ``form``: the query asks for a form (:func:`answer_form`) and the answer plainly is not of it
      (Qwen2.5-Coder-1.5B answered a count with 3,000 characters of the input copied back).

    On the agent's last turn only the empty check applies: a refusal there would leave no turn to act on it.

    Attributes:
        form: the form the query asks for, or None.
    """

    query: str
    early: Literal["refuse", "warn"] = "warn"
    form: AnswerForm | None = field(init=False)
    _seen_output = False  # the model has been shown the output of a cell
    _unseen_print = False  # a cell of the reply at hand printed or raised, and nothing was shown before
    _refused: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.form = answer_form(self.query)

    def cell_ran(self, printed: bool) -> None:
        """Tell the gate a cell ran; ``printed``: it printed something or raised."""
        self._unseen_print = self._unseen_print or (printed and not self._seen_output)

    def outputs_shown(self) -> None:
        """Tell the gate the model has been shown its cells' output."""
        self._seen_output, self._unseen_print = True, False

    def judge(self, answer: str, *, last_turn: bool = False) -> Verdict:
        """The verdict on a finish with ``answer``; a refusal is counted, so ask once per finish."""
        if not answer.strip():
            return self._once("empty", EMPTY_ANSWER_NOTE) or Verdict("empty")
        if last_turn:
            return Verdict("accept")
        warning = None
        if self._unseen_print:
            if self.early == "refuse" and (verdict := self._once("early", EARLY_READY_NOTE)):
                return verdict
            warning = "early"
        form = self.form
        if form and not fits_form(answer, form) and (verdict := self._once("form", form_note(form, answer))):
            return verdict
        return Verdict("accept", warning)

    def _once(self, check: str, note: str) -> Verdict | None:
        if check in self._refused:
            return None
        self._refused.add(check)
        return Verdict("refuse", check, note)


def cut_reply(text: str, finish_reason: str | None, completion_tokens: int) -> str | None:
    """Why a reply with no code to run came back cut or empty, or None when it is neither.

    ``"length"``: it hit ``max_tokens`` (``finish_reason == "length"``) inside an unclosed code block;
    ``"stop_sequence"``: it is empty, yet the model generated more than one token, so a stop sequence cut it
    at its start (Qwen2.5-Coder-0.5B began a reply with "REPL output": 3 tokens, all cut);
    ``"empty"``: nothing at all. A reply that holds a closed code block is never cut here.
    """
    if finish_reason == "length" and text.count("```") % 2 == 1:
        return "length"
    if text.strip():
        return None
    return "stop_sequence" if finish_reason == "stop" and completion_tokens > 1 else "empty"


def nudge_note(why: str, stop_sequences: tuple[str, ...], max_tokens: int | None) -> str:
    """What the model is told after a cut or empty reply, before it is asked again (the turn is not spent)."""
    if why == "length":
        limit = f" of {max_tokens:,} tokens" if max_tokens else ""
        return (
            f"[note: your reply hit the length limit{limit} inside a code block, so it was not run. Write it "
            "again, shorter: one ```repl block, ending with ```.]"
        )
    cut = ""
    if why == "stop_sequence":
        shown = " or ".join(repr(s) for s in stop_sequences)
        cut = f" (it began with {shown}, which only the REPL writes, and was cut there)"
    return f"[note: your reply was empty{cut}. Write your next step as Python code in a ```repl block.]"
