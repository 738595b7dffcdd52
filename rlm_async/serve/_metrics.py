"""The server's Prometheus metrics, fed by the events of every run it serves (prometheus_client)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from .._trace import Event

__all__ = ["Metrics"]


class Metrics:
    """Counters and gauges for ``GET /metrics``, one registry per server.

    Args:
        in_flight: a callable giving the HTTP attempts in flight now, summed over the served endpoints.

    Metrics (units in the names, as Prometheus recommends):
        rlm_requests_in_progress: completions being served now.
        rlm_calls_in_flight: model calls holding an endpoint slot now.
        rlm_calls_queued: model calls admitted and waiting for their first attempt (rate limits, slots).
        rlm_calls_total: model calls answered.
        rlm_call_errors_total{kind}: model calls that failed for good, by ``LLMCallError.kind``.
        rlm_tokens_total{type}: tokens billed, ``prompt`` and ``completion``.
        rlm_cost_usd_total: USD billed.
        rlm_runs_total{stop_reason}: completions ended, by stop reason.
    """

    def __init__(self, in_flight: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Gauge("rlm_requests_in_progress", "Completions being served now", registry=r)
        Gauge("rlm_calls_in_flight", "Model calls holding an endpoint slot now", registry=r).set_function(in_flight)
        self._queued: set[tuple[str, int]] = set()
        Gauge("rlm_calls_queued", "Model calls waiting for their first attempt", registry=r).set_function(
            lambda: len(self._queued)
        )
        self.calls = Counter("rlm_calls", "Model calls answered", registry=r)
        self.errors = Counter("rlm_call_errors", "Model calls failed for good", ["kind"], registry=r)
        self.tokens = Counter("rlm_tokens", "Tokens billed", ["type"], registry=r)
        self.cost = Counter("rlm_cost_usd", "USD billed", registry=r)
        self.runs = Counter("rlm_runs", "Completions ended", ["stop_reason"], registry=r)

    def observe(self, event: Event) -> None:
        """An ``on_event`` listener: update the metrics from one event."""
        name = event["event"]
        key = (str(event.get("run_id")), int(event.get("call_id") or 0))
        if name == "call_queued":
            self._queued.add(key)
        elif name == "call_started":
            self._queued.discard(key)
        elif name == "call_finished":
            self._queued.discard(key)
            self.calls.inc()
            self.tokens.labels("prompt").inc(event.get("prompt_tokens") or 0)
            self.tokens.labels("completion").inc(event.get("completion_tokens") or 0)
        elif name == "call_failed":
            self._queued.discard(key)
            self.errors.labels(str(event.get("kind"))).inc()
        elif name == "run_end":
            self.runs.labels(str(event.get("stop_reason"))).inc()
            self.cost.inc(event.get("cost_usd") or 0.0)

    def forget_run(self, run_ids: Iterable[str]) -> None:
        """Drop the queued calls of runs that ended without their calls ending (cancelled)."""
        gone = set(run_ids)
        self._queued = {k for k in self._queued if k[0] not in gone}

    def render(self) -> bytes:
        """The Prometheus text exposition format."""
        return generate_latest(self.registry)
