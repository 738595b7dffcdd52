"""Answers to OOLONG and OOLONG-Pairs questions computed from labelled records.

One implementation serves two readers: the generators compute the gold answers with it from the true labels,
and the simulator's scripted root pastes this module's source into a REPL cell and runs it on the labels its
sub-calls returned (``rlm_async.eval._simulated``). It therefore uses the standard library only and has no
``from __future__`` import (that must be a cell's first statement). Its rules are checked against hand counts
in tests/test_eval.py.

A record is ``(date, user_id, label)``: a ``datetime.date``, an int, and one of :data:`LABELS`. A question
spec is a plain dict (see ``rlm_async.eval._oolong`` and ``rlm_async.eval._pairs`` for the kinds).
"""

import collections
import datetime
import itertools
import re
from typing import Any

#: TREC's six coarse labels as OOLONG names them (``TREC_Coarse.label_map`` in OOLONG's datasets_loader.py).
LABELS = (
    "abbreviation",
    "entity",
    "description and abstract concept",
    "human being",
    "location",
    "numeric value",
)
MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
_ABBR = {m[:3]: i for i, m in enumerate(MONTHS, 1)}
_LINE = re.compile(r"^Date: ([A-Z][a-z]{2}) (\d{1,2}), (\d{4}) \|\| User: (\d+) \|\| Instance: (.*)$")

Record = tuple[datetime.date, int, str]
#: A question spec: a plain dict, so that it can be written into a REPL cell as a literal.
Spec = dict[str, Any]


def parse_line(line: str) -> tuple[datetime.date, int, str] | None:
    """``(date, user_id, question)`` from an OOLONG line ``Date: Dec 12, 2022 || User: 63685 || Instance: ...``,
    or None for any other line. Month abbreviations are read without the locale (English, as OOLONG writes
    them with ``strftime("%b %d, %Y")``)."""
    m = _LINE.match(line.rstrip("\n"))
    if m is None or m.group(1) not in _ABBR:
        return None
    try:
        day = datetime.date(int(m.group(3)), _ABBR[m.group(1)], int(m.group(2)))
    except ValueError:
        return None
    return day, int(m.group(4)), m.group(5)


def format_date(day: datetime.date) -> str:
    """A date as OOLONG's lines and date-range questions write it: ``Dec 12, 2022``."""
    return f"{MONTHS[day.month - 1][:3]} {day.day:02d}, {day.year}"


def subset(spec: Spec, records: list[Record]) -> list[Record]:
    """The records an OOLONG question is about: all, or those of ``spec["users"]``, of ``spec["month"]``
    (1-12, any year), or dated ``spec["start"]`` to ``spec["end"]`` inclusive (ISO dates)."""
    if spec.get("users") is not None:
        users = set(spec["users"])
        return [r for r in records if r[1] in users]
    if spec.get("month") is not None:
        return [r for r in records if r[0].month == spec["month"]]
    if spec.get("start") is not None:
        start, end = datetime.date.fromisoformat(spec["start"]), datetime.date.fromisoformat(spec["end"])
        return [r for r in records if start <= r[0] <= end]
    return list(records)


def oolong_answer(spec: Spec, records: list[Record]) -> str:
    """The answer to one OOLONG question spec over ``records``, as OOLONG's gold answers read.

    Kinds: ``most_common`` / ``least_common`` (a label among ``spec["labels"]``, absent ones counting 0; on a
    tie the first listed), ``compare`` (``label`` against ``other``: "more common than", "less common than",
    "same frequency as"), ``count`` (instances of ``label``, as digits), ``compare_time`` (the share of
    ``label`` among instances dated before ``pivot`` against its share after it, both strict: "more common",
    "less common", "the same frequency").
    """
    rows = subset(spec, records)
    counts = collections.Counter(r[2] for r in rows)
    kind = spec["kind"]
    if kind in ("most_common", "least_common"):
        listed = [(counts.get(label, 0), i, label) for i, label in enumerate(spec["labels"])]
        pick = max(listed, key=lambda t: (t[0], -t[1])) if kind == "most_common" else min(listed)
        return str(pick[2])
    if kind == "compare":
        a, b = counts.get(spec["label"], 0), counts.get(spec["other"], 0)
        return "more common than" if a > b else "less common than" if a < b else "same frequency as"
    if kind == "count":
        return str(counts.get(spec["label"], 0))
    if kind == "compare_time":
        pivot = datetime.date.fromisoformat(spec["pivot"])
        before = [r[2] for r in rows if r[0] < pivot]
        after = [r[2] for r in rows if r[0] > pivot]
        # share before - share after, compared without division: nb / len(before) vs na / len(after)
        nb, na = before.count(spec["label"]), after.count(spec["label"])
        lhs, rhs = nb * max(len(after), 1), na * max(len(before), 1)
        return "more common" if lhs > rhs else "less common" if lhs < rhs else "the same frequency"
    raise ValueError(f"unknown OOLONG question kind {kind!r}")


