"""``run_eval``: items through one engine, one after another, into a resumable ``results.jsonl``."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from .._budget import Limits, Price
from .._errors import ConfigError, RLMError
from .._prompts import system_prompt
from .._retry import RetryPolicy
from ..sim import PROFILES, SimConfig, SimServer, sim_process
from ._engines import ENGINES, EngineName, ModelConfig, Outcome, open_engine
from ._plot import plot_scores
from ._stats import GroupSummary, summarise
from ._task import Item, OolongExpected, PairsExpected

__all__ = ["ANSWER_CHARS", "EvalSummary", "read_results", "run_eval"]

#: Characters of each answer kept in results.jsonl (an OOLONG-Pairs answer can run to megabytes; the score
#: is taken from the whole answer before it is cut).
ANSWER_CHARS = 4000
SIM_MODEL, SIM_SUB_MODEL = "sim-root", "sim-sub"


@dataclass(frozen=True, slots=True)
class EvalSummary:
    """What ``run_eval`` did.

    Attributes:
        results_path: ``<out_dir>/results.jsonl``: one JSON object per item and engine.
        plot_path: ``<out_dir>/score_vs_length.png`` (every engine and task in results.jsonl), or None
            without matplotlib.
        groups: this run's items summarised per (task, engine, model, length), resumed items included.
        ran: items run now.
        resumed: items found already done in results.jsonl and skipped.
        stopped: ``"max_cost_usd"`` when the budget stopped the run before its last item, else None.
        cost_usd: USD spent on this run's items, resumed ones included.
        simulated: whether the run used the embedded simulator (its scores measure the plumbing only).
    """

    results_path: Path
    plot_path: Path | None
    groups: list[GroupSummary]
    ran: int
    resumed: int
    stopped: Literal["max_cost_usd"] | None
    cost_usd: float
    simulated: bool


def read_results(path: Path) -> list[dict[str, Any]]:
    """The rows of a results.jsonl; a line that does not parse (a run killed mid-write) is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if isinstance(row, dict) and "id" in row:
                rows.append(row)
    return rows


def _expected_json(expected: object) -> Any:
    if isinstance(expected, OolongExpected):
        return {"value": expected.value, "answer_type": expected.answer_type}
    if isinstance(expected, PairsExpected):
        return {"pairs": expected.count}
    return list(expected) if isinstance(expected, tuple) else str(expected)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


@contextlib.asynccontextmanager
async def _endpoint(
    base_url: str | None, model: str | None, simulator: SimConfig | None, in_process: bool
) -> AsyncIterator[str | None]:
    """``base_url``, or the embedded simulator's when neither a model nor an endpoint is given."""
    if base_url or model:
        yield base_url
        return
    config = simulator or SimConfig(latency=PROFILES["fast"], time_scale=0.1)
    if in_process:
        async with SimServer(config) as sim:
            yield sim.base_url
    else:
        async with sim_process(config) as remote:
            yield remote.base_url


