"""The benchmark suite: latency speedups against sequential runs, the ideal bound, and the official RLM.

Every scenario runs the full engine (root turn, REPL cell in its worker process, scheduler, the default
client over HTTP) against the simulator in a child process, with a fixed latency model (every call takes
``call_s`` seconds, no jitter, no outliers) so that the ideal lower bound is exact:

- fan-out: ``ceil(N / C)`` waves of ``call_s`` plus the root's one turn;
- recursive fan-out (k chains of depth d, run at once): ``(d + 2) * call_s`` (root turn, d agent turns, the
  leaf call), or the one-at-a-time sum when ``C = 1``;
- a rate-limited provider: the larger of the wave bound and ``(N + 1 - RPM) / RPM`` minutes (the provider's
  bucket holds a minute's worth and refills continuously).

Figures per run: makespan, speedup over the same workload at ``max_concurrency=1``, ratio to the ideal
bound, CPU milliseconds of the engine process per call (client and HTTP included; the scheduler alone is
measured separately with the in-process fake client), peak in-flight, and peak RSS of the engine process.
Fan-out rows at C >= 8 also carry their ratios to the floor, a bare aiohttp loop doing the same HTTP work
against the same simulator in the same run (:mod:`rlm_async.bench._floor`).

The suite lives here, importable, so that ``rlm-async bench`` runs from an installed package; the repository's
``benchmarks/`` folder holds the latest full run's results, the microbenchmarks and how to read them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio

from .._budget import Ledger, Limits
from .._clients import ChatRequest, FakeClient
from .._engine import RLM, RLMResult
from .._retry import RetryPolicy
from .._scheduler import RateLimit, Scheduler
from .._trace import Event, Tracer
from ..sim import PROFILES, FaultPlan, LatencyModel, SimConfig, sim_process
from ._floor import FLOOR_ROUNDS, FloorRun, bare_fanout, floor_targets

__all__ = ["BenchConfig", "Measurement", "run_benchmarks"]

OFFICIAL_VERSION = "0.1.3"


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """What to run. ``quick`` shrinks the grids so that the whole suite takes under two minutes here.

    Attributes:
        quick: the small grids.
        out_dir: where results.json and the PNG plots go.
        official: also run the official ``rlms`` package (installed into its own virtual environment).
        official_venv: that environment's folder (kept between runs).
        call_s: the simulated latency of every call before the time scale, seconds.
        time_scale: the simulator's time scale.
        seed: the simulator's seed.
    """

    quick: bool = False
    out_dir: Path = Path("bench-results")
    official: bool = True
    official_venv: Path = Path.home() / ".cache" / "rlm-async" / f"official-rlms-{OFFICIAL_VERSION}"
    call_s: float = 0.5
    time_scale: float = 0.1
    seed: int = 0

    @property
    def latency(self) -> LatencyModel:
        """Every call takes exactly ``call_s`` (before the time scale)."""
        return LatencyModel(self.call_s, 1e12, 1e12, jitter_sigma=0.0, outlier_rate=0.0)

    def sim_config(self) -> SimConfig:
        """The simulator of the floor targets and the grids: :attr:`latency` at ``time_scale``, ``seed``, and
        room for 4,096 calls at once (the largest C is 256)."""
        return SimConfig(latency=self.latency, time_scale=self.time_scale, seed=self.seed, capacity=4096)

    @property
    def scaled_call_s(self) -> float:
        """Seconds one call really takes."""
        return self.call_s * self.time_scale


@dataclass(slots=True)
class Measurement:
    """One benchmark run.

    Attributes:
        scenario: ``fanout``, ``recursive``, ``main_job``, ``rate_limited``, ``faulty``, ``scheduler``,
            or the official comparisons ``official_fanout`` / ``official_recursive`` / ``official_loop``.
        engine: ``rlm_async`` or ``rlms-0.1.3``.
        params: the scenario's parameters (N, C, k, depth, ...).
        wall_s: makespan, seconds.
        ideal_s: the ideal lower bound, seconds (None where none is defined).
        calls: model calls made.
        cpu_ms_per_call: CPU milliseconds of the engine process per call.
        peak_in_flight: the engine's peak of attempts in flight.
        peak_rss_mb: peak resident memory of the engine process during the run, MiB.
        ok: the run's answer was right (all sub-calls answered, all chains returned).
        answer: the run's answer.
        speedup: filled in afterwards: the C=1 run's wall_s / this wall_s.
        extra: anything else worth keeping (retries, 429s served, errors).
        cpu_vs_floor: cpu_ms_per_call / the floor's, measured in the same run (None where no floor ran).
        wall_vs_floor: wall_s / the floor's.
    """

    scenario: str
    engine: str
    params: dict[str, Any]
    wall_s: float
    ideal_s: float | None
    calls: int
    cpu_ms_per_call: float | None
    peak_in_flight: int | None
    peak_rss_mb: float | None
    ok: bool
    answer: str
    speedup: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    cpu_vs_floor: float | None = None
    wall_vs_floor: float | None = None

    def against(self, floor: FloorRun) -> None:
        """Fill ``cpu_vs_floor`` and ``wall_vs_floor`` from a floor run of the same work."""
        self.cpu_vs_floor = (self.cpu_ms_per_call or 0.0) / floor.cpu_ms_per_call
        self.wall_vs_floor = self.wall_s / floor.wall_s

    @property
    def ideal_ratio(self) -> float | None:
        """wall_s / ideal_s."""
        return None if not self.ideal_s else self.wall_s / self.ideal_s


# -- measuring --------------------------------------------------------------------------------------------
def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark for this process (Linux: write 5 to clear_refs), where allowed."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _engine_run(
    base_url: str, query: str, context: Any, limits: Limits, *, events: bool = False, **rlm_kwargs: Any
) -> tuple[RLMResult, float, float, list[Event]]:
    """One completion; returns the result, CPU seconds of this process, peak RSS (MiB) and the events (only
    with ``events=True``: a listener makes every event cost its CPU, which the figures should not carry).
    A full garbage collection runs first, outside the timing (as :func:`~rlm_async.bench._floor.bare_fanout`
    does)."""
    seen: list[Event] = []
    if events:
        rlm_kwargs["on_event"] = seen.append
    gc.collect()  # untimed: a full collection owed to earlier runs must not land in this one (docs/benchmarks.md)
    _reset_peak_rss()
    cpu = time.process_time()
    async with RLM(
        "sim-root", sub_model="sim-sub", base_url=base_url, api_key="sim", limits=limits, **rlm_kwargs
    ) as rlm:
        result = await rlm.completion(query, context)
    return result, time.process_time() - cpu, _peak_rss_mb(), seen


def _measure(
    scenario: str, params: dict[str, Any], ideal: float | None, run: tuple[Any, ...], right: str
) -> Measurement:
    result, cpu_s, rss, _ = run
    calls = result.stats.calls
    return Measurement(
        scenario=scenario,
        engine="rlm_async",
        params=params,
        wall_s=result.stats.wall_s,
        ideal_s=ideal,
        calls=calls,
        cpu_ms_per_call=cpu_s * 1000 / max(calls, 1),
        peak_in_flight=result.stats.peak_in_flight,
        peak_rss_mb=rss,
        ok=result.answer.startswith(right),
        answer=result.answer,
        extra={"retries": result.stats.retries, "stop_reason": result.stop_reason},
    )


def _with_speedups(rows: list[Measurement], key: Callable[[Measurement], Any]) -> None:
    """Fill ``speedup`` from the C=1 run with the same key."""
    base = {key(r): r.wall_s for r in rows if r.params.get("C") == 1}
    for r in rows:
        if key(r) in base:
            r.speedup = base[key(r)] / r.wall_s


# -- scenarios --------------------------------------------------------------------------------------------
async def fanout(cfg: BenchConfig, base_url: str) -> list[Measurement]:
    """Scenario 1: one ``llm_batch`` of N calls at max_concurrency C; at C >= 8, the floor beside each point."""
    ns = (10, 100, 1000) if cfg.quick else (10, 100, 1000, 10_000)
    cs = (1, 8, 64) if cfg.quick else (1, 8, 64, 256)
    rows = []
    for n in ns:
        for c in cs:
            if cfg.quick and n > 100 and c < 8:
                continue  # quick: the 50 s one-at-a-time baseline for N=1000 is left to the full run
            row = await _fanout_row(cfg, base_url, "fanout", n, c)
            if c >= 8:
                floor = await bare_fanout(base_url, n, c)
                row.against(floor)
                row.extra.update(floor_cpu_ms_per_call=floor.cpu_ms_per_call, floor_wall_s=floor.wall_s)
            rows.append(row)
    _with_speedups(rows, lambda r: r.params["N"])
    return rows


async def fanout_openai(cfg: BenchConfig, base_url: str) -> list[Measurement]:
    """Scenario 1 again with ``RLM(http="openai")`` (the OpenAI SDK client) for N = 1000 at C >= 8: what the SDK
    costs where the engine's CPU per call, not the latency, sets the makespan."""
    cs = (64,) if cfg.quick else (8, 64, 256)
    return [await _fanout_row(cfg, base_url, "fanout_openai", 1000, c, http="openai") for c in cs]


