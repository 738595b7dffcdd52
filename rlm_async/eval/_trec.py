"""OOLONG's trec_coarse context windows: questions with a date and a user id per line, from the real TREC pool.

The pool is ``<data_dir>/oolong/trec_coarse_validated.jsonl`` (4,151 TREC questions with their coarse labels;
its README gives the source, OOLONG's repository, MIT). The data folder is the ``data_dir`` argument, else the
environment variable ``RLM_ASYNC_DATA``, else ``../shared/data`` relative to the working directory; the
repository never holds a copy.

A window follows OOLONG's ``construct_context`` and its helpers (``src/data_gen/oolong-synth`` of
abertsch72/oolong): a label distribution ``softmax(randint(1, 30) ** (1 / T))`` with ``T = randint(2, 6)``
(OOLONG's generate_dataset.py), questions drawn per label without replacement (repeated when a label runs
out), then shuffled; 5-digit user ids of which about 80% come from a pool of ``max(n // 10, 1)`` common ids
(``generate_skewed_user_ids``); dates uniform from 2022-02-16 to 2025-06-21 (``sample_random_dates``). The
text is OOLONG's ``get_prompt``: an intro paragraph, one line per question, and a "Recall: ..." paragraph.

Departure: OOLONG sizes a window by an estimate (``(length * 0.95 - 168 - 250) // 39`` lines); here the
lines are counted exactly with the project's tokenizer so that the context fits ``length - 250`` tokens
(250 = OOLONG's ``QUESTION_TOKENS`` allowance for the question).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._errors import ConfigError
from ..sim._tokens import token_counter
from ._answers import LABELS, Record, format_date
from ._task import Expected, Item, Scorer

__all__ = ["POOL_SHA256", "QUESTION_TOKENS", "Window", "data_dir", "load_pool", "window"]

#: sha256 of the pool file as ../shared/data/oolong/README.md records it.
POOL_SHA256 = "84bcac41e631eb8d6666b04646977d6e4be5c444a5b939905cf589deb4d13dcc"
#: Tokens left for the question (OOLONG's ``EvalDataset.QUESTION_TOKENS``).
QUESTION_TOKENS = 250
_POOL = Path("oolong") / "trec_coarse_validated.jsonl"
_FIRST_DAY, _LAST_DAY = datetime.date(2022, 2, 16), datetime.date(2025, 6, 21)


def data_dir(given: str | Path | None = None) -> Path:
    """The data folder: ``given``, else ``$RLM_ASYNC_DATA``, else ``../shared/data`` (relative to the cwd)."""
    if given is not None:
        return Path(given)
    return Path(os.environ.get("RLM_ASYNC_DATA") or Path("..") / "shared" / "data")


@functools.cache
def _read_pool(path: Path) -> tuple[tuple[str, str], ...]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"the OOLONG question pool is missing: cannot read {path} ({exc.strerror or exc}); pass data_dir "
            "(--data-dir) or set RLM_ASYNC_DATA to the folder holding oolong/trec_coarse_validated.jsonl"
        ) from None
    if hashlib.sha256(raw).hexdigest() != POOL_SHA256:
        raise ConfigError(f"{path} is not the expected OOLONG pool (sha256 differs from {POOL_SHA256})")
    pool = []
    for line in raw.decode("utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            pool.append((str(record["input"]), str(record["label"])))
    return tuple(pool)


def load_pool(given: str | Path | None = None) -> tuple[tuple[str, str], ...]:
    """The pool's ``(question, label)`` pairs, in file order.

    Raises:
        ConfigError: the file is missing or is not the pool the README describes (sha256).
    """
    return _read_pool(data_dir(given).resolve() / _POOL)


@dataclass(frozen=True, slots=True)
class Window:
    """One OOLONG context window.

    Attributes:
        key: what it was generated from: ``"trec/<seed>/<length>/<index>"``.
        rows: ``(date, user_id, label)`` per line, in line order (the ground truth).
        questions: the question text of each line.
        labels: the label order of OOLONG's ``true_counts`` (a shuffled copy of the six labels).
        text: the context: intro, lines, "Recall" paragraph.
        tokens: ``text``'s length in tokens.
    """

    key: str
    rows: tuple[Record, ...]
    questions: tuple[str, ...]
    labels: tuple[str, ...]
    text: str
    tokens: int

    def item(
        self, task: str, index: int, query: str, expected: Expected, scorer: Scorer, length_tokens: int, seed: int,
        **metadata: Any,
    ) -> Item:  # fmt: skip
        """Item ``index`` of ``task`` asking ``query`` about this window: what every OOLONG-family item shares
        (the id, the window as context, the token count of context and query, the window's metadata), with
        the family's own ``metadata`` between the window's key and size."""
        _, count = token_counter()
        return Item(
            id=f"{task}/{length_tokens}/s{seed}/{index}",
            task=task,
            query=query,
            context=self.text,
            expected=expected,
            scorer=scorer,
            length_tokens=length_tokens,
            tokens=count(f"{self.text}\n{query}"),
            seed=seed,
            metadata={"window": self.key, "lines": len(self.rows), **metadata, "context_tokens": self.tokens},
        )


def _describe(n: int, labels: tuple[str, ...], intro: bool) -> str:
    """OOLONG's ``TREC_Coarse.get_desc`` through ``EvalDataset.get_general_desc``."""
    start = "The following" if intro else "Recall: the preceding"
    quoted = ", ".join(f"'{label}'" for label in labels)
    return (
        f"{start} lines contain {n} general-knowledge questions, one per line. Each question has an answer that "
        f"can be described as one of {len(labels)} categories: {quoted}.\n\nYou will be asked to answer questions "
        f"about the aggregate label statistics across all {n} examples in this dataset. Do not try to guess, "
        "estimate, or approximate the result. Calculate the exact answer given these datapoints.\n\n"
    )


def _line(day: datetime.date, user: int, question: str) -> str:
    return f"Date: {format_date(day)} || User: {user} || Instance: {question.replace(chr(10), ' ')}\n"


def _label_counts(rng: random.Random, labels: list[str], n: int) -> list[int]:
    """OOLONG's distribution: softmax of ``randint(1, 30) ** (1 / T)``, T = randint(2, 6), times n, rounded,
    the first count absorbing the rounding error."""
    temperature = rng.randint(2, 6)
    logits = [rng.randint(1, 30) ** (1 / temperature) for _ in labels]
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    counts = [round(w / sum(weights) * n) for w in weights]
    counts[0] -= sum(counts) - n
    return [max(c, 0) for c in counts]


def _user_ids(rng: random.Random, n: int) -> list[int]:
    """OOLONG's ``generate_skewed_user_ids``: 80% from ``max(n // 10, 1)`` common 5-digit ids."""
    common = rng.sample(range(10_000, 100_000), max(int(n * 0.1), 1))
    common_set = set(common)
    ids = []
    for _ in range(n):
        if rng.random() < 0.8:
            ids.append(rng.choice(common))
        else:
            while (uid := rng.randint(10_000, 99_999)) in common_set:
                pass
            ids.append(uid)
    return ids


def window(seed: int, length_tokens: int, index: int, given_dir: str | Path | None = None) -> Window:
    """The ``index``-th context window for ``(seed, length_tokens)``: deterministic, and shared by the OOLONG
    and OOLONG-Pairs tasks (they ask different questions of the same windows).

    Raises:
        ConfigError: the pool is missing, or ``length_tokens`` leaves no room for a line.
    """
    return _window(seed, length_tokens, index, data_dir(given_dir).resolve())


@functools.lru_cache(maxsize=8)
def _window(seed: int, length_tokens: int, index: int, folder: Path) -> Window:
    pool = _read_pool(folder / _POOL)
    _, count = token_counter()
    key = f"trec/{seed}/{length_tokens}/{index}"
    rng = random.Random(key)
    labels = list(LABELS)
    rng.shuffle(labels)
    budget = length_tokens - QUESTION_TOKENS - 2 * count(_describe(99_999, tuple(labels), True))
    if budget < 40:
        raise ConfigError(f"{length_tokens} tokens leave no room for an OOLONG line (need about 1,200)")
    guess = budget // 20 + 8  # lines are over 20 tokens: more than fit, cut below
    by_label: dict[str, list[str]] = {label: [] for label in labels}
    for question, label in pool:
        by_label[label].append(question)
    drawn: list[tuple[str, str]] = []
    for label, want in zip(labels, _label_counts(rng, labels, guess), strict=True):
        source = by_label[label]
        copies = source * math.ceil(want / len(source)) if want > len(source) else list(source)
        rng.shuffle(copies)
        drawn += [(q, label) for q in copies[:want]]
    rng.shuffle(drawn)
    users = _user_ids(rng, len(drawn))
    span = (_LAST_DAY - _FIRST_DAY).days
    days = [_FIRST_DAY + datetime.timedelta(days=rng.randint(0, span)) for _ in drawn]
    lines = [_line(d, u, q) for d, u, (q, _) in zip(days, users, drawn, strict=True)]
    kept, used = 0, 0
    for line in lines:
        used += count(line)
        if used > budget:
            break
        kept += 1
    while True:  # the exact count of the joined text decides
        text = _describe(kept, tuple(labels), True) + "".join(lines[:kept]) + _describe(kept, tuple(labels), False)
        tokens = count(text)
        if tokens <= length_tokens - QUESTION_TOKENS or kept == 1:
            break
        kept -= 1
    rows = tuple((days[i], users[i], drawn[i][1]) for i in range(kept))
    return Window(key, rows, tuple(q for q, _ in drawn[:kept]), tuple(labels), text, tokens)
