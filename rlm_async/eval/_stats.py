"""Summary statistics of an eval: the mean score with a bootstrap interval, totals, latency percentiles."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._errors import ConfigError

__all__ = ["GroupSummary", "bootstrap_ci", "percentile", "summarise"]

#: Bootstrap resamples for the 95% interval (Efron and Tibshirani, "An Introduction to the Bootstrap", 1993:
#: 1,000 or more for percentile intervals).
BOOTSTRAP_RESAMPLES = 1000


def bootstrap_ci(
    scores: Sequence[float], *, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95
) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``scores`` (Efron and Tibshirani 1993, ch. 13):
    ``resamples`` means of samples drawn with replacement, cut at ``(1 - level) / 2`` and ``(1 + level) / 2``
    with :func:`percentile`. Seeded, so the same scores give the same interval. One score gives
    ``(score, score)``.

    Raises:
        ConfigError: no scores, ``resamples < 1`` or ``level`` outside (0, 1).
    """
    if not scores:
        raise ConfigError("bootstrap_ci needs at least one score")
    if resamples < 1 or not 0 < level < 1:
        raise ConfigError(f"need resamples >= 1 and 0 < level < 1, got {resamples} and {level}")
    rng = random.Random(seed)
    n = len(scores)
    means = sorted(sum(rng.choices(scores, k=n)) / n for _ in range(resamples))
    return percentile(means, (1 - level) / 2 * 100), percentile(means, (1 + level) / 2 * 100)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks (numpy's default,
    Hyndman and Fan's type 7).

    Raises:
        ConfigError: no values, or ``q`` outside 0..100.
    """
    if not values or not 0 <= q <= 100:
        raise ConfigError(f"percentile needs values and 0 <= q <= 100, got {len(values)} values and q={q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True, slots=True)
class GroupSummary:
    """One (task, engine, model, length) group of results.

    Attributes:
        task, engine, model: what ran.
        length_tokens: the target length of its items.
        n: items scored.
        score: the mean score in [0, 1] (accuracy for S-NIAH and OOLONG, F1 for OOLONG-Pairs).
        ci_low, ci_high: the 95% percentile-bootstrap interval of ``score`` (:func:`bootstrap_ci`).
        cost_usd: USD over the items (0 where neither the provider nor a price table gives a cost).
        prompt_tokens, completion_tokens: tokens over the items, as the provider reported them.
        calls: model calls over the items.
        wall_s: seconds over the items (they run one after another).
        p50_s, p95_s: per-item latency percentiles, seconds (:func:`percentile`).
        errors: items that ended without an answer (their score counts as 0).
        non_empty: items whose answer is not empty or blank (issue 16's target: at least 95% of runs).
        turns: the root's REPL turns summed over the items that report them (``turns_n`` of them), or None
            where none does (the plain call; rows written before turns were recorded).
        turns_n: items behind ``turns``.
        stop_reasons: stop reason -> items.
    """

    task: str
    engine: str
    model: str
    length_tokens: int
    n: int
    score: float
    ci_low: float
    ci_high: float
    cost_usd: float
    prompt_tokens: int
    completion_tokens: int
    calls: int
    wall_s: float
    p50_s: float
    p95_s: float
    errors: int
    non_empty: int = 0
    turns: int | None = None
    turns_n: int = 0
    stop_reasons: dict[str, int] = field(default_factory=dict, hash=False)


def summarise(rows: Sequence[Mapping[str, Any]], *, seed: int = 0) -> list[GroupSummary]:
    """Group ``results.jsonl`` rows by (task, engine, model, length_tokens) and summarise each group, sorted
    by those keys. The bootstrap is seeded with ``seed``."""
    groups: dict[tuple[str, str, str, int], list[Mapping[str, Any]]] = {}
    for row in rows:
        key = (str(row["task"]), str(row["engine"]), str(row["model"]), int(row["length_tokens"]))
        groups.setdefault(key, []).append(row)
    out = []
    for (task, engine, model, length), members in sorted(groups.items()):
        scores = [float(r["score"]) for r in members]
        walls = [float(r["wall_s"]) for r in members]
        low, high = bootstrap_ci(scores, seed=seed)
        usage = [r.get("usage") or {} for r in members]
        turns = [r["turns"] for r in members if isinstance(r.get("turns"), int)]
        out.append(
            GroupSummary(
                task,
                engine,
                model,
                length,
                len(members),
                sum(scores) / len(scores),
                low,
                high,
                sum(float(u.get("cost_usd") or 0.0) for u in usage),
                sum(int(u.get("prompt_tokens") or 0) for u in usage),
                sum(int(u.get("completion_tokens") or 0) for u in usage),
                sum(int(r.get("calls") or 0) for r in members),
                sum(walls),
                percentile(walls, 50),
                percentile(walls, 95),
                sum(1 for r in members if r.get("error")),
                non_empty=sum(1 for r in members if str(r.get("answer") or "").strip()),
                turns=sum(turns) if turns else None,
                turns_n=len(turns),
                stop_reasons=dict(Counter(str(r.get("stop_reason")) for r in members).most_common()),
            )
        )
    return out
