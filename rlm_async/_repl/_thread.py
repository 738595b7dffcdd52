"""The in-thread REPL: each cell runs in its own worker thread, so blocking model code never stalls the engine.

- Cells may use top-level ``await`` (compiled with ``PyCF_ALLOW_TOP_LEVEL_AWAIT``); such a cell runs on a
  fresh asyncio loop inside its worker thread. Sub-calls cross to the engine's loop through an anyio
  :class:`~anyio.from_thread.BlockingPortal` whose task group lives in the agent's task, so cancelling the
  agent cancels every sub-call a cell started.
- Output is captured per session by giving the namespace its own ``print`` (never by swapping the
  process-wide ``sys.stdout``), and is kept within ``max_output_chars`` as it is written.
- A bare expression on a cell's last line is shown, as in an interactive Python prompt.
- On cancellation or a per-cell timeout the worker thread is interrupted (an asynchronous
  :class:`CellInterrupted` raised in it) and awaited for a short grace period.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import contextvars
import ctypes
import inspect
import itertools
import linecache
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from types import CodeType, TracebackType
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal

from .._errors import BudgetExceeded, RLMError, ToolError
from ._cell import SHOW, CappedText, compile_cell, format_traceback, show_value
from ._deadline import CellDeadline
from ._functions import ReplFunctions
from ._protocol import KEEP, CellResult, Host

__all__ = ["CellInterrupted", "ThreadRepl"]

#: Real seconds an interrupted cell gets to unwind by itself (its sub-calls cancelled) before it is forced.
_SETTLE_S = 0.5
_cell_numbers = itertools.count(1)


class CellInterrupted(BaseException):
    """Raised asynchronously inside a cell's thread to stop it (cancellation or cell timeout).

    A BaseException, like KeyboardInterrupt, so model code's ``except Exception`` does not swallow it.
    """


class SubcallCancelled(RLMError):
    """A sub-call of a cell that is being stopped (timeout or cancellation) was cancelled."""


class ThreadRepl:
    """A persistent REPL for one agent, cells in worker threads. Use as ``async with ThreadRepl(...)``.

    Args:
        context: the agent's ``context`` variable, as given (str, list of str, dict, ...).
        host: the engine side of the seam.
        max_output_chars: characters of printed output shown per cell (``Limits.max_output_chars``).
        cell_timeout_s: seconds one cell may run before it is interrupted, or None for no limit.
        interrupt_grace_s: seconds to wait for an interrupted thread to finish before abandoning it.
        name: a label for thread names and tracebacks (the agent id).
        tools: names of the custom tools the host calls (proxies in the REPL).
        values: custom tool values, put in the namespace as they are.
    """

    def __init__(
        self,
        *,
        context: Any,
        host: Host,
        max_output_chars: int,
        cell_timeout_s: float | None = None,
        interrupt_grace_s: float = 2.0,
        name: str = "repl",
        tools: tuple[str, ...] = (),
        values: dict[str, Any] | None = None,
    ) -> None:
        self._tools = tools
        self._values = dict(values or {})
        self._host = host
        self._context = context
        self._max_output_chars = max_output_chars
        self._cell_timeout_s = cell_timeout_s
        self._grace_s = interrupt_grace_s
        self._name = name
        self._portal: BlockingPortal | None = None
        self._out = CappedText(max_output_chars)
        self._ns: dict[str, Any] = {}
        self._fns = ReplFunctions(self._submit, self._call, self._ns, BudgetExceeded, tool_error=ToolError)
        self._filenames: list[str] = []
        self._cell_scopes: set[anyio.CancelScope] = set()
        self._deadline: CellDeadline | None = None  # the running cell's (stops during its sub-calls)
        self._stopping = False  # set while a cell is being stopped: its late sub-calls are refused
        self._caller_context = contextvars.Context()
        self.abandoned_threads = 0

    async def __aenter__(self) -> ThreadRepl:
        self._caller_context = contextvars.copy_context()
        self._portal = BlockingPortal()
        await self._portal.__aenter__()
        own_builtins = dict(vars(builtins))
        own_builtins["print"] = self._print
        self._ns.update(self._fns.build(self._context, self._tools, self._values))
        self._ns.update({"__name__": "__rlm_repl__", "__builtins__": own_builtins, SHOW: self._show})
        return self

    async def started(self) -> None:
        """Nothing to wait for: the REPL is ready when ``__aenter__`` returns."""

    def when_gone(self, callback: Callable[[], None]) -> None:
        """At once: leaving the REPL stops its thread before it returns."""
        callback()

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        for filename in self._filenames:
            linecache.cache.pop(filename, None)
        portal, self._portal = self._portal, None
        if portal is None:
            return None
        await portal.stop(cancel_remaining=True)
        return await portal.__aexit__(et, ev, tb)

    # -- the seam -------------------------------------------------------------------------------------
    def _submit(self, method: str, *args: Any) -> Future[Any]:
        return self._require_portal().start_task_soon(self._host_call, method, args, name=f"{self._name}:{method}")

    async def _host_call(self, method: str, args: tuple[Any, ...]) -> Any:
        """Runs on the engine loop. Its cancel scope is registered so that a cell stop can cancel it (a
        concurrent Future of a started portal task cannot be cancelled from its side). A call that arrives
        while its cell is being stopped is refused at once: the stop has already cancelled the scopes it saw."""
        if self._stopping:
            raise SubcallCancelled(f"{method} was refused because the cell is being stopped")
        # A portal task starts in the event loop's own context: give it the agent's (a host's request id,
        # tracing context), as a task spawned by the agent would have. It is this task's copy alone.
        for var, value in self._caller_context.items():
            var.set(value)
        deadline = self._deadline
        with anyio.CancelScope() as scope:
            self._cell_scopes.add(scope)
            if deadline is not None:
                deadline.call_started()
            try:
                return await getattr(self._host, method)(*args)
            finally:
                self._cell_scopes.discard(scope)
                if deadline is not None:
                    deadline.call_ended()
        raise SubcallCancelled(f"{method} was cancelled because the cell was stopped")

    def _call(self, method: str) -> Any:
        return self._require_portal().call(getattr(self._host, method))

    def _require_portal(self) -> BlockingPortal:
        if self._portal is None:
            raise RuntimeError("this REPL's agent has finished; the engine no longer takes its calls")
        return self._portal

    # -- state the agent reads ------------------------------------------------------------------------
    def answer(self) -> tuple[str, bool]:
        content = self._fns.answer.get("content", "")
        return ("" if content is None else str(content)), bool(self._fns.answer.get("ready"))

    async def set_variables(self, values: dict[str, Any]) -> None:
        self._ns.update(values)

    async def unready(self) -> None:
        self._fns.answer["ready"] = False

    async def next_turn(self, host: Host, values: dict[str, Any], context: Any) -> None:
        self._host = host
        self._ns.update(values)
        self._fns.next_turn(context, KEEP)

    async def final_var(self, name: str) -> str | None:
        return self._fns.variable_text(name)

    # -- running cells --------------------------------------------------------------------------------
    async def run_cell(self, code: str) -> CellResult:
        """Run one cell in a worker thread and wait for it without blocking the event loop.

        Model errors (syntax errors included) are returned in ``CellResult.error``; cancellation of the
        caller interrupts the cell's thread and propagates.
        """
        self._out = CappedText(self._max_output_chars)
        self._stopping = False
        filename = f"<cell {self._name}#{next(_cell_numbers)}>"
        self._filenames.append(filename)
        try:
            compiled = compile_cell(code, filename)
        except SyntaxError as exc:
            return CellResult(self._out.render(), "".join(traceback.format_exception_only(exc)))
        error, timed_out = await self._run_in_thread(compiled, filename)
        notes = [*self._fns.restore_reserved(), *self._unawaited_note()]
        if timed_out:
            notes.append(f"the cell ran past its time limit of {self._cell_timeout_s:g} s and was interrupted")
        return CellResult(self._out.render(), error, tuple(notes), timed_out, tuple(self._fns.user_variables()))

    async def _run_in_thread(self, compiled: CodeType, filename: str) -> tuple[str | None, bool]:
        loop = asyncio.get_running_loop()
        done = anyio.Event()
        box: dict[str, BaseException] = {}

        def target() -> None:
            try:
                if compiled.co_flags & inspect.CO_COROUTINE:
                    _run_coroutine_cell(compiled, self._ns)
                else:
                    exec(compiled, self._ns)
            except BaseException as exc:
                box["error"] = exc
            finally:
                # RuntimeError: the engine's loop is closed, so nobody is waiting any more.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(done.set)

        thread = threading.Thread(target=target, name=f"rlm-cell-{self._name}", daemon=True)
        thread.start()
        timed_out = False
        self._deadline = deadline = CellDeadline(self._cell_timeout_s)
        try:
            with deadline.scope:
                await done.wait()
            if deadline.scope.cancelled_caught:
                timed_out = True
                await self._interrupt(thread, done)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._interrupt(thread, done)
            raise
        finally:
            self._deadline = None
        exc = box.get("error")
        if exc is None or (timed_out and isinstance(exc, CellInterrupted)):
            return None, timed_out
        return format_traceback(exc, filename), timed_out

    async def _interrupt(self, thread: threading.Thread, done: anyio.Event) -> None:
        """Stop a cell's thread: first cancel the sub-calls it waits on and let it unwind by itself; only a
        thread still running after that (a CPU loop, a blocking call) gets an asynchronous CellInterrupted,
        which is never safe inside library code and so is the last resort. Waits are real time."""
        self._stopping = True
        for scope in list(self._cell_scopes):
            scope.cancel()
        await anyio.to_thread.run_sync(thread.join, min(_SETTLE_S, self._grace_s))
        if thread.is_alive() and thread.ident is not None:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(CellInterrupted))
            await anyio.to_thread.run_sync(thread.join, self._grace_s)
        if thread.is_alive():
            self.abandoned_threads += 1

    def _unawaited_note(self) -> list[str]:
        note = self._fns.unawaited_note()
        return [note] if note else []

    # -- namespace helpers ---------------------------------------------------------------------------
    def _print(
        self, *args: Any, sep: str | None = " ", end: str | None = "\n", file: Any = None, flush: bool = False
    ) -> None:
        if file is not None:
            builtins.print(*args, sep=sep, end=end, file=file, flush=flush)
            return
        self._out.write((" " if sep is None else sep).join(map(str, args)) + ("\n" if end is None else end))

    def _show(self, value: Any) -> None:
        show_value(self._out, value)


def _run_coroutine_cell(compiled: CodeType, namespace: dict[str, Any]) -> None:
    """Run a cell with top-level await on a fresh event loop in this thread, closing the coroutine and the
    loop even when a :class:`CellInterrupted` lands between the steps (it is raised only once)."""
    coro = eval(compiled, namespace)
    runner = asyncio.Runner()
    try:
        runner.run(coro)
    finally:
        coro.close()
        try:
            runner.close()
        except CellInterrupted:
            runner.close()
            raise
