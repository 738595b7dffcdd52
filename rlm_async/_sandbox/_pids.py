"""A pids cgroup around each zygote (or spawned worker) when the engine runs as root.

``Sandbox.processes`` is applied as RLIMIT_NPROC, but the kernel never applies that limit to a process whose
real user is root in the initial user namespace (``kernel/fork.c``, ``copy_process``: the check is skipped for
``INIT_USER`` and for ``CAP_SYS_RESOURCE`` / ``CAP_SYS_ADMIN``), and bwrap's user namespace maps the
sandbox's user to the engine's. A red-team cell with ``threading.stack_size(32768)`` took the host to 17,481
threads that way (docs/security.md). The pids controller counts every task of a cgroup, threads included,
whoever owns it, and refuses a ``fork``/``clone`` past ``pids.max`` (the kernel's
``Documentation/admin-guide/cgroup-v1/pids.rst``; ``cgroup-v2.rst``, "PID").

The cgroup is made under the engine's own, in the pids hierarchy (cgroup v1) or in the unified one where its
``cgroup.subtree_control`` already enables ``pids`` (cgroup v2). The zygote joins it before bwrap starts:
``/bin/sh`` writes its own pid to ``cgroup.procs``, then ``exec``s the real command, so every process the
sandbox ever starts is born inside. Model code cannot leave it under ``"strict"`` (bwrap shows it no
``/sys``, Landlock refuses writes outside its workdir); under ``"process"`` a root worker is not confined
anyway. Where no such cgroup can be made (no writable hierarchy, as on most systemd hosts), the engine runs
as before and ``rlm-async doctor`` says why.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import signal
import time
from pathlib import Path

__all__ = ["PidsCgroup", "pids_parent"]

#: How long :meth:`PidsCgroup.close` waits for the killed tasks to be reaped, in seconds.
CLOSE_WAIT_S = 5.0
#: An empty cgroup of ours older than this is a dead engine's, and is removed (a live one is empty only for
#: the moment between its ``mkdir`` and the shell joining it, or once it is closed).
STALE_AFTER_S = 60.0
_PREFIX = "rlm-async-"
#: Parents whose stale cgroups this process has removed (once each).
_swept: set[Path] = set()


@functools.cache
def pids_parent() -> tuple[Path | None, str]:
    """The cgroup folder under which this process can make pids cgroups, or (None, why not).

    Only when the engine runs as root: otherwise RLIMIT_NPROC applies and nothing is needed. The folder is
    tried for real (a cgroup made, its ``pids.max`` written, removed). Cached: the answer does not change
    while the process lives.
    """
    if os.geteuid() != 0:
        return None, "not needed: the engine is not root, so RLIMIT_NPROC applies"
    if not os.access("/bin/sh", os.X_OK):
        return None, "no /bin/sh to start the sandbox inside the cgroup"
    try:
        memberships = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError as exc:
        return None, f"cannot read this process's cgroups: {exc}"
    entries = [fields for line in memberships if len(fields := line.split(":", 2)) == 3]  # hierarchy:controllers:path
    v1 = {path for _, controllers, path in entries if "pids" in controllers.split(",")}
    v2 = {path for hierarchy, controllers, path in entries if (hierarchy, controllers) == ("0", "")}
    why = "no pids cgroup this process may create children in (cgroup v1 pids, or v2 with pids delegated)"
    for line in mounts:
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        mount_root, mount_point = _unescape(fields[3]), _unescape(fields[4])
        fstype, options = fields[dash + 1], fields[-1].split(",")
        paths = v1 if fstype == "cgroup" and "pids" in options else v2 if fstype == "cgroup2" else set()
        for path in paths:
            inside = path == mount_root or path.startswith(mount_root.rstrip("/") + "/")
            if not inside or "/.." in path:  # outside this mount, or outside our cgroup namespace's root
                continue
            folder = Path(mount_point, os.path.relpath(path, mount_root))
            if fstype == "cgroup2" and not _enables_pids(folder):
                continue
            try:
                PidsCgroup.create(folder, 1).close()
            except OSError as exc:
                why = f"cannot make a pids cgroup in {folder}: {exc}"
                continue
            return folder, ""
    return None, why


def _unescape(field: str) -> str:
    """A mountinfo path with its octal escapes (``\\040`` for a space) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def _enables_pids(folder: Path) -> bool:
    try:
        return "pids" in (folder / "cgroup.subtree_control").read_text().split()
    except OSError:
        return False


def _remove_stale(parent: Path) -> None:
    """Remove our empty cgroups older than :data:`STALE_AFTER_S` (left by engines that were killed)."""
    now = time.time()
    for child in parent.glob(f"{_PREFIX}*"):
        with contextlib.suppress(OSError):
            if now - child.stat().st_mtime > STALE_AFTER_S:
                child.rmdir()  # refused while any task is in it


class PidsCgroup:
    """One pids cgroup with its limit, for the processes one command starts.

    Raises:
        OSError: from :meth:`create`, when the folder or its limit cannot be written.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, parent: Path, limit: int) -> PidsCgroup:
        """A new cgroup under ``parent`` that lets ``limit`` tasks (processes and threads) live at once. Its
        name is random: engines in other pid namespaces may share ``parent``."""
        if parent not in _swept:
            _swept.add(parent)
            _remove_stale(parent)
        path = parent / f"{_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        path.mkdir()
        try:
            (path / "pids.max").write_text(str(limit))
        except OSError:
            path.rmdir()
            raise
        return cls(path)

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` started inside this cgroup: a shell that moves itself in, then becomes ``argv``."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *argv]

    def tasks(self) -> list[int]:
        """The pids in it now (the engine's view)."""
        try:
            return [int(pid) for pid in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def close(self) -> None:
        """Kill whatever is still in it and remove it. Blocks up to :data:`CLOSE_WAIT_S` while the killed
        tasks are reaped; a cgroup still busy then is left (a later engine removes it once it is empty and
        stale). Idempotent."""
        deadline = time.monotonic() + CLOSE_WAIT_S
        while self.path.exists():
            self._kill_all()
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.01)  # the kernel reaps killed tasks on its own time; nothing to wait on

    def _kill_all(self) -> None:
        """SIGKILL every task in it: ``cgroup.kill`` where the kernel has it (v2, 5.14+), else each pid through
        a pidfd taken while the pid is still listed here, so a pid reused by another process is not hit."""
        with contextlib.suppress(FileNotFoundError):
            if (self.path / "cgroup.kill").exists():
                (self.path / "cgroup.kill").write_text("1")
                return
        pidfds: dict[int, int] = {}
        for pid in self.tasks():
            with contextlib.suppress(OSError):  # gone already
                pidfds[pid] = os.pidfd_open(pid)
        try:
            listed = set(self.tasks())  # listed after its pidfd was taken: the pidfd is this cgroup's task
            for pid, pidfd in pidfds.items():
                if pid in listed:
                    with contextlib.suppress(OSError):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        finally:
            for pidfd in pidfds.values():
                os.close(pidfd)
