"""Confinement a REPL worker applies to itself, after it starts and before it reads any model code.

Standard library only at import; landlockpy is imported when its layer is asked for. The worker loads this
file by path. Each function raises when its layer cannot be applied, and the
worker then refuses to start (the engine fails closed), except where the engine asked for best effort.

Layers, in the order the worker applies them:

- :func:`apply_rlimits`: address space, CPU seconds, file size, open files, core dumps (and processes inside
  a user namespace, where the count starts at zero).
- :func:`apply_landlock`: read-only access to the interpreter's files, read-write only in the workdir, no
  ``execve`` anywhere; no TCP bind or connect; no abstract Unix sockets or signals outside the worker.
- :func:`load_seccomp`: the syscall filter the engine compiled with libseccomp (``_layers.DENIED_SYSCALLS``:
  no sockets, no new processes, no ``execve``, no ptrace, mount, bpf, keyctl, namespaces).
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Iterable
from typing import Any

__all__ = ["apply_landlock", "apply_rlimits", "load_seccomp", "set_parent_death_signal"]


_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


def set_parent_death_signal() -> None:
    """Ask the kernel to SIGKILL this process when its parent (the engine) dies, so a worker never outlives
    its engine. Exits at once when the parent is already gone."""
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getppid()
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os._exit(1)


def apply_rlimits(limits: dict[str, Any]) -> list[str]:
    """Set the worker's resource limits (soft and hard, so model code cannot raise them again).

    Args:
        limits: ``{"as": bytes, "cpu": seconds, "fsize": bytes, "nofile": count, "nproc": count | None,
            "core": bytes}``; a None value leaves that limit as it was.

    Returns:
        The names of the limits set.
    """
    names = {
        "as": resource.RLIMIT_AS,
        "cpu": resource.RLIMIT_CPU,
        "fsize": resource.RLIMIT_FSIZE,
        "nofile": resource.RLIMIT_NOFILE,
        "nproc": resource.RLIMIT_NPROC,
        "core": resource.RLIMIT_CORE,
    }
    applied = []
    for key, which in names.items():
        value = limits.get(key)
        if value is None:
            continue
        _, hard = resource.getrlimit(which)
        new = int(value) if hard == resource.RLIM_INFINITY else min(int(value), hard)
        resource.setrlimit(which, (new, new))
        applied.append(key)
    return applied


def apply_landlock(read_paths: Iterable[str], write_paths: Iterable[str]) -> list[str]:
    """Restrict this process and its future threads with Landlock (landlockpy), best effort over the ABI.

    Filesystem: every access right the kernel knows is handled; ``read_paths`` get read access (files and
    directories), ``write_paths`` get everything but ``execve``. Network (ABI >= 4): TCP bind and connect
    are handled with no port allowed. Scopes (ABI >= 6): abstract Unix sockets and signals outside this
    domain.

    Returns:
        The sub-layers enforced, e.g. ``["landlock-fs", "landlock-net", "landlock-scope"]``.

    Raises:
        OSError: the kernel has no Landlock (ABI 0) or refused the ruleset.
    """
    import landlockpy
    from landlockpy import AccessFS, Ruleset, Scope

    abi = landlockpy.abi_version()
    if abi < 1:
        raise OSError(errno.EOPNOTSUPP, "Landlock is not available in this kernel")
    read = AccessFS.READ_FILE | AccessFS.READ_DIR
    write = landlockpy.fs_for_abi(abi) & ~AccessFS.EXECUTE
    with Ruleset(scoped=Scope.ABSTRACT_UNIX_SOCKET | Scope.SIGNAL) as ruleset:
        for path in read_paths:
            if os.path.exists(path):
                # A file (not a directory) takes file rights only.
                ruleset.allow_path(path, read if os.path.isdir(path) else AccessFS.READ_FILE)
        for path in write_paths:
            ruleset.allow_path(path, write)
        ruleset.restrict()
        layers = ["landlock-fs"]
        if ruleset.handled_net:
            layers.append("landlock-net")
        if ruleset.scoped:
            layers.append("landlock-scope")
    return layers


def load_seccomp(bpf: bytes) -> list[str]:
    """Load a compiled seccomp filter (classic BPF, as libseccomp exports it) into this process, after
    setting ``no_new_privs``. Threads started later inherit it; call before any other thread exists.

    Returns:
        ``["seccomp"]``.

    Raises:
        OSError: the kernel refused the filter.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")

    class SockFprog(ctypes.Structure):
        _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_char_p))

    if len(bpf) % 8:
        raise OSError(errno.EINVAL, "a BPF program is a whole number of 8-byte instructions")
    prog = SockFprog(len(bpf) // 8, bpf)
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")
    return ["seccomp"]
