"""The hostile-code suite: model code tries what an attacker would, through the whole engine, and is stopped.

Each case runs model code in the default sandbox (``"strict"``) and checks three things: the attempt is
blocked, the outcome is typed and visible to the model (a Python error in the cell's output, or an engine
note), and the host is unaffected afterwards (a second completion in the same process works, the host's cwd
and streams are its own). docs/security.md names, for each layer, the test that tries to break it.

A case that needs a layer this machine lacks is skipped with the reason, unless ``RLM_ASYNC_REQUIRE_SANDBOX``
is set (``scripts/test`` sets it where ``rlm-async doctor`` finds every layer), where a missing layer fails.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from rlm_async import RLM, ConfigError, FakeClient, Limits, Sandbox, WorkerError
from rlm_async._sandbox import probe
from rlm_async._sandbox._layers import LayerSupport, plan_for
from rlm_async._sandbox._pids import PidsCgroup, pids_parent

from .conftest import Script, printed, repl, worker_processes, worker_spools

SECRET = "sk-test-DO-NOT-LEAK-5f1c2a9e"
SUPPORT = probe()
REQUIRED = bool(os.environ.get("RLM_ASYNC_REQUIRE_SANDBOX"))


def needs(available: bool, why: str) -> pytest.MarkDecorator:
    """Skip with the reason where a layer is missing, unless the run requires every layer."""
    return pytest.mark.skipif(not available and not REQUIRED, reason=f"sandbox layer unavailable: {why}")


strict_only = needs(SUPPORT.filesystem and SUPPORT.network, "strict cannot start here (rlm-async doctor)")
with_bwrap = needs(SUPPORT.bwrap is not None, SUPPORT.bwrap_why)
with_seccomp = needs(SUPPORT.seccomp_bpf is not None, SUPPORT.seccomp_why)
with_landlock_scope = needs(SUPPORT.landlock_abi >= 6, SUPPORT.landlock_why or "Landlock ABI < 6")


async def run_code(code: str, *, context: object = "ctx", sandbox: str | Sandbox = "strict", **limits: object):
    """Run ``code`` as the root's first cell; return (result, the cell's output as the model saw it, without
    its last newline)."""
    finish = repl("answer['content'] = answer['content'] or 'done'\nanswer['ready'] = True")  # never empty
    script = Script({"q": [repl(code), finish]})
    outputs: list[str] = []

    def on_event(event: dict) -> None:
        if event["event"] == "output":
            outputs.append(event["output"])

    limits.setdefault("cell_timeout_s", 20)
    rlm = RLM(
        "root-model",
        sub_model="sub-model",
        client=FakeClient(script),
        api_key=SECRET,
        limits=Limits(**limits),  # type: ignore[arg-type]
        sandbox=sandbox,
        on_event=on_event,
    )
    result = await rlm.completion("q", context)
    return result, printed(outputs[0]) if outputs else ""


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def assert_host_unaffected() -> None:
    """A second completion in the same process works, the process state is the host's own, and it leaves no
    worker process and no file descriptor behind."""
    cwd, stdout, fds = os.getcwd(), sys.stdout, open_fds()
    result, output = await run_code("print(sorted({1, 2}), context)", context="fine")
    assert result.ok and output == "[1, 2] fine"
    assert (os.getcwd(), sys.stdout) == (cwd, stdout)
    assert worker_processes(grace_s=5) == []
    assert open_fds() <= fds


@pytest.fixture(autouse=True)
def _secret_in_the_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("MY_SERVICE_TOKEN", SECRET)


# -- secrets ---------------------------------------------------------------------------------------------
@strict_only
@pytest.mark.parametrize(
    "path", ["/etc/passwd", "/etc/shadow", "~/.ssh/id_rsa", "/root/.bashrc", "/proc/1/environ", "HOST_SECRET"]
)
async def test_host_files_cannot_be_read(path, tmp_path, no_leaks):
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(SECRET)
    target = str(secret_file) if path == "HOST_SECRET" else path
    code = f"import os\ntry:\n    print(open(os.path.expanduser({target!r})).read())\nexcept OSError as e:\n"
    code += "    print('blocked', type(e).__name__)"
    _, output = await run_code(code)
    assert output.startswith("blocked") and SECRET not in output
    await assert_host_unaffected()


@strict_only
async def test_the_key_is_nowhere_in_the_worker(no_leaks):
    """The environment, /proc/self/environ and every object the worker's garbage collector knows."""
    code = f"""
import gc, os
needle = {SECRET[:12]!r} + {SECRET[12:]!r}
hits = [k for k, v in os.environ.items() if needle in v]
try:
    hits += ['proc'] if needle.encode() in open('/proc/self/environ', 'rb').read() else []
except OSError:
    pass
for obj in gc.get_objects():
    try:
        if isinstance(obj, dict) and any(isinstance(v, str) and needle in v and v is not needle for v in obj.values()):
            hits.append(type(obj).__name__)
        elif isinstance(obj, str) and needle in obj and obj is not needle:
            hits.append('str')
    except Exception:
        pass
print('hits', hits, sorted(os.environ))
"""
    _, output = await run_code(code)
    assert output.startswith("hits []"), output
    assert "OPENAI_API_KEY" not in output and "MY_SERVICE_TOKEN" not in output
    await assert_host_unaffected()


