"""A pids cgroup around each zygote (or spawned worker) when the engine runs as root.

``Sandbox.processes`` is applied as RLIMIT_NPROC, but the kernel never applies that limit to a process whose
real user is root in the initial user namespace (``kernel/fork.c``, ``copy_process``: the check is skipped for
``INIT_USER`` and for ``CAP_SYS_RESOURCE`` / ``CAP_SYS_ADMIN``), and bwrap's user namespace maps the
sandbox's user to the engine's. A red-team cell with ``threading.stack_size(32768)`` took the host to 17,481
threads that way (docs/security.md). The pids controller counts every task of a cgroup, threads included,
whoever owns it, and refuses a ``fork``/``clone`` past ``pids.max`` (the kernel's
``Documentation/admin-guide/cgroup-v1/pids.rst``; ``cgroup-v2.rst``, "PID").

The cgroup is made next to the engine's own, in the pids hierarchy (cgroup v1) or in the unified one where
its ``cgroup.subtree_control`` already enables ``pids`` (cgroup v2). The zygote joins it before bwrap
starts: ``/bin/sh`` writes its own pid to ``cgroup.procs``, then ``exec``s the real command, so every
process the sandbox ever starts is born inside. Where no such cgroup can be made (no writable hierarchy,
as on most systemd hosts), the engine runs as before and ``rlm-async doctor`` says why.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import signal
import time
from pathlib import Path

__all__ = ["PidsCgroup", "pids_parent"]

#: Tasks that are not the workers' own: bwrap's two processes and the zygote.
OVERHEAD_TASKS = 3
#: How long :meth:`PidsCgroup.close` waits for the killed tasks to be reaped, in seconds.
CLOSE_WAIT_S = 5.0
_PREFIX = "rlm-async-"
_serial = itertools.count()


@functools.cache
def pids_parent() -> tuple[Path | None, str]:
    """The cgroup folder under which this process can make pids cgroups, or (None, why not).

    Only when the engine runs as root: otherwise RLIMIT_NPROC applies and nothing is needed. Cached: the
    answer does not change while the process lives.
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
    for line in mounts:
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        mount_root, mount_point, fstype, options = fields[3], fields[4], fields[dash + 1], fields[-1].split(",")
        paths = v1 if fstype == "cgroup" and "pids" in options else v2 if fstype == "cgroup2" else set()
        for path in paths:
            if path != mount_root and not path.startswith(mount_root.rstrip("/") + "/"):
                continue
            folder = Path(mount_point, os.path.relpath(path, mount_root))
            if fstype == "cgroup2" and not _enables_pids(folder):
                continue
            if os.access(folder, os.W_OK):
                _remove_stale(folder)
                return folder, ""
    return None, "no pids cgroup this process may create children in (cgroup v1 pids, or v2 with pids delegated)"


def _enables_pids(folder: Path) -> bool:
    try:
        return "pids" in (folder / "cgroup.subtree_control").read_text().split()
    except OSError:
        return False


def _remove_stale(parent: Path) -> None:
    """Remove the cgroups left by engines that died (their pid, in the name, is gone) and are empty."""
    for child in parent.glob(f"{_PREFIX}*"):
        pid = child.name[len(_PREFIX) :].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                child.rmdir()


class PidsCgroup:
    """One pids cgroup with its limit, for the processes one command starts.

    Raises:
        OSError: from :meth:`create`, when the folder or its limit cannot be written.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, parent: Path, limit: int) -> PidsCgroup:
        """A new cgroup under ``parent`` that lets ``limit`` tasks (processes and threads) live at once."""
        path = parent / f"{_PREFIX}{os.getpid()}-{next(_serial)}"
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
        tasks are reaped; a cgroup still busy then is left (the next engine's :func:`pids_parent` removes it
        once it is empty). Idempotent."""
        deadline = time.monotonic() + CLOSE_WAIT_S
        while self.path.exists():
            for pid in self.tasks():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.01)  # the kernel reaps killed tasks on its own time; nothing to wait on
