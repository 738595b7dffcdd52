"""REPL sessions behind one protocol (in a worker thread today; a sandboxed worker process can follow)."""

from ._functions import Pending, SubcallFailure
from ._protocol import CellResult, Host, Outcome, ReplSession
from ._thread import CellInterrupted, ThreadRepl

__all__ = [
    "CellInterrupted",
    "CellResult",
    "Host",
    "Outcome",
    "Pending",
    "ReplSession",
    "SubcallFailure",
    "ThreadRepl",
]
