"""rlm-async batch on one machine: items and the results file, the leased capacity (without Ray), the job's
budgets, resume, interruption, and the command with SIGINT / SIGTERM. The Ray path: tests/test_batch_ray.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import types
from pathlib import Path

import anyio
import pytest

from rlm_async import BatchItem, BudgetExceeded, ConfigError, Limits, RateLimit, batch
from rlm_async.batch import ItemResult, LeaseSizes, ResultStore, read_items
from rlm_async.batch._lease import Capacity, LeasedEndpoint, LeasedGate, LocalLink
from rlm_async.batch._progress import BatchProgress
from rlm_async.sim import LatencyModel, SimConfig, sim_process

from .conftest import Script, on_fake_clock, repl

BOOKS = ("Genesis", "Exodus", "Psalms", "John")
VERSES = "In how many verses of each book does the word 'shepherd' occur?"
QUICK = LatencyModel(ttft_s=0.02, prefill_tok_per_s=1e9, decode_tok_per_s=1e9, jitter_sigma=0.2, outlier_rate=0.0)


def verse_item(i: int) -> BatchItem:
    """An item the simulator answers from its context: per book, the verses that mention a shepherd."""
    lines = [
        f"{BOOKS[(i + j) % 4]} {j + 1}:{i % 7 + 1} the {'shepherd' if (i * j) % 3 == 0 else 'sheep'} went"
        for j in range(6)
    ]
    return BatchItem(f"item-{i}", VERSES, "\n".join(lines))


def expected(item: BatchItem) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in item.context.splitlines():
        if "shepherd" in line:
            book = line.split()[0]
            counts[book] = counts.get(book, 0) + 1
    return counts


def lines_of(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- items and the results file ----------------------------------------------------------------------------
def test_read_items_resolves_paths_and_names_bad_lines(tmp_path: Path) -> None:
    (tmp_path / "doc.txt").write_text("hello")
    good = tmp_path / "in.jsonl"
    good.write_text('{"id": 1, "query": "q", "context": "c"}\n\n{"id": "b", "query": "q", "context_path": "doc.txt"}\n')
    items = read_items(good)
    assert [i.id for i in items] == ["1", "b"]
    assert items[1].load_context() == "hello"
    for body, message in (
        ('{"id": 1, "query": "q"}\nnot json\n', "in.jsonl:2: not JSON"),
        ('{"id": 1}\n', "has no query"),
        ('{"id": 1, "query": "q", "ctx": 1}\n', "unknown fields ['ctx']"),
        ('{"id": 1, "query": "q"}\n{"id": "1", "query": "r"}\n', "ids must be unique"),
        ('{"id": 1, "query": "q", "context": "c", "context_path": "p"}\n', "not both"),
        ("[1]\n", "must be a JSON object"),
    ):
        good.write_text(body)
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            read_items(good)
    with pytest.raises(ConfigError, match="cannot read batch input"):
        read_items(tmp_path / "missing.jsonl")


def test_store_appends_durably_resumes_and_never_writes_an_id_twice(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.jsonl"
    a = ItemResult("a", "done", "42", "answer")
    with ResultStore(path) as store:
        assert store.append(a) is True
        assert store.append(ItemResult("a", "failed", "", "error")) is False
        with pytest.raises(ConfigError, match="being written by another batch"):
            ResultStore(path)
    with open(path, "ab") as f:  # a write cut short by a crash: no newline
        f.write(b'{"id": "b", "status": "do')
    with ResultStore(path) as store:
        assert set(store.finished) == {"a"}
        assert store.finished["a"] == a
        store.append(ItemResult("b", "done", "x", "answer"))
    assert [r["id"] for r in lines_of(path)] == ["a", "b"]
    with open(path, "ab") as f:  # a whole last line without its newline (edited by hand): kept, not cut
        f.write(b'{"id": "c", "status": "failed", "answer": "", "stop_reason": "error"}')
    with ResultStore(path) as store:
        assert set(store.finished) == {"a", "b", "c"}
        store.append(ItemResult("d", "done", "x", "answer"))
    assert [r["id"] for r in lines_of(path)] == ["a", "b", "c", "d"]
    path.write_text('{"id": "a", "status": "done", "answer": "", "stop_reason": "answer"}\nnope\n')
    with pytest.raises(ConfigError, match=r"out\.jsonl:2: not a batch result"):
        ResultStore(path)


# -- leased capacity, without Ray --------------------------------------------------------------------------
async def test_leased_slots_hold_the_cap_across_engines_with_few_round_trips() -> None:
    capacity = Capacity(max_concurrency=6, workers=2, sizes=LeaseSizes(slots=3))
    link = LocalLink(capacity)
    endpoints = [LeasedEndpoint(link, f"w{i}", max_concurrency=6, breaker=None) for i in range(2)]
    in_flight = peak = 0
    gate = asyncio.Event()

    async def attempt(endpoint: LeasedEndpoint) -> None:
        nonlocal in_flight, peak
        async with endpoint.slots:
            in_flight += 1
            peak = max(peak, in_flight)
            if in_flight == 6:
                gate.set()
            await gate.wait()
            await asyncio.sleep(0)
            in_flight -= 1

    async with anyio.create_task_group() as tg:
        for n in range(200):
            tg.start_soon(attempt, endpoints[n % 2])
    assert peak == 6 and capacity.peak_out == 6
    leases = sum(e.leased_slots.leases for e in endpoints)
    assert leases < 200 / 2  # a lease covers several attempts
    for e in endpoints:
        await e.aclose()
    assert capacity.out == 0


async def test_a_forgotten_worker_gives_its_slots_to_the_others() -> None:
    capacity = Capacity(max_concurrency=2, workers=2, sizes=LeaseSizes(slots=2))
    assert await capacity.slots("dead", 5) == 1  # its share: ceil(2 / 2)
    assert await capacity.slots("w", 5) == 1
    waiting = asyncio.ensure_future(capacity.slots("w", 5))
    await asyncio.sleep(0)
    assert not waiting.done()  # w holds its share
    capacity.forget("dead")
    assert await waiting == 1 and capacity.out == 2 and await capacity.slots("dead", 1) == 0


@on_fake_clock
async def test_leased_rate_limit_holds_the_rpm_across_engines() -> None:
    loop = asyncio.get_running_loop()
    limit = RateLimit(rpm=40, period_s=60.0)
    capacity = Capacity(max_concurrency=100, rate_limits={"m": limit}, workers=2)
    assert capacity.lease_for("m", "rpm") == 5  # min(8, 40 / (4 * 2))
    link = LocalLink(capacity)
    endpoints = [LeasedEndpoint(link, f"w{i}", max_concurrency=100, rate_limits={"m": limit}) for i in range(2)]
    sent: list[float] = []

    async def attempt(endpoint: LeasedEndpoint) -> None:
        await endpoint.limiters["m"].acquire(10)
        sent.append(loop.time())

    async with anyio.create_task_group() as tg:
        for n in range(160):
            tg.start_soon(attempt, endpoints[n % 2])
    # A burst of one period's 40, then 40 a minute: 160 requests need 3 minutes; a lease per worker at most
    # (5 each) is the overshoot over one engine's bucket.
    assert max(sent) >= 3 * 60 - 1
    for start in range(0, 180, 10):
        window = sum(start <= t < start + 60 for t in sent)
        assert window <= 40 + 40 + 2 * 5


async def test_job_calls_are_reserved_in_leases_and_never_exceeded() -> None:
    capacity = Capacity(max_concurrency=1, max_calls=50, workers=2)
    sizes = LeaseSizes(calls=8)
    gates = [LeasedGate(LocalLink(capacity), max_calls=50, max_cost_usd=None, sizes=sizes) for _ in range(2)]
    taken = 0
    with pytest.raises(BudgetExceeded, match="max_calls"):
        for n in range(100):
            await gates[n % 2].before_attempt()
            taken += 1
    assert taken <= 50 and gates[taken % 2].exhausted
    for g in gates:
        await g.aclose()
    assert capacity.calls_reserved == taken


class RoundTripLink(LocalLink):
    """A LocalLink whose job-budget calls wait a loop turn, as a round trip to a Ray coordinator does."""

    async def reserve_calls(self, want: int) -> int:
        await asyncio.sleep(0)
        return await super().reserve_calls(want)

    async def reserve_usd(self, want: float, debt: float) -> float:
        await asyncio.sleep(0)
        return await super().reserve_usd(want, debt)


async def test_job_calls_are_never_exceeded_when_the_usd_refill_waits_on_the_coordinator() -> None:
    """Both budgets: while one attempt waits for USD, the others must not spend the call it saw."""
    capacity = Capacity(max_concurrency=1, max_calls=10, max_cost_usd=1.0)
    gate = LeasedGate(RoundTripLink(capacity), max_calls=10, max_cost_usd=1.0, sizes=LeaseSizes(calls=4))
    sent = refused = 0

    async def attempt() -> None:
        nonlocal sent, refused
        try:
            await gate.before_attempt()
        except BudgetExceeded:
            refused += 1
            return
        sent += 1
        gate.settle(0.001)

    async with anyio.create_task_group() as tg:
        for _ in range(40):
            tg.start_soon(attempt)
    assert (sent, refused) == (10, 30) and gate.exhausted
    await gate.aclose()
    assert capacity.calls_reserved == 10


# -- the single-machine path, on a fake model ---------------------------------------------------------------
def answering() -> Script:
    code = repl('answer["content"] = "seen " + str(len(context)); answer["ready"] = True')
    return Script({"q": [code]})


async def test_batch_runs_each_item_once_and_a_rerun_skips_finished(tmp_path: Path) -> None:
    from rlm_async import FakeClient

    out = tmp_path / "out.jsonl"
    items = [BatchItem(f"i{n}", f"q{n}", "x" * n) for n in range(12)]
    client = FakeClient(answering())
    report = await batch(items, "m", client=client, out=out, max_runs=4, sandbox="none")
    assert (report.done, report.failed, report.skipped, report.not_run) == (12, 0, 0, 0)
    assert {r["id"]: r["answer"] for r in lines_of(out)} == {f"i{n}": f"seen {n}" for n in range(12)}
    more = [*items, BatchItem("new", "q", "abc"), BatchItem("bad", "q", context_path=str(tmp_path / "nope"))]
    report = await batch(more, "m", client=client, out=out, sandbox="none")
    assert report.skipped == 12 and {r.id for r in report.results} == {"new", "bad"}
    bad = next(r for r in report.results if r.id == "bad")
    assert (bad.status, bad.stop_reason) == ("failed", "bad_input") and "cannot read context_path" in str(bad.error)
    ids = [r["id"] for r in lines_of(out)]
    assert len(ids) == len(set(ids)) == 14


@pytest.mark.parametrize("budget", ["max_calls", "max_cost_usd"])
async def test_items_the_jobs_budget_stops_are_not_recorded_and_a_rerun_with_more_runs_them(
    tmp_path: Path, budget: str
) -> None:
    """The job's max_calls / max_cost_usd refuses the call of the item running when it runs out: that item is
    not finished (not recorded, counted stopped and not run), nor are the items never started; a rerun with a
    larger budget runs exactly those. (They were recorded failed, and a rerun skipped them.)"""
    from rlm_async import FakeClient, Price

    out = tmp_path / "out.jsonl"
    items = [BatchItem(f"i{n}", f"q{n}", "x") for n in range(10)]
    script = answering()
    sent = []

    async def counted(request):  # type: ignore[no-untyped-def]
        sent.append(request)
        return await script(request)

    client = FakeClient(counted)
    prices = {"m": Price(1e6, 1e6)}  # $1 a token: a call costs its tokens in USD
    cap: dict[str, object] = {"max_calls": 3} if budget == "max_calls" else {"max_cost_usd": 1.0}
    stopped: list[ItemResult] = []
    report = await batch(
        items, "m", client=client, out=out, max_runs=1, sandbox="none", prices=prices, on_stopped=stopped.append, **cap
    )  # type: ignore[arg-type]
    assert report.failed == 0 and report.stopped == 1 and len(stopped) == 1
    assert stopped[0].stop_reason == f"budget:{budget}" and stopped[0].id not in {r.id for r in report.results}
    assert report.done >= 1 and report.not_run == 10 - report.done
    assert report.summary()["stopped_by_budget"] == 1
    if budget == "max_calls":
        assert len(sent) == 3 and report.done == 3  # one root turn an item; the fourth item's was refused
    rows = lines_of(out)
    assert sorted(r["id"] for r in rows) == sorted(r.id for r in report.results)
    assert all(r["status"] == "done" for r in rows)
    first = report.done
    report = await batch(items, "m", client=client, out=out, max_runs=4, sandbox="none")
    assert report.skipped == first and report.done == 10 - first and report.not_run == 0
    assert {r.id for r in report.results} >= {stopped[0].id}
    assert len(lines_of(out)) == 10


async def test_an_item_stopped_by_its_own_per_run_budget_is_finished_and_recorded(tmp_path: Path) -> None:
    """Under a job's budget that is not spent, an item whose run hit its own Limits.max_calls is a finished
    result (failed, budget:max_calls), recorded, and a rerun skips it."""
    from rlm_async import FakeClient

    done = repl('answer["content"] = "ok"; answer["ready"] = True')
    client = FakeClient(Script({"long": [repl("x = 1"), done], "q": [done]}))
    out = tmp_path / "out.jsonl"
    items = [BatchItem("a", "q a", "x"), BatchItem("b", "long b", "x"), BatchItem("c", "q c", "x")]
    options = {"limits": Limits(max_calls=1), "sandbox": "none"}
    report = await batch(items, "m", client=client, out=out, max_calls=100, **options)  # type: ignore[arg-type]
    assert (report.done, report.failed, report.stopped, report.not_run) == (2, 1, 0, 0)
    (own,) = [r for r in lines_of(out) if r["id"] == "b"]
    assert (own["status"], own["stop_reason"]) == ("failed", "budget:max_calls")
    report = await batch(items, "m", client=client, out=out, max_calls=100, **options)  # type: ignore[arg-type]
    assert report.skipped == 3 and report.results == ()


async def test_cancelling_a_batch_keeps_what_finished_and_the_rerun_runs_the_rest(tmp_path: Path) -> None:
    from rlm_async import FakeClient

    out = tmp_path / "out.jsonl"
    release = asyncio.Event()
    hold_from = 3

    async def script(request):  # type: ignore[no-untyped-def]
        n = int(request.messages[1]["content"].split("Query: q")[1].split()[0])
        if n >= hold_from:
            await release.wait()
        return repl('answer["content"] = "ok"; answer["ready"] = True')

    items = [BatchItem(f"i{n}", f"q{n}", "x") for n in range(8)]
    finished: list[str] = []
    three = asyncio.Event()

    def on_result(r: ItemResult) -> None:
        finished.append(r.id)
        if len(finished) == 3:
            three.set()

    job = asyncio.ensure_future(
        batch(items, "m", client=FakeClient(script), out=out, max_runs=8, sandbox="none", on_result=on_result)
    )
    await three.wait()
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert sorted(r["id"] for r in lines_of(out)) == ["i0", "i1", "i2"]
    release.set()
    report = await batch(items, "m", client=FakeClient(script), out=out, sandbox="none")
    assert report.skipped == 3 and sorted(r.id for r in report.results) == [f"i{n}" for n in range(3, 8)]


async def test_a_line_written_as_the_job_is_cancelled_is_counted_and_not_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C lands while a result's line is being made durable in its thread: the file is closed only after
    the line is written, and the result reaches on_result (the command's counts match the file)."""
    from rlm_async import FakeClient
    from rlm_async.batch import _store

    loop = asyncio.get_running_loop()
    closing = threading.Event()
    jobs: list[asyncio.Future[object]] = []

    def fsync(fd: int) -> None:
        loop.call_soon_threadsafe(jobs[0].cancel)
        closing.wait(10)  # until the cancelled job closes the store
        with contextlib.suppress(OSError):  # closed under this thread (the bug) or not
            os.fsync(fd)

    def close(self: ResultStore) -> None:
        closing.set()
        original_close(self)

    original_close = ResultStore.close
    monkeypatch.setattr(_store, "os", types.SimpleNamespace(fsync=fsync, SEEK_END=os.SEEK_END))
    monkeypatch.setattr(ResultStore, "close", close)
    out = tmp_path / "out.jsonl"
    counted: list[ItemResult] = []
    items = [BatchItem("a", "q0", "x")]
    jobs.append(
        asyncio.ensure_future(
            batch(items, "m", client=FakeClient(answering()), out=out, sandbox="none", on_result=counted.append)
        )
    )
    with pytest.raises(asyncio.CancelledError):
        await jobs[0]
    assert [r["id"] for r in lines_of(out)] == ["a"]
    assert [r.id for r in counted] == ["a"]


