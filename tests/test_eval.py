"""rlm_async.eval: generators, ground truth, the papers' scorers, and runs on the simulator.

The OOLONG tests read the real question pool from ../shared/data (or $RLM_ASYNC_DATA). The pool is data that
lives beside the repository, never in it: on a machine without that folder those tests are skipped, and the
summary says where the pool was looked for. A pool that is there but unreadable or altered fails them.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from rlm_async import ConfigError, Limits, RetryPolicy
from rlm_async.eval import (
    PAIR_QUERIES,
    TASKS,
    OolongExpected,
    bootstrap_ci,
    data_dir,
    generate,
    load_pool,
    oolong_parse,
    oolong_score,
    pair_f1,
    parse_length,
    parse_lengths,
    parse_pairs,
    parse_question,
    percentile,
    question_text,
    read_results,
    run_eval,
    string_match_all,
    summarise,
)
from rlm_async.eval import _cli as eval_cli
from rlm_async.eval._answers import oolong_answer, oolong_render, pair_users, parse_labels, parse_line
from rlm_async.eval._niah import DEPTHS, NOISE
from rlm_async.eval._oolong import candidates
from rlm_async.eval._pairs import spec_for_query
from rlm_async.eval._simulated import classify, root_program, sub_answer
from rlm_async.eval._trec import QUESTION_TOKENS, window
from rlm_async.sim import PROFILES, SimConfig
from rlm_async.sim._tokens import token_counter

from .conftest import on_fake_clock

D = datetime.date
INSTANT = SimConfig(latency=PROFILES["instant"])


def _written(path: str) -> bool:
    """Whether a file holds something (sync: the async tests keep file calls out of their bodies)."""
    return Path(path).stat().st_size > 0


# -- scorers: worked examples -------------------------------------------------------------------------------

#: The OOLONG and OOLONG-Pairs tests need the pool (see the module docstring).
needs_pool = pytest.mark.skipif(
    not (data_dir() / "oolong" / "trec_coarse_validated.jsonl").exists(),
    reason=f"OOLONG data: {data_dir() / 'oolong' / 'trec_coarse_validated.jsonl'} is not there (set RLM_ASYNC_DATA)",
)


def test_string_match_all_is_the_share_of_references_found_case_insensitively():
    assert string_match_all("The special magic number for x is 4512987.", ("4512987",)) == 1.0
    assert string_match_all("no number here", ("4512987",)) == 0.0
    assert string_match_all("uuid 35EDC9B6-B3D3-4A95-BC0E-D1C40FD85D27", ("35edc9b6-b3d3-4a95-bc0e-d1c40fd85d27",)) == 1
    assert string_match_all("7 and 9", ("7", "9", "11", "13")) == 0.5  # RULER: sum(hits) / len(refs)
    with pytest.raises(ConfigError):
        string_match_all("x", ())


def test_oolong_parse_follows_oolongs_synth_attempt_answer_parse():
    assert oolong_parse("Label: entity") == "entity"
    assert oolong_parse("**Answer:** [42]") == " 42"  # as OOLONG: stripped before the markdown goes (int() copes)
    assert oolong_parse("entity") == "entity"  # no colon, short: the whole reply
    assert oolong_parse("I think the most common one is location") == "location"  # no colon, long: last word
    assert oolong_parse("Answer: location is more common than entity") == "more common"
    assert oolong_parse("Answer: location is the same frequency before 2023-01-01") == "same frequency"


@pytest.mark.parametrize(
    ("answer", "gold", "answer_type", "score"),
    [
        ("Answer: 10", "10", "numeric", 1.0),
        ("Answer: 12", "10", "numeric", 0.75**2),
        ("Answer: 7", "10", "numeric", 0.75**3),
        ("Answer: many", "10", "numeric", 0.0),
        ("Label: human being", "human being", "label", 1.0),
        ("Label: location", "human being", "label", 0.0),
        ("Answer: entity is less common than location", "less common than", "comparison", 1.0),
        ("Answer: entity is more common than location", "less common than", "comparison", 0.0),
        ("Answer: same frequency as", "same frequency as", "comparison", 1.0),
        ("Answer: location is the same frequency before 2023-05-01", "the same frequency", "comparison", 1.0),
        ("Answer: less common", "less common", "comparison", 1.0),
        # lenient readings (docs/eval.md): a capitalised label, and an answer explained after a second colon
        ("Label: Human Being", "human being", "label", 1.0),
        ("Answer: 42. Explanation: I counted them: all of them", "42", "numeric", 1.0),
        ("Answer: 1,204", "1204", "numeric", 1.0),
    ],
)
def test_oolong_score_worked_examples(answer, gold, answer_type, score):
    assert oolong_score(answer, OolongExpected(gold, answer_type)) == pytest.approx(score)


def test_pair_f1_counts_unordered_pairs_once_and_defines_the_empty_cases():
    gold = frozenset({(1, 2), (2, 3)})
    assert pair_f1("(1, 2)\n(2, 3)", gold) == 1.0
    assert pair_f1("(2, 1)\n(1,2)\n(3, 2)\n(2, 3)", gold) == 1.0  # reversed and repeated pairs count once
    assert pair_f1("(1, 2)\n(1, 3)", gold) == pytest.approx(0.5)  # P = 1/2, R = 1/2
    assert pair_f1("(1, 2)", gold) == pytest.approx(2 * 1 * 0.5 / 1.5)  # P = 1, R = 1/2
    assert pair_f1("(5, 6)", gold) == 0.0
    assert pair_f1("(4, 4)", frozenset()) == 1.0  # a user paired with itself is no pair: both sets empty
    assert pair_f1("No pairs.", frozenset()) == 1.0
    assert pair_f1("No pairs.", gold) == 0.0
    assert pair_f1("(1, 2)", frozenset()) == 0.0
    assert parse_pairs("(10, 3), (3 , 10) and (7,8)") == frozenset({(3, 10), (7, 8)})


# -- ground truth on hand-countable records ----------------------------------------------------------------
#   date          user  label
RECORDS = [
    (D(2023, 1, 5), 11, "location"),
    (D(2023, 1, 9), 11, "entity"),
    (D(2023, 2, 1), 22, "location"),
    (D(2023, 2, 1), 33, "human being"),
    (D(2023, 3, 15), 22, "numeric value"),
    (D(2024, 1, 20), 33, "location"),
    (D(2024, 6, 30), 44, "entity"),
    (D(2024, 7, 1), 44, "abbreviation"),
]
SIX = ["abbreviation", "entity", "description and abstract concept", "human being", "location", "numeric value"]


def test_oolong_answers_on_records_counted_by_hand():
    def ask(**spec):
        return oolong_answer(spec, RECORDS)

    assert ask(kind="count", label="location") == "3"
    assert ask(kind="count", label="description and abstract concept") == "0"
    assert ask(kind="most_common", labels=SIX) == "location"
    assert ask(kind="least_common", labels=SIX) == "description and abstract concept"  # absent labels count 0
    assert ask(kind="compare", label="entity", other="location") == "less common than"
    assert ask(kind="compare", label="entity", other="human being") == "more common than"
    assert ask(kind="compare", label="abbreviation", other="numeric value") == "same frequency as"
    assert ask(kind="count", label="location", users=[11, 33]) == "2"  # user subset
    assert ask(kind="most_common", labels=["entity", "abbreviation"], users=[44]) == "entity"  # tie: first listed
    assert ask(kind="count", label="location", month=1) == "2"  # January of any year: 2023-01-05, 2024-01-20
    assert ask(kind="count", label="location", start="2023-01-09", end="2023-02-01") == "1"  # inclusive range
    assert ask(kind="count", label="human being", start="2023-01-09", end="2023-02-01") == "1"
    # before 2023-02-01: location 1 of 2; after it: location 1 of 4 (the pivot's own day is in neither)
    assert ask(kind="compare_time", label="location", pivot="2023-02-01") == "more common"
    assert ask(kind="compare_time", label="entity", pivot="2023-02-01") == "more common"  # 1/2 against 1/4
    assert ask(kind="compare_time", label="human being", pivot="2023-02-01") == "the same frequency"  # 0 and 0
    spec = {"kind": "compare", "label": "entity", "other": "location"}
    assert oolong_render(spec, "less common than") == "Answer: entity is less common than location"


def test_pair_users_on_records_counted_by_hand():
    def pairs(**spec):
        return pair_users(spec, RECORDS)

    # location or numeric value: users 11, 22, 33 (44 has neither)
    assert pairs(mode="both", labels=["location", "numeric value"]) == {(11, 22), (11, 33), (22, 33)}
    # the same, with every location after 2023-01-06: 11's location is on 2023-01-05, so 11 drops out
    after = {"label": "location", "op": "after", "date": "2023-01-06"}
    assert pairs(mode="both", labels=["location", "numeric value"], constraint=after) == {(22, 33)}
    # entity or abbreviation, every entity before 2024-01-01: 11 (entity 2023-01-09); 44's entity is later
    before = {"label": "entity", "op": "before", "date": "2024-01-01"}
    assert pairs(mode="both", labels=["entity", "abbreviation"], constraint=before) == set()
    # one user with exactly one location, the other with at least one entity: 11 has both, 22 and 33 one location
    assert pairs(mode="split", one=[["location", "==", 1]], other=[["entity", ">=", 1]]) == {
        (11, 22), (11, 33), (22, 44), (33, 44), (11, 44),
    }  # fmt: skip
    assert pairs(mode="split", one=[["location", ">=", 2]], other=[["entity", ">=", 1]]) == set()


def test_lines_and_label_replies_parse():
    line = "Date: Dec 12, 2022 || User: 63685 || Instance: How many years old is Benny Carter ?"
    assert parse_line(line) == (D(2022, 12, 12), 63685, "How many years old is Benny Carter ?")
    assert parse_line("Recall: the preceding lines contain 3 questions") is None
    assert parse_labels("1: location\n2. Entity\n3) nonsense\n9: entity", 3) == ["location", "entity", None]


# -- generators ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("task", "length"),
    [
        ("s_niah", 2048),
        pytest.param("oolong", 4096, marks=needs_pool),
        pytest.param("oolong_pairs", 4096, marks=needs_pool),
    ],
)
def test_generators_are_deterministic_for_a_seed(task, length):
    first, again, other = generate(task, 3, length, 0), generate(task, 3, length, 0), generate(task, 3, length, 1)
    key = [(i.id, i.query, i.context, i.tokens) for i in first]
    assert key == [(i.id, i.query, i.context, i.tokens) for i in again]
    assert [repr(i.expected) for i in first] == [repr(i.expected) for i in again]
    assert [i.context for i in first] != [i.context for i in other]
    assert len({i.id for i in first}) == 3


def test_niah_items_hold_one_needle_at_their_depth_and_fit_the_length():
    _, count = token_counter()
    items = generate("s_niah", 6, 4096, 3)
    assert [i.metadata["haystack"] for i in items] == ["noise", "kjv", "kjv"] * 2
    assert [i.metadata["value_type"] for i in items] == ["numbers", "numbers", "uuids"] * 2
    for item in items:
        key, (value,) = item.metadata["key"], item.expected
        needle = f"One of the special magic {item.metadata['value_type']} for {key} is: {value}."
        assert item.context.count(needle) == 1 and item.context.count("special magic") == 1
        assert (
            item.query
            == f"What is the special magic {item.metadata['value_type'][:-1]} for {key} mentioned in the provided text?"
        )
        assert count(item.plain_prompt()) == item.tokens and item.tokens + 128 <= 4096
        where = item.context.index(needle) / len(item.context)
        assert abs(where - item.metadata["depth_percent"] / 100) < 0.08
        assert item.metadata["depth_percent"] in DEPTHS
        assert item.score(f"It is {value}.") == 1.0 and item.score("I do not know.") == 0.0
    assert {line for line in items[0].context.split("\n") if "special magic" not in line} == {NOISE}
    assert items[1].context.startswith("In the beginning God created the heaven and the earth.")
    assert len({i.metadata["depth_percent"] for i in generate("niah_single_1", 40, 1024, 0)}) == 40


@needs_pool
def test_an_oolong_window_matches_an_independent_count_of_its_text():
    labels = dict(load_pool())
    win = window(0, 4096, 0)
    lines = [line for line in win.text.splitlines() if line.startswith("Date: ")]
    assert win.text.startswith(f"The following lines contain {len(lines)} general-knowledge questions")
    assert f"Recall: the preceding lines contain {len(lines)} general-knowledge questions" in win.text
    assert win.tokens <= 4096 - QUESTION_TOKENS
    seen = []
    for line in lines:
        m = re.fullmatch(r"Date: (\w{3}) (\d\d), (\d{4}) \|\| User: (\d{5}) \|\| Instance: (.*)", line)
        assert m is not None, line
        day = datetime.datetime.strptime(f"{m[1]} {m[2]} {m[3]}", "%b %d %Y").date()
        assert D(2022, 2, 16) <= day <= D(2025, 6, 21)
        seen.append((day, int(m[4]), labels[m[5]]))
    assert seen == list(win.rows)
    for item in generate("oolong", 10, 4096, 0):  # count questions, recounted from the text without _answers
        spec = parse_question(item.query)
        assert spec is not None
        if spec["kind"] == "count" and set(spec) == {"kind", "label"}:
            assert int(item.expected.value) == sum(1 for r in seen if r[2] == spec["label"])


@needs_pool
def test_oolong_questions_read_back_and_the_solver_agrees_with_the_gold_answers():
    win = window(0, 8192, 0)
    for spec in candidates(win, random.Random(0)):
        text = question_text(spec)
        assert "\n" not in text
        back = parse_question(text)
        assert back == {k: v for k, v in spec.items() if k != "group"}
    for item in generate("oolong", 10, 8192, 0):
        spec = parse_question(item.query)
        render = oolong_render(spec, oolong_answer(spec, list(win.rows)))
        assert item.score(render) == 1.0


@needs_pool
def test_the_twenty_pair_queries_are_the_papers():
    assert len(PAIR_QUERIES) == 20 and len({q for q, _ in PAIR_QUERIES}) == 20
    first = PAIR_QUERIES[0][0]
    assert first.startswith(
        "In the above data, list all pairs of user IDs (no duplicate pairs, list lower ID first) where both users "
        "have at least one instance with a numeric value or location."
    )
    assert first.endswith("list all pairs in the format (user_id_1, user_id_2), separated by newlines.")
    assert all(spec_for_query(q) == spec for q, spec in PAIR_QUERIES)
    items = generate("oolong_pairs", 20, 4096, 0)
    assert [i.metadata["paper_task"] for i in items] == list(range(1, 21))
    rows = list(window(0, 4096, 0).rows)
    for item in items[:3]:
        gold = item.expected.pairs()
        assert len(gold) == item.metadata["pairs"] == item.expected.count
        assert item.score("\n".join(f"({a}, {b})" for a, b in sorted(gold)) or "No pairs.") == 1.0
    users_with = {u for _, u, label in rows if label in ("numeric value", "location")}  # Task 1, by hand
    assert items[0].expected.pairs() == {(a, b) for a in users_with for b in users_with if a < b}


def test_bad_requests_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown task"):
        generate("niah", 1, 4096)
    with pytest.raises(ConfigError, match="n must be"):
        generate("s_niah", 0, 4096)
    with pytest.raises(ConfigError, match="supports lengths"):
        generate("oolong", 1, 1 << 20)
    with pytest.raises(ConfigError, match="question pool is missing"):
        generate("oolong", 1, 4096, data_dir=tmp_path)
    (tmp_path / "oolong").mkdir()
    (tmp_path / "oolong" / "trec_coarse_validated.jsonl").write_text('{"input": "q", "label": "entity"}\n')
    with pytest.raises(ConfigError, match="sha256"):
        generate("oolong", 1, 4096, data_dir=tmp_path)


def test_lengths_parse_with_power_of_two_names():
    assert [parse_length(s) for s in ("8k", "32k", "131k", "1m", "100k", "4096", "2K")] == [
        8192, 32768, 131072, 1 << 20, 100_000, 4096, 2048,
    ]  # fmt: skip
    assert parse_lengths("32k, 131k,32768") == [32768, 131072]
    for bad in ("", "3x", "0", "1.5"):
        with pytest.raises(ConfigError):
            parse_lengths(bad)


def test_bootstrap_interval_and_percentiles():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([1, 2, 3, 4], 95) == pytest.approx(3.85)
    scores = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1]
    low, high = bootstrap_ci(scores, seed=7)
    assert (low, high) == bootstrap_ci(scores, seed=7)
    assert 0 <= low < 0.7 < high <= 1
    assert bootstrap_ci([0.25]) == (0.25, 0.25)
    with pytest.raises(ConfigError):
        bootstrap_ci([])


# -- the simulator's programs ----------------------------------------------------------------------------------
def test_the_simulator_recognises_eval_prompts_and_nothing_else():
    item = generate("niah_single_3", 1, 2048, 0)[0]
    assert sub_answer(item.plain_prompt()).endswith(f"is {item.expected[0]}.")
    assert root_program(item.query, True) is not None and root_program(item.query, False) is not None
    assert "await llm_batch" in root_program(item.query, True)[1]
    assert "llm_query_batched" in root_program(item.query, False)[1]
    assert root_program("Summarise the text", True) is None and sub_answer("Take notes on this text") is None
    assert classify("Where is Woodstock ?") == "location" and classify("What does CPR stand for ?") == "abbreviation"


# -- end to end on the simulator -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("task", "length"),
    [
        ("s_niah", 2048),
        pytest.param("oolong", 4096, marks=needs_pool),
        pytest.param("oolong_pairs", 4096, marks=needs_pool),
    ],
)
async def test_each_family_runs_end_to_end_on_both_engines(task, length, tmp_path):
    items = generate(task, 2, length, 0)
    summaries = {}
    for engine in ("rlm_async", "plain"):
        summaries[engine] = await run_eval(
            items, engine=engine, out_dir=tmp_path, simulator=INSTANT, simulator_in_process=True
        )
    rows = read_results(tmp_path / "results.jsonl")
    assert len(rows) == 4 and {r["engine"] for r in rows} == {"rlm_async", "plain"}
    by = {(r["engine"], r["id"]): r for r in rows}
    for item in items:
        ours, plain = by[("rlm_async", item.id)], by[("plain", item.id)]
        assert ours["stop_reason"] == "answer" and ours["error"] is None and ours["calls"] >= 2
        assert _written(ours["trace"])
        assert plain["calls"] == 1 and plain["extra"] == {"truncated": False}
        assert plain["turns"] is None and 1 <= ours["turns"] <= Limits().max_iterations
        # the same rule-based sub-model labels for both engines, so the same score: plumbing, not intelligence
        assert ours["score"] == pytest.approx(plain["score"])
        assert 0 <= ours["score"] <= 1
    if task == "s_niah":
        assert all(r["score"] == 1.0 for r in rows)
    summary = summaries["rlm_async"]
    assert summary.simulated and summary.ran == 2 and summary.resumed == 0
    (group,) = summary.groups
    assert (group.task, group.engine, group.length_tokens, group.n) == (task, "rlm_async", length, 2)
    assert group.ci_low <= group.score <= group.ci_high and group.p50_s <= group.p95_s
    assert group.non_empty == 2 and group.stop_reasons == {"answer": 2}
    assert group.turns_n == 2 and group.turns == sum(r["turns"] for r in rows if r["engine"] == "rlm_async")
    (plain_group,) = summaries["plain"].groups
    assert plain_group.turns is None and plain_group.turns_n == 0
    assert (tmp_path / "summary.json").exists()


def test_the_summary_counts_non_empty_answers_turns_and_stop_reasons():
    """What issue 16 asks of each group beside the score: the share of runs ending with a non-empty answer, the
    root's turns, how runs ended. Rows written before turns were recorded have none."""
    base = {"task": "s_niah", "engine": "official", "model": "m", "length_tokens": 8192, "wall_s": 1.0}
    rows = [
        {**base, "score": 1.0, "answer": "5642167", "stop_reason": "answer", "turns": 3},
        {**base, "score": 0.0, "answer": "", "stop_reason": "error", "turns": 8, "error": "boom"},
        {**base, "score": 0.0, "answer": "a guess", "stop_reason": "answer"},  # an older row: no turns
        {**base, "score": 0.0, "answer": " \n", "stop_reason": "answer", "turns": 1},  # blank is empty
    ]
    (group,) = summarise(rows)
    assert (group.n, group.non_empty, group.errors) == (4, 2, 1)
    assert (group.turns, group.turns_n) == (12, 3)
    assert group.stop_reasons == {"answer": 3, "error": 1}
    assert hash(group)  # still a frozen, hashable summary


