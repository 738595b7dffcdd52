"""rlm-async batch on a local Ray cluster (``ray.init(num_cpus=2)``) against the simulator: 500 items each
answered once with the cluster-wide in-flight cap and RPM held at the server, a worker actor killed mid-job,
an interrupted job rerun, and the same answers as the single-machine path; and the command itself, with its
own cluster, stopped by SIGINT and rerun.

Marked ``ray``; CI runs them (ray is in the dev extra). Without Ray this module fails to import: it does not
skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import ray

from rlm_async import ConfigError, Limits, RateLimit, batch, ray_batch
from rlm_async.batch import ItemResult, LeaseSizes
from rlm_async.batch._ray import init_ray
from rlm_async.sim import LatencyModel, SimConfig, sim_process

from .test_batch import assert_each_item_answered_once, batch_command, expected, lines_of, verse_item

pytestmark = pytest.mark.ray

#: The simulator's minute is PERIOD_S seconds (time scale PERIOD_S / 60), and the engine's RateLimit period too.
PERIOD_S = 3.0
SCALE = PERIOD_S / 60
#: About 20 ms a call after scaling.
LATENCY = LatencyModel(ttft_s=0.02 / SCALE, prefill_tok_per_s=1e12, decode_tok_per_s=1e12, jitter_sigma=0.2,
                       outlier_rate=0.0)  # fmt: skip
MODEL = "sim"  # one model name for root turns and sub-calls: one RPM bucket at the engine and at the server


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    # Started as the command starts it (init_ray), which keeps the process's SIGTERM handler: ray.init alone
    # puts in one that exits wherever the main thread is, so the command's clean stop never ran on Ray.
    def mine(signum: int, frame: object) -> None:
        raise AssertionError("not called")

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        yield
    finally:
        ray.shutdown()


def options(base_url: str, **extra: Any) -> dict[str, Any]:
    return {"sub_model": MODEL, "base_url": base_url, "api_key": "k", **extra}


def workers_of_running_job() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "-worker-" in a["name"])


async def test_500_items_each_answered_once_with_the_cap_and_rpm_held_cluster_wide(cluster: None, tmp_path: Path):
    cap, rpm, workers = 8, 450, 2
    lease = LeaseSizes()
    # The documented overshoot: at most one lease of requests per worker beyond the bucket (min(8, rpm / (4 W))),
    # plus 1 for the requests still on the wire.
    overshoot = workers * min(lease.requests, rpm // (4 * workers)) + 1
    items = [verse_item(i) for i in range(500)]
    out = tmp_path / "out.jsonl"
    async with sim_process(SimConfig(latency=LATENCY, time_scale=SCALE, rpm=rpm + overshoot)) as sim:
        report = await batch(
            items,
            MODEL,
            out=out,
            ray="auto",
            workers=workers,
            max_runs=16,
            limits=Limits(max_concurrency=cap),
            rate_limits={MODEL: RateLimit(rpm=rpm, period_s=PERIOD_S)},
            **options(sim.base_url),
        )
        stats = await sim.stats()
    assert report.done == 500 and report.failed == 0
    rows = lines_of(out)
    assert len(rows) == len({r["id"] for r in rows}) == 500
    by_id = {i.id: i for i in items}
    assert all(json.loads(str(r["answer"])) == expected(by_id[str(r["id"])]) for r in rows)
    # The server saw every call once, never more than the cap at once, and no 429 from its RPM bucket.
    assert stats.requests == stats.completed == report.usage.calls
    assert 1 < stats.peak_in_flight <= cap
    assert stats.faults.get("rate_limit", 0) == 0
    # And the RPM bound the job: past the first period's burst, at most rpm + overshoot a period.
    assert report.wall_s >= (stats.requests - rpm - overshoot) * PERIOD_S / rpm
    print(f"\n500 items: {report.wall_s:.2f} s, {stats.requests} requests, peak in flight {stats.peak_in_flight}")


async def test_a_killed_worker_actors_items_finish_elsewhere_once(cluster: None, tmp_path: Path):
    """One worker killed after 20 results: its running items run again on the other, each recorded once and
    started once (the progress bar's running count). Then the last one killed: its running items are left
    for a rerun (not run), not recorded as lost after one try."""
    items = [verse_item(i) for i in range(120)]
    out = tmp_path / "out.jsonl"
    got: list[ItemResult] = []
    started: list[str] = []
    kills = 0
    async with sim_process(SimConfig(latency=LATENCY, time_scale=SCALE)) as sim:
        source = ray_batch(
            items,
            MODEL,
            out=out,
            workers=2,
            max_runs=8,
            limits=Limits(max_concurrency=8),
            on_start=started.append,
            **options(sim.base_url),
        )
        async with contextlib.aclosing(source) as results:
            async for result in results:
                got.append(result)
                if kills == 0 and len(got) == 20:
                    names = workers_of_running_job()
                    assert len(names) == 2
                    ray.kill(_actor(names[0]))
                    kills = 1
                elif kills == 1 and result.attempts == 2:  # a retried item came back: kill the last worker
                    (name,) = workers_of_running_job()
                    ray.kill(_actor(name))
                    kills = 2
    assert kills == 2
    rows = lines_of(out)
    assert len(rows) == len({r["id"] for r in rows}) == len(got) < 120  # the last worker's items: not run
    assert all(r["status"] == "done" for r in rows)
    assert len(started) == len(set(started)) > len(got)
    print(f"\nretried after the kill: {sum(r.attempts == 2 for r in got)} items; not run: {120 - len(got)}")


async def test_an_item_whose_call_ray_fails_runs_again_and_one_it_fails_every_time_is_recorded(
    cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Regression: a call Ray failed with the worker still alive (an object lost with its node, memory that ran
    out) was recorded as the item's final failure after one try, so a rerun skipped an item nothing was wrong
    with. Such an item now runs again, like one whose worker died; after ``max_item_attempts`` it is
    recorded with Ray's error."""
    from ray.exceptions import OutOfMemoryError

    from rlm_async.batch import _ray as on_ray

    class FlakyWorker(on_ray.WorkerActor):  # defined here, so Ray ships it to the workers by value
        async def run(self, item: Any, attempts: int) -> Any:
            if (item.id == "item-1" and attempts == 1) or item.id == "item-2":
                raise OutOfMemoryError(f"test: {item.id}, try {attempts}")
            return await on_ray.WorkerActor.run(self, item, attempts)

    monkeypatch.setattr(on_ray, "WorkerActor", FlakyWorker)
    items = [verse_item(i) for i in range(4)]
    out = tmp_path / "out.jsonl"
    async with sim_process(SimConfig(latency=LATENCY, time_scale=SCALE)) as sim:
        report = await batch(
            items, MODEL, out=out, ray="auto", workers=1, max_runs=4, max_item_attempts=3,
            limits=Limits(max_concurrency=4), **options(sim.base_url),
        )  # fmt: skip
    rows = {str(r["id"]): r for r in lines_of(out)}
    assert (report.done, report.failed) == (3, 1)
    assert [(rows[f"item-{i}"]["status"], rows[f"item-{i}"]["attempts"]) for i in range(4)] == [
        ("done", 1), ("done", 2), ("failed", 3), ("done", 1),
    ]  # fmt: skip
    assert rows["item-2"]["stop_reason"] == "error" and "OutOfMemoryError" in str(rows["item-2"]["error"])


def test_an_item_a_transient_ray_error_failed_tries_another_worker_where_one_is_free():
    """Regression: the retry went to the least-loaded worker, often the one whose call had just failed (memory
    out, an object lost), which may be dying and would cost the item another try."""
    from rlm_async.batch._ray import pick_worker

    live = ["w0", "w1", "w2"]
    assert pick_worker({"w0": 0, "w1": 2, "w2": 1}, live, 4, avoid=None) == "w0"
    assert pick_worker({"w0": 0, "w1": 2, "w2": 1}, live, 4, avoid="w0") == "w2"  # busier, but not w0
    assert pick_worker({"w0": 0, "w1": 4, "w2": 4}, live, 4, avoid="w0") == "w0"  # the only free slot
    assert pick_worker({"w0": 4, "w1": 4, "w2": 4}, live, 4, avoid=None) is None
    assert pick_worker({"w0": 0}, ["w0"], 4, avoid="w0") == "w0"  # the last worker left


@pytest.mark.timeout(480)  # two starts of a cluster and two jobs, on a busy 2-core machine
async def test_the_command_on_its_own_ray_cluster_stops_cleanly_on_sigint_and_the_rerun_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """``rlm-async batch --ray local`` as a user runs it, in its own process with its own cluster (not the one
    RAY_ADDRESS names: ``ray.init()`` without an address joined it): SIGINT lands while items run on the
    worker actors; the command exits 130 with the finished items kept whole, and the rerun runs exactly the
    others, with the answers of the single-machine path."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # nothing listens there
    slow = LatencyModel(ttft_s=0.3, prefill_tok_per_s=1e9, decode_tok_per_s=1e9, jitter_sigma=0.0, outlier_rate=0.0)
    items = [verse_item(i) for i in range(40)]
    async with sim_process(SimConfig(latency=slow)) as sim:
        command, out = batch_command(
            items, tmp_path, sim.base_url, "--ray", "local", "--workers", "2", "--max-runs", "2"
        )
        process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        async with _killed_on_failure(process):
            with anyio.fail_after(180):  # the cluster's start: seconds on a busy 2-core machine
                while not out.exists() or len(out.read_text().splitlines()) < 2:
                    assert process.returncode is None, (await process.communicate())[1].decode()[-2000:]
                    await anyio.sleep(0.05)
            process.send_signal(signal.SIGINT)
            with anyio.fail_after(60):
                stdout, stderr = await process.communicate()
        assert process.returncode == 130, stderr.decode()[-2000:]
        summary = json.loads(stdout.decode().strip().splitlines()[-1])
        first = lines_of(out)
        assert summary["interrupted"] is True and summary["done"] == len(first) < 40
        rerun = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        async with _killed_on_failure(rerun):
            with anyio.fail_after(180):
                stdout, stderr = await rerun.communicate()
        assert rerun.returncode == 0, stderr.decode()[-2000:]
        summary = json.loads(stdout.decode().strip().splitlines()[-1])
    assert summary["skipped"] == len(first) and summary["done"] == 40 - len(first)
    assert_each_item_answered_once(out, items)


@contextlib.asynccontextmanager
async def _killed_on_failure(process: asyncio.subprocess.Process) -> AsyncIterator[None]:
    """Kill the command (and so its Ray cluster's driver) when the block fails, rather than leave it running."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise


def _actor(name: str) -> Any:
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"] == name:
            return ray.get_actor(name, namespace=entry["namespace"])
    raise AssertionError(f"no actor {name}")


async def test_an_interrupted_job_reruns_only_unfinished_items_with_the_single_machine_answers(
    cluster: None, tmp_path: Path
):
    items = [verse_item(i) for i in range(60)]
    out = tmp_path / "out.jsonl"
    async with sim_process(SimConfig(latency=LATENCY, time_scale=SCALE)) as sim:
        first: list[str] = []
        source = ray_batch(items, MODEL, out=out, workers=2, max_runs=8, **options(sim.base_url))
        async with contextlib.aclosing(source) as results:
            async for result in results:
                first.append(result.id)
                if len(first) == 15:
                    break  # closing the iterator cancels the running items
        assert sorted(r["id"] for r in lines_of(out)) == sorted(first)
        assert workers_of_running_job() == []  # the job's actors are gone
        second = await batch(items, MODEL, out=out, ray="auto", workers=2, max_runs=8, **options(sim.base_url))
        local = await batch(items, MODEL, max_runs=8, **options(sim.base_url))
    assert second.skipped == 15 and sorted(r.id for r in second.results) == sorted(
        set(i.id for i in items) - set(first)
    )
    rows = lines_of(out)
    assert len(rows) == len({r["id"] for r in rows}) == 60
    on_ray = {str(r["id"]): r["answer"] for r in rows}
    assert on_ray == {r.id: r.answer for r in local.results}


class OnlyOnTheDriver(float):
    """A temperature that is valid on the driver and arrives on the workers as 5.0 (out of range): a worker
    that cannot build its engine, as one whose node cannot run the strict sandbox."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (float, (5.0,))


async def test_a_worker_that_cannot_build_its_engine_stops_the_job_and_records_nothing(cluster: None, tmp_path):
    """Every item was recorded as a permanent error (and a rerun skipped them all); now the job stops with a
    ConfigError naming the worker, its node and why, and no item is recorded. The key is not in the message."""
    items = [verse_item(i) for i in range(6)]
    out = tmp_path / "out.jsonl"
    secret = "sk-never-shown-0123"
    with pytest.raises(ConfigError) as caught:
        await batch(
            items,
            MODEL,
            out=out,
            ray="auto",
            workers=2,
            max_runs=2,
            temperature=OnlyOnTheDriver(0.5),
            base_url="http://127.0.0.1:9/v1",
            api_key=secret,
        )
    message = str(caught.value)
    assert "cannot build its engine: ConfigError: temperature must be in [0, 2]" in message
    assert "-worker-" in message and " on node " in message and secret not in message
    assert lines_of(out) == []
    assert workers_of_running_job() == []


async def test_the_drivers_endpoint_from_its_environment_reaches_the_workers_and_budget_stops_are_rerun(
    cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The endpoint and key only in the driver's environment (set after the cluster started, so its workers
    do not have them): the job runs on the workers with them (every item was an `error` before). The job's
    max_calls runs out: the items it stopped are not recorded, and a rerun with no cap runs exactly them."""

    @ray.remote(num_cpus=0)
    def worker_sees() -> str | None:
        return os.environ.get("OPENAI_BASE_URL")

    items = [verse_item(i) for i in range(8)]
    out = tmp_path / "out.jsonl"
    secret = "sk-driver-only-0123"
    async with sim_process(SimConfig(latency=LATENCY, time_scale=SCALE)) as sim:
        monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", secret)
        assert await worker_sees.remote() is None  # the workers' environment lacks it
        first = await batch(items, MODEL, out=out, ray="auto", workers=2, max_runs=4, sub_model=MODEL, max_calls=12)
        assert first.failed == 0 and first.stopped >= 1 and first.done + first.not_run == 8
        assert first.usage.calls + first.stopped_usage.calls <= 12
        rows = lines_of(out)
        assert sorted(r["id"] for r in rows) == sorted(r.id for r in first.results)
        assert all(r["status"] == "done" for r in rows)
        rerun = await batch(items, MODEL, out=out, max_runs=8, sub_model=MODEL)  # here, no cap
    assert rerun.skipped == first.done and rerun.done == 8 - first.done and rerun.failed == 0
    rows = lines_of(out)
    assert len(rows) == len({r["id"] for r in rows}) == 8
    assert secret not in out.read_text()
