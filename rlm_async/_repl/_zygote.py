"""Worker processes, engine side: how one is started, killed and waited for.

Two ways to start a worker, with one handle interface (:class:`WorkerProcess`):

- **forked from a zygote** (the default where Landlock can keep workers apart): a template process, started
  once per sandbox layout and kept for the life of the engine process, that has already imported everything a
  worker needs. Under ``"strict"`` it runs inside one bubblewrap sandbox (user, pid, net, ipc and mount
  namespaces); each fork then confines itself on its own (Landlock with only its own workdir writable, the
  seccomp filter, rlimits, its own session). A fork takes about 2 ms of the zygote's time instead of a new
  interpreter's 60-80 ms of imports (docs/security.md has the figures). The engine holds a pidfd for each
  worker, so it can kill it and see it exit even inside the zygote's pid namespace.
- **spawned** as a fresh ``python -I`` (under its own bubblewrap in ``"strict"``): where Landlock is missing,
  so that bubblewrap's mount namespace alone keeps each worker's files from its siblings.

The zygote never runs model code and never sees a key: it is started like a worker, with the allowlisted
environment, from a file that imports only the standard library.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Protocol

import anyio

from .._errors import WorkerError
from .._sandbox._layers import WorkerPlan, bwrap_argv, nproc_limit, read_only_roots, worker_env
from .._sandbox._pids import PidsCgroup, pids_parent

__all__ = ["WorkerProcess", "new_spool", "remove_tree", "start_worker", "uses_zygote"]

WORKER_FILE = Path(__file__).resolve().parent / "_worker.py"
#: Seconds to wait for the zygote to record a dead worker's exit status (only to name it in a message).
_STATUS_WAIT_S = 2.0


class WorkerProcess(Protocol):
    """A running worker, however it was started."""

    @property
    def host_pid(self) -> int:
        """The worker's pid as this process sees it."""
        ...

    @property
    def returncode(self) -> int | None:
        """None while it runs (or while unknown); then the exit code, or minus the signal that killed it."""
        ...

    async def settle(self) -> None:
        """After :meth:`wait`: give the exit status up to 2 s to become known (a dead worker's message
        names it). Not needed before a kill, so a kill never waits on it."""
        ...

    def kill(self) -> None:
        """SIGKILL it (and its process group where it has one). Idempotent."""
        ...

    async def wait(self) -> None:
        """Return once it has exited."""
        ...


# -- spawned ---------------------------------------------------------------------------------------------
class _Spawned:
    def __init__(self, proc: asyncio.subprocess.Process, pids: PidsCgroup | None) -> None:
        self._proc = proc
        self._pids = pids

    @property
    def host_pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)  # its own session: bwrap, the worker, anything it started

    async def wait(self) -> None:
        await self._proc.wait()
        if self._pids is not None:
            await anyio.to_thread.run_sync(self._pids.close)

    async def settle(self) -> None:
        """The exit status is known once :meth:`wait` returns."""


async def spawn_worker(plan: WorkerPlan, config: dict[str, Any], spool: Path, channel: socket.socket) -> _Spawned:
    """Start a fresh interpreter as a worker (under its own bwrap where the plan has one)."""
    workdir = Path(config["workdir"])
    argv = [sys.executable, "-I", "-B", str(WORKER_FILE)]
    if plan.bwrap:
        argv = [*bwrap_argv(plan.bwrap, [str(workdir)], chdir=str(workdir)), "--", *argv]
    pids = new_pids_cgroup(plan)
    config = {**config, "rlimits": {**config["rlimits"], "nproc": nproc_limit(plan)}, "pids_cgroup": bool(pids)}
    argv = [*argv, json.dumps({**config, "fd": channel.fileno()})]
    try:
        with open(spool / "stderr.log", "wb") as stderr:  # noqa: ASYNC230 - a local file, handed to the child
            proc = await asyncio.create_subprocess_exec(
                *(pids.wrap(argv) if pids else argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                pass_fds=[channel.fileno()],
                env=worker_env(str(workdir)),
                cwd=workdir,
                start_new_session=True,
            )
    except BaseException:
        if pids is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(pids.close)
        raise
    return _Spawned(proc, pids)


def new_pids_cgroup(plan: WorkerPlan) -> PidsCgroup | None:
    """A pids cgroup of ``plan.sandbox.processes`` tasks, plus the zygote and bwrap's two processes, where the
    engine runs as root and may make one (:mod:`rlm_async._sandbox._pids`); else None: RLIMIT_NPROC then
    applies, or ``rlm-async doctor`` says why nothing does.

    Raises:
        WorkerError: the engine could make one when it first tried, and now cannot (fails closed).
    """
    parent, _why = pids_parent()
    if parent is None:
        return None
    try:
        return PidsCgroup.create(parent, plan.sandbox.processes + 1 + (2 if plan.bwrap else 0))
    except OSError as exc:
        raise WorkerError(f"cannot make the workers' pids cgroup in {parent}: {exc}") from None


# -- forked from a zygote --------------------------------------------------------------------------------
class _Forked:
    def __init__(self, pidfd: int, spool: Path, group: bool, zygote: Zygote) -> None:
        self._pidfd = pidfd
        self._spool = spool
        self._zygote = zygote
        self._group = group  # no pid namespace: the worker's pid is ours too, and it leads its own group
        self._host_pid = _pidfd_pid(pidfd)
        self._returncode: int | None = None
        self._exited = False

    @property
    def host_pid(self) -> int:
        return self._host_pid

    @property
    def returncode(self) -> int | None:
        return self._returncode

    def kill(self) -> None:
        if self._exited:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        if self._group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._host_pid, signal.SIGKILL)

    async def wait(self) -> None:
        if not self._exited:
            await _readable(self._pidfd)  # a pidfd turns readable when its process exits
            self._exited = True
            os.close(self._pidfd)

    async def settle(self) -> None:
        """The zygote reaps the worker and keeps its wait status until asked: ask, up to 2 s."""
        status = None
        with anyio.move_on_after(_STATUS_WAIT_S):
            # The zygote reaps on its SIGCHLD, which gives this process no event to wait on: poll. A zygote that
            # does not answer is abandoned at the deadline, not waited on.
            ask = functools.partial(self._zygote.status, str(self._spool))
            while (status := await anyio.to_thread.run_sync(ask, abandon_on_cancel=True)) is None:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        if status is not None:
            with contextlib.suppress(ValueError):
                self._returncode = os.waitstatus_to_exitcode(status)