def test_the_official_driver_counts_the_roots_iterations(tmp_path):
    """The official engine's turns are the root instance's ``_completion_turn`` calls (rlms 0.1.3 never calls
    its ``on_iteration_start`` callback, so a first version of this count read 0 on every item); here a
    stand-in ``rlm`` package iterates as rlms 0.1.3 does, with a child instance iterating too."""
    fake = tmp_path / "fake" / "rlm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "class _Result:\n"
        "    response = 'the answer'\n"
        "    usage_summary = None\n"
        "class RLM:\n"
        "    def __init__(self, **kwargs):\n"
        "        self.kwargs = kwargs\n"
        "    def _completion_turn(self, prompt):\n"
        "        return prompt\n"
        "    def completion(self, context, root_prompt=None):\n"
        "        child = RLM(**self.kwargs)\n"
        "        for i in range(3):\n"
        "            self._completion_turn(i)\n"
        "            child._completion_turn(i)  # a child's iteration\n"
        "        return _Result()\n"
    )
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"query": "q", "context": "c", "model": "m", "base_url": "u", "api_key": "k"}))
    driver = Path(eval_cli.__file__).with_name("official_driver.py")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}
    done = subprocess.run(
        [sys.executable, str(driver), str(request)], capture_output=True, text=True, env=env, timeout=120
    )
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["ok"] and record["answer"] == "the answer" and record["turns"] == 3, (record, done.stderr)