# -- writes ----------------------------------------------------------------------------------------------
@strict_only
async def test_writes_land_only_in_the_workdir(tmp_path, no_leaks):
    outside = tmp_path / "planted.txt"
    code = f"""
import os
blocked = []
for path in [{str(outside)!r}, '/tmp/planted.txt', os.path.expanduser('~/../planted.txt'), '/root/.bashrc']:
    try:
        open(path, 'a').write('x')
    except OSError as e:
        blocked.append(type(e).__name__)
open('mine.txt', 'w').write('kept')
print(len(blocked), open('mine.txt').read(), os.getcwd())
"""
    _, output = await run_code(code)
    blocked, kept, workdir = output.split()
    assert (blocked, kept) == ("4", "kept") and workdir != os.getcwd()
    assert not Path(workdir).exists()  # noqa: ASYNC240 - the workdir is deleted with its agent
    assert not outside.exists() and not Path("/tmp/planted.txt").exists()  # noqa: ASYNC240
    await assert_host_unaffected()


# -- network ---------------------------------------------------------------------------------------------
@strict_only
async def test_no_tcp_udp_or_dns_to_the_host(no_leaks):
    accepted = asyncio.Event()

    async def on_connect(reader, writer):
        accepted.set()
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    code = f"""
import socket
outcomes = []
for attempt in [
    lambda: socket.create_connection(('127.0.0.1', {port}), timeout=2),
    lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'{SECRET}', ('127.0.0.1', {port})),
    lambda: socket.getaddrinfo('localhost', {port}),
    lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM),
    lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
]:
    try:
        attempt()
        outcomes.append('CONNECTED')
    except OSError as e:
        outcomes.append(type(e).__name__)
print(outcomes)
"""
    async with server:
        _, output = await run_code(code)
    assert "CONNECTED" not in output and output.startswith("["), output
    assert not accepted.is_set()
    await assert_host_unaffected()


# -- other programs and processes -----------------------------------------------------------------------
@strict_only
async def test_no_other_programs(no_leaks):
    code = """
import ctypes, os, subprocess
outcomes = []
try:
    subprocess.run(['id'], check=True)
    outcomes.append('RAN')
except OSError as e:
    outcomes.append(type(e).__name__)
status = ctypes.CDLL(None).system(b'echo pwned > pwned.txt')
outcomes.append(os.path.exists('pwned.txt'))
try:
    os.execv('/bin/true', ['true'])
except OSError as e:
    outcomes.append(type(e).__name__)
print(outcomes)
"""
    _, output = await run_code(code)
    assert output == "['PermissionError', False, 'PermissionError']", output
    await assert_host_unaffected()


@with_seccomp
async def test_a_fork_bomb_is_bounded(no_leaks):
    code = "import os\nn = 0\ntry:\n    while n < 10_000:\n        os.fork() or os._exit(0)\n        n += 1\n"
    code += "except OSError as e:\n    print('stopped after', n, type(e).__name__)"
    _, output = await run_code(code)
    assert output == "stopped after 0 PermissionError", output
    await assert_host_unaffected()


async def test_a_thread_bomb_is_bounded(no_leaks):
    code = "import threading\nn = 0\ntry:\n    while n < 100_000:\n"
    code += "        threading.Thread(target=threading.Event().wait, daemon=True).start()\n        n += 1\n"
    code += "except (RuntimeError, MemoryError) as e:\n    print('stopped', n < 2000, type(e).__name__)"
    _, output = await run_code(code)
    assert output.startswith("stopped True"), output
    await assert_host_unaffected()


THREADS_BOUND = os.geteuid() != 0 or pids_parent()[0] is not None