def remove_tree(path: Path) -> None:
    """Delete a worker's spool even where model code took the permissions away (``chmod 0`` on a folder in
    its workdir: Landlock does not govern chmod): such a folder is given back u+rwx and tried again."""

    def retry(func: Any, failed: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(failed), 0o700)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, 0o700)
            func(failed)

    shutil.rmtree(path, onerror=retry)
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _pidfd_pid(pidfd: int) -> int:
    """The pid a pidfd refers to, in this process's pid namespace (``Pid:`` in its fdinfo)."""
    for line in Path(f"/proc/self/fdinfo/{pidfd}").read_text().splitlines():
        if line.startswith("Pid:"):
            return int(line.split()[1])
    return -1


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


class Zygote:
    """One template process and its control socket. Thread-safe; its calls block, so run them in a thread.

    Raises:
        WorkerError: from the constructor when the zygote does not start.
    """

    def __init__(self, plan: WorkerPlan) -> None:
        self.plan = plan
        self.spool = Path(tempfile.mkdtemp(prefix="rlm-zygote-"))
        self._lock = threading.Lock()
        self._control, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = {
            "mode": "zygote",
            "fd": child.fileno(),
            "bwrap": bool(plan.bwrap),
            "landlock": plan.landlock,
            "read_paths": read_only_roots() if plan.landlock else [],
            "seccomp_bpf": plan.seccomp_bpf.hex() if plan.seccomp_bpf is not None else None,
            "nproc": nproc_limit(plan),
        }
        self._pids: PidsCgroup | None = None
        try:
            self._pids = new_pids_cgroup(plan)
            config["pids_cgroup"] = bool(self._pids)  # every fork inherits the zygote's cgroup
            argv = [sys.executable, "-I", "-B", str(WORKER_FILE), json.dumps(config)]
            if plan.bwrap:
                argv = [*bwrap_argv(plan.bwrap, [str(self.spool)], chdir=str(self.spool)), "--", *argv]
            with open(self.spool / "zygote.log", "wb") as log:
                self._proc = subprocess.Popen(
                    self._pids.wrap(argv) if self._pids else argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    pass_fds=[child.fileno()],
                    env=worker_env(str(self.spool)),
                    cwd=self.spool,
                    start_new_session=True,
                )
        except BaseException:
            child.close()
            self._control.close()
            if self._pids is not None:
                self._pids.close()
            remove_tree(self.spool)
            raise
        child.close()
        self._control.settimeout(plan.sandbox.start_timeout_s)
        try:
            hello = self._control.recv(4096)
        except OSError:
            hello = b""
        if not hello:
            self.close()
            raise WorkerError(f"the REPL zygote did not start: {self._log_tail()}")
        self._control.settimeout(None)

    def _log_tail(self) -> str:
        try:
            return (self.spool / "zygote.log").read_text(errors="replace")[-800:].strip()
        except OSError:
            return ""

    def alive(self) -> bool:
        return self._proc.poll() is None

    def fork(self, channel: socket.socket, config: dict[str, Any]) -> tuple[int, bool]:
        """Ask for one worker on ``channel``; returns (a pidfd for it, whether to kill its group too).

        Raises:
            WorkerError: the zygote is gone or refused.
        """
        with self._lock:
            try:
                socket.send_fds(self._control, [json.dumps(config).encode()], [channel.fileno()])
                data, fds, _flags, _addr = socket.recv_fds(self._control, 4096, 1)
            except OSError as exc:
                raise WorkerError(f"the REPL zygote is gone: {exc}: {self._log_tail()}") from None
        if not data or not fds:
            why = data.decode(errors="replace") if data else self._log_tail()
            raise WorkerError(f"the REPL zygote did not fork a worker: {why}")
        return fds[0], not self.plan.bwrap

    def status(self, spool: str) -> int | None:
        """The wait status (``os.waitpid``'s) of the worker forked for ``spool``, once the zygote has reaped it;
        the zygote forgets it then. None before that, or when the zygote is gone."""
        with self._lock:
            try:
                self._control.send(json.dumps({"op": "status", "spool": spool}).encode())
                data = self._control.recv(4096)
            except OSError:
                return None
        try:
            status = json.loads(data).get("status") if data else None
        except (ValueError, AttributeError):
            return None
        return status if isinstance(status, int) and not isinstance(status, bool) else None

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        if self._pids is not None:
            self._pids.close()  # the workers forked into it, and anything they left
        self._control.close()
        remove_tree(self.spool)