async def test_a_rerun_resumes_and_the_budget_stops_before_an_item(tmp_path):
    items = generate("s_niah", 3, 2048, 0)
    seen = []
    first = await run_eval(
        items[:2], out_dir=tmp_path, simulator=INSTANT, simulator_in_process=True, sandbox="none",
        progress=lambda row, resumed: seen.append((row["id"], resumed)),
    )  # fmt: skip
    assert first.ran == 2
    again = await run_eval(
        items, out_dir=tmp_path, simulator=INSTANT, simulator_in_process=True, sandbox="none",
        progress=lambda row, resumed: seen.append((row["id"], resumed)),
    )  # fmt: skip
    assert (again.ran, again.resumed) == (1, 2)
    assert seen[2:4] == [(items[0].id, True), (items[1].id, True)] and seen[4] == (items[2].id, False)
    assert len(read_results(tmp_path / "results.jsonl")) == 3
    paced = await run_eval(  # how fast, not what: rows written with 64 in flight resume under --local's 4 slots
        items, out_dir=tmp_path, simulator=INSTANT, simulator_in_process=True, sandbox="none",
        limits=Limits(max_depth=1, max_concurrency=4, max_workers=2),
    )  # fmt: skip
    assert (paced.ran, paced.resumed) == (0, 3)
    with pytest.raises(ConfigError, match=r"limits\.early_finish, limits\.max_iterations differ"):
        await run_eval(  # regression: the resume key ignored the limits, so this reused the rows above
            items, out_dir=tmp_path, simulator=INSTANT, simulator_in_process=True, sandbox="none",
            limits=Limits(max_depth=1, max_iterations=3, early_finish="refuse"),
        )  # fmt: skip
    broke = await run_eval(
        generate("s_niah", 1, 2048, 5), engine="plain", out_dir=tmp_path, max_cost_usd=0.0,
        simulator=INSTANT, simulator_in_process=True,
    )  # fmt: skip
    assert broke.stopped == "max_cost_usd" and broke.ran == 0


