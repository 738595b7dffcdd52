"""The worker-process REPL, engine side: one confined worker process per agent, spoken to over a socketpair.

:class:`ProcessRepl` starts the worker (``_worker.py``, a fresh ``python -I`` interpreter, under bubblewrap
in the strict sandbox), hands it the context once through a file in its own workdir, and then sends cells and
answers the worker's sub-calls through the agent's :class:`~rlm_async._repl.Host`, on the engine's loop, so
they pass the same scheduler and budgets as every other call. Everything the engine decides with stays here:
the ``answer`` state (the worker reports it with each cell's result), the budgets, the client and its keys.

A worker that runs past ``cell_timeout_s``, dies (``os._exit``, a segfault, the memory limit, the CPU limit)
or breaks the protocol is killed with its whole process group (SIGKILL) and replaced by a fresh one with the
context reloaded and the answer draft kept; the model is told that its variables are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import pickle
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio

from .._errors import BudgetExceeded, ConfigError, ToolError, WorkerError
from .._sandbox._layers import WorkerPlan, read_only_roots
from . import _wire
from ._cell import capped
from ._deadline import CellDeadline
from ._protocol import KEEP, CellResult, Host
from ._zygote import WorkerProcess, new_spool, remove_tree, start_worker

__all__ = ["ProcessRepl"]

_CONTEXT_FILE = ".rlm_context.pkl"
_TURN_FILE = ".rlm_turn.pkl"
_ANSWER_FILE = ".rlm_answer.txt"
#: Bytes of a dead worker's stderr shown to the model (the tail holds the fatal error).
_STDERR_TAIL = 1500
#: Seconds a worker that closed its channel gets to exit by itself, so its own exit status can be reported.
_EXIT_GRACE_S = 0.5
#: Frames up to this size are parsed on the event loop; larger ones in a thread.
_PARSE_INLINE_BYTES = 256 * 1024
#: Sub-calls one worker may have in flight; past it the engine stops reading its messages until one ends.
#: (One ``llm_batch`` of any size is one call; this bounds a flood of single calls.)
_CALLS_PER_WORKER = 1024
#: Bytes of replies a worker may leave unread before the engine kills it.
_REPLY_BUFFER_BYTES = 64 * 1024 * 1024


class _WorkerGone(Exception):
    """The worker died, timed out or broke the protocol while the engine waited on it."""

    def __init__(self, note: str, *, timed_out: bool = False) -> None:
        super().__init__(note)
        self.note = note
        self.timed_out = timed_out


class _Worker:
    """One live worker process and its channel."""

    def __init__(self, proc: WorkerProcess, reader: asyncio.StreamReader, writer: Any, spool: Path):
        self.proc = proc
        self.reader = reader
        self.writer = writer
        self.spool = spool
        self.layers: tuple[str, ...] = ()
        self.violation = ""  # why the engine killed it, when it broke the protocol

    async def send(self, message: dict[str, Any]) -> None:
        self.writer.write(_wire.frame(message, _wire.ENGINE_FRAME_BYTES))
        await self.writer.drain()

    def send_reply(self, message: dict[str, Any]) -> None:
        """Queue a reply without waiting for the worker to read it (no drain waiter per reply). A worker
        that lets more than :data:`_REPLY_BUFFER_BYTES` of replies pile up unread is killed."""
        if self.writer.is_closing():
            return
        self.writer.write(_wire.frame(message, _wire.ENGINE_FRAME_BYTES))
        if self.writer.transport.get_write_buffer_size() > _REPLY_BUFFER_BYTES:
            self.violation = f"it left over {_REPLY_BUFFER_BYTES // 2**20} MiB of replies unread"
            self.proc.kill()

    async def receive(self) -> dict[str, Any]:
        """The next message, checked against the protocol. A large frame is parsed in a thread, so a worker
        cannot stall the engine's loop with one.

        Raises:
            _wire.ProtocolError: a malformed message.
            asyncio.IncompleteReadError: the worker closed the channel (it died).
        """
        n = _wire.frame_length(await self.reader.readexactly(4))
        body = await self.reader.readexactly(n)
        if n > _PARSE_INLINE_BYTES:
            message = await anyio.to_thread.run_sync(_wire.parse_frame, body)
        else:
            message = _wire.parse_frame(body)
        return _wire.check_worker_message(message)

    async def kill(self) -> None:
        """SIGKILL the worker (its process group, where it has one) and wait for it; close the channel.
        Idempotent, and quick: the process is gone when this returns."""
        self.proc.kill()
        self.writer.close()
        with anyio.CancelScope(shield=True):
            await self.proc.wait()
            with contextlib.suppress(OSError, ConnectionError):
                await self.writer.wait_closed()

    def stderr_tail(self) -> str:
        try:
            data = (self.spool / "stderr.log").read_bytes()[-_STDERR_TAIL:]
        except OSError:
            return ""
        return data.decode("utf-8", "replace").strip()

    def crash_reason(self) -> str:
        """The line of the worker's stderr that says why it died (faulthandler's "Fatal Python error: ..."),
        else its last line, else ""."""
        lines = [line.strip() for line in self.stderr_tail().splitlines() if line.strip()]
        fatal = [line for line in lines if line.startswith("Fatal Python error")]
        return (fatal or lines or [""])[-1][:300]

    def exit_description(self) -> str:
        code = self.proc.returncode
        if code is None:
            return "it stopped answering"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit status {code}"


class ProcessRepl:
    """A persistent REPL for one agent in a confined worker process. Use as ``async with ProcessRepl(...)``.

    Args:
        context: the agent's ``context`` (pickled once into the worker's workdir; keeps its type).
        host: the engine side of the seam (the agent).
        tools: names of the custom tools the host calls (proxies in the REPL).
        values: custom tool values, pickled into the worker with the context.
        plan: the sandbox layers to apply (:func:`rlm_async._sandbox.plan_for`).
        max_output_chars: characters of output shown per cell (``Limits.max_output_chars``).
        cell_timeout_s: seconds one cell may run before its worker is killed and replaced; None: no limit.
        name: a label for cell file names and the workdir (the agent id).

    Raises:
        WorkerError: from the REPL's first use (:meth:`started`, ``run_cell`` and the other calls; the worker
            starts in the background from ``__aenter__``), and from ``run_cell`` when a replacement cannot
            start: the worker did not start within ``Sandbox.start_timeout_s`` or applied fewer layers than
            the plan requires.
        ConfigError: the context cannot be pickled.
    """

    def __init__(
        self,
        *,
        context: Any,
        host: Host,
        plan: WorkerPlan,
        max_output_chars: int,
        cell_timeout_s: float | None = None,
        name: str = "repl",
        tools: tuple[str, ...] = (),
        values: dict[str, Any] | None = None,
    ) -> None:
        self._host = host
        self._plan = plan
        self._tools = tools
        self._max_output_chars = max_output_chars
        self._cell_timeout_s = cell_timeout_s
        self._name = name
        self._values = dict(values or {})
        self._context_bytes = self._start_payload(context)
        self._answer: tuple[str, bool] = ("", False)
        self._worker: _Worker | None = None
        self._starting: asyncio.Task[_Worker] | None = None
        self._reaper: asyncio.Task[None] | None = None  # set when leaving handed a start in flight to a reaper
        self._ids = itertools.count(1)
        self.restarts = 0

    def _start_payload(self, context: Any) -> bytes:
        """What a (re)started worker loads: the context and the tool values, pickled.

        Raises:
            ConfigError: they cannot be pickled.
        """
        try:
            return pickle.dumps({"context": context, "values": self._values}, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise ConfigError(
                f"the context (or a custom tool value) cannot be sent to a REPL worker: {type(exc).__name__}: {exc}"
            ) from exc

    @property
    def layers(self) -> tuple[str, ...]:
        """The confinement layers the live worker reported as applied (empty until it has started)."""
        return self._worker.layers if self._worker else ()

    @property
    def pid(self) -> int | None:
        """The live worker's process id as the engine sees it (bubblewrap's when spawned under bwrap), or
        None (also until it has started)."""
        return self._worker.proc.host_pid if self._worker else None

    async def __aenter__(self) -> ProcessRepl:
        """Start the worker in the background and return at once: an agent's first model call needs only the
        context's metadata, so it goes out while the worker starts, and the REPL's first use waits for the
        worker (:meth:`started`). That takes the worker's start (its fork, the context's crossing; the
        zygote's own start on an engine's first run) off every run's critical path (docs/architecture.md).
        Leaving before the start has finished does not wait for it: the worker is discarded once started."""
        self._starting = asyncio.get_running_loop().create_task(self._start(), name=f"repl-start-{self._name}")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        starting, self._starting = self._starting, None
        if starting is not None:
            if not starting.done():
                # A start is never cancelled half-way (a fork in a thread cannot be taken back), and leaving
                # does not wait for it either (a cancelled rlm_batch of 100 children waited 0.3-0.5 s for
                # their starts): a reaper discards the worker as soon as it has started.
                self._reaper = _reap_when_started(starting)
                return
            if not starting.cancelled() and starting.exception() is None:  # a failed start cleaned up itself
                self._worker = starting.result()
        worker, self._worker = self._worker, None
        if worker is not None:
            await _discard(worker)

    def when_gone(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once this REPL's worker is gone: at once, or when the reaper that leaving handed a
        start in flight to has discarded the worker."""
        reaper = self._reaper
        if reaper is None or reaper.done():
            callback()
        else:
            reaper.add_done_callback(lambda _: callback())

    async def started(self) -> None:
        """Wait until the worker has started (the REPL's first use does this itself).

        Raises:
            WorkerError: the worker did not start within ``Sandbox.start_timeout_s`` or applied fewer layers
                than the plan requires (also raised by the first ``run_cell`` and the other calls that use it).
            RuntimeError: the REPL has been closed.
        """
        await self._live()

    async def _live(self) -> _Worker:
        """The live worker, once started; a cancelled wait does not cancel the start (see :meth:`__aexit__`)."""
        starting = self._starting
        if starting is not None:
            worker = await asyncio.shield(starting)
            if self._starting is starting:
                self._starting, self._worker = None, worker
        if self._worker is None:
            raise RuntimeError("this REPL has been closed")
        return self._worker

    # -- starting ---------------------------------------------------------------------------------------
    async def _start(self) -> _Worker:
        sandbox = self._plan.sandbox
        spool = await new_spool(self._plan)
        workdir = spool / "work"
        workdir.mkdir(mode=0o700)
        (workdir / _CONTEXT_FILE).write_bytes(self._context_bytes)
        if self._answer[0]:  # a restart keeps the draft; in a file, as it may be far past a config message
            (workdir / _ANSWER_FILE).write_text(self._answer[0], encoding="utf-8", errors="surrogatepass")
        config: dict[str, Any] = {
            "spool": str(spool),
            "workdir": str(workdir),
            "context_file": _CONTEXT_FILE,
            "max_output_chars": self._max_output_chars,
            "name": self._name,
            "answer_file": _ANSWER_FILE if self._answer[0] else None,
            "tools": list(self._tools),
            "rlimits": {
                "as": sandbox.memory_bytes,
                "cpu": sandbox.cpu_s,
                "fsize": sandbox.file_size_bytes,
                "nofile": sandbox.open_files,
                "core": 0,
            },
            "bwrap": bool(self._plan.bwrap),
            "landlock": self._plan.landlock,
            "read_paths": read_only_roots() if self._plan.landlock else [],
            "seccomp_bpf": self._plan.seccomp_bpf.hex() if self._plan.seccomp_bpf is not None else None,
        }
        parent, child = socket.socketpair()
        try:
            proc = await start_worker(self._plan, config, child)  # it closes `child`; on failure, the spool too
        except BaseException:
            parent.close()
            raise
        try:
            reader, writer = await asyncio.open_unix_connection(sock=parent)
        except BaseException:
            proc.kill()
            parent.close()
            with anyio.CancelScope(shield=True):
                await proc.wait()
            remove_tree(spool)
            raise
        worker = _Worker(proc, reader, writer, spool)
        try:
            with anyio.fail_after(sandbox.start_timeout_s):
                ready = await worker.receive()
        except BaseException as exc:
            await worker.kill()
            why = f"the REPL worker did not start ({worker.exit_description()}): {worker.stderr_tail()}"
            await _discard(worker)
            if isinstance(exc, TimeoutError | asyncio.IncompleteReadError | _wire.ProtocolError):
                raise WorkerError(why) from None
            raise
        if ready["op"] != "ready":
            await _discard(worker)
            raise WorkerError(f"the REPL worker sent {ready['op']!r} before 'ready'")
        missing = [layer for layer in self._plan.layers if layer not in ready["layers"]]
        if missing:
            await _discard(worker)
            raise WorkerError(f"the REPL worker did not apply {missing}; it reported {ready['layers']}")
        worker.layers = tuple(ready["layers"])
        return worker

    async def _restart(self, note: str) -> str:
        """Replace a dead or killed worker; the note for the model says what happened."""
        worker, self._worker = self._worker, None
        if worker is not None:
            await _discard(worker)
        self.restarts += 1
        # Through `_starting`, as the first start: a restart cancelled mid-fork is then left to a reaper on
        # exit, and `when_gone` waits for it (awaited inline, the fork's worker outlived the REPL's slot).
        self._starting = asyncio.get_running_loop().create_task(self._start(), name=f"repl-restart-{self._name}")
        await self._live()
        return note + "; the REPL was restarted and its variables are lost (`context` was reloaded)"

    # -- state the agent reads ------------------------------------------------------------------------
    def answer(self) -> tuple[str, bool]:
        return self._answer

    async def next_turn(self, host: Host, values: dict[str, Any], context: Any) -> None:
        """Rebind the host, empty the answer, and hand the worker the turn's variables (and a new context).
        A new context is also the one a restarted worker reloads.

        Raises:
            ConfigError: a value cannot be pickled.
        """
        self._host = host
        self._answer = ("", False)
        payload: dict[str, Any] = {"values": values, "reset": True}
        if context is not KEEP:
            payload["context"] = context
            self._context_bytes = self._start_payload(context)
        await self._send_variables(payload)

    async def set_variables(self, values: dict[str, Any]) -> None:
        """Put ``values`` into the worker's REPL (pickled into its workdir); the answer draft is kept.

        Raises:
            ConfigError: a value cannot be pickled.
        """
        await self._send_variables({"values": values, "reset": False})

    async def unready(self) -> None:
        """Set ``answer["ready"]`` back to False in the worker, keeping the draft."""
        self._answer = (self._answer[0], False)
        await self._send_variables({"values": {}, "reset": False, "unready": True})

    async def _send_variables(self, payload: dict[str, Any]) -> None:
        try:
            data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise ConfigError(f"values for the REPL cannot be sent: {type(exc).__name__}: {exc}") from exc
        worker = await self._live()
        (Path(worker.spool) / "work" / _TURN_FILE).write_bytes(data)
        try:
            await self._exchange({"op": "turn", "file": _TURN_FILE}, "turned")
        except _WorkerGone as gone:
            await self._restart(gone.note)

    async def final_var(self, name: str) -> str | None:
        """``str()`` of the REPL variable ``name`` in the worker, or None (also when the worker cannot say)."""
        try:
            reply = await self._exchange({"op": "get_var", "name": name}, "var")
        except _WorkerGone as gone:
            await self._restart(gone.note)
            return None
        text: str | None = reply["text"]
        return text

    # -- running cells --------------------------------------------------------------------------------
    async def run_cell(self, code: str) -> CellResult:
        """Run one cell in the worker. Model errors come back in ``CellResult.error``; a timeout or a crash
        comes back as a note (the worker is replaced); cancellation kills the worker and propagates."""
        try:
            done = await self._exchange({"op": "cell", "code": code}, "done")
        except _WorkerGone as gone:
            note = await self._restart(gone.note)
            return CellResult("", None, (note,), timed_out=gone.timed_out, restarted=True)
        self._answer = (done["answer"]["content"], done["answer"]["ready"])
        # The worker cuts its output to max_output_chars (plus its note on the cut), but it is not trusted
        # to: cut again here, leaving room for that note.
        cap = self._max_output_chars + 500
        error = None if done["error"] is None else capped(done["error"], cap)
        notes = tuple(capped(note, 1000) for note in done["notes"][:20])
        variables = tuple(name[:100] for name in done.get("variables", [])[:200])
        return CellResult(capped(done["output"], cap), error, notes, variables=variables)

    async def _exchange(self, request: dict[str, Any], reply_op: str) -> dict[str, Any]:
        """Send one request and serve the worker's sub-calls until its reply arrives.

        Raises:
            _WorkerGone: the worker died, broke the protocol or ran past ``cell_timeout_s`` (it is killed).
        """
        worker = await self._live()
        request_id = next(self._ids)
        reply: dict[str, Any] | None = None
        broken: BaseException | None = None
        calls = anyio.Semaphore(_CALLS_PER_WORKER)
        deadline = CellDeadline(self._cell_timeout_s)  # stops while the cell's sub-calls are in flight
        try:
            with deadline.scope:
                async with anyio.create_task_group() as tg:
                    try:
                        await worker.send({**request, "id": request_id})
                        while reply is None:
                            message = await worker.receive()
                            if message["op"] == "call":
                                await calls.acquire()  # backpressure: no more reading until a call ends
                                deadline.call_started()
                                tg.start_soon(self._serve_call, worker, message, calls, deadline)
                            elif message["op"] == "answer":
                                self._answer = (message["content"], message["ready"])
                            elif message["op"] == reply_op and message["id"] == request_id:
                                reply = message
                    except (asyncio.IncompleteReadError, ConnectionError, _wire.ProtocolError) as exc:
                        broken = exc
                    tg.cancel_scope.cancel()  # sub-calls still running belong to the finished cell
        except BaseException:
            await worker.kill()  # cancelled: the cell and its worker end now
            raise
        if broken is not None:
            if isinstance(broken, _wire.ProtocolError) or worker.violation:
                await worker.kill()
                why = worker.violation or str(broken)
                raise _WorkerGone(f"the REPL worker broke the message protocol ({why}) and was killed")
            with anyio.move_on_after(_EXIT_GRACE_S):  # it closed the channel: let it exit with its own status
                await worker.proc.wait()
            await worker.kill()
            await worker.proc.settle()
            reason = worker.crash_reason()
            raise _WorkerGone(f"the REPL worker died ({worker.exit_description()})" + (f": {reason}" if reason else ""))
        if reply is None:
            await worker.kill()
            raise _WorkerGone(f"the cell was killed after {self._cell_timeout_s:g} s", timed_out=True)
        return reply

    async def _serve_call(
        self, worker: _Worker, message: dict[str, Any], calls: anyio.Semaphore, deadline: CellDeadline
    ) -> None:
        """Run one sub-call from the worker through the host and send the reply. Budget refusals and engine
        errors go back as typed errors; cancellation (the cell ended) sends nothing."""
        try:
            reply = await self._call_host(message)
        finally:
            calls.release()
            deadline.call_ended()
        with contextlib.suppress(ConnectionError, _wire.ProtocolError):
            worker.send_reply(reply)

    async def _call_host(self, message: dict[str, Any]) -> dict[str, Any]:
        method, args = message["method"], message["args"]
        reply: dict[str, Any]
        try:
            if method == "budget":
                value: Any = self._host.budget()
            elif method == "rlm_batch":
                contexts = [_wire.decode_value(c) for c in args[1]]
                value = await self._host.rlm_batch(args[0], contexts, args[2])
            elif method == "tool":
                result = await self._host.tool(args[0], _wire.decode_value(args[1]), _wire.decode_value(args[2]))
                try:
                    value = _wire.encode_value(result)
                except TypeError as exc:
                    raise ToolError(f"tool {args[0]!r} returned what cannot reach the REPL: {exc}") from None
            else:
                value = await self._host.llm_batch(*args)
            reply = {"op": "reply", "id": message["id"], "ok": True, "value": value}
        except BudgetExceeded as exc:
            error = {
                "type": "BudgetExceeded", "message": str(exc), "limit": exc.limit, "cap": exc.cap,
                "used": exc.used, "results": list(exc.results),
            }  # fmt: skip
            reply = {"op": "reply", "id": message["id"], "ok": False, "error": error}
        except ToolError as exc:
            error = {"type": "ToolError", "message": str(exc)}
            reply = {"op": "reply", "id": message["id"], "ok": False, "error": error}
        except (ConfigError, _wire.ProtocolError) as exc:
            reply = {"op": "reply", "id": message["id"], "ok": False, "error": {"type": "Error", "message": str(exc)}}
        return reply