@needs(THREADS_BOUND, f"the engine runs as root and {pids_parent()[1]}")
async def test_a_small_stack_thread_bomb_stops_at_sandbox_processes(no_leaks):
    """With 32 KiB stacks the address space no longer stops a thread bomb (a red-team cell took a root host to
    17,481 threads, docs/security.md): ``Sandbox.processes`` must, as RLIMIT_NPROC or, as root, a pids cgroup."""
    code = "import threading\nthreading.stack_size(32768)\nn = 0\ntry:\n    while n < 5_000:\n"
    code += "        threading.Thread(target=threading.Event().wait, daemon=True).start()\n        n += 1\n"
    code += "except (RuntimeError, MemoryError) as e:\n    print('stopped', n, type(e).__name__)"
    await run_code("pass")  # the default zygote, whose socket assert_host_unaffected would count, starts here
    _, output = await run_code(code, sandbox=Sandbox(processes=200))
    assert output.startswith("stopped "), output
    assert 150 <= int(output.split()[1]) < 200, output  # the worker's own threads count too
    await assert_host_unaffected()


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only: otherwise RLIMIT_NPROC applies and no cgroup is made")
@needs(pids_parent()[0] is not None, pids_parent()[1])
def test_a_pids_cgroup_refuses_tasks_past_its_limit_and_close_kills_what_is_left():
    parent = pids_parent()[0]
    assert parent is not None
    cgroup = PidsCgroup.create(parent, 3)
    code = "import subprocess, time\nps = []\ntry:\n    for _ in range(10):\n"
    code += "        ps.append(subprocess.Popen(['sleep', '600']))\nexcept OSError:\n    print(len(ps), flush=True)\n"
    code += "time.sleep(600)"
    proc = subprocess.Popen(cgroup.wrap([sys.executable, "-c", code]), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "2\n"  # itself and 2 sleeps: 3 tasks
        assert len(cgroup.tasks()) == 3 and proc.pid in cgroup.tasks()
        cgroup.close()
        assert not cgroup.path.exists() and proc.wait(timeout=10) == -signal.SIGKILL
        cgroup.close()  # idempotent
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        cgroup.close()


def test_a_pids_cgroup_that_could_be_made_and_now_cannot_stops_the_worker_start(monkeypatch):
    """Review finding: a failure to make the cgroup was swallowed, so the workers ran without the limit that
    ``rlm-async doctor`` had reported. Once the engine could make one, it fails closed."""
    from rlm_async._repl import _zygote

    monkeypatch.setattr(_zygote, "pids_parent", lambda: (Path("/nonexistent/cgroup"), ""))
    with pytest.raises(WorkerError, match="cannot make the workers' pids cgroup in /nonexistent/cgroup"):
        _zygote.new_pids_cgroup(plan_for(Sandbox("process")))
    monkeypatch.setattr(_zygote, "pids_parent", lambda: (None, "not needed"))
    assert _zygote.new_pids_cgroup(plan_for(Sandbox("process"))) is None


def test_mountinfo_paths_are_unescaped():
    from rlm_async._sandbox._pids import _unescape

    assert _unescape("/sys/fs/cgroup/my\\040pids") == "/sys/fs/cgroup/my pids"


async def test_a_4_gib_allocation_is_refused(no_leaks):
    code = "try:\n    x = bytearray(4 * 1024**3)\n    print('GOT', len(x))\nexcept MemoryError:\n    print('refused')"
    _, output = await run_code(code, sandbox="process")
    assert output == "refused"
    await assert_host_unaffected()


@with_landlock_scope
async def test_the_host_process_cannot_be_signalled(no_leaks):
    code = f"""
import os, signal
outcomes = []
for pid in (os.getppid(), {os.getpid()}):
    try:
        os.kill(pid, signal.SIGKILL)
        outcomes.append('SENT')
    except OSError as e:
        outcomes.append(type(e).__name__)
print(outcomes)
"""
    _, output = await run_code(code)
    assert "SENT" not in output and output.startswith("["), output
    await assert_host_unaffected()


# -- hangs and crashes -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "code", ["while True:\n    pass", "print(sum(range(3 * 10**9)))", "import time\ntime.sleep(60)"]
)
async def test_a_hang_is_killed_at_the_cell_timeout_and_the_agent_goes_on(code, no_leaks):
    script = Script({"q": [repl("x = 1\n" + code), repl("print('x' in globals(), len(context))"), repl("FINAL('ok')")]})
    events: list[dict] = []
    rlm = RLM("m", client=FakeClient(script), limits=Limits(cell_timeout_s=0.5), on_event=events.append)
    result = await rlm.completion("q", "ctx")
    assert result.answer == "ok"
    outputs = [e["output"] for e in events if e["event"] == "output"]
    assert "the cell was killed after 0.5 s; the REPL was restarted and its variables are lost" in outputs[0]
    assert outputs[1] == "False 3"  # a fresh worker, context reloaded
    sent, shown = (e["t"] for e in events if e["event"] in ("code", "output") and e["iteration"] == 1)
    # 0.5 s of cell time, then the kill and the replacement worker: within 0.5 s more (plus 1 s of slack for
    # a loaded machine; the kill itself does not wait on the worker).
    assert shown - sent < 0.5 + 0.5 + 1.0
    await assert_host_unaffected()


@pytest.mark.parametrize(
    ("code", "why"),
    [
        ("import os\nos._exit(0)", "exit status 0"),
        ("import ctypes\nctypes.string_at(0)", "Segmentation fault"),
        ("import os\nos.abort()", "Fatal Python error: Aborted"),
    ],
)
async def test_a_crashing_worker_is_replaced_and_the_model_told(code, why, no_leaks):
    result, output = await run_code(code, sandbox="process")
    assert result.ok
    assert why in output, output
    await assert_host_unaffected()


# -- tampering -------------------------------------------------------------------------------------------
async def test_tampering_with_builtins_modules_and_cwd_stays_in_the_worker(no_leaks):
    code = "import builtins, os, sys\ndel builtins.print\nsys.modules['asyncio'] = None\nos.chdir('/')"
    result, _ = await run_code(code)
    assert result.ok
    await assert_host_unaffected()


