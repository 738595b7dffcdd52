"""REPL sessions behind one protocol: a confined worker process per agent (the default), or a worker thread
inside the engine process (``sandbox="none"``, for trusted code)."""

from ._functions import SubcallFailure
from ._process import ProcessRepl, reap_pending
from ._protocol import KEEP, CellResult, Host, Outcome, ReplSession
from ._thread import CellInterrupted, ThreadRepl

__all__ = [
    "KEEP",
    "CellInterrupted",
    "CellResult",
    "Host",
    "Outcome",
    "ProcessRepl",
    "ReplSession",
    "SubcallFailure",
    "ThreadRepl",
    "reap_pending",
]
