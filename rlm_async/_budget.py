"""Budgets: the :class:`Limits` value object, prices, usage totals and the run's ledger.

Admission rules (checked by the ledger, on the event loop, so no locks are needed):

- calls, agents, depth and fan-out are *reserved before work starts* and can never be exceeded: a batch of
  N prompts reserves N calls at once or is refused whole, before any task exists;
- input tokens, output tokens and USD are known only after a response, so they are *checked when each
  attempt takes its slot*, counting the estimates held by the attempts already in flight (prompt characters
  / 4 and ``max_tokens``); the attempt then holds its own estimate until it settles. Once the spend plus the
  holds reach a cap, no further attempt starts, so the overshoot is bounded by what the attempts in flight
  were billed;
- the wall clock (``timeout_s``) is enforced by a cancel scope around the whole run.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from ._errors import BudgetExceeded, ConfigError

__all__ = ["Limits", "Price", "Usage", "UsageTotals"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps for one run (one ``RLM.completion``), shared by every agent at every depth. None means no cap.

    Per endpoint or per run: the ``Limits`` given to ``RLM(limits=...)`` set the endpoint's in-flight cap
    (``max_concurrency``), shared by every completion of that RLM, and the default budgets of each run. The
    ``Limits`` given to ``completion(limits=...)`` replace those budgets for one run, and their
    ``max_concurrency`` caps that run alone when lower than the endpoint's. Rate limits (``RLM(rate_limits=...)``)
    and the circuit breaker are always per endpoint. Everything else here is per run.

    Attributes:
        max_concurrency: HTTP attempts in flight at once across the whole call tree. A slot covers one
            attempt only: never held while an agent awaits children or a retry backs off. Default 64.
        max_depth: agents exist at depths ``0 .. max_depth - 1`` (the root is depth 0); ``rlm_agent`` from
            an agent at depth ``max_depth - 1`` falls back to a plain LLM call at depth ``max_depth``. The
            same meaning as the official ``rlms`` package's ``max_depth``. Default 3.
        max_calls: model calls in the run: root turns, sub-calls and child agents' turns. A retry is not a
            new call. Reserved before work starts. Default 1000.
        max_input_tokens: prompt tokens summed over every billed attempt. Checked before each call.
        max_output_tokens: completion tokens summed over every billed attempt. Checked before each call.
        max_cost_usd: USD summed over every billed attempt (provider-reported ``usage.cost`` when present,
            else the price table passed to ``RLM(prices=...)``). Checked before each call.
        max_agents: agents in the run, the root included. Reserved before a child starts. Default 100.
        max_fanout: the largest single ``llm_batch`` / ``rlm_batch``. A larger batch is refused at once.
            Default 1000.
        max_tokens_per_turn: ``max_tokens`` sent with every agent turn (root and children), or None for the
            server's default. Small local models that ramble need it (``rlm-async run --local`` uses 512).
        max_iterations: turns of one agent's loop; at the cap one last call asks for the answer. Default 20
            (the official ``rlms`` default is 30; the paper's runs finish in far fewer turns).
        timeout_s: wall-clock seconds for the whole run; at the deadline the run stops with its partial
            answer and ``stop_reason == "timeout"``.
        agent_timeout_s: wall-clock seconds one child agent (depth >= 1) may run; at its deadline the child
            stops with its partial answer and ``stop_reason == "timeout"``, its subtree cancelled, and its
            parent sees a typed failure of kind ``"timeout"`` and goes on. The root is bounded by
            ``timeout_s``. Default None.
        max_output_chars: characters of one cell's printed output shown to the model; the rest is cut with
            a note. Default 20,000 (about 5,000 tokens at 4 characters per token).
        cell_timeout_s: seconds one REPL cell may run, not counting the time it waits on its own sub-calls
            (``llm_batch``, ``rlm_agent``, tools: those are bounded by ``timeout_s``, ``agent_timeout_s`` and
            the call budgets, so a long batch is not cut short); a slower cell is stopped and the model is
            told, and the agent goes on. In a worker process (the default sandbox) the worker's process group is
            killed and replaced, so the cell's variables are lost; in-thread (``sandbox="none"``) its
            sub-calls are cancelled and its thread interrupted. Default 120; None: no limit (``timeout_s``
            then bounds the whole run).
        max_errors: consecutive turns of one agent that went wrong (a cell raised, was killed or its worker
            died; or the reply had no code and no FINAL) before the agent stops with its partial answer and
            ``stop_reason="budget:max_errors"``. The official ``rlms``' ``max_errors``. Default None: no cap
            (``max_iterations`` bounds the turns).
        max_workers: REPL worker processes running model code at once in the run (each a fork of the
            sandbox's zygote: about 3-4 MB of its own memory, 19 MB resident; docs/security.md). An agent
            waits for a slot before its worker starts; an agent whose
            cell waits on child agents lends its slot to them meanwhile, so a tree wider than the cap queues
            instead of deadlocking. Default 32.
        max_tokens_per_subcall: ``max_tokens`` sent with each ``llm_query`` / ``llm_batch`` sub-call that does
            not set its own, or None for the server's default. Default None.
        early_finish: what becomes of a finish (``answer["ready"] = True``, ``FINAL``) from a reply whose code
            printed before the model had seen any output: ``"warn"`` accepts it and records a
            ``finish_warned`` event; ``"refuse"`` refuses it once with a note, and the model finishes again
            after reading its output (see ``rlm_async._guards.FinishGate``). Default ``"warn"``.

    Raises:
        ConfigError: a count or cap that is not an int >= 1 (``max_calls=0``, ``max_iterations=2.7``),
            seconds or USD that are not a number > 0, or an ``early_finish`` other than ``"warn"`` / ``"refuse"``.
    """

    max_concurrency: int = 64
    max_depth: int = 3
    max_calls: int | None = 1000
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    max_cost_usd: float | None = None
    max_agents: int | None = 100
    max_fanout: int | None = 1000
    max_tokens_per_turn: int | None = None
    max_iterations: int = 20
    timeout_s: float | None = None
    agent_timeout_s: float | None = None
    max_output_chars: int = 20_000
    cell_timeout_s: float | None = 120.0
    max_errors: int | None = None
    max_workers: int = 32
    max_tokens_per_subcall: int | None = None
    early_finish: Literal["warn", "refuse"] = "warn"

    def __post_init__(self) -> None:
        required = ("max_concurrency", "max_depth", "max_iterations", "max_output_chars", "max_workers")
        if self.early_finish not in ("warn", "refuse"):
            raise ConfigError(f"Limits.early_finish must be 'warn' or 'refuse', got {self.early_finish!r}")
        for f in fields(self):
            if f.name == "early_finish":
                continue
            value = getattr(self, f.name)
            if value is None:
                if f.name in required:
                    raise ConfigError(f"Limits.{f.name} cannot be None")
                continue
            if f.name.endswith("_s") or f.name == "max_cost_usd":  # seconds, USD
                if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                    raise ConfigError(f"Limits.{f.name} must be a number > 0, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:  # counts and caps
                raise ConfigError(f"Limits.{f.name} must be an int >= 1, got {value!r}")

    @classmethod
    def small_model(cls, **overrides: Any) -> Limits:
        """The profile for a small model (about 0.5B-8B parameters) on any OpenAI-compatible endpoint: what
        ``rlm-async run --local`` uses, and ``--profile small`` elsewhere.

        ``max_tokens_per_turn=512`` (a small model rambles: Qwen2.5-Coder-0.5B wrote 500-token cells of
        repeated lines), ``max_iterations=8`` (past a few turns it repeats its first cell), and
        ``max_output_chars=2000`` (its conversation must fit a slot of llama.cpp's default 32,768-token context
        shared by 4 slots: 8,192 tokens each). ``overrides`` replace any field.

        Raises:
            ConfigError: as the constructor does for a bad value.
        """
        return cls(**{**SMALL_MODEL, **overrides})

    def describe(self) -> dict[str, Any]:
        """The caps as a plain dict (field name -> value), for traces and the system prompt."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


#: :meth:`Limits.small_model`'s fields.
SMALL_MODEL: dict[str, Any] = {
    "max_tokens_per_turn": 512,
    "max_tokens_per_subcall": 1024,
    "max_iterations": 8,
    "max_output_chars": 2000,
}


@dataclass(frozen=True, slots=True)
class Price:
    """A model's price in USD per million tokens (the unit providers publish)."""

    input_per_mtok: float
    output_per_mtok: float

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for one response with the given token counts."""
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """Usage summed over billed responses.

    Attributes:
        calls: billed responses (a discarded retry that the provider billed counts too).
        prompt_tokens: prompt (input) tokens, as the provider reported them.
        completion_tokens: completion (output) tokens, as the provider reported them.
        cost_usd: USD, provider-reported or from the price table; 0.0 when neither is known.
    """

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def total_tokens(self) -> int:
        """prompt_tokens + completion_tokens."""
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: UsageTotals) -> UsageTotals:
        return UsageTotals(
            self.calls + other.calls,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cost_usd + other.cost_usd,
        )


@dataclass(frozen=True, slots=True)
class Usage:
    """Tree-wide usage of one run, with breakdowns. Every billed attempt is in every view exactly once.

    Attributes:
        total: the whole tree.
        by_depth: depth -> totals (root turns are depth 0; sub-calls of an agent at depth d are at d + 1).
        by_agent: agent id -> totals of the calls that agent made (its own turns and its sub-calls).
        by_model: model name -> totals.
    """

    total: UsageTotals = field(default_factory=UsageTotals)
    by_depth: Mapping[int, UsageTotals] = field(default_factory=dict)
    by_agent: Mapping[str, UsageTotals] = field(default_factory=dict)
    by_model: Mapping[str, UsageTotals] = field(default_factory=dict)

    @property
    def calls(self) -> int:
        """Billed responses in the whole tree."""
        return self.total.calls

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens in the whole tree."""
        return self.total.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        """Completion tokens in the whole tree."""
        return self.total.completion_tokens

    @property
    def cost_usd(self) -> float:
        """USD in the whole tree."""
        return self.total.cost_usd


class _Sum:
    """Running totals, mutated in place: the ledger's hot path builds no objects per call."""

    __slots__ = ("calls", "completion_tokens", "cost_usd", "prompt_tokens")

    def __init__(self) -> None:
        self.calls = self.prompt_tokens = self.completion_tokens = 0
        self.cost_usd = 0.0

    def add(self, calls: int, prompt_tokens: int, completion_tokens: int, cost_usd: float) -> None:
        self.calls += calls
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.cost_usd += cost_usd

    def frozen(self) -> UsageTotals:
        return UsageTotals(self.calls, self.prompt_tokens, self.completion_tokens, self.cost_usd)


#: What :meth:`Ledger.hold` returns and :meth:`Ledger.release` takes: (prompt tokens, completion tokens, USD).
Hold = tuple[int, int, float]


class Ledger:
    """The run's budget ledger: reserve, hold, settle, refund. Used only from the event loop thread.

    Attributes:
        spend_capped: True when a token or USD cap is set (``max_input_tokens``, ``max_output_tokens``,
            ``max_cost_usd``). Only then do spend checks and holds mean anything, so the scheduler skips
            :meth:`check_priced`, :meth:`check_spend`, :meth:`hold` and :meth:`release` without one.
    """

    def __init__(self, limits: Limits, prices: Mapping[str, Price] | None = None) -> None:
        self.limits = limits
        self.prices = dict(prices or {})
        self.calls_reserved = 0
        self.agents = 0
        self._totals: dict[tuple[int, str, str], _Sum] = defaultdict(_Sum)
        self._total = _Sum()
        self._held = _Sum()  # estimates of the attempts in flight
        self.spend_capped = any(
            cap is not None for cap in (limits.max_input_tokens, limits.max_output_tokens, limits.max_cost_usd)
        )

    @property
    def total(self) -> UsageTotals:
        """Usage settled so far, the whole tree."""
        return self._total.frozen()

    @property
    def held(self) -> UsageTotals:
        """The estimates held by the attempts in flight (``calls`` is always 0; always zero in a run that is not
        :attr:`spend_capped`, where the scheduler holds nothing)."""
        return self._held.frozen()

    # -- reserved counts: never exceeded -------------------------------------------------------------
    def reserve_calls(self, n: int) -> None:
        """Reserve ``n`` calls or none. Raises BudgetExceeded("max_calls") when fewer than n remain."""
        cap = self.limits.max_calls
        if cap is not None and self.calls_reserved + n > cap:
            raise BudgetExceeded(
                "max_calls", cap, self.calls_reserved + n, detail=f"{cap - self.calls_reserved} calls left"
            )
        self.calls_reserved += n

    def refund_calls(self, n: int) -> None:
        """Give back ``n`` reserved calls that were never sent."""
        self.calls_reserved -= n

    def check_fanout(self, n: int) -> None:
        """Raises BudgetExceeded("max_fanout") when one batch of ``n`` items is larger than the cap."""
        cap = self.limits.max_fanout
        if cap is not None and n > cap:
            raise BudgetExceeded("max_fanout", cap, n, detail="split the work into smaller batches")

    def reserve_agents(self, n: int) -> None:
        """Reserve ``n`` agents or none. Raises BudgetExceeded("max_agents")."""
        cap = self.limits.max_agents
        if cap is not None and self.agents + n > cap:
            raise BudgetExceeded("max_agents", cap, self.agents + n, detail=f"{cap - self.agents} agents left")
        self.agents += n

    # -- measured amounts: checked before each call ----------------------------------------------------
    def check_spend(self) -> None:
        """Raises BudgetExceeded when input tokens, output tokens or USD are spent, counting the estimates
        held by the attempts in flight."""
        if not self.spend_capped:
            return
        lim, tot, held = self.limits, self._total, self._held
        for name, cap, used, holding in (
            ("max_input_tokens", lim.max_input_tokens, tot.prompt_tokens, held.prompt_tokens),
            ("max_output_tokens", lim.max_output_tokens, tot.completion_tokens, held.completion_tokens),
            ("max_cost_usd", lim.max_cost_usd, tot.cost_usd, held.cost_usd),
        ):
            if cap is not None and used + holding >= cap:
                detail = f"{holding:g} more held by attempts in flight" if holding else ""
                raise BudgetExceeded(name, cap, used, detail=detail)

    def hold(self, model: str, prompt_tokens: int, max_tokens: int) -> Hold:
        """Check the spend (holds included), then hold one attempt's estimate until :meth:`release`.

        Args:
            model: for the USD estimate (price table; 0 without a price).
            prompt_tokens: the prompt's token estimate.
            max_tokens: the request's ``max_tokens`` (0 when unset: its output cannot be known ahead).

        Returns:
            The hold, to pass to :meth:`release`.

        Raises:
            BudgetExceeded: a token or USD cap is reached by spend plus holds.
        """
        self.check_spend()
        price = self.prices.get(model)
        cost = price.cost_usd(prompt_tokens, max_tokens) if price else 0.0
        self._held.add(0, prompt_tokens, max_tokens, cost)
        return (prompt_tokens, max_tokens, cost)

    def release(self, hold: Hold) -> None:
        """End a hold (the attempt settled, failed or was cancelled)."""
        prompt_tokens, max_tokens, cost = hold
        held = self._held
        held.prompt_tokens -= prompt_tokens
        held.completion_tokens -= max_tokens
        held.cost_usd = max(held.cost_usd - cost, 0.0)

    def check_priced(self, model: str) -> None:
        """With a USD cap, a model must have a price (or the cap could not be kept). Raises ConfigError."""
        if self.limits.max_cost_usd is not None and model not in self.prices:
            raise ConfigError(
                f"max_cost_usd is set but model {model!r} has no price: pass RLM(prices={{{model!r}: Price(...)}})"
            )

    def settle(
        self,
        *,
        depth: int,
        agent_id: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        cost_usd: float | None,
    ) -> None:
        """Record one billed response (its cost from the provider, else the price table)."""
        if cost_usd is None:
            price = self.prices.get(model)
            cost_usd = price.cost_usd(prompt_tokens, completion_tokens) if price else 0.0
        self._totals[(depth, agent_id, model)].add(1, prompt_tokens, completion_tokens, cost_usd)
        self._total.add(1, prompt_tokens, completion_tokens, cost_usd)

    def usage(self) -> Usage:
        """A frozen snapshot of tree-wide usage with per-depth, per-agent and per-model breakdowns."""
        by_depth: dict[int, UsageTotals] = defaultdict(UsageTotals)
        by_agent: dict[str, UsageTotals] = defaultdict(UsageTotals)
        by_model: dict[str, UsageTotals] = defaultdict(UsageTotals)
        for (depth, agent_id, model), running in self._totals.items():
            t = running.frozen()
            by_depth[depth] += t
            by_agent[agent_id] += t
            by_model[model] += t
        return Usage(self.total, dict(sorted(by_depth.items())), dict(by_agent), dict(by_model))

    def remaining(self) -> dict[str, float | None]:
        """What is left of each cap (None: no cap). Units: counts, tokens, USD."""
        lim, tot = self.limits, self._total

        def left(cap: float | None, used: float) -> float | None:
            return None if cap is None else max(cap - used, 0)

        return {
            "calls": left(lim.max_calls, self.calls_reserved),
            "agents": left(lim.max_agents, self.agents),
            "input_tokens": left(lim.max_input_tokens, tot.prompt_tokens),
            "output_tokens": left(lim.max_output_tokens, tot.completion_tokens),
            "cost_usd": left(lim.max_cost_usd, tot.cost_usd),
        }


def estimate_tokens(chars: int) -> int:
    """A token estimate for ``chars`` characters of text, used before a response exists: ceil(chars / 4).

    Source: OpenAI's rule of thumb that one token is about 4 characters of English text ("What are tokens and
    how to count them?", OpenAI Help Center). The ledger never uses it for accounting: usage comes from the
    provider.
    """
    return math.ceil(chars / 4)
