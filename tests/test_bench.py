"""The benchmark suite's pieces, on tiny sizes: scenarios run, bounds hold, plots and JSON are written."""

from __future__ import annotations

import json
import struct

import pytest

from rlm_async import bench
from rlm_async.bench._plots import plot_speedups, plot_timeline
from rlm_async.sim import SimConfig, sim_process


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def cfg(tmp_path) -> bench.BenchConfig:
    return bench.BenchConfig(quick=True, out_dir=tmp_path, official=False, time_scale=0.02)


async def test_fanout_and_recursive_scenarios_meet_their_bounds(cfg, monkeypatch, tmp_path):
    sim_config = SimConfig(latency=cfg.latency, time_scale=cfg.time_scale)
    async with sim_process(sim_config) as sim:
        # 40 calls of 10 ms: the run's fixed cost (root turn, cell thread, about 0.1 s) must not decide the
        # speedup; with 20 calls it once came out at 1.81 on a clean-clone CI run
        rows = [
            bench._measure("fanout", {"N": 40, "C": c}, (1 + -(-40 // c)) * cfg.scaled_call_s, run, "40 of 40 right")
            for c in (1, 8)
            for run in [
                await bench._engine_run(sim.base_url, "Fan out 40 sub-calls", "", bench.Limits(max_concurrency=c))
            ]
        ]
        recursive_rows, timeline = await bench.recursive(cfg, sim.base_url, k=3)
    bench._with_speedups(rows, lambda r: r.params["N"])
    for r in rows + recursive_rows:
        assert r.ok, r.answer
        assert r.wall_s >= r.ideal_s * 0.999  # the bound is a lower bound
        assert r.peak_in_flight <= r.params["C"]
    sequential, concurrent = rows
    assert sequential.speedup == 1.0 and concurrent.speedup > 2
    assert {r.params["depth"] for r in recursive_rows} == {1, 2}
    plot_speedups(rows, tmp_path / "s.png")
    plot_timeline(timeline, tmp_path / "t.png")
    assert png_size(tmp_path / "s.png")[0] > 300 and png_size(tmp_path / "t.png")[0] > 300


async def test_scheduler_overhead_scenario():
    row = await bench.scheduler_overhead(500)
    assert row.ok and row.calls == 500 and row.cpu_ms_per_call > 0 and row.peak_in_flight <= 256


def test_official_driver_reports_a_missing_package_as_a_failure(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    driver = Path(bench.__file__).with_name("official_driver.py")
    done = subprocess.run(
        [sys.executable, str(driver), "--base-url", "http://127.0.0.1:9/v1", "--query", "q"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    record = json.loads(done.stdout)
    assert record["ok"] is False and "rlm" in record["error"]


async def test_the_floor_makes_the_same_calls_and_engine_rows_carry_ratios_to_it(cfg):
    from rlm_async.bench._floor import bare_fanout, floor_targets

    async with sim_process(SimConfig(latency=cfg.latency, time_scale=cfg.time_scale)) as sim:
        floor = await bare_fanout(sim.base_url, 30, 8)
        stats = await sim.stats()
        rows = await floor_targets(sim.base_url, bench._engine_run, bench._measure, n=20, reps=2)
    assert floor.ok and floor.calls == 31 == stats.completed and floor.cpu_ms_per_call > 0
    assert stats.peak_in_flight <= 8
    by = {(r.params["C"], r.params["config"]): r for r in rows}
    assert set(by) == {
        (64, "bare aiohttp"), (64, "default"), (64, "http=openai"), (64, "trace_on"), (64, "rlm_batch"),
        (256, "bare aiohttp"), (256, "default"), (256, "http=openai"), (256, "trace_on"),
    }  # fmt: skip
    for (c, config), row in by.items():
        assert row.ok, (c, config, row.answer)
        assert row.cpu_vs_floor is not None and row.cpu_vs_floor > 0
        assert (row.wall_vs_floor is None) == (config == "rlm_batch")
        if config != "bare aiohttp":  # every round's own ratios are kept beside the medians'
            assert row.extra["reps"] == len(row.extra["cpu_vs_floor_rounds"]) == 2
            assert len(row.extra.get("wall_vs_floor_rounds", [])) == (0 if config == "rlm_batch" else 2)
    assert by[(64, "default")].calls == by[(64, "bare aiohttp")].calls == 21


async def test_each_rounds_ratio_is_that_rounds_engine_run_over_that_rounds_floor(monkeypatch):
    """The per-round ratios beside the medians. The first version overwrote round 1's engine row with the
    medians before the ratios were taken, so the first entry of every list was median / round-1 floor."""
    from rlm_async.bench import _floor

    floor_walls: list[float] = []

    async def floor_run(base_url: str, n: int, c: int) -> _floor.FloorRun:
        floor_walls.append([1.0, 2.0, 4.0][len(floor_walls) % 3])
        return _floor.FloorRun(floor_walls[-1], floor_walls[-1], 1000, True)  # CPU ms a call = wall s, here

    async def engine_run(*args: object, **kwargs: object) -> float:
        return floor_walls[-1] * [1.1, 1.0, 1.2][(len(floor_walls) - 1) % 3]  # this round's floor, scaled

    def measure(scenario: str, params: dict, ideal: None, wall: float, right: str) -> bench.Measurement:
        return bench.Measurement(scenario, "rlm_async", params, wall, None, 1000, wall, 64, None, True, right)

    monkeypatch.setattr(_floor, "bare_fanout", floor_run)
    rows = await _floor.floor_targets("http://unused", engine_run, measure, n=1000, reps=3)
    for row in rows:
        if row.engine == "floor":
            assert (row.wall_s, row.cpu_ms_per_call, row.wall_vs_floor) == (2.0, 2.0, 1.0)
            continue
        assert row.extra["cpu_vs_floor_rounds"] == [1.1, 1.0, 1.2], row.params
        assert row.extra.get("wall_vs_floor_rounds", [1.1, 1.0, 1.2]) == [1.1, 1.0, 1.2]
        assert row.wall_s == row.cpu_ms_per_call == 2.0  # the medians: 1.1, 2.0 and 4.8
        assert row.cpu_vs_floor == 1.0 and row.wall_vs_floor in (1.0, None)
