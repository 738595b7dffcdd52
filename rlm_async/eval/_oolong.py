"""OOLONG trec_coarse: aggregation questions over a context window of labelled TREC questions.

The questions follow OOLONG's ``task_constructors.py`` (``src/data_gen/oolong-synth`` of abertsch72/oolong),
word for word, typos included ("occuring"):

- counting (``CountingTasks``): the most common label (asked only when it is unique and 2 points of share
  clear of the next), the least common label, label A against label B (asked when their shares differ by
  more than 2 points or are equal), and how many instances have label L;
- user (``UserTasks``): the same counting questions over the instances of one user, picked among the 50
  most frequent users (OOLONG's released code samples ``min(1, ...)`` users, so always one);
- timeline (``TemporalTasks``): the counting questions over one month of any year and over a date range
  (OOLONG's rules for picking them), and "was label L more common, less common, or the same frequency before
  T, as compared to after T?" (asked when the shares differ by more than 2 points or are equal).

Departures: the least common label is asked only when it is unique (OOLONG scores a tie against the first
tied label only); OOLONG's date, user-ranking and month-ranking questions are not generated. A window gets
``per_window`` questions (OOLONG keeps 50 per window), picked round-robin over the question kinds.
"""

from __future__ import annotations

import datetime
import itertools
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from .._errors import ConfigError
from ._answers import MONTHS, Record, Spec, format_date, oolong_answer
from ._scorers import oolong_score
from ._task import Item, OolongExpected
from ._trec import Window, window

__all__ = ["candidates", "generate_oolong", "parse_question", "question_text"]

_GAP = 0.02  # OOLONG's 2% share difference for comparison questions
_ANSWER_TYPES: dict[str, Literal["label", "comparison", "numeric"]] = {
    "count": "numeric",
    "most_common": "label",
    "least_common": "label",
}


def _counting(counts: dict[str, int], prefix: Spec, group: str) -> list[Spec]:
    """OOLONG's ``CountingTasks`` over ``counts`` (label -> instances, in OOLONG's label order)."""
    total = sum(counts.values())
    if not counts or total == 0:
        return []
    labels = list(counts)
    out: list[Spec] = []

    def share(label: str) -> float:
        return counts[label] / total

    top = max(counts.values())
    tops = [k for k in labels if counts[k] == top]
    if len(tops) == 1 and all(abs(share(tops[0]) - share(k)) > _GAP for k in labels if k != tops[0]):
        out.append({**prefix, "kind": "most_common", "labels": labels, "group": group})
    bottom = min(counts.values())
    if sum(1 for k in labels if counts[k] == bottom) == 1:
        out.append({**prefix, "kind": "least_common", "labels": labels, "group": group})
    for a, b in itertools.combinations(labels, 2):
        diff = share(a) - share(b)
        if abs(diff) > _GAP or diff == 0:
            out.append({**prefix, "kind": "compare", "label": a, "other": b, "group": group})
    out += [{**prefix, "kind": "count", "label": label, "group": group} for label in labels]
    return out


def candidates(win: Window, rng: random.Random) -> list[Spec]:
    """Every question OOLONG's rules ask of ``win`` (specs for :func:`question_text` and ``oolong_answer``)."""
    rows = list(win.rows)
    full = Counter(r[2] for r in rows)
    specs = _counting({label: full.get(label, 0) for label in win.labels}, {}, "counting")
    # user: one of the 50 most frequent users (OOLONG: random.sample(top_users, min(1, ...)))
    top_users = [u for u, _ in sorted(Counter(r[1] for r in rows).items(), key=lambda t: -t[1])[:50]]
    if top_users:
        user = rng.choice(top_users)
        counts = dict(Counter(r[2] for r in rows if r[1] == user))
        specs += _counting(counts, {"users": [user]}, "user")
    by_date = sorted(rows, key=lambda r: r[0])
    specs += _timeline(by_date, rng)
    return specs


