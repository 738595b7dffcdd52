"""The REPL worker process: one per agent, started by the engine as ``python -I -B _worker.py CONFIG``.

It never imports the engine: it loads its sibling files (``_wire``, ``_cell``, ``_functions``) and the
confinement code (``../_sandbox/_confine.py``) by path, so neither the engine's client nor a key ever exists
in this process. Start-up, before any model code:

1. read CONFIG (JSON: the socket fd, the workdir, the context file, the layers to apply, the rlimits);
2. ask to be killed with the engine (PR_SET_PDEATHSIG), load ``context`` from the workdir and delete the file;
3. confine itself: rlimits, then Landlock, then the seccomp filter the engine compiled (last: it forbids
   ``execve``, so it cannot be loaded before the interpreter starts);
4. send ``ready`` with the layers applied; the engine refuses a worker that applied fewer than it asked for.

Then it serves the engine: a reader thread takes replies to sub-calls (they complete futures that model code
waits on) and queues ``cell`` and ``get_var`` requests for the main thread, which runs them one at a time.
``sys.stdout`` and ``sys.stderr`` are captured while a cell runs, so ``print``, ``pprint``,
``sys.stdout.write``, warnings and tracebacks all reach the model, cut to ``max_output_chars``.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import faulthandler
import importlib.util
import inspect
import itertools
import json
import os
import pickle
import queue
import random
import signal
import socket
import sys
import threading
import traceback
from concurrent.futures import Future
from pathlib import Path
from types import ModuleType
from typing import Any

_HERE = Path(__file__).resolve().parent
_KEEP = object()  # a turn that brings no new context


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickle look modules up by name
    spec.loader.exec_module(module)
    return module


class BudgetExceeded(Exception):
    """A cap of the run refused work. ``limit``: the Limits field; ``results``: a cut batch's outcomes."""

    def __init__(self, message: str, limit: str, cap: Any, used: Any, results: list[Any]) -> None:
        super().__init__(message)
        self.limit = limit
        self.cap = cap
        self.used = used
        self.results = results


class SubcallError(Exception):
    """The engine refused or could not run a request from this REPL (not a model answer)."""


class ToolError(Exception):
    """A custom tool raised, is unknown, or returned a value that cannot reach the REPL."""


class AnswerDict(dict[str, Any]):
    """The ``answer`` dict of model code: each change is reported to the engine at once, so a draft survives
    a cell that is killed or cancelled after writing it."""

    def __init__(self, on_change: Any, content: str) -> None:
        super().__init__(content=content, ready=False)
        self._on_change = on_change

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self._on_change()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._on_change()

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self._on_change()