_zygotes: dict[tuple[str, int, str | None, bool], Zygote] = {}
_zygotes_lock = threading.Lock()
_launcher: concurrent.futures.ThreadPoolExecutor | None = None


def _zygote_for(plan: WorkerPlan) -> Zygote:
    """The live zygote for ``plan``'s layout, started on first use (and again if it died).

    The zygote is started from one thread that lives as long as the process: the kernel's parent-death
    signal (the zygote's own, and bwrap's --die-with-parent) fires when the *thread* that started a process
    ends, so a zygote started from a pool thread would die when that thread retired.
    """
    global _launcher
    key = (plan.sandbox.level, plan.sandbox.processes, plan.bwrap, plan.landlock)  # processes: the zygote's own
    with _zygotes_lock:
        zygote = _zygotes.get(key)
        if zygote is None or not zygote.alive():
            if zygote is not None:
                zygote.close()
            if _launcher is None:
                _launcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rlm-zygote-launcher")
            zygote = _zygotes[key] = _launcher.submit(Zygote, plan).result()
        return zygote


@atexit.register
def _close_zygotes() -> None:
    with _zygotes_lock:
        for zygote in _zygotes.values():
            zygote.close()
        _zygotes.clear()


def uses_zygote(plan: WorkerPlan) -> bool:
    """Fork from a zygote unless the plan has bubblewrap but no Landlock: then only a mount namespace of its
    own keeps a worker's files from its siblings, so each worker is spawned in its own bwrap."""
    return plan.landlock or not plan.bwrap


async def new_spool(plan: WorkerPlan) -> Path:
    """A new, empty spool folder for one worker: inside the zygote's spool where the worker will be forked
    (the zygote's sandbox sees it at the same path), else in the system's temp folder."""
    if not uses_zygote(plan):
        return Path(tempfile.mkdtemp(prefix="rlm-repl-"))
    zygote = await anyio.to_thread.run_sync(_zygote_for, plan)
    return Path(tempfile.mkdtemp(prefix="w-", dir=zygote.spool))


async def start_worker(plan: WorkerPlan, config: dict[str, Any], channel: socket.socket) -> WorkerProcess:
    """Start one worker on ``channel`` with ``config`` (its ``spool`` and ``workdir`` made by
    :func:`new_spool`, the context file already in the workdir): forked from the zygote, or spawned.

    Closes ``channel`` once the worker has its end. When the start fails or is cancelled, it also removes the
    spool: at once, or, when a fork was already under way (a fork in a thread cannot be taken back), from that
    thread once the fork has finished, after killing the worker it made. The caller must not remove the spool
    itself then (it could remove it under a fork still writing there).

    Raises:
        WorkerError: the zygote did not start or did not fork.
        OSError: the interpreter or bwrap could not be started.
    """
    spool = Path(config["spool"])
    if not uses_zygote(plan):
        try:
            return await spawn_worker(plan, config, spool, channel)
        except BaseException:
            remove_tree(spool)
            raise
        finally:
            channel.close()
    try:
        zygote = await anyio.to_thread.run_sync(_zygote_for, plan)
    except BaseException:
        channel.close()
        remove_tree(spool)
        raise
    forking = _fork_pool().submit(zygote.fork, channel, config)
    try:
        pidfd, group = await asyncio.wrap_future(forking)
    except BaseException:
        forking.add_done_callback(lambda done: _undo_fork(done, channel, spool, zygote))  # now, or when it ends
        raise
    channel.close()
    return _Forked(pidfd, spool, group, zygote)


_forker: concurrent.futures.ThreadPoolExecutor | None = None


def _fork_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The thread that asks the zygotes for workers (their control sockets take one request at a time)."""
    global _forker
    with _zygotes_lock:
        if _forker is None:
            _forker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rlm-zygote-fork")
        return _forker


def _undo_fork(
    done: concurrent.futures.Future[tuple[int, bool]], channel: socket.socket, spool: Path, zygote: Zygote
) -> None:
    """A start that failed or was cancelled, once its fork has finished (in the fork's thread, or at once when
    it never ran): kill the worker it made, if any, close the channel and remove the spool. The zygote reaps
    the worker."""
    channel.close()
    if not done.cancelled() and done.exception() is None:
        pidfd, group = done.result()
        _Forked(pidfd, spool, group, zygote).kill()
        os.close(pidfd)
    remove_tree(spool)
