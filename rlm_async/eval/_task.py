"""The shape every task family shares: an :class:`Item` to answer and score, a :class:`Task` that makes them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ._answers import Record, pair_users

__all__ = ["Expected", "Family", "Item", "OolongExpected", "PairsExpected", "Scorer", "Task"]

#: The three task families of the RLM paper's Table 1 that this package generates.
Family = Literal["s_niah", "oolong", "oolong_pairs"]


@dataclass(frozen=True, slots=True)
class OolongExpected:
    """The gold answer of one OOLONG question.

    Attributes:
        value: the gold answer as OOLONG writes it: a label (``"human being"``), a comparison
            (``"more common than"``, ``"less common than"``, ``"same frequency as"``, or for a before/after
            question ``"more common"``, ``"less common"``, ``"the same frequency"``), or a count as decimal
            digits.
        answer_type: OOLONG's ``ANSWER_TYPE`` in lower case: ``"label"``, ``"comparison"`` or ``"numeric"``
            (only numeric answers get partial credit, 0.75 ** |error|).
    """

    value: str
    answer_type: Literal["label", "comparison", "numeric"]


@dataclass(frozen=True, slots=True)
class PairsExpected:
    """The gold answer of one OOLONG-Pairs query, kept as its question and labelled rows: the pair set itself
    can run to hundreds of thousands of pairs at 131K tokens, so it is built when an answer is scored.

    Attributes:
        spec: the query's spec (``rlm_async.eval._pairs.PAIR_QUERIES``).
        rows: the window's ``(date, user_id, label)`` rows.
        count: how many pairs the gold set holds.
    """

    spec: Mapping[str, Any] = field(repr=False)
    rows: tuple[Record, ...] = field(repr=False)
    count: int

    def pairs(self) -> frozenset[tuple[int, int]]:
        """The gold pairs ``(low_id, high_id)``."""
        return frozenset(pair_users(dict(self.spec), list(self.rows)))


#: What an item's scorer compares an answer with: RULER's reference strings (S-NIAH), an OOLONG gold answer,
#: or an OOLONG-Pairs gold pair set.
Expected = tuple[str, ...] | OolongExpected | PairsExpected

#: ``scorer(answer, expected) -> score`` in [0, 1].
Scorer = Callable[[str, Any], float]


@dataclass(frozen=True, slots=True)
class Item:
    """One prompt of a task: what an engine is given, what it should answer, and how to score the answer.

    Attributes:
        id: stable across runs for the same (task, length, seed, index): ``"<task>/<length>/s<seed>/<index>"``;
            resumable runs key on it.
        task: the task name (a key of ``rlm_async.eval.TASKS``).
        query: the question, one line, as an RLM gets it (the ``query`` of ``RLM.completion``).
        context: the long input, as an RLM gets it (the ``context`` of ``RLM.completion``).
        expected: the gold answer (see :data:`Expected`).
        scorer: ``scorer(answer, expected)`` -> score in [0, 1].
        length_tokens: the target length in tokens the item was generated for.
        tokens: the prompt's measured length in tokens (``preamble + context + "\\n" + query``, counted with
            ``rlm_async.sim._tokens.token_counter``: quicktok's o200k_base when installed).
        seed: the seed the item was generated from.
        preamble: text put before the context in the single-call ("plain") prompt, e.g. RULER's "A special
            magic number is hidden within the following text. ..."; empty for OOLONG.
        metadata: family-specific facts (needle depth, window index, question kind, ...), JSON-serialisable.
    """

    id: str
    task: str
    query: str
    context: str
    expected: Expected
    scorer: Scorer = field(repr=False, compare=False)
    length_tokens: int
    tokens: int
    seed: int
    preamble: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def score(self, answer: str) -> float:
        """The score of ``answer`` in [0, 1] (the item's scorer against its expected answer)."""
        return float(self.scorer(answer, self.expected))

    def plain_prompt(self) -> str:
        """The whole task as one user message, for the single-call baseline: ``preamble + context + "\\n" +
        query`` (RULER's template shape; OOLONG's context already ends with its "Recall: ..." paragraph)."""
        return f"{self.preamble}{self.context}\n{self.query}"


@dataclass(frozen=True, slots=True)
class Task:
    """A named task: how to make ``n`` items of one length from a seed.

    Attributes:
        name: the name used by ``generate`` and ``rlm-async eval``.
        family: which of the paper's three families it belongs to.
        description: one line for ``--help`` and the docs.
        scorer: the scorer its items carry.
        min_tokens: the shortest supported length, tokens.
        max_tokens: the longest supported length, tokens.
        needs_data: whether it reads the OOLONG question pool from the data folder.
        build: ``build(n, length_tokens, seed, data_dir) -> items``.
    """

    name: str
    family: Family
    description: str
    scorer: Scorer = field(repr=False)
    min_tokens: int
    max_tokens: int
    needs_data: bool
    build: Callable[[int, int, int, Path | None], list[Item]] = field(repr=False)
