"""The three engines an eval compares on the same model and items.

- ``rlm_async``: this project's RLM (``RLM.completion(item.query, item.context)``), one ``RLM`` for the run.
- ``official``: the official ``rlms`` package (version ``rlm_async.bench.OFFICIAL_VERSION``) in its own
  virtual environment, one process per item (``official_driver.py``).
- ``plain``: the RLM paper's base-model row: the whole prompt (``Item.plain_prompt``) in one chat call,
  the context cut from its end to fit the model's window.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import aiohttp
import anyio

from .._budget import Ledger, Limits, Price
from .._clients import ChatRequest, OpenAIClient, windows_from_models
from .._compaction import window_for
from .._engine import RLM
from .._errors import ConfigError, LLMCallError, RLMError
from .._retry import RetryPolicy
from .._scheduler import Scheduler
from .._trace import Tracer
from ..sim._tokens import token_counter
from ._task import Item

__all__ = ["ENGINES", "EngineName", "ModelConfig", "Outcome", "open_engine"]

EngineName = Literal["rlm_async", "official", "plain"]
ENGINES: tuple[EngineName, ...] = ("rlm_async", "official", "plain")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The models and endpoint every engine of an eval uses.

    Attributes:
        model: the root model (the one model of ``plain``).
        sub_model: the model of sub-calls (default ``model``).
        base_url: an OpenAI-compatible endpoint.
        api_key: its key (local servers take any).
        prices: model -> USD per million tokens, for costs and ``max_cost_usd`` where the provider reports no
            cost.
        temperature: sent with every call, or None for the provider's default.
        context_window: the ``plain`` engine's window in tokens; None asks the endpoint's ``GET /models``,
            then the published windows (``rlm_async._compaction.KNOWN_WINDOWS``), else no cut.
        limits: the ``rlm_async`` engine's limits (``max_depth=1`` by default: the paper's depth-1 RLM).
        retry: the retry policy of the ``rlm_async`` and ``plain`` engines.
        sandbox: where the ``rlm_async`` engine runs model code (``RLM(sandbox=...)``).
        max_depth: the official engine's ``max_depth``.
        max_iterations: the official engine's ``max_iterations`` (``run_eval`` passes ``limits.max_iterations``,
            so both RLM engines get the same number of turns; the official default is 30).
        timeout_s: seconds one item may take, retries included (every engine).
        official_venv: where the official package's virtual environment lives (created on first use).
    """

    model: str
    sub_model: str | None = None
    base_url: str | None = None
    api_key: str | None = None
    prices: Mapping[str, Price] = field(default_factory=dict)
    temperature: float | None = None
    context_window: int | None = None
    limits: Limits = field(default_factory=lambda: Limits(max_depth=1))
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    sandbox: Literal["strict", "process", "none"] = "strict"
    max_depth: int = 1
    max_iterations: int = 30
    timeout_s: float = 1800.0
    official_venv: Path | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one engine made of one item.

    Attributes:
        answer: the final answer text ('' when there was none).
        stop_reason: the engine's: rlm_async's ``StopReason``, ``"answer"`` / ``"error"`` for the others.
        error: why it failed, one line, or None.
        calls: model calls billed.
        prompt_tokens, completion_tokens: as the provider reported them.
        cost_usd: provider-reported, or from ``ModelConfig.prices``; 0.0 when neither is known.
        trace: the JSONL trace of the run (rlm_async only), or None.
        extra: engine-specific facts (truncation of the plain prompt, ...).
        turns: the root model's REPL turns (rlm_async: ``RunStats.turns``; official: the root's iterations,
            the default-answer call after the last one not counted), failed and stopped runs included; None
            for the plain call, and where the engine could not say (the official driver crashed or timed out).
    """

    answer: str
    stop_reason: str
    error: str | None
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    trace: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    turns: int | None = None


class Engine(Protocol):
    async def run(self, item: Item, budget_usd: float | None, trace: Path | None) -> Outcome: ...


class _RlmAsync:
    def __init__(self, rlm: RLM, cfg: ModelConfig) -> None:
        self.rlm, self.cfg = rlm, cfg

    async def run(self, item: Item, budget_usd: float | None, trace: Path | None) -> Outcome:
        limits = replace(self.cfg.limits, timeout_s=self.cfg.limits.timeout_s or self.cfg.timeout_s)
        if budget_usd is not None and self.cfg.prices:
            limits = replace(limits, max_cost_usd=budget_usd)
        result = await self.rlm.completion(
            item.query, item.context, limits=limits, trace_path=trace, metadata={"item": item.id}
        )
        u = result.usage
        return Outcome(
            result.answer, result.stop_reason, None if result.error is None else str(result.error).splitlines()[0],
            u.calls, u.prompt_tokens, u.completion_tokens, u.cost_usd, None if trace is None else str(trace),
            {"agents": result.stats.agents, "peak_in_flight": result.stats.peak_in_flight}, result.stats.turns,
        )  # fmt: skip


class _Official:
    def __init__(self, python: Path, cfg: ModelConfig, base_url: str, api_key: str) -> None:
        self.python, self.cfg, self.base_url, self.api_key = python, cfg, base_url, api_key

    async def run(self, item: Item, budget_usd: float | None, trace: Path | None) -> Outcome:
        cfg = self.cfg
        request = {
            "query": item.query, "context": item.context, "model": cfg.model, "sub_model": cfg.sub_model,
            "base_url": self.base_url, "api_key": self.api_key, "max_depth": cfg.max_depth,
            "max_iterations": cfg.max_iterations, "workers": cfg.limits.max_concurrency, "timeout_s": cfg.timeout_s,
            "max_budget": budget_usd,
            "sampling": _official_sampling(cfg),
        }  # fmt: skip
        driver = Path(__file__).with_name("official_driver.py")
        with tempfile.TemporaryDirectory(prefix="rlm-async-eval-") as tmp:
            path = Path(tmp) / "request.json"
            path.write_text(json.dumps(request), encoding="utf-8")
            with anyio.move_on_after(cfg.timeout_s + 60):
                done = await anyio.run_process([str(self.python), str(driver), str(path)], check=False)
                try:
                    record = json.loads(done.stdout.decode().strip().splitlines()[-1])
                except (ValueError, IndexError):
                    tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
                    return Outcome("", "error", f"the official driver failed: {tail[0]}")
                usage = record.get("usage") or {}
                cost = float(usage.get("cost_usd") or 0.0) or _priced(cfg, usage)
                return Outcome(
                    str(record.get("answer") or ""), "answer" if record.get("ok") else "error", record.get("error"),
                    int(usage.get("calls") or 0), int(usage.get("prompt_tokens") or 0),
                    int(usage.get("completion_tokens") or 0), cost,
                    turns=record["turns"] if isinstance(record.get("turns"), int) else None,
                )  # fmt: skip
        return Outcome("", "timeout", f"the official driver ran past {cfg.timeout_s + 60:g} s")


def _official_sampling(cfg: ModelConfig) -> dict[str, Any] | None:
    """The official engine's ``sampling_args``: the same temperature and per-turn token cap as rlm_async's."""
    sampling: dict[str, Any] = {}
    if cfg.temperature is not None:
        sampling["temperature"] = cfg.temperature
    if cfg.limits.max_tokens_per_turn is not None:
        sampling["max_tokens"] = cfg.limits.max_tokens_per_turn
    return sampling or None


def _priced(cfg: ModelConfig, usage: Mapping[str, Any]) -> float:
    """USD from the root model's price (the official driver reports tokens summed over its models)."""
    price = cfg.prices.get(cfg.model)
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return price.cost_usd(prompt, completion) if price else 0.0