def _timeline(by_date: list[Record], rng: random.Random) -> list[Spec]:
    """OOLONG's ``TemporalTasks``: before/after comparisons, one month, one date range."""
    n = len(by_date)
    out: list[Spec] = []
    if n >= 4:
        for _ in range(10):  # OOLONG's patience
            start = rng.randint(int(n * 0.15), int(n * 0.75))
            pivot = by_date[start - 2 if start == n - 1 else start][0]
            before = [r[2] for r in by_date if r[0] < pivot]
            after = [r[2] for r in by_date if r[0] > pivot]
            if not before or not after:
                continue
            made = False
            labels = list(dict.fromkeys(before))
            rng.shuffle(labels)
            for label in labels:
                diff = before.count(label) / len(before) - after.count(label) / len(after)
                if abs(diff) > _GAP or diff == 0:
                    out.append(
                        {"kind": "compare_time", "label": label, "pivot": pivot.isoformat(), "group": "timeline"}
                    )
                    made = made or diff != 0
            if made:
                break
    months = [m for m in range(1, 13) if any(r[0].month == m for r in by_date)]
    if months:
        month = rng.choice(months)
        counts = dict(Counter(r[2] for r in by_date if r[0].month == month))
        out += _counting(counts, {"month": month}, "timeline")
    first, offset = 0, -1
    if n >= 4:
        first = rng.randint(int(n * 0.1), int(n * 0.5))
        while first > 0 and by_date[first - 1][0] == by_date[first][0]:
            first -= 1
        offset = 10
        if n < 11:
            offset = n // 2
            if first + offset + 2 >= n:
                offset = -1
    if offset > 2:
        last = min(rng.randint(first + offset, max(first + offset + 2, int(n * 0.9))), n - 1)
        while last < n - 1 and by_date[last + 1][0] == by_date[last][0]:
            last += 1
        counts = dict(Counter(r[2] for r in by_date[first : last + 1]))
        span = {"start": by_date[first][0].isoformat(), "end": by_date[last][0].isoformat()}
        out += _counting(counts, span, "timeline")
    return out


def _prefix(spec: Spec) -> str:
    if spec.get("users") is not None:
        ids = ", ".join(str(u) for u in spec["users"])
        return (
            f"For the following question, only consider the subset of instances that are associated with user IDs "
            f"{ids}. Among instances associated with these users,"
        )
    if spec.get("month") is not None:
        name = MONTHS[spec["month"] - 1]
        return (
            f"For the following question, only consider the subset of instances that occur in {name} of any year. "
            f"Among instances occuring in {name},"
        )
    if spec.get("start") is not None:
        start = format_date(datetime.date.fromisoformat(spec["start"]))
        end = format_date(datetime.date.fromisoformat(spec["end"]))
        return (
            f"For the following question, only consider the subset of instances that occur between {start} and "
            f"{end}, inclusive. Among instances occuring in this date range,"
        )
    return "In the above data,"


def question_text(spec: Spec) -> str:
    """The question OOLONG asks for ``spec``, one line."""
    kind, prefix = spec["kind"], _prefix(spec)
    if kind in ("most_common", "least_common"):
        which = "most" if kind == "most_common" else "least"
        return (
            f"{prefix} which of the labels is the {which} common? Give your final answer in the form 'Label: answer' "
            f"where answer is one of the labels: {', '.join(spec['labels'])}."
        )
    if kind == "compare":
        a, b = spec["label"], spec["other"]
        return (
            f"{prefix} is label '{a}' more common, less common, or the same frequency as label '{b}'? Give your "
            f"final answer in the form 'Answer: {a} is [X] {b}', where [X] is 'more common than', 'less common "
            "than', or 'same frequency as'."
        )
    if kind == "count":
        return (
            f"{prefix} how many data points should be classified as label '{spec['label']}'? Give your final answer "
            "in the form 'Answer: number'."
        )
    if kind == "compare_time":
        label, t = spec["label"], spec["pivot"]
        return (
            f"In the above data, was label '{label}' more common, less common, or the same frequency before {t}, "
            f"as compared to after {t}? Give your final answer in the form 'Answer: {label} is [X] before {t}', "
            "where [X] is 'more common', 'less common', or 'the same frequency'."
        )
    raise ConfigError(f"unknown OOLONG question kind {kind!r}")


_PREFIXES = [
    (re.compile(r"^In the above data, (.*)$"), None),
    (re.compile(r"^For the following question, only consider the subset of instances that are associated with "
                r"user IDs ([\d, ]+)\. Among instances associated with these users, (.*)$"), "users"),
    (re.compile(r"^For the following question, only consider the subset of instances that occur in (\w+) of any "
                r"year\. Among instances occuring in \w+, (.*)$"), "month"),
    (re.compile(r"^For the following question, only consider the subset of instances that occur between "
                r"(\w{3} \d{2}, \d{4}) and (\w{3} \d{2}, \d{4}), inclusive\. Among instances occuring in this date "
                r"range, (.*)$"), "range"),
]  # fmt: skip
_CORES = [
    (re.compile(r"^which of the labels is the (most|least) common\? Give your final answer in the form 'Label: "
                r"answer' where answer is one of the labels: (.*)\.$"), "rank"),
    (re.compile(r"^is label '([^']+)' more common, less common, or the same frequency as label '([^']+)'\?"),
     "compare"),
    (re.compile(r"^how many data points should be classified as label '([^']+)'\?"), "count"),
    (re.compile(r"^was label '([^']+)' more common, less common, or the same frequency before "
                r"(\d{4}-\d{2}-\d{2}), as compared to after"), "compare_time"),
]  # fmt: skip


