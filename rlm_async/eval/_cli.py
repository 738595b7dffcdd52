"""``rlm-async eval``: generate a task's items, run them through one engine, print a table.

``add_parser(subparsers)`` adds the ``eval`` subcommand to ``rlm-async``'s parser; ``main(args)`` runs it and
returns the exit code: 0 done, 2 bad arguments or missing data, 3 stopped by ``--max-cost-usd``, 4 the
local model could not be set up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .._budget import Limits, Price
from .._errors import ConfigError
from ..local import MODELS, LocalSetupError
from ..sim import PROFILES, SimConfig
from ._engines import ENGINES
from ._runner import EvalSummary, run_eval
from ._task import Item
from ._tasks import TASKS, generate, parse_lengths

__all__ = ["add_parser", "main"]

EXIT_OK, EXIT_USAGE, EXIT_BUDGET, EXIT_ENDPOINT = 0, 2, 3, 4

_EPILOG = """\
examples:
  rlm-async eval s_niah --n 6 --length 8k,32k            # on the embedded simulator: plumbing, not intelligence
  rlm-async eval oolong --local --engine plain --n 20 --length 8k
  rlm-async eval oolong_pairs --model gpt-5 --sub-model gpt-5-mini --engine official --max-cost-usd 5 \\
      --price gpt-5=1.25,10 --price gpt-5-mini=0.25,2