#: Tokens kept free for the plain call's reply, and the share of the window the prompt may fill: the
#: window is counted in the model's tokens, the cut in o200k's, so 10% is left for the difference.
REPLY_TOKENS, WINDOW_SHARE = 1024, 0.9


class _Plain:
    def __init__(self, client: OpenAIClient, cfg: ModelConfig, window: int | None) -> None:
        self.client, self.cfg, self.window = client, cfg, window

    def prompt(self, item: Item) -> tuple[str, dict[str, Any]]:
        """The item's prompt, its context cut from the end to fit the window (the question always stays)."""
        prompt = item.plain_prompt()
        if self.window is None:
            return prompt, {"truncated": False}
        _, count = token_counter()
        budget = int((self.window - REPLY_TOKENS) * WINDOW_SHARE)
        tokens = count(prompt)
        if tokens <= budget:
            return prompt, {"truncated": False, "prompt_tokens_o200k": tokens}
        fixed = count(f"{item.preamble}\n{item.query}")
        keep = max(int(len(item.context) * max(budget - fixed, 0) / max(count(item.context), 1)), 0)
        while keep > 0 and count(f"{item.preamble}{item.context[:keep]}\n{item.query}") > budget:
            keep = int(keep * 0.97)
        cut = f"{item.preamble}{item.context[:keep]}\n{item.query}"
        return cut, {"truncated": True, "context_chars_kept": keep, "context_chars": len(item.context)}

    async def run(self, item: Item, budget_usd: float | None, trace: Path | None) -> Outcome:
        prompt, extra = self.prompt(item)
        request = ChatRequest(
            self.cfg.model, ({"role": "user", "content": prompt},),
            max_tokens=REPLY_TOKENS if self.window is not None else None, temperature=self.cfg.temperature,
        )  # fmt: skip
        # The engine's own scheduler, for its one retry layer (Retry-After, backoff, per-attempt timeout).
        ledger = Ledger(Limits(max_calls=None), self.cfg.prices)
        scheduler = Scheduler(self.client, ledger, Tracer(), max_concurrency=1, retry=self.cfg.retry)
        try:
            with anyio.move_on_after(self.cfg.timeout_s) as deadline:
                response = await scheduler.call(request, depth=0, agent_id="plain")
        except LLMCallError as exc:
            return Outcome("", "llm_error", str(exc).splitlines()[0], extra=extra)
        if deadline.cancelled_caught:
            return Outcome("", "timeout", f"the plain call ran past {self.cfg.timeout_s:g} s", extra=extra)
        cost = ledger.total.cost_usd  # provider-reported where given, else from the price table
        return Outcome(
            response.text, "answer", None, 1, response.prompt_tokens, response.completion_tokens, cost, extra=extra
        )