async def test_a_child_cannot_write_its_parents_answer_or_the_budget(no_leaks):
    kid = """
import gc
found = [type(o).__name__ for o in gc.get_objects() if type(o).__name__ in ('Ledger', 'Agent', 'Scheduler')]
answer['content'] = 'kid took over: ' + str(found)
answer['ready'] = True
b = budget()
b['calls'] = 10**9
"""
    root = """
r = await rlm_agent('kid', 'c')
refused = 0
for i in range(6):
    try:
        await llm_query(str(i))
    except BudgetExceeded:
        refused += 1
answer['content'] = f'root: {r} | refused {refused}'
answer['ready'] = True
"""
    script = Script({"q": [repl(root)], "kid": [repl(kid)]})
    rlm = RLM("m", client=FakeClient(script), limits=Limits(max_calls=5))
    result = await rlm.completion("q", "ctx")
    assert result.answer == "root: kid took over: [] | refused 3"  # 2 turns + 3 sub-calls = max_calls
    assert result.usage.total.calls == 5
    await assert_host_unaffected()


# -- cancellation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "code",
    [
        "llm_query('cell running')\nimport time\ntime.sleep(60)",
        "await llm_query('cell running')\nimport asyncio\nawait asyncio.sleep(60)",
    ],
)
async def test_cancelling_a_completion_kills_its_workers_within_half_a_second(code, no_leaks):
    cell_running = asyncio.Event()

    def model(request: Any) -> str:
        if request.messages[-1]["content"] == "cell running":  # the worker is up and runs the cell
            cell_running.set()
            return "ok"
        return repl(code)

    rlm = RLM("m", client=FakeClient(model), limits=Limits(cell_timeout_s=None))
    task = asyncio.ensure_future(rlm.completion("q", "ctx"))
    await cell_running.wait()
    assert len(worker_processes()) == 1
    cancelled_at = time.perf_counter()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.perf_counter() - cancelled_at < 0.5
    assert worker_processes() == []


