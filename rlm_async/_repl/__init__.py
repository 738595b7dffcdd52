"""REPL sessions behind one protocol (in a worker thread today; a sandboxed worker process can follow)."""

from ._functions import RESERVED_NAMES, Pending, SubcallFailure
from ._protocol import CellResult, Host, Outcome, ReplSession
from ._thread import CellInterrupted, ThreadRepl

__all__ = [
    "RESERVED_NAMES",
    "CellInterrupted",
    "CellResult",
    "Host",
    "Outcome",
    "Pending",
    "ReplSession",
    "SubcallFailure",
    "ThreadRepl",
]
