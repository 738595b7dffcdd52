"""The tracer: events cost nothing when nobody listens, and reach every consumer that does."""

from __future__ import annotations

import asyncio
import json
import logging

import structlog

from rlm_async._trace import Tracer, bound

from .conftest import on_fake_clock


def test_nobody_listening_means_no_event_is_built(monkeypatch):
    built = []
    monkeypatch.setattr(structlog.contextvars, "get_contextvars", lambda: built.append(1) or {})
    tracer = Tracer()
    assert logging.getLogger("rlm_async").getEffectiveLevel() > logging.DEBUG  # as a library user has it
    assert not tracer.active
    tracer.emit("call_started", call_id=1)
    assert built == []


def test_the_stdlib_logger_at_debug_is_a_listener_and_its_level_is_read_per_event(caplog):
    tracer = Tracer()
    assert not tracer.active
    with caplog.at_level(logging.DEBUG, logger="rlm_async"):
        assert tracer.active
        with bound(run_id="r1"):
            tracer.emit("call_started", call_id=7)
    assert not tracer.active
    (record,) = [r for r in caplog.records if r.name == "rlm_async"]
    assert record.levelno == logging.DEBUG and "call_started" in record.getMessage()


def test_a_structlog_filtering_logger_is_asked_its_level():
    quiet = structlog.make_filtering_bound_logger(logging.INFO)(structlog.testing.CapturingLogger(), [], {})
    loud_sink = structlog.testing.CapturingLogger()
    loud = structlog.make_filtering_bound_logger(logging.DEBUG)(loud_sink, [], {})
    assert not Tracer(logger=quiet).active
    tracer = Tracer(logger=loud)
    assert tracer.active
    tracer.emit("turn", iteration=1)
    assert [call.kwargs["event"] for call in loud_sink.calls] == ["turn"]


def test_a_logger_that_cannot_say_counts_as_listening():
    class Opaque:
        def __init__(self) -> None:
            self.seen: list[dict] = []

        def debug(self, **event: object) -> None:
            self.seen.append(event)

    logger = Opaque()
    tracer = Tracer(logger=logger)
    assert tracer.active
    tracer.emit("turn")
    assert [e["event"] for e in logger.seen] == ["turn"]


def test_a_trace_file_or_a_listener_gets_every_event_whatever_the_logger(tmp_path):
    seen: list[dict] = []
    path = tmp_path / "t.jsonl"
    tracer = Tracer(trace_path=path, listeners=[seen.append])
    assert tracer.active
    with bound(run_id="r", agent_id="0", depth=0):
        tracer.emit("call_queued", call_id=1)
        tracer.emit("call_finished", call_id=1, latency_s=0.5)
    tracer.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["event"] for e in lines] == [e["event"] for e in seen] == ["call_queued", "call_finished"]
    assert all(e["run_id"] == "r" and e["depth"] == 0 for e in lines)


@on_fake_clock
async def test_the_trace_file_is_on_disk_within_a_second_of_an_event(tmp_path):
    """Regression: the JSONL file was flushed only when its 8 KiB buffer filled, so a 32K-token eval item's
    trace stayed empty for minutes while the run waited on a local model."""
    from rlm_async._trace import FLUSH_AFTER_S

    path = tmp_path / "t.jsonl"
    tracer = Tracer(trace_path=path)
    tracer.emit("turn")
    tracer.emit("reply", text="x")
    assert path.read_text() == ""  # buffered: one flush serves every event of the next second
    await asyncio.sleep(FLUSH_AFTER_S)  # looptime: no real time passes
    assert [json.loads(line)["event"] for line in path.read_text().splitlines()] == ["turn", "reply"]
    tracer.emit("turn")
    tracer.close()  # cancels the pending flush and closes the file with its line
    assert len(path.read_text().splitlines()) == 3
    await asyncio.sleep(FLUSH_AFTER_S)  # the cancelled timer does not touch the closed file


def test_an_event_written_outside_an_event_loop_is_flushed_at_once(tmp_path):
    path = tmp_path / "t.jsonl"
    tracer = Tracer(trace_path=path)
    tracer.emit("turn")
    assert json.loads(path.read_text())["event"] == "turn"
    tracer.close()


def test_the_default_logger_is_asked_through_structlogs_lazy_proxy(caplog):
    """Regression: the default logger is structlog.wrap_logger's lazy proxy, not a BoundLogger; on structlog
    before 26.1 the proxy had no is_enabled_for, so events were built for nobody."""
    from rlm_async._trace import _debug_check, _default_logger

    logger = _default_logger()
    check = _debug_check(logger)
    assert isinstance(getattr(logger, "_logger", None), logging.Logger)
    assert check() is False
    with caplog.at_level(logging.DEBUG, logger="rlm_async"):
        assert check() is True
