"""The seam between a REPL session and the engine: plain data both ways, no shared engine objects.

A REPL session (a confined worker process by default, a thread with ``sandbox="none"``) reaches the engine
only through a :class:`Host`. Everything crossing the seam is plain data: lists of str, JSON-like contexts,
outcome dicts, and :class:`~rlm_async.BudgetExceeded` whose ``results`` are outcome dicts too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypedDict

__all__ = ["KEEP", "CellResult", "Host", "Outcome", "ReplSession"]

#: ``next_turn(..., context=KEEP)``: the turn brings no new context.
KEEP: Any = object()


class Outcome(TypedDict, total=False):
    """One sub-call's outcome. ``ok`` True: ``text`` is the answer. ``ok`` False: ``kind`` and ``message``
    say why it failed, and ``partial`` holds a child agent's partial answer when it had one."""

    ok: bool
    text: str
    kind: str
    message: str
    partial: str


class Host(Protocol):
    """What model code may ask of the engine. Runs on the engine's event loop."""

    async def llm_batch(self, prompts: list[str], model: str | None, max_tokens: int | None) -> list[Outcome]:
        """One plain LLM call per prompt, concurrently; outcomes in prompt order.

        Raises BudgetExceeded (``max_fanout``, ``max_calls``: nothing started) or, after the batch, when a
        token or USD cap cut it short (``results`` holds every outcome).
        """
        ...

    async def rlm_batch(self, queries: list[str], contexts: list[Any], model: str | None = None) -> list[Outcome]:
        """One child agent per (query, context), concurrently, on ``model`` (None: the run's model for the
        children's depth); outcomes in order. Raises BudgetExceeded."""
        ...

    async def tool(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """Call the custom tool ``name`` in the engine process; its result as it returned it.

        Raises:
            ToolError: no such tool, or the tool raised.
        """
        ...

    def budget(self) -> dict[str, Any]:
        """What is left: calls, agents, input/output tokens, USD, seconds, depth (None: no cap)."""
        ...


@dataclass(frozen=True, slots=True)
class CellResult:
    """The result of running one code cell.

    Attributes:
        output: printed output, already cut to ``max_output_chars`` with a note when it was longer.
        error: the formatted traceback when the cell raised (syntax errors included), else None.
        notes: engine notes for the model (a reserved name restored, an un-awaited call, a timeout).
        timed_out: the cell ran past the per-cell time limit and was interrupted.
        variables: the user variables after the cell, shown as a last ``REPL variables: [...]`` line, as the
            official RLM shows them.
        restarted: the cell's worker was killed or died and was replaced (its variables are gone).
    """

    output: str
    error: str | None
    notes: tuple[str, ...] = ()
    timed_out: bool = False
    variables: tuple[str, ...] = ()
    restarted: bool = False

    @property
    def failed(self) -> bool:
        """The cell raised, ran past its time limit, or lost its worker."""
        return self.error is not None or self.timed_out or self.restarted

    def render(self) -> str:
        """The text shown to the model for this cell."""
        parts = [self.output.rstrip("\n")] if self.output.strip() else []
        if self.error:
            parts.append(self.error.rstrip("\n"))
        parts.extend(f"[note] {n}" for n in self.notes)
        if not parts:
            parts.append("(no output)")
        if self.variables:
            parts.append(f"REPL variables: {list(self.variables)}")
        return "\n".join(parts)


class ReplSession(Protocol):
    """A persistent REPL for one agent. Used as an async context manager around the agent's life."""

    async def __aenter__(self) -> ReplSession: ...

    async def __aexit__(self, et: Any, ev: Any, tb: Any) -> bool | None: ...

    async def started(self) -> None:
        """Wait until the REPL can run a cell (a worker process starts in the background from ``__aenter__``;
        its first use waits for it anyway)."""
        ...

    def when_gone(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the event loop) once nothing this REPL started is left: at once, or, when
        leaving it handed a worker's start in flight to a reaper, once the reaper has discarded that worker
        (what an agent's ``max_workers`` slot waits for)."""
        ...

    async def run_cell(self, code: str) -> CellResult:
        """Run one cell to completion (or to its time limit). Model errors become ``CellResult.error``."""
        ...

    def answer(self) -> tuple[str, bool]:
        """``(answer["content"], answer["ready"])`` as it stands, content coerced to str."""
        ...

    async def next_turn(self, host: Host, values: dict[str, Any], context: Any) -> None:
        """Start a session's next turn: calls go to ``host`` (the new turn's agent), ``answer`` is empty again,
        ``values`` become REPL variables, and ``context`` (unless it is :data:`KEEP`) becomes ``context``."""
        ...

    async def set_variables(self, values: dict[str, Any]) -> None:
        """Put ``values`` into the REPL as variables (the answer draft is left alone)."""
        ...

    async def unready(self) -> None:
        """Set ``answer["ready"]`` back to False, keeping the draft (a finish the engine refused)."""
        ...

    async def final_var(self, name: str) -> str | None:
        """``str()`` of the REPL variable ``name``, or None when it does not exist."""
        ...