#: Reapers of workers whose start outlived their REPL (strong references, so none is collected half-way).
_REAPERS: set[asyncio.Task[None]] = set()


def _reap_when_started(starting: asyncio.Task[_Worker]) -> asyncio.Task[None]:
    """Discard the worker ``starting`` makes once it has started (a failed start cleaned up itself); returns
    the reaper."""

    async def reap() -> None:
        try:
            worker = await asyncio.shield(starting)  # a reaper cancelled at the loop's end leaves the start be
        except BaseException:
            return
        await _discard(worker)

    reaper = asyncio.get_running_loop().create_task(reap(), name=f"{starting.get_name()}-reaper")
    _REAPERS.add(reaper)
    reaper.add_done_callback(_REAPERS.discard)
    return reaper


async def reap_pending() -> None:
    """Wait until the workers whose start outlived their REPL on this event loop are discarded (what
    ``RLM.aclose`` waits for, so that no start is left for the loop's shutdown to cut short)."""
    loop = asyncio.get_running_loop()
    pending = [reaper for reaper in _REAPERS if reaper.get_loop() is loop]
    if pending:
        with anyio.CancelScope(shield=True):
            await asyncio.wait(pending)


async def _discard(worker: _Worker) -> None:
    """Kill a worker and delete its spool (workdir and stderr log) off the event loop; shielded, as it runs
    when a run is cancelled or timed out (anyio's ``to_thread`` refuses to start in a cancelled scope: every
    such run left its worker's spool, whatever model code had written there, until the engine exited)."""
    with anyio.CancelScope(shield=True):
        await worker.kill()
        await anyio.to_thread.run_sync(remove_tree, worker.spool)