async def _endpoint_window(base_url: str, api_key: str | None, model: str) -> int | None:
    """The model's window from the endpoint's ``GET /models`` (vLLM, llama.cpp, OpenRouter), or None."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
            http.get(base_url.rstrip("/") + "/models", headers=headers) as resp,
        ):
            if resp.status != 200:
                return None
            return windows_from_models(await resp.json(content_type=None)).get(model)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


@contextlib.asynccontextmanager
async def open_engine(name: EngineName, cfg: ModelConfig) -> AsyncIterator[Engine]:
    """The engine ``name`` on ``cfg``'s endpoint for the ``async with`` block.

    Raises:
        ConfigError: an unknown engine, no endpoint, or (official) the official package cannot be installed.
    """
    if not cfg.base_url:
        raise ConfigError("an eval needs base_url (the simulator's, or a real endpoint's)")
    api_key = cfg.api_key or "EMPTY"
    if name == "rlm_async":
        async with RLM(
            cfg.model, sub_model=cfg.sub_model, base_url=cfg.base_url, api_key=api_key, limits=cfg.limits,
            retry=cfg.retry, prices=cfg.prices, temperature=cfg.temperature, sandbox=cfg.sandbox,
            context_windows={cfg.model: cfg.context_window} if cfg.context_window else None,
        ) as rlm:  # fmt: skip
            yield _RlmAsync(rlm, cfg)
    elif name == "official":
        from ..bench import BenchConfig, ensure_official_venv

        venv = cfg.official_venv or BenchConfig().official_venv
        try:
            python = await anyio.to_thread.run_sync(ensure_official_venv, venv)
        except (OSError, RLMError) as exc:
            raise ConfigError(f"cannot set up the official rlms package in {venv}: {exc}") from None
        except Exception as exc:  # subprocess.CalledProcessError: pip could not install it
            raise ConfigError(f"cannot install the official rlms package into {venv}: {exc}") from None
        yield _Official(python, cfg, cfg.base_url, api_key)
    elif name == "plain":
        window = cfg.context_window or await _endpoint_window(cfg.base_url, api_key, cfg.model)
        window = window or window_for(cfg.model, {})
        if window is not None and window <= REPLY_TOKENS + 64:
            raise ConfigError(f"a context window of {window} tokens leaves no room for a prompt")
        client = OpenAIClient(base_url=cfg.base_url, api_key=api_key)
        try:
            yield _Plain(client, cfg, window)
        finally:
            await client.aclose()
    else:
        raise ConfigError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")
