"""Running one cell of model code, shared by both REPLs: compile, capture output, show the last expression.

Standard library only: the worker process loads this file by path (it never imports the engine), and the
in-thread REPL imports it as usual.
"""

from __future__ import annotations

import ast
import linecache
import threading
import traceback
from types import CodeType
from typing import Any

__all__ = ["SHOW", "CappedText", "capped", "compile_cell", "format_traceback"]

#: The namespace name of the function that shows a cell's trailing bare expression.
SHOW = "__rlm_show__"


class CappedText:
    """Collects printed text, keeping the head and the tail within ``limit`` characters in all.

    Thread-safe: model code may print from threads of its own. Also a minimal text stream (``write``,
    ``flush``, ``isatty``), so the worker can install it as ``sys.stdout`` / ``sys.stderr``.
    """

    def __init__(self, limit: int) -> None:
        self._head_cap = limit * 2 // 3
        self._tail_cap = limit - self._head_cap
        self._head: list[str] = []
        self._head_len = 0
        self._tail = ""
        self.total = 0
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        n = len(text)
        with self._lock:
            self.total += n
            room = self._head_cap - self._head_len
            if room > 0:
                self._head.append(text[:room])
                self._head_len += min(room, len(text))
                text = text[room:]
            if text and self._tail_cap:
                self._tail = (self._tail + text)[-self._tail_cap :]
        return n

    def flush(self) -> None:
        """Nothing to flush: text is kept in memory."""

    def isatty(self) -> bool:
        return False

    def render(self) -> str:
        head = "".join(self._head)
        shown = len(head) + len(self._tail)
        if self.total <= shown:
            return head + self._tail
        cut = self.total - shown
        return (
            f"{head}\n[... output cut: {cut:,} of {self.total:,} characters not shown; keep large results in "
            f"variables and print slices or summaries ...]\n{self._tail}"
        )


def capped(text: str, limit: int) -> str:
    """``text`` within ``limit`` characters, head and tail, as :class:`CappedText` keeps printed output."""
    if len(text) <= limit:
        return text
    out = CappedText(limit)
    out.write(text)
    return out.render()


def compile_cell(code: str, filename: str) -> CodeType:
    """Parse, show a trailing bare expression (as an interactive prompt does), and compile with top-level
    ``await`` allowed. The source is registered in :mod:`linecache` so tracebacks quote the model's lines.

    Raises:
        SyntaxError: the code does not parse (shown to the model as the cell's error).
    """
    tree = ast.parse(code, filename=filename, mode="exec")
    if tree.body and isinstance(tree.body[-1], ast.Expr) and not _is_print_call(tree.body[-1].value):
        last = tree.body[-1]
        call = ast.Call(func=ast.Name(SHOW, ast.Load()), args=[last.value], keywords=[])
        tree.body[-1] = ast.Expr(ast.copy_location(call, last.value))
        ast.fix_missing_locations(tree)
    linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
    code_obj: CodeType = compile(tree, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
    return code_obj


def _is_print_call(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"


def format_traceback(exc: BaseException, filename: str) -> str:
    """The traceback from the cell's own frames on: engine frames above the cell are dropped."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def show_value(out: CappedText, value: Any) -> None:
    """Write ``repr(value)`` of a cell's trailing expression, as an interactive prompt does (None: nothing)."""
    if value is not None:
        out.write(repr(value) + "\n")