async def test_a_new_system_prompt_is_a_new_configuration(tmp_path, monkeypatch):
    """rlm_async rows record their root system prompt's fingerprint, so a resume cannot mix two (prompt work
    at 32K once had to keep each prompt's rows apart by hand); rows written before it was recorded resume."""
    from rlm_async import _prompts

    items = generate("s_niah", 2, 2048, 0)
    common: dict[str, Any] = {"out_dir": tmp_path, "simulator": INSTANT, "simulator_in_process": True}
    first = await run_eval(items[:1], sandbox="none", **common)
    (row,) = read_results(tmp_path / "results.jsonl")
    assert first.ran == 1 and re.fullmatch(r"[0-9a-f]{16}", row["config"]["system_prompt"])
    monkeypatch.setattr(_prompts, "_SYSTEM", _prompts._SYSTEM.replace("Work in small steps", "Work in big steps"))
    with pytest.raises(ConfigError, match=r"\(system_prompt differ\)"):
        await run_eval(items, sandbox="none", **common)
    plain = await run_eval(items[:1], engine="plain", **common)  # the prompt is rlm_async's alone
    assert plain.ran == 1 and "system_prompt" not in read_results(tmp_path / "results.jsonl")[-1]["config"]
    del row["config"]["system_prompt"]  # as written before the fingerprint was recorded
    (tmp_path / "results.jsonl").write_text(json.dumps(row) + "\n")
    again = await run_eval(items, sandbox="none", **common)
    assert (again.ran, again.resumed) == (1, 1)