class Worker:
    """The worker's state: the channel, the namespace and the pending sub-calls."""

    def __init__(
        self,
        sock: socket.socket,
        context: Any,
        values: dict[str, Any],
        config: dict[str, Any],
        mods: dict[str, ModuleType],
    ) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()
        self._wire, self._cell = mods["wire"], mods["cell"]
        self._pending: dict[int, Future[Any]] = {}
        self._ids = itertools.count(1)
        self._inbox: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._max_output_chars = int(config["max_output_chars"])
        self._name = str(config["name"])
        self._cells = itertools.count(1)
        self._out = self._cell.CappedText(self._max_output_chars)
        self._real_streams = (sys.stdout, sys.stderr)
        self.ns: dict[str, Any] = {}
        self._answer = AnswerDict(self._answer_changed, str(config.get("answer", "")))
        self._fns = mods["functions"].ReplFunctions(
            self._submit, self._call, self.ns, BudgetExceeded, self._answer, ToolError
        )
        self.ns.update(self._fns.build(context, config.get("tools", ()), values))
        self.ns.update({"__name__": "__main__", "__builtins__": builtins, self._cell.SHOW: self._show})

    # -- the channel ----------------------------------------------------------------------------------
    def send(self, message: dict[str, Any]) -> None:
        data = self._wire.frame(message)
        with self._send_lock:
            self._sock.sendall(data)

    def _recv_exact(self, n: int) -> bytes:
        chunks, left = [], n
        while left:
            chunk = self._sock.recv(min(left, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def reader(self) -> None:
        """Read the engine's messages until the channel closes; then end the process."""
        try:
            while True:
                n = self._wire.frame_length(self._recv_exact(4), self._wire.ENGINE_FRAME_BYTES)
                message = self._wire.parse_frame(self._recv_exact(n))
                if message["op"] == "reply":
                    self._resolve(message)
                else:
                    self._inbox.put(message)
        except BaseException:  # EOF, a broken channel or a bad frame: the engine is gone or done with us
            pass
        os._exit(0)

    def _resolve(self, message: dict[str, Any]) -> None:
        future = self._pending.pop(message["id"], None)
        if future is None or future.done():
            return
        if message.get("ok"):
            future.set_result(message.get("value"))
            return
        error = message.get("error") or {}
        if error.get("type") == "ToolError":
            future.set_exception(ToolError(error.get("message", "")))
        elif error.get("type") == "BudgetExceeded":
            future.set_exception(
                BudgetExceeded(
                    error.get("message", ""),
                    error.get("limit", ""),
                    error.get("cap"),
                    error.get("used"),
                    list(error.get("results") or []),
                )
            )
        else:
            future.set_exception(SubcallError(error.get("message", "the engine refused the request")))

    def _submit(self, method: str, *args: Any) -> Future[Any]:
        if method == "rlm_batch":
            queries, contexts, model = args
            args = (queries, [self._wire.encode_value(c) for c in contexts], model)
        elif method == "tool":
            name, tool_args, tool_kwargs = args
            args = (name, self._wire.encode_value(tool_args), self._wire.encode_value(tool_kwargs))
            future = self._new_call(method, args)
            decoded: Future[Any] = Future()

            def decode(done: Future[Any]) -> None:
                if done.exception() is not None:
                    decoded.set_exception(done.exception())
                else:
                    decoded.set_result(self._wire.decode_value(done.result()))

            future.add_done_callback(decode)
            return decoded
        return self._new_call(method, args)

    def _new_call(self, method: str, args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        call_id = next(self._ids)
        self._pending[call_id] = future
        self.send({"op": "call", "id": call_id, "method": method, "args": list(args)})
        return future

    def _call(self, method: str) -> Any:
        return self._submit(method).result()

    # -- serving ---------------------------------------------------------------------------------------
    def serve(self) -> None:
        while (message := self._inbox.get()) is not None:
            if message["op"] == "cell":
                self.send(self._run_cell(message["id"], message["code"]))
            elif message["op"] == "get_var":
                self.send({"op": "var", "id": message["id"], "text": self._var_text(message["name"])})
            elif message["op"] == "turn":
                self._next_turn(message["file"])
                self.send({"op": "turned", "id": message["id"]})

    def _next_turn(self, file: str) -> None:
        """A session's next turn: the engine pickled its variables (and maybe a new context) into ``file``."""
        path = Path(file)
        with open(path, "rb") as f:
            payload = pickle.load(f)  # written by the engine (trusted)
        path.unlink()
        self.ns.update(payload["values"])
        if payload.get("reset"):
            self._fns.next_turn(payload.get("context", _KEEP), _KEEP)
            self._answer_changed()
        elif payload.get("unready"):  # the engine refused a finish: the draft stays, ready goes (reported)
            self._answer["ready"] = False

    def _var_text(self, name: str) -> str | None:
        try:
            text: str | None = self._fns.variable_text(name)
        except Exception as exc:
            return f"<str() of {name} failed: {type(exc).__name__}: {exc}>"
        return text

    def _run_cell(self, cell_id: int, code: str) -> dict[str, Any]:
        self._out = out = self._cell.CappedText(self._max_output_chars)
        filename = f"<cell {self._name}#{next(self._cells)}>"
        error: str | None = None
        sys.stdout = sys.stderr = out
        try:
            try:
                compiled = self._cell.compile_cell(code, filename)
            except SyntaxError as exc:
                error = "".join(traceback.format_exception_only(exc))
            else:
                try:
                    if compiled.co_flags & inspect.CO_COROUTINE:
                        with asyncio.Runner() as runner:
                            runner.run(eval(compiled, self.ns))
                    else:
                        exec(compiled, self.ns)
                except BaseException as exc:  # SystemExit and KeyboardInterrupt too: the REPL lives on
                    error = self._cell.format_traceback(exc, filename)
        finally:
            sys.stdout, sys.stderr = self._real_streams
        notes = list(self._fns.restore_reserved())
        if note := self._fns.unawaited_note():
            notes.append(note)
        # Everything but the answer is cut as the engine would cut it (and to a quarter of a frame at most);
        # the answer gets what is left of the frame.
        wire, quarter = self._wire, self._wire.MAX_FRAME_BYTES // 4
        if error is not None:
            error = wire.fit(self._cell.capped(error, self._max_output_chars), quarter)[0]
        message: dict[str, Any] = {
            "op": "done", "id": cell_id, "output": wire.fit(out.render(), quarter)[0], "error": error,
            "notes": [note[:1000] for note in notes[:19]],
            "variables": [name[:100] for name in self._fns.user_variables()[:200]],
        }  # fmt: skip
        room = wire.MAX_FRAME_BYTES - wire.encoded_size(message) - _FRAME_SLACK
        message["answer"] = self._answer_state(message["notes"], room)
        return message

    def _answer_state(self, notes: list[str], budget: int) -> dict[str, Any]:
        """``answer`` as plain data: content coerced to str (whole when its JSON fits ``budget`` bytes, else
        its longest prefix that does, with a note), ready to bool."""
        content = self._answer.get("content", "")
        try:
            content = "" if content is None else str(content)
        except Exception as exc:
            notes.append(f'str() of answer["content"] failed: {type(exc).__name__}: {exc}')
            content = ""
        fitted, whole = self._wire.fit(content, budget)
        if not whole:
            notes.append(
                f'answer["content"] was cut to {len(fitted):,} of its {len(content):,} characters (the REPL '
                f"sends at most {self._wire.MAX_FRAME_BYTES:,} bytes a message)"
            )
        return {"content": fitted, "ready": bool(self._answer.get("ready"))}

    def _answer_changed(self) -> None:
        self.send({"op": "answer", **self._answer_state([], self._wire.MAX_FRAME_BYTES - _FRAME_SLACK)})

    def _show(self, value: Any) -> None:
        self._cell.show_value(self._out, value)


#: Bytes of a frame kept for a message's own fields and framing.
_FRAME_SLACK = 4096
#: Exit statuses the zygote keeps for workers whose status the engine has not asked for (discarded ones):
#: about 0.2 MB at most, for a zygote that lives as long as the engine.
STATUSES_KEPT = 1024


def run_worker(config: dict[str, Any], sock: socket.socket, confine: ModuleType, mods: dict[str, ModuleType]) -> None:
    """Load the context, confine this process, say ``ready``, then serve cells until the engine hangs up."""
    context_path = Path(config["workdir"]) / config["context_file"]
    with open(context_path, "rb") as f:
        payload = pickle.load(f)  # written by the engine (trusted), before any model code ran here
    context_path.unlink()
    if config.get("answer_file"):  # a restarted worker's answer draft (a file: it can be long)
        answer_path = Path(config["workdir"]) / config["answer_file"]
        config["answer"] = answer_path.read_text(encoding="utf-8", errors="surrogatepass")
        answer_path.unlink()
    layers = ["env", *confine.apply_rlimits(config["rlimits"])]
    if config.get("bwrap"):
        layers.append("bwrap")
    if config.get("pids_cgroup"):
        layers.append("pids_cgroup")
    if config.get("landlock"):
        layers += confine.apply_landlock(config["read_paths"], [config["workdir"]])
    if config.get("seccomp_bpf"):
        layers += confine.load_seccomp(bytes.fromhex(config["seccomp_bpf"]))
    if "as" in layers:
        layers.append("rlimits")
    worker = Worker(sock, payload["context"], payload["values"], config, mods)
    worker.send({"op": "ready", "version": mods["wire"].PROTOCOL_VERSION, "pid": os.getpid(), "layers": layers})
    threading.Thread(target=worker.reader, name="rlm-worker-reader", daemon=True).start()
    worker.serve()


class Zygote:
    """The template process: everything a worker needs is imported once, and each worker is a fork of it.

    It never runs model code and never sees a key (it was started like a worker, with the allowlisted
    environment). It reads fork requests from its control socket (SOCK_SEQPACKET): one message of JSON
    config with the new worker's channel fd attached (SCM_RIGHTS). It forks; the child confines itself and
    becomes the worker (:func:`run_worker`); the zygote answers with the child's pid and a pidfd for it, so
    the engine can kill the worker and see it exit. It reaps its children and keeps each one's wait status
    until the engine asks for it (a message ``{"op": "status", "spool": ...}``, answered ``{"status": ...}``,
    null while the worker is not reaped yet); it keeps the last :data:`STATUSES_KEPT` nobody asked for. It never
    writes in a worker's spool: a status file written there could land while the engine removed the folder,
    and leave it behind. The zygote is single-threaded, so forking is safe.
    """

    def __init__(self, config: dict[str, Any], confine: ModuleType, mods: dict[str, ModuleType]) -> None:
        self._control = socket.socket(fileno=int(config["fd"]))
        self._base = config
        self._confine = confine
        self._mods = mods
        self._spools: dict[int, str] = {}  # pid -> its spool, until reaped
        self._statuses: collections.OrderedDict[str, int] = collections.OrderedDict()  # spool -> wait status
        signal.signal(signal.SIGCHLD, self._reap)

    def _reap(self, signum: int, frame: Any) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            spool = self._spools.pop(pid, None)
            if spool is not None:
                self._statuses[spool] = status
                while len(self._statuses) > STATUSES_KEPT:  # workers discarded without asking
                    self._statuses.popitem(last=False)

    def serve(self) -> None:
        self._control.send(json.dumps({"op": "ready", "pid": os.getpid()}).encode())
        while True:
            data, fds, _flags, _addr = socket.recv_fds(self._control, 1 << 20, 1)
            if not data:
                os._exit(0)  # the engine is gone
            try:
                request = json.loads(data)
                if request.get("op") == "status":  # the signal handler runs between bytecodes: pop is atomic
                    for fd in fds:
                        os.close(fd)
                    status = self._statuses.pop(str(request.get("spool")), None)
                    self._control.send(json.dumps({"status": status}).encode())
                    continue
                pidfd = self._fork(request, fds)
            except Exception as exc:  # a bad request or a failed fork: say so, and stay up for the next
                for fd in fds:
                    os.close(fd)
                self._control.send(json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
                continue
            socket.send_fds(self._control, [b"{}"], [pidfd])
            os.close(pidfd)

    def _fork(self, request: dict[str, Any], fds: list[int]) -> int:
        """Fork one worker on the channel in ``fds``; returns a pidfd for it."""
        if len(fds) != 1:
            raise ValueError(f"a fork request carries one channel fd, got {len(fds)}")
        config = {**self._base, **request}
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # the child is reaped after pidfd_open
        try:
            pid = os.fork()
            if pid == 0:
                self._become_worker(config, fds[0])
            self._spools[pid] = config["spool"]
            return os.pidfd_open(pid)
        finally:
            os.close(fds[0])
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})

    def _become_worker(self, config: dict[str, Any], fd: int) -> None:
        status = 1
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            self._control.close()
            os.setsid()
            _set_name(b"rlm-worker")
            _redirect_output(Path(config["spool"]) / "stderr.log")
            self._confine.set_parent_death_signal()
            random.seed()  # not the zygote's state, shared by every fork
            os.chdir(config["workdir"])
            os.environ.update(HOME=config["workdir"], TMPDIR=config["workdir"], PWD=config["workdir"])
            run_worker(config, socket.socket(fileno=fd), self._confine, self._mods)
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)


def _set_name(name: bytes) -> None:
    """Name this process (``/proc/<pid>/comm``), so workers and the zygote can be told apart."""
    import ctypes

    ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # PR_SET_NAME


def _redirect_output(stderr_path: Path) -> None:
    """fd 1 to /dev/null and fd 2 to the worker's own log (faulthandler writes the crash reason there)."""
    null = os.open(os.devnull, os.O_WRONLY)
    log = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(null, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)


def main(argv: list[str]) -> None:
    config = json.loads(argv[1])
    faulthandler.enable()  # a crash (segfault, abort) leaves its reason on stderr for the engine to show
    confine = _load("_rlm_confine", _HERE.parent / "_sandbox" / "_confine.py")
    confine.set_parent_death_signal()
    mods = {
        "wire": _load("_rlm_wire", _HERE / "_wire.py"),
        "cell": _load("_rlm_cell", _HERE / "_cell.py"),
        "functions": _load("_rlm_functions", _HERE / "_functions.py"),
    }
    if config.get("mode") == "zygote":
        _set_name(b"rlm-zygote")
        confine.apply_rlimits({"nproc": config.get("nproc")})  # shared by every fork (Sandbox.processes)
        if config.get("landlock"):
            import landlockpy  # noqa: F401 - imported once here instead of in every worker
        Zygote(config, confine, mods).serve()
    else:
        _set_name(b"rlm-worker")
        run_worker(config, socket.socket(fileno=int(config["fd"])), confine, mods)


if __name__ == "__main__":
    main(sys.argv)
