"""Events. One :class:`Tracer` per run; logging, the JSONL trajectory and listeners are views of its events.

Every event is a flat dict: ``event`` (its name), ``t`` (seconds since the run started, monotonic clock), the
context bound with structlog's contextvars (``run_id``, ``agent_id``, ``depth``) and the event's own fields.
Event names (:data:`EventName`): ``run_start``, ``run_end``, ``agent_start``, ``agent_end``,
``agent_fallback``, ``turn``, ``reply``, ``code``, ``output``, ``answer`` (a draft changed), ``call_queued``,
``call_started``, ``call_finished``, ``call_retried``, ``call_failed``, ``call_crashed``, ``budget_stop``,
``config_error``, ``tool_call``, ``compaction``. :class:`RunEvent` is the typed form ``RLM.stream`` yields.

The structlog logger is, by default, a structlog wrapper around the stdlib logger ``"rlm_async"`` at DEBUG
level, so a library user sees nothing unless they enable that logger; pass ``logger=structlog.get_logger()``
to route events through your own structlog configuration. The bound context is passed to the logger with each
event, so it arrives whether or not your processors merge contextvars. Nothing is configured at import time.

Events cost nothing when nobody listens: :attr:`Tracer.active` is False when there is no JSONL file, no
listener, and the logger is not enabled for DEBUG (the stdlib logger's ``isEnabledFor``, a structlog filtering
logger's ``is_enabled_for``; a logger that says neither counts as listening). ``emit`` then returns before
building the event, and hot paths test ``active`` before computing an event's fields. The level is read at
each event, so enabling the logger mid-run takes effect at once.

The JSONL file is written through Python's buffer and flushed at most :data:`FLUSH_AFTER_S` after an event is
written (a timer on the running event loop; at once when written outside one), and on ``close``. It was
flushed only when the 8 KiB buffer filled, so a long run's trace stayed empty for minutes (a 32K-token eval
item on a local model); a flush per line would be a write system call for every event of a 10,000-call run.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import structlog

__all__ = ["FLUSH_AFTER_S", "Event", "EventName", "RunEvent", "Tracer", "bound"]

#: Seconds an event written to the JSONL file may wait in the buffer before it is flushed to the file.
FLUSH_AFTER_S = 1.0

Event = dict[str, Any]
Listener = Callable[[Event], None]

EventName = Literal[
    "run_start", "run_end", "agent_start", "agent_end", "agent_fallback", "turn", "reply", "code", "output",
    "answer", "call_queued", "call_started", "call_finished", "call_retried", "call_failed", "call_crashed",
    "budget_stop", "config_error", "tool_call", "compaction",
]  # fmt: skip
EventName.__doc__ = "The name of an event (see the module docstring of ``rlm_async._trace``)."


@dataclass(frozen=True, slots=True)
class RunEvent:
    """One event of a run, as ``RLM.stream`` yields it.

    Attributes:
        event: what happened (:data:`EventName`).
        t: seconds since the run started (monotonic clock).
        run_id: the run's id.
        agent_id: the agent it concerns (``"0"`` the root, ``"0.2"`` its second child), or None.
        depth: that agent's depth, or None.
        data: the event's own fields (``output`` for ``output``, ``content`` and ``ready`` for ``answer``,
            ``call_id`` and token counts for ``call_finished``, ...).
    """

    event: EventName
    t: float
    run_id: str
    agent_id: str | None
    depth: int | None
    data: Mapping[str, Any]

    @classmethod
    def from_dict(cls, record: Event) -> RunEvent:
        """The typed form of one event dict."""
        rest = {k: v for k, v in record.items() if k not in ("event", "t", "run_id", "agent_id", "depth")}
        return cls(
            record["event"], record["t"], record.get("run_id", ""), record.get("agent_id"), record.get("depth"), rest
        )


#: Bind run_id / agent_id / depth for everything emitted inside the ``with`` block (and tasks spawned in it).
bound = structlog.contextvars.bound_contextvars


_callback_log = logging.getLogger("rlm_async.callbacks")

#: One encoder for every JSONL line: ``json.dumps(record, default=repr)`` builds a new ``JSONEncoder`` per call.
_ENCODER = json.JSONEncoder(default=repr)


def _default_logger() -> Any:
    return structlog.wrap_logger(
        logging.getLogger("rlm_async"),
        wrapper_class=structlog.stdlib.BoundLogger,
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.render_to_log_kwargs,
        ],
    )


def _debug_check(logger: Any) -> Callable[[], bool]:
    """A cheap "would this logger emit at DEBUG?" for a stdlib-backed or a structlog filtering logger."""
    wrapped = getattr(logger, "_logger", None)  # a BoundLogger's, or the lazy proxy wrap_logger returns
    if isinstance(wrapped, logging.Logger):  # it filters by its level anyway: asking it is never wrong
        return functools.partial(wrapped.isEnabledFor, logging.DEBUG)  # no Python frame of its own
    is_enabled_for = getattr(logger, "is_enabled_for", None)
    if callable(is_enabled_for):  # structlog's make_filtering_bound_logger (structlog >= 22.1)
        return lambda: bool(is_enabled_for(logging.DEBUG))
    return lambda: True  # a logger that cannot say: assume it listens


class Tracer:
    """Sends each event to the structlog logger, the JSONL file (when ``trace_path`` is set) and listeners.

    Args:
        trace_path: a file to append one JSON object per line to, or None.
        logger: a structlog logger; None for the stdlib-backed default described in the module docstring.
        listeners: callables given each event dict (progress bars, tests, metrics). One that raises is logged
            (the stdlib logger ``"rlm_async.callbacks"``) and the event goes on to the others.
        clock: monotonic seconds; injectable for tests.
    """

    def __init__(
        self,
        *,
        trace_path: str | Path | None = None,
        logger: Any = None,
        listeners: Iterable[Listener] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger if logger is not None else _default_logger()
        self._log_enabled = _debug_check(self._log)
        self._listeners = list(listeners)
        self._clock = clock
        self._t0 = clock()
        self._file: IO[str] | None = open(trace_path, "a", encoding="utf-8") if trace_path else None  # noqa: SIM115
        self._always = self._file is not None or bool(self._listeners)
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flush_loop: asyncio.AbstractEventLoop | None = None

    @property
    def active(self) -> bool:
        """Whether an event emitted now would reach anyone (a file, a listener, or a logger enabled for DEBUG)."""
        return self._always or self._log_enabled()

    def emit(self, event: str, **fields: Any) -> None:
        """Record one event, or do nothing when :attr:`active` is False. Never raises for an unserialisable
        field: JSON falls back to ``repr``."""
        logged = self._log_enabled()
        if not (logged or self._always):
            return
        record: Event = {"event": event, "t": round(self._clock() - self._t0, 6)}
        record.update(structlog.contextvars.get_contextvars())
        record.update(fields)
        if logged:
            self._log.debug(**record)
        if self._file is not None:
            self._write(self._file, _ENCODER.encode(record) + "\n")
        for listener in self._listeners:
            try:
                listener(record)
            except Exception:  # a user's callback must not change the run: logged, then left out
                _callback_log.exception("on_event callback %r raised on %r; the run goes on", listener, event)

    def _write(self, file: IO[str], line: str) -> None:
        """Write one line to the JSONL file; flush it within :data:`FLUSH_AFTER_S` (at once outside a loop)."""
        file.write(line)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a thread or sync code: there is no later to flush in
            file.flush()
            return
        if self._flush_timer is None or self._flush_loop is not loop:  # a timer on a loop since gone never fires
            self._flush_loop = loop
            self._flush_timer = loop.call_later(FLUSH_AFTER_S, self._flush)

    def _flush(self) -> None:
        self._flush_timer = None
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Flush and close the JSONL file. Idempotent."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._file is not None:
            self._file.close()
            self._file = None