async def test_the_plain_engine_cuts_the_context_to_the_window(tmp_path):
    item = generate("niah_single_1", 1, 8192, 0)[0]
    summary = await run_eval(
        [item], engine="plain", context_window=4096, out_dir=tmp_path, simulator=INSTANT, simulator_in_process=True
    )
    (row,) = read_results(summary.results_path)
    assert row["extra"]["truncated"] is True
    assert 0 < row["extra"]["context_chars_kept"] < len(item.context)
    assert row["usage"]["prompt_tokens"] <= int((4096 - 1024) * 0.9) + 16
    needle_kept = item.metadata["needle_char"] < row["extra"]["context_chars_kept"]
    assert row["score"] == (1.0 if needle_kept else 0.0)


def test_the_eval_command_prints_a_table_and_json(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="rlm-async")
    eval_cli.add_parser(parser.add_subparsers(dest="command"))
    argv = ["eval", "s_niah", "--n", "1", "--length", "2k", "--out", str(tmp_path), "--time-scale", "0.01"]
    assert eval_cli.main(parser.parse_args([*argv, "--sandbox", "none", "--json"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ran"] == 1 and out["simulated"] and out["groups"][0]["score"] == 1.0
    assert eval_cli.main(parser.parse_args(argv)) == 0  # resumed: prints the table
    assert "score % (95% CI)" in capsys.readouterr().out
    assert eval_cli.main(parser.parse_args([*argv[:5], "oops"])) == 2
    assert eval_cli.main(parser.parse_args([*argv, "--price", "sim-root=1"])) == 2  # needs MODEL=IN,OUT
    assert Counter(r["id"] for r in read_results(tmp_path / "results.jsonl")) == {"s_niah/2048/s0/0": 1}
    assert set(TASKS) == {"s_niah", "niah_single_1", "niah_single_2", "niah_single_3", "oolong", "oolong_pairs"}


# -- the local model ----------------------------------------------------------------------------------------
@pytest.mark.real_llm
@pytest.mark.timeout(600)
def test_eval_runs_on_the_local_model_for_both_engines(tmp_path):
    """Plumbing on a real model (Qwen2.5-Coder-0.5B under llama.cpp): every engine answers and is scored; the
    score itself is whatever the small model gets."""
    from rlm_async import Limits, local

    try:
        local.setup("0.5b", build=False)
    except local.LocalSetupError as exc:
        pytest.skip(f"real_llm: {exc}")
    items = generate("niah_single_1", 1, 1024, 0)
    limits = Limits(max_depth=1, max_iterations=2, max_tokens_per_turn=256, max_output_chars=2000)
    with local.serving("0.5b", build=False, tie_to_parent=True) as server:
        for engine in ("plain", "rlm_async"):
            summary = asyncio.run(
                run_eval(
                    items,
                    engine=engine,
                    model=server.model.name,
                    base_url=server.base_url,
                    api_key=server.api_key or "local",
                    temperature=0.0,
                    limits=limits,
                    out_dir=tmp_path,
                )
            )
            (group,) = summary.groups
            assert not summary.simulated and group.n == 1 and group.calls >= 1 and 0 <= group.score <= 1
    rows = read_results(tmp_path / "results.jsonl")
    assert {r["engine"] for r in rows} == {"plain", "rlm_async"}
    assert all(r["usage"]["prompt_tokens"] > 0 for r in rows)


@on_fake_clock
async def test_the_plain_engine_retries_through_the_engine_scheduler():
    """The plain engine's one call goes through the engine's Scheduler (it used to run a second copy of the
    retry loop): a 503 is retried after the policy's backoff, and a 401 fails at once, typed."""
    from rlm_async import FakeClient, ProviderStatusError
    from rlm_async.eval._engines import ModelConfig, _Plain

    replies: list[Any] = [ProviderStatusError("busy", status=503), "the answer"]

    def handler(request):
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    (item,) = generate("s_niah", 1, 2048, 5)
    client = FakeClient(handler)
    outcome = await _Plain(client, ModelConfig("m"), None).run(item, None, None)  # type: ignore[arg-type]
    assert (outcome.answer, outcome.stop_reason, len(client.requests)) == ("the answer", "answer", 2)
    replies[:] = [ProviderStatusError("bad key", status=401)]
    outcome = await _Plain(FakeClient(handler), ModelConfig("m"), None).run(item, None, None)  # type: ignore[arg-type]
    assert outcome.stop_reason == "llm_error" and "bad key" in (outcome.error or "")
    replies[:] = [ProviderStatusError("busy", status=503), "the answer"]
    no_retries = ModelConfig("m", retry=RetryPolicy(max_retries=0))  # the config's policy, not the default
    outcome = await _Plain(FakeClient(handler), no_retries, None).run(item, None, None)  # type: ignore[arg-type]
    assert outcome.stop_reason == "llm_error" and "busy" in (outcome.error or "")


async def test_the_rlm_async_engine_gets_the_configs_retry_policy():
    from rlm_async.eval._engines import ModelConfig, open_engine

    cfg = ModelConfig("m", base_url="http://127.0.0.1:9/v1", retry=RetryPolicy(attempt_timeout_s=1_982.0))
    async with open_engine("rlm_async", cfg) as engine:
        assert engine.rlm.retry is cfg.retry  # type: ignore[attr-defined]


@on_fake_clock
async def test_the_plain_engine_stops_at_the_item_timeout():
    """A plain call that never answers ends the item at ``timeout_s`` (it used to wait out every attempt's
    timeout and retry: three times 33 minutes under ``--local``), typed, with the prompt's facts kept."""
    from rlm_async import FakeClient
    from rlm_async.eval._engines import ModelConfig, _Plain

    async def never(request):
        await anyio.sleep_forever()

    (item,) = generate("s_niah", 1, 2048, 5)
    cfg = ModelConfig("m", timeout_s=90.0, retry=RetryPolicy(attempt_timeout_s=1_982.0))
    started = anyio.current_time()
    outcome = await _Plain(FakeClient(never), cfg, None).run(item, None, None)  # type: ignore[arg-type]
    assert (outcome.answer, outcome.stop_reason, outcome.extra) == ("", "timeout", {"truncated": False})
    assert "90 s" in (outcome.error or "") and anyio.current_time() - started == pytest.approx(90.0, abs=1.0)


def test_the_report_tables_only_the_items_every_input_holds(tmp_path, capsys):
    """docs/eval.md's tables came from a script outside the repo; ``python -m rlm_async.eval.report`` makes them
    from the raw rows, on the items every input shares for each task and length."""
    from rlm_async.eval import bootstrap_ci, report

    def row(task: str, i: int, engine: str, score: float, wall: float, turns: int | None) -> dict[str, Any]:
        return {
            "id": f"{task}/8192/s0/{i}", "task": task, "engine": engine, "model": "m", "length_tokens": 8192,
            "score": score, "answer": "x" if score else "", "wall_s": wall, "calls": 2, "turns": turns,
            "usage": {"prompt_tokens": 100, "completion_tokens": 10}, "stop_reason": "answer", "error": None,
        }  # fmt: skip

    def write(path: Path, rows: list[dict[str, Any]]) -> Path:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    scores = [1.0, 0.0, 1.0, 1.0]
    new = write(tmp_path / "new.jsonl", [row("s_niah", i, "rlm_async", scores[i], 10.0 * (i + 1), 3) for i in range(4)])
    old = write(
        tmp_path / "old.jsonl",
        [row(task, i, engine, 0.0, 5.0, None) for task in ("s_niah", "oolong") for i in range(6)
         for engine in ("rlm_async", "official")],
    )  # fmt: skip
    assert report.main([f"this prompt={new}", f"earlier prompt={old}@rlm_async", f"{old}@official"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| task | length | engine | n | score | 95% CI |")
    assert len(lines) == 5, "oolong is not in new.jsonl, so it has no row; items 4 and 5 are in old.jsonl only"
    low, high = bootstrap_ci(scores, seed=0)
    assert lines[2] == (
        f"| s_niah | 8,192 | this prompt | 4 | 0.75 | [{low:.2f}, {high:.2f}] | 3/4 | answer 4 | 3.0 / 2.0 "
        "| 100 / 10 | 25 |"  # the interpolated median of 10, 20, 30 and 40 s
    )
    assert lines[3].startswith("| s_niah | 8,192 | earlier prompt | 4 | 0.00 | [0.00, 0.00] | 0/4 | answer 4 | - / 2.0")
    assert lines[4].startswith("| s_niah | 8,192 | official | 4 |")
    assert report.main([f"both engines={old}"]) == 2  # one label, each item twice
    assert "twice" in capsys.readouterr().err
    for wrong in (f"{tmp_path / 'missing.jsonl'}", f"{old}@offical"):  # regression: left out, exit 0
        assert report.main([str(new), wrong]) == 2
        assert "has no rows" in capsys.readouterr().err
    two_models = write(
        tmp_path / "models.jsonl", [{**row("s_niah", 0, "plain", 1.0, 1.0, None), "model": m} for m in "ab"]
    )
    assert report.main([str(two_models)]) == 0
    assert "| plain (a) |" in capsys.readouterr().out
    assert report.Source.parse("a=b=c.jsonl@plain") == report.Source(Path("c.jsonl"), "a=b", "plain")
