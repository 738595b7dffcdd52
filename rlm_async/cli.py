"""The ``rlm-async`` command line: ``run`` a query, serve the ``sim``ulator, or run the main job (``demo``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from . import local
from ._budget import SMALL_MODEL, Limits
from ._engine import RLM, RLMResult
from ._errors import ConfigError
from ._retry import RetryPolicy
from ._sandbox import describe as describe_sandbox
from ._trace import Event
from .batch import _cli as batch_cli
from .eval import _cli as eval_cli
from .local import MODELS, LocalSetupError
from .sim import FAULT_KINDS, PROFILES, FaultPlan, SimConfig, SimServer

__all__ = ["main"]

#: Limits that ``run --local`` (and ``--profile small``) set unless told otherwise: ``Limits.small_model()``.
LOCAL_LIMITS = SMALL_MODEL

#: Exit codes a shell user can act on.
EXIT_OK, EXIT_NO_ANSWER, EXIT_USAGE, EXIT_BUDGET, EXIT_ENDPOINT = 0, 1, 2, 3, 4
#: ``run``'s wall-clock bound unless --timeout says otherwise: a CLI run never hangs for ever.
DEFAULT_RUN_TIMEOUT_S = 1800.0

_EPILOG = """\
examples:
  rlm-async demo                                   # the main job: the KJV, 100+ chunks, checked answer
  rlm-async run "Which books mention a shepherd?" --context bible.txt
  rlm-async run "Summarise" --context - --base-url http://127.0.0.1:8000/v1 < notes.txt
  rlm-async sim --port 8000 --profile fast --faults "429=0.05,500=0.01"
  rlm-async bench --quick --out bench-results      # speedups, ideal bounds, the official rlms side by side
  rlm-async eval oolong --n 20 --length 8k,32k     # quality: S-NIAH, OOLONG, OOLONG-Pairs (docs/eval.md)
  rlm-async batch docs.jsonl --out results.jsonl  # many queries, resumable; --ray for a Ray cluster
  rlm-async local setup                            # llama.cpp + Qwen2.5-Coder-0.5B, cached (once, ~8 min)
  rlm-async run --local "How many lines mention a cat?" --context notes.txt