async def _fanout_row(cfg: BenchConfig, base_url: str, scenario: str, n: int, c: int, **rlm_kwargs: Any) -> Measurement:
    """One ``llm_batch`` of n calls at max_concurrency c; ideal: the root turn plus ceil(n / c) waves."""
    limits = Limits(max_concurrency=c, max_calls=n + 10, max_fanout=n)
    run = await _engine_run(base_url, f"Fan out {n} sub-calls", "", limits, **rlm_kwargs)
    ideal = (1 + math.ceil(n / c)) * cfg.scaled_call_s
    return _measure(scenario, {"N": n, "C": c}, ideal, run, f"{n} of {n} right")


async def throughput(cfg: BenchConfig) -> Measurement:
    """Calls per second one engine process sustains: 10,000 calls at C=256 (2,000 quick) against a simulator
    that answers at once, so the engine's CPU (and the simulator's, on the other core) is all there is."""
    n = 2000 if cfg.quick else 10_000
    instant = SimConfig(latency=PROFILES["instant"], seed=cfg.seed, capacity=4096)
    async with sim_process(instant) as sim:
        run = await _engine_run(sim.base_url, f"Fan out {n} sub-calls", "", Limits(max_concurrency=256,
                                max_calls=n + 10, max_fanout=n))  # fmt: skip
        floor = await bare_fanout(sim.base_url, n, 256)
    row = _measure("throughput", {"N": n, "C": 256}, None, run, f"{n} of {n} right")
    row.against(floor)
    row.extra.update(
        calls_per_s=round(row.calls / row.wall_s), cpu_bound_calls_per_s=round(1000 / (row.cpu_ms_per_call or 1)),
        floor_calls_per_s=round(floor.calls / floor.wall_s),
    )  # fmt: skip
    return row