def oolong_render(spec: Spec, value: str) -> str:
    """``value`` in the form the question asks for: ``Label: x``, ``Answer: n``, ``Answer: A is [X] B`` or
    ``Answer: L is [X] before T``."""
    kind = spec["kind"]
    if kind in ("most_common", "least_common"):
        return f"Label: {value}"
    if kind == "compare":
        return f"Answer: {spec['label']} is {value} {spec['other']}"
    if kind == "compare_time":
        return f"Answer: {spec['label']} is {value} before {spec['pivot']}"
    return f"Answer: {value}"


_REPLY_LINE = re.compile(r"^\s*(\d+)\s*[:.)\-]\s*(.+?)\s*$")


def parse_labels(reply: str, n: int) -> list[str | None]:
    """Labels of questions 1..n from a reply with lines ``<number>: <label>``; None where a number is missing
    or its label is not one of :data:`LABELS` (compared case-insensitively, quotes and a final period
    stripped)."""
    labels: list[str | None] = [None] * n
    for line in reply.splitlines():
        m = _REPLY_LINE.match(line)
        if m is None:
            continue
        index, label = int(m.group(1)), m.group(2).strip(" '\"`*.").lower()
        if 1 <= index <= n and label in LABELS:
            labels[index - 1] = label
    return labels


def _user_counts(records: list[Record]) -> dict[int, collections.Counter[str]]:
    per_user: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for _, user, label in records:
        per_user[user][label] += 1
    return per_user


def _meets(counts: collections.Counter[str], conditions: list[list[Any]]) -> bool:
    """Every ``[label, op, n]``: ``op`` is ``">="`` (at least n instances) or ``"=="`` (exactly n)."""
    for label, op, n in conditions:
        have = counts.get(label, 0)
        if (op == ">=" and have < n) or (op == "==" and have != n):
            return False
    return True


def pair_users(spec: Spec, records: list[Record]) -> set[tuple[int, int]]:
    """The pairs ``(low_id, high_id)`` of distinct users that an OOLONG-Pairs question spec asks for.

    ``mode == "both"``: both users have at least one instance with a label in ``spec["labels"]``, and, with a
    ``spec["constraint"]`` ``{"label", "op", "date"}``, every instance of that label of each user is strictly
    ``after`` / ``before`` the date. ``mode == "split"``: one user meets every condition of ``spec["one"]`` and
    the other every condition of ``spec["other"]`` (either way round).
    """
    per_user = _user_counts(records)
    if spec["mode"] == "both":
        constraint = spec.get("constraint")
        limit = datetime.date.fromisoformat(constraint["date"]) if constraint else None
        bad: set[int] = set()
        if constraint is not None and limit is not None:
            for day, user, label in records:
                if label == constraint["label"] and not (day > limit if constraint["op"] == "after" else day < limit):
                    bad.add(user)
        wanted = set(spec["labels"])
        chosen = sorted(u for u, c in per_user.items() if u not in bad and any(c.get(x, 0) for x in wanted))
        return set(itertools.combinations(chosen, 2))
    one = [u for u, c in per_user.items() if _meets(c, spec["one"])]
    other = [u for u, c in per_user.items() if _meets(c, spec["other"])]
    return {(min(a, b), max(a, b)) for a in one for b in other if a != b}


def pairs_render(pairs: set[tuple[int, int]]) -> str:
    """Pairs in the form the question asks for: ``(user_id_1, user_id_2)`` one per line, lower id first,
    sorted; ``"No pairs."`` for none."""
    return "\n".join(f"({a}, {b})" for a, b in sorted(pairs)) or "No pairs."
