"""Events. One :class:`Tracer` per run; logging, the JSONL trajectory and listeners are views of its events.

Every event is a flat dict: ``event`` (its name), ``t`` (seconds since the run started, monotonic clock), the
context bound with structlog's contextvars (``run_id``, ``agent_id``, ``depth``) and the event's own fields.
Event names: ``run_start``, ``run_end``, ``agent_start``, ``agent_end``, ``agent_fallback``, ``turn``,
``code``, ``output``, ``call_queued``, ``call_started``, ``call_finished``, ``call_retried``,
``call_failed``, ``budget_stop``.

The structlog logger is, by default, a structlog wrapper around the stdlib logger ``"rlm_async"`` at DEBUG
level, so a library user sees nothing unless they enable that logger; pass ``logger=structlog.get_logger()``
to route events through your own structlog configuration. The bound context is passed to the logger with each
event, so it arrives whether or not your processors merge contextvars. Nothing is configured at import time.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import structlog

__all__ = ["Event", "Tracer", "bound"]

Event = dict[str, Any]
Listener = Callable[[Event], None]

#: Bind run_id / agent_id / depth for everything emitted inside the ``with`` block (and tasks spawned in it).
bound = structlog.contextvars.bound_contextvars


_callback_log = logging.getLogger("rlm_async.callbacks")


def _default_logger() -> Any:
    return structlog.wrap_logger(
        logging.getLogger("rlm_async"),
        wrapper_class=structlog.stdlib.BoundLogger,
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.render_to_log_kwargs,
        ],
    )


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
        self._listeners = list(listeners)
        self._clock = clock
        self._t0 = clock()
        self._file: IO[str] | None = open(trace_path, "a", encoding="utf-8") if trace_path else None  # noqa: SIM115

    def emit(self, event: str, **fields: Any) -> None:
        """Record one event. Never raises for an unserialisable field: JSON falls back to ``repr``."""
        record: Event = {"event": event, "t": round(self._clock() - self._t0, 6)}
        record.update(structlog.contextvars.get_contextvars())
        record.update(fields)
        self._log.debug(**record)
        if self._file is not None:
            self._file.write(json.dumps(record, default=repr) + "\n")
        for listener in self._listeners:
            try:
                listener(record)
            except Exception:  # a user's callback must not change the run: logged, then left out
                _callback_log.exception("on_event callback %r raised on %r; the run goes on", listener, event)

    def close(self) -> None:
        """Flush and close the JSONL file. Idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None
