"""OOLONG-Pairs: the 20 pair-finding queries of the RLM paper over OOLONG's trec_coarse windows.

The queries are those of the paper's Appendix D.1 (Zhang, Kraska, Khattab, "Recursive Language Models",
arXiv 2512.24601), word for word; each query below is the paper's "Task k" sentence followed by the shared
instruction. The contexts are the OOLONG windows of ``rlm_async.eval._trec`` (the same windows the OOLONG
task asks about), ground truth is computed from their true labels (``rlm_async.eval._answers.pair_users``),
and the score is F1 over the predicted set of unordered pairs (``rlm_async.eval._scorers.pair_f1``).

Reading of the conditions (the paper states no more): "after" / "before" a date are strict; "all instances
that are a X for both users must be after D" holds for a user with no X instance; "one user has A, and the
other user has B" holds for a pair either way round; a user is never paired with itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._errors import ConfigError
from ._answers import Spec, pair_users
from ._scorers import pairs_score
from ._task import Item, PairsExpected
from ._trec import window

__all__ = ["PAIR_QUERIES", "generate_pairs", "spec_for_query"]

_LABEL_LIST = (
    "Each of the questions can be labelled as one of the labels (the data does not provide the labels, you need "
    "to figure out the label from the semantics of the question): description and abstract concept, entity, "
    "human being, numeric value, location, abbreviation. In your answer, list all pairs in the format "
    "(user_id_1, user_id_2), separated by newlines."
)
_HEAD = "In the above data, list all pairs of user IDs (no duplicate pairs, list lower ID first) "

DESC, ENT, HUM, NUM, LOC, ABBR = (
    "description and abstract concept",
    "entity",
    "human being",
    "numeric value",
    "location",
    "abbreviation",
)


def _both(text: str, labels: list[str], constraint: dict[str, str] | None = None) -> tuple[str, Spec]:
    return f"{_HEAD}where both users have {text}. {_LABEL_LIST}", {
        "mode": "both", "labels": labels, "constraint": constraint,
    }  # fmt: skip


def _split(text: str, one: list[list[Any]], other: list[list[Any]]) -> tuple[str, Spec]:
    return f"{_HEAD}such that {text}. {_LABEL_LIST}", {"mode": "split", "one": one, "other": other}


#: The paper's 20 queries (Task 1 .. Task 20) with the spec of each: ``mode "both"`` (labels any of which
#: each user needs, and an optional all-instances date constraint) or ``mode "split"`` (conditions
#: ``[label, ">=" | "==", n]`` on one user and on the other).
PAIR_QUERIES: tuple[tuple[str, Spec], ...] = (
    _both("at least one instance with a numeric value or location", [NUM, LOC]),
    _both("at least one instance with an entity or human being", [ENT, HUM]),
    _both("at least one instance with a description and abstract concept or abbreviation", [DESC, ABBR]),
    _both(
        "at least one instance with a human being or location, and all instances that are a human being for "
        "both users must be after January 6, 2023",
        [HUM, LOC],
        {"label": HUM, "op": "after", "date": "2023-01-06"},
    ),
    _both(
        "at least one instance with an entity or numeric value, and all instances that are an entity for both "
        "users must be before March 15, 2023",
        [ENT, NUM],
        {"label": ENT, "op": "before", "date": "2023-03-15"},
    ),
    _both("at least one instance with a location or abbreviation", [LOC, ABBR]),
    _both(
        "at least one instance with a description and abstract concept or numeric value, and all instances "
        "that are a numeric value for both users must be after February 1, 2023",
        [DESC, NUM],
        {"label": NUM, "op": "after", "date": "2023-02-01"},
    ),
    _both("at least one instance with a human being or description and abstract concept", [HUM, DESC]),
    _both(
        "at least one instance with an entity or location, and all instances that are a location for both "
        "users must be after April 10, 2023",
        [ENT, LOC],
        {"label": LOC, "op": "after", "date": "2023-04-10"},
    ),
    _both(
        "at least one instance with a numeric value or abbreviation, and all instances that are an "
        "abbreviation for both users must be before May 20, 2023",
        [NUM, ABBR],
        {"label": ABBR, "op": "before", "date": "2023-05-20"},
    ),
    _split(
        "one user has at least one instance with entity and one with abbreviation, and the other user has "
        "exactly one instance with entity",
        [[ENT, ">=", 1], [ABBR, ">=", 1]],
        [[ENT, "==", 1]],
    ),
    _split(
        "one user has at least two instances with numeric value, and the other user has at least one "
        "instance with location and at least one instance with human being",
        [[NUM, ">=", 2]],
        [[LOC, ">=", 1], [HUM, ">=", 1]],
    ),
    _split(
        "one user has exactly one instance with description and abstract concept, and the other user has at "
        "least one instance with abbreviation and at least one instance with entity",
        [[DESC, "==", 1]],
        [[ABBR, ">=", 1], [ENT, ">=", 1]],
    ),
    _split(
        "one user has at least one instance with human being and at least one instance with numeric value, "
        "and the other user has exactly two instances with location",
        [[HUM, ">=", 1], [NUM, ">=", 1]],
        [[LOC, "==", 2]],
    ),
    _split(
        "one user has at least one instance with entity, at least one instance with location, and at least "
        "one instance with abbreviation, and the other user has exactly one instance with numeric value",
        [[ENT, ">=", 1], [LOC, ">=", 1], [ABBR, ">=", 1]],
        [[NUM, "==", 1]],
    ),
    _split(
        "one user has at least one instance with description and abstract concept and at least one instance "
        "with human being, and the other user has at least two instances with entity and exactly one instance "
        "with abbreviation",
        [[DESC, ">=", 1], [HUM, ">=", 1]],
        [[ENT, ">=", 2], [ABBR, "==", 1]],
    ),
    _split(
        "one user has exactly one instance with numeric value, and the other user has at least one instance "
        "with location and at least one instance with description and abstract concept",
        [[NUM, "==", 1]],
        [[LOC, ">=", 1], [DESC, ">=", 1]],
    ),
    _split(
        "one user has at least one instance with abbreviation and exactly one instance with human being, and "
        "the other user has at least one instance with entity and at least one instance with numeric value",
        [[ABBR, ">=", 1], [HUM, "==", 1]],
        [[ENT, ">=", 1], [NUM, ">=", 1]],
    ),
    _split(
        "one user has at least two instances with location and at least one instance with entity, and the "
        "other user has exactly one instance with description and abstract concept and exactly one instance "
        "with abbreviation",
        [[LOC, ">=", 2], [ENT, ">=", 1]],
        [[DESC, "==", 1], [ABBR, "==", 1]],
    ),
    _split(
        "one user has at least one instance with numeric value and at least one instance with human being, "
        "and the other user has at least one instance with location, at least one instance with entity, and "
        "exactly one instance with abbreviation",
        [[NUM, ">=", 1], [HUM, ">=", 1]],
        [[LOC, ">=", 1], [ENT, ">=", 1], [ABBR, "==", 1]],
    ),
)


def spec_for_query(query: str) -> Spec | None:
    """The spec of one of :data:`PAIR_QUERIES` given its text (surrounding whitespace ignored), else None."""
    text = query.strip()
    return next((spec for q, spec in PAIR_QUERIES if q == text), None)


def generate_pairs(n: int, length_tokens: int, seed: int, data_dir: str | Path | None = None) -> list[Item]:
    """``n`` OOLONG-Pairs items at ``length_tokens``: item i asks query ``i % 20`` (Task ``i % 20 + 1``) of
    window ``i // 20``, the windows of the OOLONG task with the same seed and length.

    Raises:
        ConfigError: the data is missing, or ``n < 1``.
    """
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    items = []
    for i in range(n):
        win = window(seed, length_tokens, i // len(PAIR_QUERIES), data_dir)
        query, spec = PAIR_QUERIES[i % len(PAIR_QUERIES)]
        count_pairs = len(pair_users(spec, list(win.rows)))
        items.append(
            win.item(
                "oolong_pairs",
                i,
                query,
                PairsExpected(spec, win.rows, count_pairs),
                pairs_score,
                length_tokens,
                seed,
                paper_task=i % len(PAIR_QUERIES) + 1,
                pairs=count_pairs,
            )
        )
    return items