async def recursive(cfg: BenchConfig, base_url: str, k: int = 10) -> tuple[list[Measurement], list[Event]]:
    """Scenario 2: k child agents at once, each heading a chain of ``depth`` agents."""
    depths = (1, 2) if cfg.quick else (1, 2, 3, 4)
    rows, timeline = [], []
    for depth in depths:
        for c in (1, 64):
            limits = Limits(max_concurrency=c, max_depth=depth + 1, max_agents=1 + k * depth)
            timed = depth == 2 and c == 64
            run = await _engine_run(base_url, f"Recursive fan-out k={k} depth={depth}", "", limits, events=timed)
            calls = 1 + k * (depth + 1)
            ideal = (calls if c == 1 else depth + 2) * cfg.scaled_call_s
            rows.append(_measure("recursive", {"k": k, "depth": depth, "C": c}, ideal, run, f"{k} of {k} chains"))
            if timed:
                timeline = run[3]
    _with_speedups(rows, lambda r: r.params["depth"])
    return rows, timeline


async def rate_limited_and_faulty(cfg: BenchConfig) -> list[Measurement]:
    """Scenario 4: a provider that enforces RPM (with and without the client's own limiter), and a faulty one."""
    n, c, rpm = (200, 64, 100) if cfg.quick else (1000, 64, 300)
    rows = []
    window_s = 60.0 * cfg.time_scale
    base = SimConfig(latency=cfg.latency, time_scale=cfg.time_scale, seed=cfg.seed, rpm=rpm)
    for client_limiter in (True, False):
        async with sim_process(base) as sim:
            limits = Limits(max_concurrency=c, max_calls=n + 10, max_fanout=n)
            kwargs: dict[str, Any] = {"retry": RetryPolicy(max_retries=50, max_retry_after_s=window_s + 1)}
            if client_limiter:  # the budget the server enforces, over its (scaled) minute
                kwargs["rate_limits"] = {"sim-sub": RateLimit(rpm=rpm, period_s=window_s)}
            run = await _engine_run(sim.base_url, f"Fan out {n} sub-calls", "", limits, **kwargs)
            served = await sim.stats()
        # A bucket of one minute's worth admits `rpm` requests at once, then rpm per minute: the last of the
        # n + 1 requests starts (n + 1 - rpm) / rpm minutes in.
        ideal = max((1 + math.ceil(n / c)) * cfg.scaled_call_s, (n + 1 - rpm) / rpm * window_s + cfg.scaled_call_s)
        row = _measure("rate_limited", {"N": n, "C": c, "rpm": rpm, "client_limiter": client_limiter}, ideal, run,
                       f"{n} of {n} right")  # fmt: skip
        row.extra["429_served"] = served.faults.get("rate_limit", 0)
        rows.append(row)
    plan = FaultPlan.parse("429=0.05,500=0.03,503=0.02", retry_after_s=1.0)
    faulty = SimConfig(latency=cfg.latency, time_scale=cfg.time_scale, seed=cfg.seed, faults=plan)
    async with sim_process(faulty) as sim:
        limits = Limits(max_concurrency=c, max_calls=n + 10, max_fanout=n)
        run = await _engine_run(sim.base_url, f"Fan out {n} sub-calls", "", limits, retry=RetryPolicy(max_retries=6))
        served = await sim.stats()
    row = _measure("faulty", {"N": n, "C": c, "faults": "429=0.05,500=0.03,503=0.02"}, None, run, f"{n} of {n} right")
    row.extra.update(faults_served=served.faults, attempts_per_call=run[0].stats.attempts / max(run[0].stats.calls, 1))
    rows.append(row)
    return rows