def _iso(text: str) -> str:
    month, day, year = text.replace(",", "").split()
    return datetime.date(int(year), [m[:3] for m in MONTHS].index(month) + 1, int(day)).isoformat()


def parse_question(text: str) -> Spec | None:
    """The spec of an OOLONG question written by :func:`question_text`, or None for any other text (the
    simulator's scripted root reads the question back with it). ``parse_question(question_text(s))`` has the
    keys of ``s`` except ``group``."""
    text = text.strip()
    for pattern, scope in _PREFIXES:
        m = pattern.match(text)
        if m is None:
            continue
        spec: Spec = {}
        if scope == "users":
            spec["users"] = [int(u) for u in m.group(1).replace(" ", "").split(",") if u]
        elif scope == "month":
            if m.group(1) not in MONTHS:
                return None
            spec["month"] = MONTHS.index(m.group(1)) + 1
        elif scope == "range":
            spec["start"], spec["end"] = _iso(m.group(1)), _iso(m.group(2))
        core = m.group(m.lastindex or 1)
        for core_pattern, kind in _CORES:
            c = core_pattern.match(core)
            if c is None:
                continue
            if kind == "rank":
                return {**spec, "kind": f"{c.group(1)}_common", "labels": c.group(2).split(", ")}
            if kind == "compare":
                return {**spec, "kind": "compare", "label": c.group(1), "other": c.group(2)}
            if kind == "count":
                return {**spec, "kind": "count", "label": c.group(1)}
            if scope is None:
                return {"kind": "compare_time", "label": c.group(1), "pivot": c.group(2)}
        return None
    return None


def _pick(specs: Sequence[Spec], k: int, rng: random.Random) -> list[Spec]:
    """``k`` specs, round-robin over (group, kind) buckets in a shuffled order; repeats once all are used."""
    buckets: dict[tuple[str, str], list[Spec]] = {}
    for spec in specs:
        buckets.setdefault((spec["group"], spec["kind"]), []).append(spec)
    order = list(buckets)
    rng.shuffle(order)
    for key in order:
        rng.shuffle(buckets[key])
    picked: list[Spec] = []
    while len(picked) < k and any(buckets.values()):
        for key in order:
            if buckets[key] and len(picked) < k:
                picked.append(buckets[key].pop())
    while len(picked) < k and specs:  # a small window has fewer questions than asked for
        picked.append(specs[len(picked) % len(specs)])
    return picked


def generate_oolong(
    n: int, length_tokens: int, seed: int, data_dir: str | Path | None = None, *, per_window: int = 10
) -> list[Item]:
    """``n`` OOLONG trec_coarse items at ``length_tokens``: window ``i // per_window`` answers question
    ``i % per_window`` of its pick.

    Raises:
        ConfigError: the data is missing (see ``rlm_async.eval._trec``), or a bad ``n`` / ``per_window``.
    """
    if n < 1 or per_window < 1:
        raise ConfigError(f"n and per_window must be >= 1, got {n} and {per_window}")
    items: list[Item] = []
    for w in range(-(-n // per_window)):
        win = window(seed, length_tokens, w, data_dir)
        rng = random.Random(f"oolong-questions/{win.key}")
        chosen = _pick(candidates(win, rng), min(per_window, n - w * per_window), rng)
        for j, spec in enumerate(chosen):
            i = w * per_window + j
            gold = oolong_answer(spec, list(win.rows))
            answer_type = _ANSWER_TYPES.get(spec["kind"], "comparison")
            query = question_text(spec)
            items.append(
                win.item(
                    "oolong",
                    i,
                    query,
                    OolongExpected(gold, answer_type),
                    oolong_score,
                    length_tokens,
                    seed,
                    kind=spec["kind"],
                    group=spec["group"],
                )
            )
    return items
