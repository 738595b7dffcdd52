"""A cell's time limit that stops while the cell waits on its own sub-calls.

``cell_timeout_s`` is there to stop model code that hangs or spins, not a cell that is waiting for the
engine: a batch of 1,000 real calls at 2 s each and 16 in flight keeps its cell waiting for two minutes, and a
plain wall-clock limit of 120 s killed it (and the batch's results with it). So the clock runs only while
none of the cell's sub-calls (``llm_batch``, ``rlm_agent``, tools, ...) is in flight. Those waits are bounded
elsewhere: the run's ``timeout_s``, ``agent_timeout_s``, the call budgets; and the worker's CPU by its
``RLIMIT_CPU``. Both REPLs use it (the worker process and the in-thread REPL).
"""

from __future__ import annotations

import math

import anyio

__all__ = ["CellDeadline"]


class CellDeadline:
    """``with deadline.scope:`` around a cell; ``call_started()`` / ``call_ended()`` around each of its
    sub-calls. ``timeout_s=None``: no limit.

    Attributes:
        scope: the cancel scope whose deadline moves; ``scope.cancelled_caught`` after the block says the limit
            was reached.
    """

    def __init__(self, timeout_s: float | None) -> None:
        self._left = math.inf if timeout_s is None else timeout_s
        self._in_flight = 0
        self.scope = anyio.CancelScope(deadline=anyio.current_time() + self._left)

    def call_started(self) -> None:
        """A sub-call of the cell began: the clock stops (if it was running)."""
        if self._in_flight == 0:
            self._left = max(self.scope.deadline - anyio.current_time(), 0.0)
            self.scope.deadline = math.inf
        self._in_flight += 1

    def call_ended(self) -> None:
        """A sub-call of the cell ended: the clock runs again once none is left."""
        self._in_flight -= 1
        if self._in_flight == 0:
            self.scope.deadline = anyio.current_time() + self._left