async def test_bad_arguments_are_config_errors(tmp_path: Path) -> None:
    from rlm_async import FakeClient, Price

    client = FakeClient(answering())
    with pytest.raises(ConfigError, match="max_runs"):
        await batch([], "m", client=client, max_runs=0)
    with pytest.raises(ConfigError, match="needs a price"):
        await batch([], "m", client=client, max_cost_usd=1.0)
    await batch([], "m", client=client, max_cost_usd=1.0, prices={"m": Price(1, 1)})
    with pytest.raises(ConfigError, match="ids must be unique"):
        await batch([{"id": 1, "query": "q"}, {"id": "1", "query": "q"}], "m", client=client)
    # Checked before Ray is reached: worker_cpus=0 made the default worker count the cluster's CPUs / 1e-9.
    for bad, message in (
        ({"worker_cpus": 0}, "worker_cpus"),
        ({"workers": 0}, "workers"),
        ({"max_cost_usd": "1"}, "max_cost_usd"),
    ):
        with pytest.raises(ConfigError, match=message):
            await batch([{"id": 1, "query": "q"}], "m", client=client, ray="auto", **bad)  # type: ignore[arg-type]


def test_progress_counts_and_draws() -> None:
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    progress = BatchProgress(4, console)
    with progress:
        progress.on_skipped(1)
        progress.on_start("a")
        progress.on_start("b")
        progress.on_result(ItemResult("a", "done", "x", "answer"))
    assert (progress.done, progress.failed, progress.running, progress.skipped) == (1, 0, 1, 1)
    assert "done 1  failed 0  running 1  skipped 1" in console.file.getvalue()  # type: ignore[attr-defined]


