"""The task registry, ``generate`` and the length syntax of ``--length``."""

from __future__ import annotations

import re
from pathlib import Path

from .._errors import ConfigError
from ._niah import VARIANTS, generate_niah
from ._oolong import generate_oolong
from ._pairs import generate_pairs
from ._scorers import oolong_score, pairs_score, string_match_all
from ._task import Item, Task

__all__ = ["TASKS", "generate", "parse_length", "parse_lengths"]

#: S-NIAH from 1K to 1M tokens (the RLM paper's Figure 1 spans 2^13 .. 2^20); OOLONG up to 131,072 (2^17,
#: OOLONG's and this project's largest window: the 4,151-question pool already repeats past it).
_NIAH_RANGE = (1024, 1 << 20)
_OOLONG_RANGE = (2048, 1 << 17)


def _niah_task(name: str, description: str) -> Task:
    return Task(
        name, "s_niah", description, string_match_all, *_NIAH_RANGE, False,
        lambda n, length, seed, data_dir: generate_niah(name, n, length, seed),
    )  # fmt: skip


#: Every task by name. ``s_niah`` cycles RULER's three single-needle variants; ``oolong`` and
#: ``oolong_pairs`` ask about the same OOLONG trec_coarse windows.
TASKS: dict[str, Task] = {
    "s_niah": _niah_task("s_niah", "RULER single needle: niah_single_1, 2, 3 in turn"),
    **{
        name: _niah_task(name, f"RULER {name}: {spec.haystack} haystack, {spec.value_type[:-1]} value")
        for name, spec in VARIANTS.items()
    },
    "oolong": Task(
        "oolong", "oolong", "OOLONG trec_coarse aggregation questions (counts, most/least common, users, time)",
        oolong_score, *_OOLONG_RANGE, True, lambda n, length, seed, folder: generate_oolong(n, length, seed, folder),
    ),
    "oolong_pairs": Task(
        "oolong_pairs", "oolong_pairs", "OOLONG-Pairs: the RLM paper's 20 pair-finding queries, F1 over pairs",
        pairs_score, *_OOLONG_RANGE, True, lambda n, length, seed, folder: generate_pairs(n, length, seed, folder),
    ),
}  # fmt: skip


def generate(
    task_name: str, n: int, length_tokens: int, seed: int = 0, data_dir: str | Path | None = None
) -> list[Item]:
    """``n`` items of ``task_name`` at ``length_tokens`` tokens, the same for the same arguments.

    Args:
        task_name: a key of :data:`TASKS`.
        n: how many items (>= 1).
        length_tokens: the target prompt length in tokens (within the task's ``min_tokens..max_tokens``).
        seed: the seed; items are a function of (task, n, length, seed) and the data.
        data_dir: the folder holding ``oolong/trec_coarse_validated.jsonl`` (OOLONG tasks); default
            ``$RLM_ASYNC_DATA``, else ``../shared/data``.

    Raises:
        ConfigError: an unknown task, ``n < 1``, a length out of range, missing data or packages.
    """
    task = TASKS.get(task_name)
    if task is None:
        raise ConfigError(f"unknown task {task_name!r}; known: {', '.join(TASKS)}")
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be an int >= 1, got {n!r}")
    if not task.min_tokens <= length_tokens <= task.max_tokens:
        low, high = task.min_tokens, task.max_tokens
        raise ConfigError(f"{task_name} supports lengths from {low:,} to {high:,} tokens, got {length_tokens:,}")
    return task.build(n, length_tokens, seed, None if data_dir is None else Path(data_dir))


_LENGTH = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_length(text: str) -> int:
    """Tokens from ``"131072"``, ``"32k"`` or ``"1m"``.

    A ``k`` / ``m`` size means thousands / millions, snapped to the nearest power of two when one lies within
    5% (``8k`` = 8,192, ``32k`` = 32,768, ``131k`` = 131,072, ``1m`` = 1,048,576, as RULER, OOLONG and the
    RLM paper use these names); ``100k`` stays 100,000. A plain integer is taken as it is.

    Raises:
        ConfigError: anything else, or a length below 1.
    """
    m = _LENGTH.match(text)
    if m is None:
        raise ConfigError(f"bad length {text!r}: use tokens, e.g. 8192, 32k, 131k or 1m")
    value = float(m.group(1)) * {"": 1, "k": 1_000, "m": 1_000_000}[m.group(2).lower()]
    if value < 1 or (not m.group(2) and not value.is_integer()):
        raise ConfigError(f"bad length {text!r}: a whole number of tokens >= 1")
    if m.group(2):
        power = 1 << max(round(value).bit_length() - 1, 0)
        nearest = min((power, power * 2), key=lambda p: abs(p - value))
        if abs(nearest - value) <= 0.05 * value:
            return nearest
    return round(value)


def parse_lengths(text: str) -> list[int]:
    """Comma-separated :func:`parse_length` values, in order, without repeats.

    Raises:
        ConfigError: an empty list or a bad entry.
    """
    lengths = list(dict.fromkeys(parse_length(part) for part in text.split(",") if part.strip()))
    if not lengths:
        raise ConfigError("--length needs at least one length, e.g. 32k,131k")
    return lengths