# -- the worker starts beside the first model call -------------------------------------------------------
def held_worker_starts(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Hold every worker's start until the returned event is set."""
    from rlm_async._repl import _process

    release = asyncio.Event()
    real_start = _process.start_worker

    async def held_start(*args: Any) -> Any:
        await release.wait()
        return await real_start(*args)

    monkeypatch.setattr(_process, "start_worker", held_start)
    return release


def failing_worker_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every worker's start fail with a WorkerError, as start_worker does (closing the channel and
    removing the spool)."""
    from rlm_async._repl import _process, _zygote

    async def no_start(plan: Any, config: Any, channel: Any) -> Any:
        channel.close()
        _zygote.remove_tree(Path(config["spool"]))
        raise WorkerError("the REPL worker did not start (test)")

    monkeypatch.setattr(_process, "start_worker", no_start)


def never_answering_model() -> tuple[Callable[[Any], Awaitable[str]], asyncio.Event]:
    """A model whose first turn never answers, and the event its first call sets."""
    first_call = asyncio.Event()

    async def model(request: Any) -> str:
        first_call.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return model, first_call


async def test_the_first_model_call_does_not_wait_for_the_worker(monkeypatch, no_leaks):
    """The worker's start runs while the first model call is out: here the start waits until the model has
    been called, which would deadlock (and fail at the deadline) if the call waited for the worker."""
    called = held_worker_starts(monkeypatch)

    def model(request: Any) -> str:
        called.set()
        return repl("answer['content'] = str(len(context))\nanswer['ready'] = True")

    with anyio.fail_after(30):
        result = await RLM("m", client=FakeClient(model)).completion("q", "12345")
    assert (result.answer, result.stop_reason) == ("5", "answer")


async def test_a_worker_that_fails_to_start_stops_the_run_at_its_first_use(monkeypatch, no_leaks):
    failing_worker_starts(monkeypatch)
    client = FakeClient(lambda r: repl("print(1)"))
    result = await RLM("m", client=client).completion("q", "ctx")
    assert result.stop_reason == "error" and isinstance(result.error, WorkerError), result
    assert "did not start (test)" in str(result.error)
    assert result.usage.total.calls == 1  # the first turn went out beside the start


async def test_a_run_that_never_runs_a_cell_does_not_report_its_workers_failed_start(monkeypatch, no_leaks):
    failing_worker_starts(monkeypatch)
    result = await RLM("m", client=FakeClient(lambda r: "FINAL(42)")).completion("q", "ctx")
    assert (result.answer, result.stop_reason) == ("42", "answer")


async def test_leaving_does_not_wait_for_a_worker_still_starting(monkeypatch, no_leaks):
    """Regression: leaving the REPL waited for its worker's start, so cancelling an rlm_batch of 100
    children took 0.3-0.5 s (their starts queued for threads). Here the start is held until after the cancel
    has finished, which would deadlock (and fail at the deadline) if leaving waited for it; the worker it
    then makes is reaped."""
    from rlm_async._repl import _process

    release = held_worker_starts(monkeypatch)
    model, first_call = never_answering_model()
    task = asyncio.ensure_future(RLM("m", client=FakeClient(model)).completion("q", "ctx"))
    await first_call.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError), anyio.fail_after(30):  # a wait past 30 s: TimeoutError
        await task
    assert len(_process._REAPERS) == 1
    release.set()  # the start goes on now, and its reaper discards the worker
    await asyncio.gather(*_process._REAPERS)
    assert worker_processes() == []


async def test_cancelling_a_completion_while_its_worker_starts_leaves_no_worker(no_leaks):
    from rlm_async._repl import _process

    model, first_call = never_answering_model()
    task = asyncio.ensure_future(RLM("m", client=FakeClient(model)).completion("q", "ctx"))
    await first_call.wait()  # the worker's start is under way (or done) beside this call
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.gather(*_process._REAPERS)  # a start still under way is reaped once it has finished
    assert worker_processes() == []


# -- levels ----------------------------------------------------------------------------------------------
def test_strict_refuses_to_start_without_filesystem_and_network_confinement(monkeypatch):
    nothing = LayerSupport(None, "no userns", 0, "no Landlock", None, "no libseccomp")
    monkeypatch.setattr("rlm_async._sandbox._layers.probe", lambda: nothing)
    with pytest.raises(ConfigError, match="sandbox='process'"):
        plan_for(Sandbox("strict"))
    assert plan_for(Sandbox("process")).layers == ("rlimits", "env")


def test_sandbox_settings_are_checked():
    with pytest.raises(ConfigError):
        Sandbox("lenient")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Sandbox(memory_bytes=0)
    with pytest.raises(ConfigError):
        RLM("m", client=FakeClient(lambda r: "x"), sandbox=3)  # type: ignore[arg-type]


@strict_only
async def test_strict_applies_every_layer_this_machine_has(no_leaks):
    expected = {"rlimits", "env"}
    expected |= {"bwrap"} if SUPPORT.bwrap else set()
    expected |= {"landlock-fs"} if SUPPORT.landlock_abi >= 1 else set()
    expected |= {"seccomp"} if SUPPORT.seccomp_bpf else set()
    plan = plan_for(Sandbox())
    assert set(plan.layers) == expected
    if REQUIRED:
        assert expected == {"rlimits", "env", "bwrap", "landlock-fs", "seccomp"}


async def test_sibling_agents_run_their_cpu_loops_at_the_same_time(no_leaks):
    """Each child's busy loop records when it ran (CLOCK_MONOTONIC is one clock for every process): in
    worker processes the two intervals overlap; in threads they could only take turns holding the GIL."""
    kid = "import time\nt0 = time.monotonic()\nn = 0\nwhile time.monotonic() - t0 < 0.6:\n    n += 1\n"
    kid += "FINAL(f'{t0} {time.monotonic()}')"
    root = "r = await rlm_batch(['kid a', 'kid b'], ['a', 'b'])\nFINAL(' '.join(r))"
    rlm = RLM("m", client=FakeClient(Script({"q": [repl(root)], "kid": [repl(kid)]})))
    result = await rlm.completion("q", "ctx")
    a0, a1, b0, b1 = map(float, result.answer.split())
    assert max(a0, b0) < min(a1, b1), "the two CPU loops did not overlap"


async def test_os_exit_in_a_plain_process_sandbox_does_not_kill_the_host(no_leaks):
    pid = os.getpid()
    result, output = await run_code("import os\nos.kill(os.getpid(), 9)", sandbox="process")
    assert os.getpid() == pid and result.ok and "killed by SIGKILL" in output
    assert signal.getsignal(signal.SIGTERM) is not None
    await assert_host_unaffected()


def test_the_zygote_outlives_the_thread_that_first_asked_for_it():
    """Regression: the zygote was started from a pool thread, and the kernel's parent-death signal (the
    zygote's, and bwrap's --die-with-parent) fires when that *thread* ends: idle pool threads retire, so the
    zygote and every worker forked from it died mid-run ("the REPL worker did not start")."""
    from rlm_async._repl import _zygote

    plan = plan_for(Sandbox("process"))
    _zygote._close_zygotes()
    box = {}
    asker = threading.Thread(target=lambda: box.setdefault("zygote", _zygote._zygote_for(plan)))
    asker.start()
    asker.join()
    with pytest.raises(subprocess.TimeoutExpired):
        box["zygote"]._proc.wait(timeout=1)  # still alive a second after the asking thread ended
    assert box["zygote"].alive()


# -- the worker's REPL -----------------------------------------------------------------------------------
async def test_output_written_any_way_reaches_the_model(no_leaks):
    code = """
import pprint, sys, warnings
sys.stdout.write('written\\n')
print('to stderr', file=sys.stderr)
pprint.pprint({'k': [1, 2]})
warnings.warn('careful')
1 / 0
"""
    _, output = await run_code(code)
    for expected in ("written", "to stderr", "{'k': [1, 2]}", "UserWarning: careful", "ZeroDivisionError"):
        assert expected in output, output


async def test_tasks_and_task_groups_of_sub_calls(no_leaks):
    code = """