Rerunning with the same --out skips items already in results.jsonl. docs/eval.md describes the tasks.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` to ``subparsers`` (what ``ArgumentParser.add_subparsers()`` returned); returns its parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "eval",
        help="quality evals: S-NIAH, OOLONG, OOLONG-Pairs on rlm_async, the official rlms, or one plain call",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("task", choices=sorted(TASKS), help="; ".join(f"{t.name}: {t.description}" for t in TASKS.values()))
    p.add_argument("--n", type=int, default=50, help="items per length (default 50)")
    p.add_argument("--length", default="32k,131k", help="comma-separated lengths in tokens: 8192, 32k, 131k, 1m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=ENGINES, default="rlm_async")
    p.add_argument("--model", default=None, help="root model (default: the embedded simulator's)")
    p.add_argument("--sub-model", default=None, help="model for sub-calls (default: --model)")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint (default: OPENAI_BASE_URL)")
    p.add_argument("--api-key", default=None, help="default: OPENAI_API_KEY")
    p.add_argument("--local", action="store_true", help="run on the local llama.cpp server (started or reused)")
    p.add_argument("--local-model", choices=sorted(MODELS), default="0.5b", help="the local model (default 0.5b)")
    p.add_argument("--out", type=Path, default=Path("eval-results"), help="results.jsonl, traces and the plot")
    p.add_argument("--max-cost-usd", type=float, default=None, help="stop before an item once this is spent")
    p.add_argument(
        "--price", action="append", default=[], metavar="MODEL=IN,OUT", help="USD per million tokens (repeatable)"
    )
    p.add_argument("--data-dir", type=Path, default=None, help="folder with oolong/ (default: ../shared/data)")
    p.add_argument("--context-window", type=int, default=None, help="the plain engine's window, tokens")
    p.add_argument("--temperature", type=float, default=None, help="default: the provider's (0 with --local)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="HTTP attempts in flight (default 64; with --local, the server's slots)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per item (default 1800)")
    p.add_argument("--sandbox", choices=["strict", "process", "none"], default="strict")
    p.add_argument("--time-scale", type=float, default=0.1, help="the simulator's time scale (default 0.1)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    return p


def _prices(specs: list[str]) -> dict[str, Price]:
    prices = {}
    for spec in specs:
        model, _, rest = spec.partition("=")
        parts = rest.split(",")
        try:
            prices[model] = Price(float(parts[0]), float(parts[1]))
        except (ValueError, IndexError):
            raise ConfigError(f"bad --price {spec!r}: use MODEL=INPUT,OUTPUT in USD per million tokens") from None
        if not model:
            raise ConfigError(f"bad --price {spec!r}: the model name is missing")
    return prices


def _items(args: argparse.Namespace, console: Console) -> list[Item]:
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    items = []
    for length in parse_lengths(args.length):
        with console.status(f"generating {args.n} {args.task} items at {length:,} tokens"):
            items += generate(args.task, args.n, length, args.seed, args.data_dir)
    return items


@contextlib.contextmanager
def _local_endpoint(args: argparse.Namespace, console: Console, limits: Limits) -> Iterator[dict[str, Any]]:
    """With ``--local``: the llama.cpp server's endpoint, and ``limits`` and a retry policy fitted to the
    server (:meth:`LocalServer.engine_settings`)."""
    if not args.local:
        yield {}
        return
    from .. import local

    with local.serving(args.local_model, log=lambda s: console.print(f"[dim]{s}[/dim]")) as srv:
        console.print(f"[yellow]local model {srv.model.name} at {srv.base_url} ({srv.parallel} slots)[/yellow]")
        limits, retry = srv.engine_settings(limits, max_concurrency=args.max_concurrency)
        yield {
            "base_url": srv.base_url,
            "api_key": srv.api_key or "local",
            "model": srv.model.name,
            "sub_model": srv.model.name,
            "temperature": 0.0 if args.temperature is None else args.temperature,
            "limits": limits,
            "retry": retry,
        }


def main(args: argparse.Namespace) -> int:
    """Run ``rlm-async eval`` with parsed ``args``; returns the exit code (see the module docstring)."""
    err = Console(stderr=True)
    try:
        return _main(args, err)
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return EXIT_USAGE
    except LocalSetupError as exc:
        err.print(f"[red]local model:[/red] {exc}")
        return EXIT_ENDPOINT


def _main(args: argparse.Namespace, err: Console) -> int:
    prices = _prices(args.price)
    items = _items(args, err)
    given = {} if args.max_concurrency is None else {"max_concurrency": args.max_concurrency}
    limits = (Limits.small_model if args.local else Limits)(max_depth=1, **given)  # the paper's depth-1 RLM
    with _local_endpoint(args, err, limits) as local_endpoint:
        model = local_endpoint.get("model", args.model)
        base_url = local_endpoint.get("base_url", args.base_url or os.environ.get("OPENAI_BASE_URL"))
        if base_url and not model:
            raise ConfigError("--model is required with a real endpoint")
        api_key = local_endpoint.get("api_key", args.api_key)
        limits = local_endpoint.get("limits", limits)
        if not model:
            err.print("[yellow]no model: running on the embedded simulator; its scores measure the plumbing, "
                      "not intelligence[/yellow]")  # fmt: skip
        summary = asyncio.run(
            _run(args, items, err, model=model, sub_model=local_endpoint.get("sub_model", args.sub_model),
                 base_url=base_url, api_key=api_key, prices=prices, limits=limits, retry=local_endpoint.get("retry"),
                 temperature=local_endpoint.get("temperature", args.temperature))
        )  # fmt: skip
    if args.json:
        print(json.dumps(_summary_json(summary)))
    else:
        out = Console()
        _table(out if out.is_terminal else Console(width=160), summary)
        err.print(f"results: {summary.results_path}" + (f"\nplot: {summary.plot_path}" if summary.plot_path else ""))
    if summary.stopped:
        err.print(f"[yellow]stopped by --max-cost-usd after ${summary.cost_usd:.4f}[/yellow]")
        return EXIT_BUDGET
    return EXIT_OK


async def _run(args: argparse.Namespace, items: list[Item], err: Console, **endpoint: Any) -> EvalSummary:
    kwargs: dict[str, Any] = {
        **endpoint,
        "engine": args.engine,
        "out_dir": args.out,
        "max_cost_usd": args.max_cost_usd,
        "context_window": args.context_window,
        "sandbox": args.sandbox,
        "timeout_s": args.timeout,
        "simulator": SimConfig(latency=PROFILES["fast"], time_scale=args.time_scale),
        "seed": args.seed,
    }
    if not err.is_terminal or args.json:
        return await run_eval(items, **kwargs)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(f"{args.task} on {args.engine}", total=len(items))

        def advance(row: Mapping[str, Any], resumed: bool) -> None:
            note = "resumed" if resumed else f"score {row['score']:.2f}, {row['wall_s']:.1f} s"
            bar.update(task, advance=1, description=f"{args.task} on {args.engine}: {row['id']} ({note})")

        return await run_eval(items, progress=advance, **kwargs)


def _table(console: Console, summary: EvalSummary) -> None:
    title = "eval" + (" on the simulator (scores measure the plumbing, not intelligence)" if summary.simulated else "")
    table = Table(title=title)
    for name in ("task", "engine", "model", "length", "n", "score % (95% CI)", "non-empty", "turns/item", "cost",
                 "tokens in/out", "wall", "calls", "p50", "p95", "errors"):  # fmt: skip
        table.add_column(name, justify="left" if name in ("task", "engine", "model") else "right")
    for g in summary.groups:
        table.add_row(
            g.task, g.engine, g.model, f"{g.length_tokens:,}", str(g.n),
            f"{100 * g.score:.1f} ({100 * g.ci_low:.1f}-{100 * g.ci_high:.1f})", f"{g.non_empty}/{g.n}",
            "-" if g.turns is None else f"{g.turns / g.turns_n:.1f}", f"${g.cost_usd:.4f}",
            f"{g.prompt_tokens:,}/{g.completion_tokens:,}", f"{g.wall_s:.1f} s", f"{g.calls:,}",
            f"{g.p50_s:.2f} s", f"{g.p95_s:.2f} s", str(g.errors),
        )  # fmt: skip
    console.print(table)
    if summary.resumed:
        console.print(f"{summary.resumed} items resumed from {summary.results_path}, {summary.ran} run now")


def _summary_json(summary: EvalSummary) -> dict[str, Any]:
    return {
        "results": str(summary.results_path),
        "plot": None if summary.plot_path is None else str(summary.plot_path),
        "ran": summary.ran,
        "resumed": summary.resumed,
        "stopped": summary.stopped,
        "cost_usd": summary.cost_usd,
        "simulated": summary.simulated,
        "groups": [dataclasses.asdict(g) for g in summary.groups],
    }
