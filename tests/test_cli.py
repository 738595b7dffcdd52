"""The rlm-async command line: exit codes, JSON output, the embedded simulator, two processes over HTTP,
and the main job."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from rlm_async.cli import EXIT_BUDGET, EXIT_ENDPOINT, EXIT_OK, EXIT_USAGE, main


@pytest.fixture
def no_endpoint(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture
def notes(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\n".join(f"line {i}: the quick brown fox" for i in range(500)))
    return path


def test_missing_context_file_is_a_usage_error(no_endpoint, capsys):
    assert main(["run", "q", "--context", "/nonexistent/file.txt"]) == EXIT_USAGE
    assert "cannot read context file" in capsys.readouterr().err


def test_run_on_the_embedded_simulator_prints_json(no_endpoint, notes, capsys):
    assert main(["run", "Summarise these notes", "--context", str(notes), "--json"]) == EXIT_OK
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert result["stop_reason"] == "answer" and result["answer"].endswith("chunks noted")
    assert result["usage"]["calls"] >= 3 and result["stats"]["peak_in_flight"] >= 1
    assert "embedded simulator" in out.err


def test_run_text_output_has_the_answer_then_a_summary(no_endpoint, notes, capsys):
    assert main(["run", "Summarise", "--context", str(notes)]) == EXIT_OK
    out = capsys.readouterr()
    assert out.out.strip().endswith("chunks noted")
    assert "peak in flight" in out.err and "stop reason" in out.err


def test_a_budget_stop_exits_3_with_the_partial_answer(no_endpoint, notes, capsys):
    assert main(["run", "Summarise", "--context", str(notes), "--max-calls", "2", "--json"]) == EXIT_BUDGET
    assert json.loads(capsys.readouterr().out)["stop_reason"] == "budget:max_calls"


def test_an_unreachable_endpoint_exits_4(no_endpoint, notes, capsys):
    code = main(["run", "q", "--context", str(notes), "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--json"])
    assert code == EXIT_ENDPOINT
    assert "connection" in json.loads(capsys.readouterr().out)["error"]


def test_a_real_endpoint_needs_a_model(monkeypatch, notes, capsys):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    assert main(["run", "q", "--context", str(notes)]) == EXIT_USAGE
    assert "--model" in capsys.readouterr().err


def test_bad_fault_spec_is_a_usage_error(capsys):
    assert main(["sim", "--faults", "teapot=0.5", "--duration", "0.1"]) == EXIT_USAGE


def test_sim_and_run_in_two_processes_over_http(notes, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    sim = subprocess.Popen(
        [sys.executable, "-m", "rlm_async.cli", "sim", "--port", "0", "--profile", "instant", "--duration", "60"],
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "COLUMNS": "200"},
    )
    try:
        assert sim.stderr is not None
        url = None
        for line in sim.stderr:
            if m := re.search(r"(http://127\.0\.0\.1:\d+/v1)", line):
                url = m.group(1)
                break
        assert url, "the simulator did not say where it listens"
        trace = tmp_path / "trace.jsonl"
        run = subprocess.run(
            [sys.executable, "-m", "rlm_async.cli", "run", "Summarise", "--context", str(notes), "--base-url", url,
             "--api-key", "k", "--model", "sim-root", "--json", "--trace", str(trace)],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert run.returncode == EXIT_OK, run.stderr
        assert json.loads(run.stdout)["stop_reason"] == "answer"
        assert any(json.loads(line)["event"] == "run_end" for line in trace.read_text().splitlines())
    finally:
        sim.terminate()
        sim.wait(timeout=10)
        if sim.stderr is not None:
            sim.stderr.close()


def test_the_main_job_matches_the_independent_count(capsys):
    code = main(["demo", "--no-sequential", "--time-scale", "0.01", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == EXIT_OK and report["matches"]
    assert report["expected"]["John"] == 5 and sum(report["expected"].values()) == 42
    run = report["runs"][0]
    assert run["sub_calls"] >= 100 and run["peak_in_flight"] > 1


def test_doctor_reports_every_layer_and_the_level(capsys, monkeypatch):
    from rlm_async._sandbox import _layers

    code = main(["doctor", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert {"rlimits", "seccomp"} <= set(report["layers"])
    assert code == (EXIT_OK if report["default_level"] == "strict" else 1)
    nothing = _layers.LayerSupport(None, "no user namespaces", 0, "no Landlock", None, "no libseccomp")
    monkeypatch.setattr(_layers, "probe", lambda: nothing)
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "strict would refuse to start" in out and "no libseccomp" in out