import asyncio
t = asyncio.create_task(llm_query('a'))
async with asyncio.TaskGroup() as tg:
    u = tg.create_task(llm_query('b'))
many = await asyncio.gather(*map(lambda p: llm_query(p), ['c', 'd']))
print(await t, u.result(), many)
"""
    _, output = await run_code(code)
    assert output == "A B ['C', 'D']", output


async def test_contexts_keep_their_type_for_the_root_and_for_children(no_leaks):
    kid = "FINAL(type(context).__name__ + ' ' + repr(context))"
    root = """
kids = await rlm_batch(['kid 1', 'kid 2', 'kid 3'], [b'\\x00raw', ('a', 1), {1: 'one', 'two': [2.5, None]}])
answer['content'] = type(context).__name__ + ' | ' + ' | '.join(kids)
answer['ready'] = True
"""
    rlm = RLM("m", client=FakeClient(Script({"q": [repl(root)], "kid": [repl(kid)]})))
    result = await rlm.completion("q", {"docs": [b"x", "y"]})
    assert result.answer == ("dict | bytes b'\\x00raw' | tuple ('a', 1) | dict {1: 'one', 'two': [2.5, None]}"), (
        result.answer
    )


async def test_a_context_model_code_cannot_send_is_a_type_error_in_its_cell(no_leaks):
    _, output = await run_code("await rlm_agent('kid', object())")
    assert "TypeError: a object cannot be passed to a child agent" in output


async def test_max_workers_bounds_the_workers_running_model_code(no_leaks):
    """Four children under max_workers=2: the root lends its slot while it waits, and two children run at a
    time (their busy spans, on the one monotonic clock all processes share, never overlap three deep)."""
    kid = "import time\nt0 = time.monotonic()\ntime.sleep(0.2)\nFINAL(f'{t0} {time.monotonic()}')"
    root = "r = await rlm_batch([f'kid {i}' for i in range(4)], ['c'] * 4)\nFINAL('|'.join(r))"
    rlm = RLM("m", client=FakeClient(Script({"q": [repl(root)], "kid": [repl(kid)]})), limits=Limits(max_workers=2))
    result = await rlm.completion("q", "ctx")
    spans = [tuple(map(float, part.split())) for part in result.answer.split("|")]
    assert len(spans) == 4
    assert max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans) == 2, spans


async def test_a_child_done_before_its_worker_is_up_keeps_its_slot_until_the_worker_is_gone(monkeypatch, no_leaks):
    """Regression: a child that answered before its worker was up gave its ``max_workers`` slot back at once,
    while a reaper still waited for the start, so the next children's workers started beside it: three of
    three at once under max_workers=1. The slot now waits for the reaper."""
    from rlm_async._repl import _process

    kids: set[str] = set()  # the children's spools: their workers from start to discard
    peak = 0
    real_start, real_discard = _process.start_worker, _process._discard

    async def counted_start(plan: Any, config: Any, channel: Any) -> Any:
        nonlocal peak
        if "." in config["name"]:  # a child's ("0.1"), not the root's ("0")
            kids.add(config["spool"])
            peak = max(peak, len(kids))
        return await real_start(plan, config, channel)

    async def counted_discard(worker: Any) -> None:
        await real_discard(worker)
        kids.discard(str(worker.spool))

    monkeypatch.setattr(_process, "start_worker", counted_start)
    monkeypatch.setattr(_process, "_discard", counted_discard)
    root = "r = await rlm_batch(['kid 1', 'kid 2', 'kid 3'], ['a', 'b', 'c'])\nFINAL('|'.join(r))"
    script = Script({"q": [repl(root)], "kid": ["FINAL(done)"]})  # each child answers on its first turn
    rlm = RLM("m", client=FakeClient(script), limits=Limits(max_workers=1))
    try:
        assert (await rlm.completion("q", "ctx")).answer == "done|done|done"
    finally:
        await rlm.aclose()
    assert peak == 1


async def test_a_tree_deeper_than_max_workers_does_not_deadlock(no_leaks):
    kid = "g = await rlm_batch(['grandkid a', 'grandkid b'], ['x', 'y'])\nFINAL('+'.join(g))"
    root = "r = await rlm_batch(['kid 1', 'kid 2'], ['c', 'd'])\nFINAL('|'.join(r))"
    script = Script({"q": [repl(root)], "kid": [repl(kid)], "grandkid": [repl("FINAL(context)")]})
    rlm = RLM("m", client=FakeClient(script), limits=Limits(max_workers=1, max_depth=3, cell_timeout_s=30))
    result = await rlm.completion("q", "ctx")
    assert result.answer == "x+y|x+y"


def test_bwrap_mounts_tmp_before_the_read_only_roots_that_may_live_under_it():
    """Regression: with the checkout and its virtual environment under /tmp (as a CI clone is), the empty /tmp
    mounted after the read-only roots hid them, and no worker could start its interpreter."""
    from rlm_async._sandbox._layers import bwrap_argv

    argv = bwrap_argv("bwrap", ["/tmp/rlm-x/work"], chdir="/tmp/rlm-x/work")
    tmpfs = argv.index("--tmpfs")
    assert argv[tmpfs + 1] == "/tmp"
    assert all(i > tmpfs for i, arg in enumerate(argv) if arg in ("--ro-bind", "--bind", "--symlink"))


# -- what a red-team pass found (each a regression test) -------------------------------------------------------
CHANNEL = """
import os, stat, socket, struct, json
fd = next(f for f in range(3, 64) if _is_sock(f))
chan = socket.socket(fileno=os.dup(fd))
def frame(msg):
    body = json.dumps(msg).encode()
    return struct.pack('>I', len(body)) + body
