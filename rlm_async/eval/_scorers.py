"""The scorers of the three task families, each a function ``(answer, expected) -> score in [0, 1]``.

- :func:`string_match_all`: RULER's metric for its NIAH tasks (``scripts/eval/synthetic/constants.py`` of
  NVIDIA/RULER): the fraction of reference strings that occur, case-insensitively, in the prediction.
- :func:`oolong_score`: OOLONG's synthetic-split scoring (``synth_process_response`` in
  ``src/eval/eval_helpers.py`` of abertsch72/oolong): the answer is the text after the last ``:``; exact match
  for labels and comparisons, ``0.75 ** |gold - answer|`` for numbers. A lenient second reading (documented on
  :func:`lenient_candidates`) only ever adds credit.
- :func:`pair_f1`: the RLM paper's OOLONG-Pairs metric (arXiv 2512.24601, Section 3.1: "F1 scores over the
  answer, which is a list of entries"), over unordered user-id pairs.
"""

from __future__ import annotations

import re

from .._errors import ConfigError
from ._task import OolongExpected, PairsExpected

__all__ = [
    "lenient_candidates",
    "oolong_parse",
    "oolong_score",
    "pair_f1",
    "pairs_score",
    "parse_pairs",
    "string_match_all",
]

_COMPARISONS = ("more common", "less common", "same frequency")


def string_match_all(prediction: str, references: tuple[str, ...]) -> float:
    """RULER's ``string_match_all`` for one prediction: ``sum(r.lower() in prediction.lower()) / len(refs)``.

    RULER averages this over predictions and reports it times 100, rounded to 2 places; here it is one item's
    score in [0, 1].

    Raises:
        ConfigError: ``references`` is empty (RULER would divide by zero).
    """
    if not references:
        raise ConfigError("string_match_all needs at least one reference string")
    lowered = prediction.lower()
    return sum(1.0 for r in references if r.lower() in lowered) / len(references)


def oolong_parse(answer: str) -> str:
    """OOLONG's ``synth_attempt_answer_parse``: the candidate answer in a free-text reply.

    Without a ``:``, the whole reply if shorter than 20 characters, else its last word. With one, the text after
    the last ``:``, stripped of ``*``, ``[`` and ``]``; a candidate of 20 characters or more that contains
    "more common", "less common" or "same frequency" becomes that phrase.
    """
    if ":" not in answer:
        return answer if len(answer) < 20 else (answer.split() or [""])[-1]
    candidate = answer.split(":")[-1].strip().replace("*", "").replace("[", "").replace("]", "")
    if len(candidate) < 20:
        return candidate
    for phrase in _COMPARISONS:
        if phrase in candidate:
            return phrase
    return candidate


_MARKED = re.compile(r"(?:answer|label|user)\s*:\s*([^\n]+)", re.IGNORECASE)
_STRIP = " \t\r\n*`'\"[]().,;!"


def lenient_candidates(answer: str) -> list[str]:
    """A further reading of a reply that OOLONG's parse misses (a departure from OOLONG, documented in
    docs/eval.md): the rest of the line after the last ``Answer:`` / ``Label:`` / ``User:`` marker (OOLONG takes
    the text after the last ``:`` anywhere, so a reply that explains itself after its answer scores 0 there),
    lower-cased and stripped of markdown, quotes, brackets and trailing punctuation. Empty without a marker."""
    found = _MARKED.findall(answer)
    return [found[-1].strip(_STRIP).lower()] if found else []


_INT = re.compile(r"-?\d[\d,]*")


def _as_int(text: str) -> int | None:
    m = _INT.search(text)
    return int(m.group().replace(",", "")) if m else None


def _score_candidate(candidate: str, expected: OolongExpected, *, strict: bool) -> float:
    gold = expected.value
    if candidate == gold:
        return 1.0
    if candidate in _COMPARISONS:
        return 1.0 if candidate in gold else 0.0
    if expected.answer_type == "numeric":
        if strict:
            try:
                value = int(candidate)
            except ValueError:
                return 0.0
        else:
            parsed = _as_int(candidate)
            if parsed is None:
                return 0.0
            value = parsed
        return float(0.75 ** abs(int(gold) - value))
    if not strict and expected.answer_type == "comparison":
        hits = [p for p in _COMPARISONS if p in candidate]
        return 1.0 if len(hits) == 1 and hits[0] in gold else 0.0
    return 0.0


def oolong_score(answer: str, expected: OolongExpected) -> float:
    """OOLONG's score of one reply: 1 for an exact label or comparison, ``0.75 ** |gold - answer|`` for a count,
    else 0; the better of OOLONG's own parse (:func:`oolong_parse`) and the lenient readings
    (:func:`lenient_candidates`: case-insensitive, first integer of the candidate, one comparison phrase)."""
    score = _score_candidate(oolong_parse(answer), expected, strict=True)
    for candidate in lenient_candidates(answer):
        score = max(score, _score_candidate(candidate, expected, strict=False))
    return score


_PAIR = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)")


def parse_pairs(answer: str) -> frozenset[tuple[int, int]]:
    """Every ``(a, b)`` of integers in ``answer`` as an unordered pair ``(min, max)``: duplicates and reversed
    duplicates count once, and a user paired with itself is dropped (it is not a pair of two users)."""
    pairs = {(min(a, b), max(a, b)) for a, b in ((int(x), int(y)) for x, y in _PAIR.findall(answer))}
    return frozenset(p for p in pairs if p[0] != p[1])


def pair_f1(answer: str, expected: frozenset[tuple[int, int]]) -> float:
    """F1 of the pairs in ``answer`` (:func:`parse_pairs`) against ``expected``: ``2PR / (P + R)`` with
    precision P = hits / predicted and recall R = hits / expected.

    Empty sets: both empty scores 1 (the right answer is "no pairs", and it was given); exactly one empty
    scores 0 (nothing right was predicted, or everything predicted is wrong).
    """
    predicted = parse_pairs(answer)
    if not predicted or not expected:
        return 1.0 if not predicted and not expected else 0.0
    hits = len(predicted & expected)
    if hits == 0:
        return 0.0
    precision, recall = hits / len(predicted), hits / len(expected)
    return 2 * precision * recall / (precision + recall)


def pairs_score(answer: str, expected: PairsExpected) -> float:
    """:func:`pair_f1` of ``answer`` against the gold pairs of an OOLONG-Pairs item."""
    return pair_f1(answer, expected.pairs())