async def scheduler_overhead(n: int) -> Measurement:
    """The scheduler alone: n calls through an in-process fake client that answers after one checkpoint."""

    async def answer(request: ChatRequest) -> str:
        await anyio.lowlevel.checkpoint()
        return "ok"

    sched = Scheduler(FakeClient(answer), Ledger(Limits(max_calls=None)), Tracer(), max_concurrency=256)
    _reset_peak_rss()
    cpu, wall = time.process_time(), time.perf_counter()

    async def one(i: int) -> None:
        await sched.call(ChatRequest("m", ({"role": "user", "content": f"p{i}"},)), depth=1, agent_id="0")

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    stats = sched.stats()
    return Measurement(
        "scheduler", "rlm_async", {"N": n, "C": 256}, time.perf_counter() - wall, None, n,
        (time.process_time() - cpu) * 1000 / n, stats.peak_in_flight, _peak_rss_mb(), stats.calls == n, "",
    )  # fmt: skip


async def main_job(cfg: BenchConfig) -> list[Measurement]:
    """Scenario 3: the main job (the KJV word count) at C=64 and C=1."""
    from ..demo import run_main_job

    report = await run_main_job(time_scale=cfg.time_scale, seed=cfg.seed)
    rows = []
    for run in (report.concurrent, report.sequential):
        if run is None:
            continue
        rows.append(
            Measurement(
                "main_job",
                "rlm_async",
                {"C": run.max_concurrency, "chunks": run.sub_calls},
                run.wall_s,
                None,
                run.result.stats.calls,
                None,
                run.peak_in_flight,
                None,
                report.matches,
                run.result.answer[:80],
            )
        )
    _with_speedups(rows, lambda r: "main")
    return rows