async def test_a_second_signal_does_not_cut_the_cleanup_short() -> None:
    """The command's signal handler, driven directly: the first SIGINT cancels the job; a SIGTERM (or another
    Ctrl-C) landing while the job cleans up (REPL workers, Ray actors) is reported, not delivered as a second
    cancellation that would abandon the cleanup. The exit code follows the first signal."""
    import io

    from rich.console import Console

    from rlm_async.batch._cli import StopOnSignal

    started, cleaning, release = asyncio.Event(), asyncio.Event(), asyncio.Event()
    cleaned: list[bool] = []

    async def job() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cleaning.set()
            await release.wait()  # the cleanup awaits (actors' close, workers' exit)
            cleaned.append(True)
            raise

    task = asyncio.ensure_future(job())
    console = Console(file=io.StringIO(), width=200)
    stop = StopOnSignal(task, console)
    await started.wait()
    stop(signal.SIGINT)
    await cleaning.wait()
    stop(signal.SIGTERM)
    stop(signal.SIGINT)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [True] and stop.signals == [signal.SIGINT, signal.SIGTERM, signal.SIGINT]
    assert "cleaning up" in console.file.getvalue()  # type: ignore[attr-defined]


# -- the command, against the simulator ---------------------------------------------------------------------
def batch_command(items: list[BatchItem], tmp_path: Path, base_url: str, *options: str) -> tuple[list[str], Path]:
    """``rlm-async batch`` as a user runs it, on ``items`` (written to an input file in ``tmp_path``) against the
    simulator at ``base_url``, with ``options``; and its results file."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i.id, "query": i.query, "context": i.context}) + "\n" for i in items))
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "rlm_async.cli", "batch", str(source), "--out", str(out), "--json"]
    command += ["--base-url", base_url, "--api-key", "k", "--model", "sim-root", "--sub-model", "sim-sub", *options]
    return command, out


def assert_each_item_answered_once(out: Path, items: list[BatchItem]) -> None:
    """The results file holds every item once, each with the single-machine path's answer."""
    rows = lines_of(out)
    assert sorted(r["id"] for r in rows) == sorted(i.id for i in items)
    by_id = {i.id: i for i in items}
    assert all(json.loads(str(r["answer"])) == expected(by_id[str(r["id"])]) for r in rows)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_the_command_stops_cleanly_on_a_signal_and_resumes(tmp_path: Path, signum: int) -> None:
    """A slow simulator (0.15 s a call), 4 runs at once: the signal lands while items run; the finished ones
    are kept, none is torn, and the rerun runs exactly the others."""
    slow = LatencyModel(ttft_s=0.15, prefill_tok_per_s=1e9, decode_tok_per_s=1e9, jitter_sigma=0.0, outlier_rate=0.0)
    items = [verse_item(i) for i in range(8)]
    async with sim_process(SimConfig(latency=slow)) as sim:
        command, out = batch_command(items, tmp_path, sim.base_url, "--max-runs", "4")
        process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        with anyio.fail_after(60):
            while not out.exists() or len(out.read_text().splitlines()) < 2:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        process.send_signal(signum)
        stdout, stderr = await process.communicate()
        assert process.returncode == (130 if signum == signal.SIGINT else 143), stderr.decode()[-2000:]
        summary = json.loads(stdout.decode().strip().splitlines()[-1])
        first = lines_of(out)
        assert summary["interrupted"] is True and summary["done"] == len(first) < 8
        rerun = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = await rerun.communicate()
        assert rerun.returncode == 0, stderr.decode()[-2000:]
        summary = json.loads(stdout.decode().strip().splitlines()[-1])
    assert summary["skipped"] == len(first) and summary["done"] == 8 - len(first)
    assert_each_item_answered_once(out, items)


async def test_single_machine_batch_over_the_simulator(tmp_path: Path) -> None:
    items = [verse_item(i) for i in range(40)]
    async with sim_process(SimConfig(latency=QUICK)) as sim:
        report = await batch(
            items,
            "sim-root",
            sub_model="sim-sub",
            base_url=sim.base_url,
            api_key="k",
            limits=Limits(max_concurrency=6),
            max_runs=12,
            out=tmp_path / "out.jsonl",
        )
        stats = await sim.stats()
    assert report.done == 40 and stats.peak_in_flight <= 6
    assert {r.id: json.loads(r.answer) for r in report.results} == {i.id: expected(i) for i in items}