"""
IS_SOCK = "import os, stat\ndef _is_sock(f):\n    try:\n        return stat.S_ISSOCK(os.fstat(f).st_mode)\n"
IS_SOCK += "    except OSError:\n        return False\n"


async def test_a_flood_of_unread_replies_gets_the_worker_killed_not_the_engine_stalled(monkeypatch, no_leaks):
    """Regression: a worker that sent calls without reading their replies made the engine queue one task
    and one drain waiter per reply; cancelling them at the cell timeout stalled the loop for 429 s."""
    monkeypatch.setattr("rlm_async._repl._process._REPLY_BUFFER_BYTES", 1 << 20)
    code = IS_SOCK + CHANNEL
    code += "deaf, _ = socket.socketpair()\nos.dup2(deaf.fileno(), fd)  # the worker's reader now hears nothing\n"
    code += "burst = b''.join(frame({'op': 'call', 'id': i, 'method': 'budget', 'args': []}) for i in range(1000))\n"
    code += "while True:\n    chan.sendall(burst)"
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        _, output = await run_code(code, cell_timeout_s=60)
        tg.cancel_scope.cancel()
    assert "broke the message protocol (it left over 1 MiB of replies unread)" in output, output
    assert max(gaps) < 2.0, max(gaps)  # the loop kept turning
    await assert_host_unaffected()


@with_seccomp
async def test_a_worker_cannot_change_another_processs_limits_or_scheduling(no_leaks):
    """Regression: every worker of a zygote shares one user namespace, so prlimit(2) on the zygote crashed
    it (and with it every worker of every run)."""
    code = """
import os, resource
out = []
for attempt in (lambda: resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (3, 3)),
                lambda: os.setpriority(os.PRIO_PROCESS, os.getppid(), 19),
                lambda: os.sched_setaffinity(os.getppid(), {0})):
    try:
        attempt()
        out.append('CHANGED')
    except OSError as e:
        out.append(type(e).__name__)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft - 1, hard))  # its own: allowed
os.sched_setaffinity(0, os.sched_getaffinity(0))
print(out)
"""
    _, output = await run_code(code)
    assert output == "['PermissionError', 'PermissionError', 'PermissionError']", output
    await assert_host_unaffected()


@with_seccomp
async def test_no_sysv_ipc_or_memfd_between_agents_or_past_the_memory_limit(no_leaks):
    """Regression: SysV shared memory was shared by every worker of a zygote and outlived them (a parent's
    secret read by a later run; 4 GiB held outside RLIMIT_AS), and memfds held memory outside RLIMIT_AS."""
    code = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
out = [libc.shmget(0x1234, 4096, 0o1666), libc.msgget(0x1234, 0o1666), libc.semget(0x1234, 1, 0o1666)]
try:
    os.memfd_create('hold')
    out.append('MEMFD')
except OSError as e:
    out.append(type(e).__name__)
print(out)
"""
    _, output = await run_code(code)
    assert output == "[-1, -1, -1, 'PermissionError']", output
    await assert_host_unaffected()


async def test_a_deeply_nested_frame_is_a_protocol_violation_not_an_engine_error(no_leaks):
    """Regression: json.loads raised RecursionError, which ended the agent with an engine traceback."""
    code = IS_SOCK + CHANNEL + "body = b'[' * 200_000\nchan.sendall(struct.pack('>I', len(body)) + body)\n"
    code += "import time\ntime.sleep(30)"
    result, output = await run_code(code)
    assert result.ok and "broke the message protocol" in output, output
    await assert_host_unaffected()


async def test_the_engine_cuts_what_a_forged_done_claims(no_leaks):
    """Regression: the engine trusted the worker to cut its output: a forged 'done' put 50 M characters into
    the next prompt."""
    code = IS_SOCK + CHANNEL + "done = {'op': 'done', 'id': 1, 'output': 'x' * 3_000_000, 'error': 'e' * 500_000,\n"
    code += "  'notes': ['n' * 50_000] * 100, 'answer': {'content': '', 'ready': False}}\n"
    code += "chan.sendall(frame(done))\nimport time\ntime.sleep(2)"
    _, output = await run_code(code, max_output_chars=5000)
    assert len(output) < 40_000, len(output)  # output and error cut to 5,000 each, 20 notes of 1,000 at most
    assert "output cut" in output