async def run_eval(
    items: Sequence[Item],
    *,
    engine: EngineName = "rlm_async",
    model: str | None = None,
    sub_model: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    out_dir: str | Path = "eval-results",
    max_cost_usd: float | None = None,
    prices: Mapping[str, Price] | None = None,
    temperature: float | None = None,
    context_window: int | None = None,
    limits: Limits | None = None,
    retry: RetryPolicy | None = None,
    sandbox: Literal["strict", "process", "none"] = "strict",
    timeout_s: float = 1800.0,
    official_venv: Path | None = None,
    simulator: SimConfig | None = None,
    simulator_in_process: bool = False,
    progress: Callable[[Mapping[str, Any], bool], None] | None = None,
    seed: int = 0,
) -> EvalSummary:
    """Run ``items`` through ``engine``, one at a time, appending one line per item to
    ``<out_dir>/results.jsonl`` as it finishes, then summarise and plot.

    Args:
        items: from ``rlm_async.eval.generate``.
        engine: ``"rlm_async"``, ``"official"`` (the official ``rlms`` in its own venv) or ``"plain"`` (one
            call, the context cut to the model's window).
        model, sub_model, base_url, api_key: the endpoint and models; ``base_url`` defaults to
            ``OPENAI_BASE_URL``, else OpenAI's, and ``api_key`` to ``OPENAI_API_KEY``. With neither ``model``
            nor ``base_url`` the run uses the embedded simulator (``sim-root`` / ``sim-sub``; see
            ``simulator``), whose scores measure the plumbing, not intelligence.
        out_dir: where results.jsonl, traces/ and score_vs_length.png go (created).
        max_cost_usd: stop before an item once the items of this run (resumed ones included) have cost this
            much, USD; the rest of the budget also caps each rlm_async run (with ``prices``) and each official
            run (``max_budget``). A single plain call is not capped within itself.
        prices: model -> USD per million tokens, where the provider reports no cost.
        temperature: sent with every call, or None for the provider's default.
        context_window: the plain engine's window in tokens (default: asked of the endpoint, then known
            windows, else no cut).
        limits: the rlm_async engine's ``Limits`` (default ``Limits(max_depth=1)``, the paper's depth-1 RLM);
            the official engine gets the same ``max_depth``, ``max_iterations``, ``max_tokens_per_turn`` (as
            its ``max_tokens`` sampling argument) and ``max_concurrency`` (its ``max_concurrent_subcalls``).
        retry: the retry policy of the rlm_async and plain engines (default ``RetryPolicy()``).
        sandbox: where the rlm_async engine runs model code.
        timeout_s: seconds one item may run, retries included, on every engine (rlm_async: unless
            ``limits.timeout_s`` says otherwise).
        official_venv: the official package's virtual environment (default: the benchmark's, in
            ``~/.cache/rlm-async``).
        simulator: the simulator's configuration when one is used (default: the ``fast`` profile at time
            scale 0.1).
        simulator_in_process: serve the simulator from this process instead of a child process (tests).
        progress: called with each item's row and whether it was resumed from results.jsonl.
        seed: the bootstrap's seed.

    Returns:
        :class:`EvalSummary`.

    Raises:
        ConfigError: an unknown engine, a real endpoint without a model, duplicate item ids, a negative
            budget, or an engine that cannot start.
    """
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    if base_url and not model:
        raise ConfigError("a real endpoint needs a model")
    if max_cost_usd is not None and max_cost_usd < 0:
        raise ConfigError(f"max_cost_usd must be >= 0, got {max_cost_usd}")
    if len({item.id for item in items}) != len(items):
        raise ConfigError("item ids must be unique")
    simulated = not base_url and not model
    if model and not base_url:
        base_url = os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
    if not simulated and not api_key:
        api_key = os.environ.get("OPENAI_API_KEY")
    root = model or SIM_MODEL
    sub = sub_model or (SIM_SUB_MODEL if simulated else None)
    out = Path(out_dir)
    rlm_limits = limits or Limits(max_depth=1)
    config = _config(engine, sub, temperature, context_window, rlm_limits)
    rows, pending = _resume(out, items, engine, root, config)
    resumed, ran = len(rows), 0
    spent = sum(float((row.get("usage") or {}).get("cost_usd") or 0.0) for row in rows)
    if progress is not None:
        for row in rows:
            progress(row, True)
    stopped: Literal["max_cost_usd"] | None = None
    if pending:
        async with _endpoint(base_url, model, simulator, simulator_in_process) as url:
            cfg = ModelConfig(
                model=root,
                sub_model=sub,
                base_url=url,
                api_key=api_key or ("sim" if simulated else None),
                prices=dict(prices or {}),
                temperature=temperature,
                context_window=context_window,
                limits=rlm_limits,
                retry=retry or RetryPolicy(),
                sandbox=sandbox,
                max_depth=rlm_limits.max_depth,
                max_iterations=rlm_limits.max_iterations,
                timeout_s=timeout_s,
                official_venv=official_venv,
            )
            async with open_engine(engine, cfg) as runner:
                with (out / "results.jsonl").open("a", encoding="utf-8") as sink:
                    for item in pending:
                        if max_cost_usd is not None and spent >= max_cost_usd:
                            stopped = "max_cost_usd"
                            break
                        budget = None if max_cost_usd is None else max_cost_usd - spent
                        trace = _fresh_trace(out, root, item) if engine == "rlm_async" else None
                        started = time.perf_counter()
                        try:
                            outcome = await runner.run(item, budget, trace)
                        except ConfigError:
                            raise
                        except RLMError as exc:
                            outcome = Outcome("", "error", f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
                        wall = time.perf_counter() - started
                        row = _row(item, engine, root, sub, outcome, wall) | {"config": config}
                        sink.write(json.dumps(row) + "\n")
                        sink.flush()
                        rows.append(row)
                        ran += 1
                        spent += outcome.cost_usd
                        if progress is not None:
                            progress(row, False)
    plot = _write_summary(out, seed)
    summary = summarise(rows, seed=seed)
    return EvalSummary(out / "results.jsonl", plot, summary, ran, resumed, stopped, spent, simulated)


def _config(
    engine: str, sub_model: str | None, temperature: float | None, context_window: int | None, limits: Limits
) -> dict[str, Any]:
    """What, besides the item, the engine and the root model, decides an item's result: recorded with each row
    and compared on resume. The limits count for the RLM engines only, the window for the plain one, and
    rlm_async's system prompt (:func:`prompt_fingerprint`) for rlm_async only."""
    config: dict[str, Any] = {"sub_model": sub_model, "temperature": temperature}
    if engine == "plain":
        config["context_window"] = context_window
    else:
        config["limits"] = limits.describe()
    if engine == "rlm_async":
        config["system_prompt"] = prompt_fingerprint(limits)
    recorded: dict[str, Any] = json.loads(json.dumps(config))  # as it reads back from results.jsonl
    return recorded


def prompt_fingerprint(limits: Limits) -> str:
    """The first 16 hex digits of the SHA-256 of the root's system prompt under ``limits`` (for a ``str``
    context): a prompt change, such as a new worked example, is a new configuration."""
    text = system_prompt(
        depth=0, max_depth=limits.max_depth, max_fanout=limits.max_fanout,
        max_output_chars=limits.max_output_chars, kind="str",
    )  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _resume(
    out: Path, items: Sequence[Item], engine: str, model: str, config: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[Item]]:
    """The rows already in ``out``/results.jsonl for these items on this engine and model, and the items to run.

    Raises:
        ConfigError: a row for one of these items, engine and model was run with another configuration (rows
            written before the configuration, or one of :data:`_RECORDED_LATER`, was recorded are taken as
            they are).
    """
    out.mkdir(parents=True, exist_ok=True)
    done = {(r["id"], r["engine"], r["model"]): r for r in read_results(out / "results.jsonl")}
    rows = [done[key] for item in items if (key := (item.id, engine, model)) in done]
    for row in rows:
        recorded = _deciding(row.get("config", config))
        wanted = _deciding({k: v for k, v in config.items() if k in recorded or k not in _RECORDED_LATER})
        if recorded != wanted:
            changed = sorted(_differences(recorded, wanted))
            raise ConfigError(
                f"{out / 'results.jsonl'} holds {row['id']} on {engine} / {model} run with another configuration "
                f"({', '.join(changed)} differ); resuming would mix the two: use another out_dir"
            )
    return rows, [item for item in items if (item.id, engine, model) not in done]


#: Configuration keys added after rows were first written: a row without one is compared on the rest.
_RECORDED_LATER = frozenset({"system_prompt"})

#: Limits that set how fast an item runs, not what it answers: resuming across them mixes nothing (``--local``
#: sets ``max_concurrency`` to the server's slots, where rows written before it hold 64).
_PACING_LIMITS = frozenset({"max_concurrency", "max_workers"})


def _deciding(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without :data:`_PACING_LIMITS`."""
    limits = config.get("limits")
    if not isinstance(limits, Mapping):
        return dict(config)
    return {**config, "limits": {k: v for k, v in limits.items() if k not in _PACING_LIMITS}}


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted names of the fields that differ between two configurations."""
    names = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            names += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            names.append(f"{prefix}{key}")
    return names


def _fresh_trace(out: Path, model: str, item: Item) -> Path:
    """``out/traces/<model>/<item id>.jsonl``, emptied: a rerun of an unfinished item starts its trace anew."""
    trace = out / "traces" / _safe(model) / f"{_safe(item.id)}.jsonl"
    trace.parent.mkdir(parents=True, exist_ok=True)
    trace.unlink(missing_ok=True)
    return trace


def _write_summary(out: Path, seed: int) -> Path | None:
    """``summary.json`` and the plot over every row of results.jsonl (every engine and task run into ``out``)."""
    everything = summarise(read_results(out / "results.jsonl"), seed=seed)
    (out / "summary.json").write_text(json.dumps([asdict(g) for g in everything], indent=1))
    return plot_scores(everything, out / "score_vs_length.png")


def _row(item: Item, engine: str, model: str, sub_model: str | None, outcome: Outcome, wall: float) -> dict[str, Any]:
    return {
        "id": item.id,
        "task": item.task,
        "engine": engine,
        "model": model,
        "sub_model": sub_model,
        "length_tokens": item.length_tokens,
        "tokens": item.tokens,
        "seed": item.seed,
        "score": item.score(outcome.answer),
        "answer": outcome.answer[:ANSWER_CHARS],
        "answer_chars": len(outcome.answer),
        "expected": _expected_json(item.expected),
        "usage": {
            "calls": outcome.calls,
            "prompt_tokens": outcome.prompt_tokens,
            "completion_tokens": outcome.completion_tokens,
            "cost_usd": outcome.cost_usd,
        },
        "calls": outcome.calls,
        "trace": outcome.trace,
        "wall_s": wall,
        "stop_reason": outcome.stop_reason,
        "turns": outcome.turns,
        "error": outcome.error,
        "metadata": dict(item.metadata),
        "extra": dict(outcome.extra),
    }