# -- the official implementation ---------------------------------------------------------------------------
def ensure_official_venv(venv: Path) -> Path:
    """The python of a virtual environment with ``rlms==0.1.3`` (created and installed on first use)."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import rlm"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"rlms=={OFFICIAL_VERSION}"],
        check=True,
    )
    return python


async def _official(python: Path, base_url: str, query: str, max_depth: int) -> dict[str, Any]:
    driver = Path(__file__).with_name("official_driver.py")
    cmd = [str(python), str(driver), "--base-url", base_url, "--query", query, "--max-depth", str(max_depth)]
    done = await anyio.run_process(cmd, check=False)
    try:
        return dict(json.loads(done.stdout.decode().strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {"ok": False, "error": done.stderr.decode()[-500:], "wall_s": float("nan"), "answer": ""}


async def official_comparison(cfg: BenchConfig, base_url: str) -> list[Measurement]:
    """The same workloads, in each engine's dialect.

    One 100-call batch (``llm_query_batched`` / ``await llm_batch``), 10 recursive children at once
    (``rlm_query_batched`` / ``await rlm_batch``), and the same kinds of sub-call made one at a time in a loop
    (``llm_query`` / ``rlm_query`` against ``await llm_query`` / ``await rlm_agent``): the loops measure what each
    engine adds per sequential call, the batches what concurrency buys.
    """
    python = await anyio.to_thread.run_sync(ensure_official_venv, cfg.official_venv)
    rows = []
    cases = [
        ("official_fanout", "Fan out 100 sub-calls", 1, "100 of 100 right", {"N": 100}),
        ("official_recursive", "Recursive fan-out k=10 depth=1", 2, "10 of 10 chains", {"k": 10, "depth": 1}),
        ("official_llm_loop", "Loop 20 sub-calls", 1, "20 of 20 right", {"N": 20}),
        ("official_rlm_loop", "Loop 5 child agents", 2, "5 of 5 chains", {"k": 5, "depth": 1}),
    ]
    for scenario, query, max_depth, right, params in cases:
        peer = await _official(python, base_url, query, max_depth)
        rows.append(
            Measurement(
                scenario,
                f"rlms-{OFFICIAL_VERSION}",
                params,
                peer["wall_s"],
                None,
                0,
                None,
                None,
                None,
                bool(peer.get("ok")) and str(peer.get("answer", "")).startswith(right),
                str(peer.get("answer") or peer.get("error", ""))[:200],
            )
        )
        ours = await _engine_run(base_url, query, "", Limits(max_concurrency=64, max_depth=max_depth))
        mine = _measure(scenario, params, None, ours, right)
        mine.speedup = peer["wall_s"] / mine.wall_s if peer.get("wall_s") else None
        rows.append(mine)
    return rows


# -- the suite --------------------------------------------------------------------------------------------
async def run_benchmarks(cfg: BenchConfig, progress: Callable[[str], None] = lambda s: None) -> list[Measurement]:
    """Run every scenario; write ``results.json`` and the plots to ``cfg.out_dir``; return the measurements."""
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[Measurement] = []
    async with sim_process(cfg.sim_config()) as sim:
        progress("the floor targets (N=2000 at C=64 and 256, against a bare aiohttp loop)")
        rows += await floor_targets(sim.base_url, _engine_run, _measure, reps=1 if cfg.quick else FLOOR_ROUNDS)
        progress("fan-out grid")
        rows += await fanout(cfg, sim.base_url)
        rows += await fanout_openai(cfg, sim.base_url)
        progress("recursive fan-out")
        recursive_rows, timeline = await recursive(cfg, sim.base_url)
        rows += recursive_rows
        if cfg.official:
            progress("the official rlms (first run installs it)")
            rows += await official_comparison(cfg, sim.base_url)
    progress("rate-limited and faulty providers")
    rows += await rate_limited_and_faulty(cfg)
    progress("throughput")
    rows.append(await throughput(cfg))
    progress("scheduler overhead")
    rows.append(await scheduler_overhead(10_000))
    progress("the main job")
    rows += await main_job(cfg)
    progress("sandbox costs")
    from ._sandbox import sandbox_costs

    rows += await sandbox_costs(cfg.quick)

    from ._plots import plot_speedups, plot_timeline

    plot_speedups([r for r in rows if r.scenario == "fanout"], cfg.out_dir / "speedup_vs_concurrency.png")
    plot_timeline(timeline, cfg.out_dir / "timeline_recursive.png")
    payload = {
        "config": {k: str(v) for k, v in asdict(cfg).items()},
        "python": sys.version.split()[0],
        "results": [{**asdict(r), "ideal_ratio": r.ideal_ratio} for r in rows],
    }
    (cfg.out_dir / "results.json").write_text(json.dumps(payload, indent=1, default=str))
    return rows


def run(cfg: BenchConfig, progress: Callable[[str], None] = lambda s: None) -> list[Measurement]:
    """Blocking :func:`run_benchmarks`."""
    return asyncio.run(run_benchmarks(cfg, progress))