async def test_a_dead_workers_exit_status_is_never_read_half_written(no_leaks):
    """Regression: the zygote wrote the exit status in place, and the engine, polling for the file, now and
    then read it empty and reported "it stopped answering" (about 1 run in 20)."""
    for _ in range(30):
        _, output = await run_code("import os\nos._exit(3)", sandbox="process")
        assert "the REPL worker died (exit status 3)" in output, output


async def test_the_zygote_writes_nothing_in_a_dead_workers_spool(monkeypatch, no_leaks):
    """Regression: the zygote wrote each reaped worker's exit status into the worker's spool folder; under
    load that write could land while the engine removed the folder, which was then left behind until the
    engine exited. The status now reaches the engine over the zygote's control socket."""
    from rlm_async._repl import _process, _zygote

    kept: list[Path] = []
    monkeypatch.setattr(_process, "remove_tree", kept.append)  # keep the spool, to look into it
    try:
        _, output = await run_code("import os\nos._exit(3)", sandbox="process")
        assert "the REPL worker died (exit status 3)" in output, output  # read after the zygote reaped it
        assert kept and all(not (spool / "exit_status").exists() for spool in kept)
        zygote = next(z for z in _zygote._zygotes.values() if z.spool == kept[0].parent)
        assert zygote.status(str(kept[0])) is None  # asked once, then forgotten
    finally:
        for spool in kept:
            _zygote.remove_tree(spool)


async def test_a_run_done_before_its_worker_is_up_returns_with_nothing_left_behind(no_leaks):
    from rlm_async._repl import _process

    result = await RLM("m", client=FakeClient(lambda r: "FINAL(1)")).completion("q", "ctx")
    assert result.answer == "1"  # answered on the first turn, beside its worker's start
    assert not _process._REAPERS and worker_spools() == [] and worker_processes() == []


async def test_aclose_waits_until_the_workers_of_cancelled_runs_are_reaped(monkeypatch, no_leaks):
    from rlm_async._repl import _process

    release = held_worker_starts(monkeypatch)
    model, first_call = never_answering_model()
    rlm = RLM("m", client=FakeClient(model))
    task = asyncio.ensure_future(rlm.completion("q", "ctx"))
    await first_call.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task  # a cancelled run does not wait for its worker's start
    assert len(_process._REAPERS) == 1
    closing = asyncio.ensure_future(rlm.aclose())
    release.set()
    await closing
    assert not _process._REAPERS and worker_spools() == [] and worker_processes() == []


def test_runs_that_end_before_their_worker_starts_leave_no_spool_worker_or_fd(no_leaks):
    """Regression: a run that ended before its worker had started left the start to ``asyncio.run``'s
    shutdown, which cut it short (90 ``completion_sync`` runs left 2-4 spool folders and 3 fds). Now
    ``RLM.aclose`` (which ``completion_sync`` calls) waits for the reapers, and a start cut short cleans up."""
    rlm = RLM("m", client=FakeClient(lambda r: "FINAL(1)"))  # done before the worker is up
    rlm.completion_sync("q", "ctx")  # the zygote and the loop's first fds
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        assert rlm.completion_sync("q", "ctx").answer == "1"
    assert worker_spools() == []
    assert worker_processes(grace_s=5) == []
    assert len(os.listdir("/proc/self/fd")) <= fds


async def test_a_cells_message_fits_its_frame_with_a_long_answer_and_a_long_error(no_leaks):
    """Regression: with the answer allowed most of a frame, a long exception message on top of it made the
    cell's 'done' message larger than a frame: the worker died and the REPL was restarted, its variables
    lost."""
    code = "answer['content'] = 'x' * 12_000_000\nkept = 1\n{}['k' * 5_000_000]"
    client = FakeClient(Script({"q": [repl(code), repl("print(kept, len(answer['content']))")]}))
    result = await RLM("m", client=client, limits=Limits(max_iterations=2)).completion("q", "ctx")
    outputs = [m["content"] for m in result.history if m["role"] == "user"][1:]
    assert "KeyError" in outputs[0] and "restarted" not in outputs[0], outputs[0][:300]
    assert "1 12000000" in outputs[1], outputs[1][:300]


async def test_a_restart_keeps_a_long_answer_draft(no_leaks):
    """Regression: a restarted worker got the answer draft in its fork request, a datagram of at most about
    200 KB: a longer draft failed the restart ('Message too long') and the run stopped with an error."""
    code = "answer['content'] = 'd' * 300_000\nimport os\nos._exit(3)"
    client = FakeClient(Script({"q": [repl(code), repl("print(len(answer['content']))")]}))
    result = await RLM("m", client=client, limits=Limits(max_iterations=2)).completion("q", "ctx")
    outputs = [m["content"] for m in result.history if m["role"] == "user"][1:]
    assert "restarted" in outputs[0], outputs[0][:300]
    assert "300000" in outputs[1], outputs[1][:300]