exit codes: 0 answer, 1 no answer (error), 2 bad arguments or input file, 3 budget or timeout stop
(the partial answer is printed), 4 endpoint unreachable, failing or refusing the configuration (401, 403,
404 for a configured model).
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlm-async",
        description="Recursive Language Models with awaitable sub-calls over one bounded scheduler.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer a query about a context file", epilog=_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    run.add_argument("query")
    run.add_argument("--context", required=True, help="a text file, or - for standard input")
    run.add_argument("--model", default=None, help="root model (default: sim-root on the simulator)")
    run.add_argument("--sub-model", default=None, help="model for sub-calls and child agents")
    run.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint (default: OPENAI_BASE_URL)")
    run.add_argument("--api-key", default=None, help="default: OPENAI_API_KEY")
    run.add_argument("--max-concurrency", type=int, default=None,
                     help="HTTP attempts in flight (default 64; with --local, the server's slots)")  # fmt: skip
    run.add_argument("--max-depth", type=int, default=3)
    run.add_argument("--max-calls", type=int, default=1000)
    run.add_argument("--max-cost-usd", type=float, default=None)
    run.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_RUN_TIMEOUT_S,
        help=f"seconds for the whole run (default {DEFAULT_RUN_TIMEOUT_S:g})",
    )
    run.add_argument("--cell-timeout", type=float, default=120.0, help="seconds one REPL cell may run (default 120)")
    run.add_argument(
        "--sandbox",
        choices=["strict", "process", "none"],
        default="strict",
        help="where model code runs (default strict; see rlm-async doctor and docs/security.md)",
    )
    run.add_argument("--trace", type=Path, default=None, help="write every event as JSON lines")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    run.add_argument("--local", action="store_true", help="run on a local llama.cpp server (started or reused)")
    run.add_argument("--local-model", choices=sorted(MODELS), default="0.5b")
    run.add_argument("--keep-server", action="store_true", help="leave a server --local started running")
    run.add_argument(
        "--profile", choices=["default", "small"], default="default",
        help="small: Limits.small_model() for a small model on any endpoint (--local implies it)",
    )  # fmt: skip
    run.add_argument("--max-iterations", type=int, default=None, help="turns per agent (default 20; 8 with --local)")
    run.add_argument("--max-output-chars", type=int, default=None, help="default 20,000; 2,000 with --local")
    run.add_argument("--max-tokens-per-turn", type=int, default=None, help="default: 512 with --local")
    run.add_argument(
        "--max-tokens-per-subcall", type=int, default=None, help="max_tokens of each sub-call (1,024 with --local)"
    )
    run.add_argument("--temperature", type=float, default=None, help="default: 0 with --local")

    serve = sub.add_parser("serve", help="serve RLMs behind an OpenAI-compatible HTTP API")
    serve.add_argument("--name", default="rlm", help="the model name clients send (default rlm)")
    serve.add_argument("--model", default=None, help="root model (default: sim-root on the simulator)")
    serve.add_argument("--sub-model", default=None, help="model for sub-calls and child agents")
    serve.add_argument("--base-url", default=None, help="the models' endpoint (default: OPENAI_BASE_URL)")
    serve.add_argument("--upstream-api-key", default=None, help="the models' key (default: OPENAI_API_KEY)")
    serve.add_argument("--sim", action="store_true", help="serve RLMs over the embedded simulator")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument(
        "--api-key",
        default=None,
        help="bearer token clients must send (default: RLM_ASYNC_SERVE_API_KEY; required off loopback)",
    )
    serve.add_argument("--max-concurrency", type=int, default=64, help="HTTP attempts in flight across requests")
    serve.add_argument("--max-calls", type=int, default=1000, help="per request")
    serve.add_argument("--timeout", type=float, default=DEFAULT_RUN_TIMEOUT_S, help="seconds per request")
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds running requests get to finish after SIGTERM (default 30)",
    )
    serve.add_argument("--sandbox", choices=["strict", "process", "none"], default="strict")

    doctor = sub.add_parser("doctor", help="which sandbox layers this machine supports, and the level used")
    doctor.add_argument("--json", action="store_true", help="print one JSON object")

    local_cmd = sub.add_parser("local", help="the local llama.cpp server: setup, start, stop, status")
    local_cmd.add_argument("action", choices=["setup", "start", "stop", "status"])
    local_cmd.add_argument("--local-model", choices=sorted(MODELS), default="0.5b")

    sim = sub.add_parser("sim", help="serve the simulated OpenAI-compatible endpoint")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8000)
    sim.add_argument("--profile", choices=sorted(PROFILES), default="fast")
    sim.add_argument("--faults", default="", help=f"KIND=RATE,... with KIND in {', '.join(FAULT_KINDS)}")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--time-scale", type=float, default=1.0)
    sim.add_argument("--capacity", type=int, default=256)
    sim.add_argument("--rpm", type=float, default=None)
    sim.add_argument("--tpm", type=float, default=None)
    sim.add_argument("--duration", type=float, default=None, help="stop by itself after this many seconds")

    bench = sub.add_parser("bench", help="the benchmark suite: speedups, ideal bounds, the official RLM")
    bench.add_argument("--quick", action="store_true", help="small grids (under two minutes here)")
    bench.add_argument("--out", type=Path, default=Path("bench-results"), help="results.json and PNG plots go here")
    bench.add_argument("--no-official", action="store_true", help="skip the official rlms comparison")
    bench.add_argument("--time-scale", type=float, default=0.1)
    bench.add_argument("--seed", type=int, default=0)

    eval_cli.add_parser(sub)
    batch_cli.add_parser(sub)

    demo = sub.add_parser("demo", help="the main job: word counts per book over the whole KJV, checked")
    demo.add_argument("--word", default="shepherd")
    demo.add_argument("--max-concurrency", type=int, default=64)
    demo.add_argument("--time-scale", type=float, default=0.1, help="the simulator's time scale")
    demo.add_argument("--no-sequential", action="store_true", help="skip the one-at-a-time run")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``rlm-async``; returns the exit code."""
    args = _parser().parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "run": _run,
        "sim": _sim,
        "demo": _demo,
        "bench": _bench,
        "local": _local,
        "doctor": _doctor,
        "serve": _serve,
        "eval": eval_cli.main,
        "batch": batch_cli.main,
    }
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}")
        return EXIT_USAGE
    except LocalSetupError as exc:
        Console(stderr=True).print(f"[red]local model:[/red] {exc}")
        return EXIT_ENDPOINT
    except KeyboardInterrupt:
        return 130


# -- serve -----------------------------------------------------------------------------------------------
def _serve(args: argparse.Namespace) -> int:
    """Serve one RLM under ``--name`` until SIGINT / SIGTERM (graceful: running requests may finish)."""
    from aiohttp import web

    from .serve import create_app, refuse_open_exposure, serve_app

    api_key = args.api_key or os.environ.get("RLM_ASYNC_SERVE_API_KEY")
    refuse_open_exposure(args.host, api_key)
    limits = Limits(max_concurrency=args.max_concurrency, max_calls=args.max_calls, timeout_s=args.timeout)
    err = Console(stderr=True)

    async def app() -> web.Application:
        base_url, upstream_key, model, sub_model = args.base_url, args.upstream_api_key, args.model, args.sub_model
        sim = None
        if args.sim or not (
            base_url or os.environ.get("OPENAI_BASE_URL") or upstream_key or os.environ.get("OPENAI_API_KEY")
        ):
            sim = SimServer(SimConfig(latency=PROFILES["fast"]))
            await sim.__aenter__()
            base_url, upstream_key, model, sub_model = sim.base_url, "sim", model or "sim-root", sub_model or "sim-sub"
            err.print(f"[yellow]serving over the embedded simulator at {sim.base_url}[/yellow]")
        if model is None:
            raise ConfigError("--model is required with a real endpoint")
        rlm = RLM(
            model, sub_model=sub_model, base_url=base_url, api_key=upstream_key, limits=limits, sandbox=args.sandbox
        )
        served = create_app({args.name: rlm}, api_key=api_key)
        if sim is not None:

            async def stop_sim(_: web.Application) -> None:
                await sim.__aexit__(None, None, None)

            served.on_cleanup.append(stop_sim)
        err.print(f"[green]rlm-async serve: model {args.name!r} at http://{args.host}:{args.port}/v1[/green]")
        return served

    serve_app(app(), args.host, args.port, args.shutdown_timeout)
    return EXIT_OK


# -- doctor ----------------------------------------------------------------------------------------------
def _doctor(args: argparse.Namespace) -> int:
    """Print the sandbox layers this machine supports; exit 0 when ``sandbox="strict"`` can start, else 1."""
    report = describe_sandbox()
    if args.json:
        print(json.dumps(report))
    else:
        table = Table(title="REPL sandbox layers on this machine")
        table.add_column("layer")
        table.add_column("available")
        table.add_column("why not")
        for name, row in report["layers"].items():
            table.add_row(name, "[green]yes[/green]" if row["available"] else "[red]no[/red]", row["why_not"])
        console = Console()
        console.print(table)
        level = report["default_level"]
        if level:
            console.print("default level: [green]strict[/green] (filesystem and network confinement available)")
        else:
            console.print(
                "default level: [red]strict would refuse to start[/red]; pass sandbox='process' (rlimits and a "
                "scrubbed environment only) or fix the missing layers"
            )
    return EXIT_OK if report["default_level"] else EXIT_NO_ANSWER


# -- run -------------------------------------------------------------------------------------------------
def _read_context(spec: str) -> str:
    if spec == "-":
        return sys.stdin.read()
    path = Path(spec)
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError(f"cannot read context file {spec!r}: {exc.strerror or exc}") from None


def _run(args: argparse.Namespace) -> int:
    context = _read_context(args.context)
    given = {name: getattr(args, name) for name in LOCAL_LIMITS if getattr(args, name) is not None}
    limits = Limits(
        **_given_concurrency(args),
        max_depth=args.max_depth,
        max_calls=args.max_calls,
        max_cost_usd=args.max_cost_usd,
        timeout_s=args.timeout,
        cell_timeout_s=args.cell_timeout,
        **({**LOCAL_LIMITS, **given} if args.local or args.profile == "small" else given),
    )
    if args.local:
        err = Console(stderr=True)
        with local.serving(args.local_model, keep=args.keep_server, log=lambda s: err.print(f"[dim]{s}[/dim]")) as srv:
            err.print(f"[yellow]local model {srv.model.name} at {srv.base_url} ({srv.parallel} slots)[/yellow]")
            args.base_url, args.api_key = srv.base_url, srv.api_key or "local"
            args.model = args.sub_model = srv.model.name
            args.temperature = 0.0 if args.temperature is None else args.temperature
            limits, retry = srv.engine_settings(limits, max_concurrency=args.max_concurrency)
            result = asyncio.run(_run_async(args, context, limits, retry))
    else:
        result = asyncio.run(_run_async(args, context, limits))
    if args.json:
        print(json.dumps(_result_json(result)))
    else:
        print(result.answer)
        _summary(Console(stderr=True), result)
    if result.ok:
        return EXIT_OK
    if result.stop_reason.startswith("budget:") or result.stop_reason == "timeout":
        return EXIT_BUDGET
    if result.stop_reason in ("llm_error", "config_error"):
        return EXIT_ENDPOINT
    return EXIT_NO_ANSWER


@contextlib.asynccontextmanager
async def _endpoint(args: argparse.Namespace, err: Console) -> AsyncIterator[tuple[str, str | None]]:
    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL")
    if base_url or args.api_key or os.environ.get("OPENAI_API_KEY"):
        yield base_url or "", args.api_key
        return
    async with SimServer(SimConfig(latency=PROFILES["fast"])) as sim:
        err.print(f"[yellow]no endpoint configured: using the embedded simulator at {sim.base_url}[/yellow]")
        yield sim.base_url, "sim"


def _given_concurrency(args: argparse.Namespace) -> dict[str, Any]:
    """``--max-concurrency`` as a ``Limits`` keyword when given (None leaves the default, or the local server's)."""
    return {} if args.max_concurrency is None else {"max_concurrency": args.max_concurrency}


async def _run_async(
    args: argparse.Namespace, context: str, limits: Limits, retry: RetryPolicy | None = None
) -> RLMResult:
    err = Console(stderr=True)
    async with _endpoint(args, err) as (base_url, api_key):
        simulated = api_key == "sim"
        model = args.model or ("sim-root" if simulated else None)
        if model is None:
            raise ConfigError("--model is required with a real endpoint")
        progress = _Progress(err) if err.is_terminal and not args.json else None
        async with RLM(
            model,
            sub_model=args.sub_model or ("sim-sub" if simulated else None),
            base_url=base_url or None,
            api_key=api_key,
            limits=limits,
            retry=retry,
            trace_path=args.trace,
            on_event=progress.on_event if progress else None,
            temperature=args.temperature,
            sandbox=args.sandbox,
        ) as rlm:
            if progress is None:
                return await rlm.completion(args.query, context)
            with progress:
                return await rlm.completion(args.query, context)


class _Progress:
    """A one-line live status on a terminal: calls finished, in flight, agents, retries."""

    def __init__(self, console: Console) -> None:
        self._status = console.status("starting")
        self._done = self._started = self._agents = self._retries = 0

    def __enter__(self) -> _Progress:
        self._status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._status.__exit__(None, None, None)

    def on_event(self, event: Event) -> None:
        name = event["event"]
        self._done += name in ("call_finished", "call_failed")
        self._started += name == "call_queued"
        self._agents += name == "agent_start"
        self._retries += name == "call_retried"
        self._status.update(
            f"calls {self._done}/{self._started}  agents {self._agents}  retries {self._retries}  t={event['t']:.1f}s"
        )


def _summary(console: Console, result: RLMResult) -> None:
    u, s = result.usage, result.stats
    table = Table(show_header=False, box=None)
    for key, value in (
        ("stop reason", result.stop_reason + (f" ({str(result.error).splitlines()[0]})" if result.error else "")),
        ("calls", f"{u.calls} billed, {s.attempts} attempts, {s.retries} retries, {s.failed_calls} failed"),
        ("tokens", f"{u.prompt_tokens:,} prompt + {u.completion_tokens:,} completion"),
        ("cost", f"${u.cost_usd:.4f}"),
        ("wall time", f"{s.wall_s:.2f} s"),
        ("peak in flight", str(s.peak_in_flight)),
        ("agents", f"{s.agents} (max depth {s.max_depth_reached})"),
    ):
        table.add_row(f"[bold]{key}[/bold]", value)
    console.print(table)


def _result_json(result: RLMResult) -> dict[str, Any]:
    usage = result.usage
    return {
        "answer": result.answer,
        "stop_reason": result.stop_reason,
        "error": None if result.error is None else str(result.error),
        "error_type": None if result.error is None else type(result.error).__name__,
        "run_id": result.run_id,
        "usage": {
            "calls": usage.calls,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cost_usd": usage.cost_usd,
            "by_depth": {d: dataclasses.asdict(t) for d, t in usage.by_depth.items()},
        },
        "stats": dataclasses.asdict(result.stats),
    }


# -- local ----------------------------------------------------------------------------------------------
def _local(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    key = args.local_model

    def log(line: str) -> None:
        err.print(f"[dim]{line}[/dim]")

    if args.action == "setup":
        try:
            binary, weights = local.setup(key, log=log)
        except LocalSetupError as exc:
            local.record_setup_error(str(exc))
            raise
        print(f"llama-server: {binary}\nweights: {weights}")
    elif args.action == "start":
        server = local.start_server(key, log=log)
        print(server.base_url)
    elif args.action == "stop":
        print("stopped" if local.stop_server(key) else "no server was running")
    else:
        found = local.find_server(key)
        print(f"running at {found.base_url} (pid {found.pid})" if found else "not running")
        return EXIT_OK if found else EXIT_NO_ANSWER
    return EXIT_OK


# -- sim ------------------------------------------------------------------------------------------------
def _sim(args: argparse.Namespace) -> int:
    config = SimConfig(
        latency=PROFILES[args.profile],
        time_scale=args.time_scale,
        capacity=args.capacity,
        faults=FaultPlan.parse(args.faults),
        rpm=args.rpm,
        tpm=args.tpm,
        seed=args.seed,
    )
    asyncio.run(_serve_sim(config, args.host, args.port, args.duration))
    return EXIT_OK


async def _serve_sim(config: SimConfig, host: str, port: int, duration: float | None) -> None:
    server = SimServer(config)
    try:
        url = await server.start(host, port)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    console = Console(stderr=True)
    console.print(f"simulator listening at [bold]{url}[/bold] (profile tokenizer: {server.tokenizer}); Ctrl-C stops it")
    try:
        if duration is None:
            await asyncio.Event().wait()
        else:
            await asyncio.sleep(duration)
    finally:
        await server.stop()
        console.print(f"served: {server.stats()}")


# -- demo (the main job) -------------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    from .demo import run_main_job

    console = Console()
    with console.status("running the main job over the KJV on the embedded simulator"):
        report = asyncio.run(
            run_main_job(
                args.word,
                max_concurrency=args.max_concurrency,
                time_scale=args.time_scale,
                sequential=not args.no_sequential,
                seed=args.seed,
            )
        )
    runs = [r for r in (report.concurrent, report.sequential) if r is not None]
    if args.json:
        print(json.dumps({
            "word": report.word, "matches": report.matches, "expected": report.expected, "answer": report.answer,
            "characters": report.characters, "speedup": report.speedup,
            "runs": [{"max_concurrency": r.max_concurrency, "wall_s": r.wall_s, "sub_calls": r.sub_calls,
                      "peak_in_flight": r.peak_in_flight, "server_requests": r.server.requests} for r in runs],
        }))  # fmt: skip
        return EXIT_OK if report.matches else EXIT_NO_ANSWER
    table = Table(title=f"verses containing '{report.word}', per book")
    table.add_column("book")
    table.add_column("engine", justify="right")
    table.add_column("plain scan", justify="right")
    for book in sorted(set(report.expected) | set(report.answer), key=lambda b: -report.expected.get(b, 0)):
        table.add_row(book, str(report.answer.get(book, "-")), str(report.expected.get(book, "-")))
    console.print(table)
    verdict = "[green]MATCHES[/green]" if report.matches else "[red]DOES NOT MATCH[/red]"
    console.print(f"answer {verdict} the independent count ({sum(report.expected.values())} verses)")
    for r in runs:
        console.print(
            f"max_concurrency={r.max_concurrency:>3}: {r.sub_calls} chunks over {report.characters:,} characters, "
            f"wall {r.wall_s:.2f} s, peak in flight {r.peak_in_flight}, server saw {r.server.requests} requests"
        )
    if report.speedup is not None:
        console.print(f"speedup over the same sub-calls one at a time: [bold]{report.speedup:.1f}x[/bold]")
    return EXIT_OK if report.matches else EXIT_NO_ANSWER


# -- bench -----------------------------------------------------------------------------------------------
def _bench(args: argparse.Namespace) -> int:
    from . import bench

    cfg = bench.BenchConfig(
        quick=args.quick, out_dir=args.out, official=not args.no_official, time_scale=args.time_scale, seed=args.seed
    )
    console = Console(width=max(Console().width, 150))
    with console.status("benchmarking") as status:
        rows = bench.run(cfg, progress=lambda step: status.update(f"benchmarking: {step}"))
    table = Table(title=f"rlm-async bench ({'quick' if args.quick else 'full'}; results in {args.out})")
    columns = ("scenario", "engine", "params", "wall s", "speedup", "/ideal", "CPU ms/call", "CPU/floor", "wall/floor",
               "peak", "RSS MiB", "ok")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col in ("scenario", "engine", "params") else "right")

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in rows:
        params = " ".join(f"{k}={v}" for k, v in r.params.items())
        table.add_row(
            r.scenario, r.engine, params, fmt(r.wall_s, ".3f"), fmt(r.speedup, ".1f"), fmt(r.ideal_ratio, ".2f"),
            fmt(r.cpu_ms_per_call, ".3f"), fmt(r.cpu_vs_floor, ".2f"), fmt(r.wall_vs_floor, ".3f"),
            fmt(r.peak_in_flight, "d"), fmt(r.peak_rss_mb, ".0f"),
            "yes" if r.ok else "[red]NO[/red]",
        )  # fmt: skip
    console.print(table)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
