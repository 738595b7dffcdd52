"""``rlm-async batch INPUT.jsonl --out RESULTS.jsonl``: the command over :func:`rlm_async.batch.batch`."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path
from typing import Any

from rich.console import Console

from .._budget import Limits, Price
from .._endpoint import RateLimit
from .._errors import ConfigError
from ._api import DEFAULT_ITEM_ATTEMPTS, DEFAULT_MAX_RUNS, BatchReport, batch
from ._items import read_items
from ._progress import BatchProgress

__all__ = ["add_parser", "main"]

#: Exit codes: every item answered; some failed or were not run; interrupted (SIGINT, SIGTERM).
EXIT_OK, EXIT_SOME_FAILED, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 130, 143

_EPILOG = """\
examples:
  rlm-async batch docs.jsonl --out results.jsonl --model gpt-4.1 --sub-model gpt-4.1-mini --max-runs 16
  rlm-async batch docs.jsonl --out results.jsonl --ray auto --model gpt-4.1 --sub-model gpt-4.1-mini \\
      --rpm 5000 --job-max-cost-usd 20 --price gpt-4.1=2,8 --price gpt-4.1-mini=0.4,1.6

Each input line: {"id": ..., "query": ..., "context": ...} or "context_path" instead of "context".
A rerun with the same --out skips the ids already there; items the job's budget stopped or never started
are not recorded, so a rerun with a larger budget runs them. docs/scale-out.md: Ray, leases, sizing.
exit codes: 0 every item answered, 1 some failed or were not run, 2 bad arguments or input (or a Ray worker
that cannot build its engine), 130 / 143 interrupted by SIGINT / SIGTERM (finished items are kept; a second
signal does not cut the cleanup short).
"""


def add_parser(sub: Any) -> None:
    """Add ``batch`` to the ``rlm-async`` subcommands."""
    p = sub.add_parser(
        "batch",
        help="run many queries (JSON lines), resumable, on this machine or a Ray cluster",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", type=Path, help="JSON lines: id, query, context or context_path")
    p.add_argument("--out", type=Path, required=True, help="the results file (JSON lines, appended)")
    p.add_argument("--model", default=None, help="root model (default: sim-root on the simulator)")
    p.add_argument("--sub-model", default=None, help="model for sub-calls and child agents")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint (default: OPENAI_BASE_URL)")
    p.add_argument("--api-key", default=None, help="default: OPENAI_API_KEY")
    p.add_argument("--max-runs", type=int, default=DEFAULT_MAX_RUNS, help="completions at once per engine")
    p.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        default=None,
        metavar="auto|local|ADDRESS",
        help="run on Ray: auto (a running cluster; the default), local (start one), or a cluster address",
    )
    p.add_argument("--workers", type=int, default=None, help="Ray worker actors (default: the cluster's CPUs)")
    p.add_argument("--max-concurrency", type=int, default=64, help="HTTP attempts in flight, across the job")
    p.add_argument("--rpm", type=float, default=None, help="requests per minute per model, across the job")
    p.add_argument("--tpm", type=float, default=None, help="tokens per minute per model, across the job")
    p.add_argument("--max-calls", type=int, default=1000, help="model calls per item")
    p.add_argument("--max-depth", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per item (default 1800)")
    p.add_argument("--job-max-calls", type=int, default=None, help="model calls (requests) across the job")
    p.add_argument("--job-max-cost-usd", type=float, default=None, help="USD across the job (needs --price)")
    p.add_argument("--price", action="append", default=[], metavar="MODEL=IN,OUT", help="USD per million tokens")
    p.add_argument(
        "--max-item-attempts",
        type=int,
        default=DEFAULT_ITEM_ATTEMPTS,
        help="tries when Ray workers die or Ray fails a call",
    )
    p.add_argument("--sandbox", choices=["strict", "process", "none"], default="strict")
    p.add_argument("--json", action="store_true", help="print the final summary as one JSON object")


def _prices(specs: list[str]) -> dict[str, Price]:
    prices = {}
    for spec in specs:
        model, _, pair = spec.partition("=")
        try:
            given, taken = (float(x) for x in pair.split(","))
        except ValueError:
            raise ConfigError(f"--price wants MODEL=IN,OUT (USD per million tokens), got {spec!r}") from None
        prices[model] = Price(given, taken)
    return prices


class StopOnSignal:
    """The command's SIGINT / SIGTERM handler: the first signal cancels the job's task (running items are
    cancelled, REPL workers and Ray actors stopped, finished items kept); later ones only say that the cleanup
    is under way, so they cannot cancel the cleanup itself and leave workers or actors behind.

    Attributes:
        signals: the signals received, in order (the first sets the exit code).
    """

    def __init__(self, task: asyncio.Task[Any], err: Console, signals: list[int] | None = None) -> None:
        self._task = task
        self._err = err
        self.signals: list[int] = signals if signals is not None else []

    def __call__(self, signum: int) -> None:
        self.signals.append(signum)
        if len(self.signals) == 1:
            self._task.cancel()
        else:
            name = signal.Signals(signum).name
            self._err.print(f"[yellow]{name}: stopping, cleaning up (workers and actors); please wait[/yellow]")


def main(args: argparse.Namespace) -> int:
    """Run ``rlm-async batch``; returns the exit code.

    Raises:
        ConfigError: bad arguments or input (the caller prints it and exits 2).
    """
    items = read_items(args.input)
    err = Console(stderr=True)
    progress = BatchProgress(len(items), None if args.json else err)
    stopped_by: list[int] = []

    async def run() -> BatchReport:
        from ..cli import _endpoint  # the embedded simulator when no endpoint is configured

        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        stop = StopOnSignal(task, err, stopped_by)
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop, signum)
        async with _endpoint(args, err) as (base_url, api_key):
            simulated = api_key == "sim"
            model = args.model or ("sim-root" if simulated else None)
            if model is None:
                raise ConfigError("--model is required with a real endpoint")
            sub_model = args.sub_model or ("sim-sub" if simulated else None)
            rate = RateLimit(rpm=args.rpm, tpm=args.tpm) if args.rpm or args.tpm else None
            models = {model, sub_model or model}
            limits = Limits(
                max_concurrency=args.max_concurrency,
                max_calls=args.max_calls,
                max_depth=args.max_depth,
                timeout_s=args.timeout,
            )
            with progress:
                return await batch(
                    items,
                    model,
                    out=args.out,
                    max_runs=args.max_runs,
                    ray=args.ray,
                    workers=args.workers,
                    max_calls=args.job_max_calls,
                    max_cost_usd=args.job_max_cost_usd,
                    max_item_attempts=args.max_item_attempts,
                    on_result=progress.on_result,
                    on_start=progress.on_start,
                    on_skipped=progress.on_skipped,
                    on_stopped=progress.on_stopped,
                    sub_model=sub_model,
                    base_url=base_url or None,
                    api_key=api_key,
                    limits=limits,
                    rate_limits={m: rate for m in models} if rate is not None else None,
                    prices=_prices(args.price),
                    sandbox=args.sandbox,
                )

    try:
        report = asyncio.run(run())
    except asyncio.CancelledError:
        if not stopped_by:
            raise
        summary = {
            "interrupted": True,
            "done": progress.done,
            "failed": progress.failed,
            "skipped": progress.skipped,
            "stopped_by_budget": progress.stopped,
            "cost_usd": progress.usage.cost_usd,
            "out": str(args.out),
        }
        _print(args, err, summary, f"interrupted: {progress.line()}; finished items are kept in {args.out}")
        return EXIT_SIGTERM if stopped_by[0] == signal.SIGTERM else EXIT_SIGINT
    summary = {"interrupted": False, **report.summary(), "out": str(args.out)}
    stopped = f" ({report.stopped} stopped by the job's budget)" if report.stopped else ""
    text = f"{progress.line()}; not run {report.not_run}{stopped}; {report.wall_s:.1f} s; {args.out}"
    _print(args, err, summary, text)
    return EXIT_OK if report.failed == 0 and report.not_run == 0 else EXIT_SOME_FAILED


def _print(args: argparse.Namespace, err: Console, summary: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(summary))
    else:
        err.print(text)
