"""Multi-turn sessions: one root REPL that outlives completions (the official RLM's persistent mode).

``async with rlm.session() as s: r1 = await s.completion(q1, ctx1); r2 = await s.completion(q2)``. The root's
REPL and its variables persist across turns. Turn ``i``'s context is ``context_i`` (and ``context``, until a
later turn brings another); its conversation with the root model is ``history_i`` (a list of
``{"role", "content"}`` dicts), so a later turn can look back. Each turn is its own run (budgets per turn); a
session's own ``limits`` cap calls, tokens and USD over all its turns together.
"""

from __future__ import annotations

import dataclasses
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._agent import make_repl, query_variable
from ._budget import Limits, UsageTotals
from ._errors import ConfigError
from ._repl import KEEP, ReplSession

if TYPE_CHECKING:
    from ._agent import Agent
    from ._engine import RLM, RLMResult


__all__ = ["Session"]

_SESSION_CAPS = ("max_calls", "max_input_tokens", "max_output_tokens", "max_cost_usd")


class Session:
    """A conversation of completions over one persistent root REPL. Make one with ``RLM.session()``.

    Args:
        rlm: the engine.
        limits: caps over the whole session (``max_calls``, ``max_input_tokens``, ``max_output_tokens``,
            ``max_cost_usd``: counts, tokens, USD); None: only each turn's own limits.

    Attributes:
        turns: completions so far.
        usage: usage summed over the turns.
    """

    def __init__(self, rlm: RLM, limits: Limits | None = None) -> None:
        self._rlm = rlm
        self._limits = limits
        self._repl: ReplSession | None = None
        self.turns = 0
        self.usage = UsageTotals()

    async def __aenter__(self) -> Session:
        """Start the root's REPL here, in the task that owns the session (its worker, or its thread portal),
        and wait until it is up: every turn starts by handing it the turn's variables.

        Raises:
            WorkerError: the REPL worker did not start (see ``ProcessRepl``).
        """
        rlm = self._rlm
        repl = make_repl(rlm.worker_plan, rlm.limits, rlm.tools_for(0), "", _NoHost(), "0")
        await repl.__aenter__()
        try:
            await repl.started()
        except BaseException as exc:
            await repl.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._repl = repl
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        repl, self._repl = self._repl, None
        if repl is not None:
            await repl.__aexit__(et, ev, tb)

    async def completion(self, query: str, context: Any = KEEP, **kwargs: Any) -> RLMResult:
        """The session's next turn. ``context`` omitted: the turn works on the variables earlier turns left.

        Args:
            query: the question.
            context: this turn's input (``context`` and ``context_<turn>`` in the REPL), or omitted.
            **kwargs: ``limits``, ``on_event``, ``trace_path``, ``metadata``, as for ``RLM.completion``.

        Raises:
            ConfigError: as ``RLM.completion``; also when the session's limits are used up.
        """
        turn = self.turns
        repl = self._repl
        if repl is None:
            raise ConfigError("use the session inside `async with rlm.session() as s:`")
        limits = self._turn_limits(kwargs.pop("limits", None) or self._rlm.limits)
        values: dict[str, Any] = {} if context is KEEP else {f"context_{turn}": context}
        values.update(query_variable(query, self._rlm.tools_for(0)))

        async def attach(agent: Agent) -> tuple[ReplSession, str]:
            await repl.next_turn(agent, values, context)
            return repl, _turn_note(turn)

        result = await self._rlm._complete(
            query,
            None if context is KEEP else context,
            limits=limits,
            on_event=kwargs.pop("on_event", None),
            trace_path=kwargs.pop("trace_path", None),
            metadata=kwargs.pop("metadata", None),
            attach=attach,
            **kwargs,
        )
        self.turns += 1
        self.usage = self.usage + result.usage.total
        history = [dict(m) for m in result.history]
        await repl.set_variables({f"history_{turn}": history})
        return result

    def _turn_limits(self, limits: Limits) -> Limits:
        """A turn's limits, narrowed to what is left of the session's caps."""
        if self._limits is None:
            return limits
        used = {
            "max_calls": self.usage.calls,
            "max_input_tokens": self.usage.prompt_tokens,
            "max_output_tokens": self.usage.completion_tokens,
            "max_cost_usd": self.usage.cost_usd,
        }
        narrowed = {}
        for name in _SESSION_CAPS:
            cap = getattr(self._limits, name)
            if cap is None:
                continue
            left = cap - used[name]
            if left <= 0:
                raise ConfigError(f"the session's {name}={cap} is used up ({used[name]} used)")
            mine = getattr(limits, name)
            narrowed[name] = left if mine is None else min(mine, left)
            if name != "max_cost_usd":
                narrowed[name] = int(narrowed[name])
        return dataclasses.replace(limits, **narrowed)


def _turn_note(turn: int) -> str:
    if turn == 0:
        return ""
    return (
        f"\n\nThis is turn {turn} of a session: the REPL keeps every variable from earlier turns. Earlier inputs "
        f"are context_0 .. context_{turn - 1} (this turn's, if any, is context_{turn} and `context`), earlier "
        f"conversations history_0 .. history_{turn - 1} (lists of role/content dicts)."
    )


class _NoHost:
    """The host between turns: no sub-call can arrive then (no cell runs)."""

    async def llm_batch(self, prompts: list[str], model: str | None, max_tokens: int | None) -> list[Any]:
        raise ConfigError("no turn is running")

    async def rlm_batch(self, queries: list[str], contexts: list[Any], model: str | None = None) -> list[Any]:
        raise ConfigError("no turn is running")

    async def tool(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        raise ConfigError("no turn is running")

    def budget(self) -> dict[str, Any]:
        return {}
