"""The circuit breaker: when the endpoint is down, calls fail fast instead of retrying into it.

The pattern is the one in Nygard's *Release It!* (and Fowler's "CircuitBreaker" article): **closed**
(attempts go out; failures since the last success are counted), **open** (every attempt fails at once with
:class:`CircuitOpenError`, which is not retried), **half-open** (after ``reset_timeout_s`` one probe attempt
goes out; its success closes the circuit, its failure opens it again for twice as long, up to
``max_reset_timeout_s``).

What counts as a failure: a connection error, an attempt timeout, or a 5xx status, i.e. the signs of an
endpoint that is down or drowning. A 429 is the provider pacing the caller (Retry-After handles it) and a 4xx
is the request's own fault, so neither counts, and neither does a malformed body.

When to open: at least ``failure_threshold`` failures since the last success, *and* at least ``failure_ratio``
of the attempts at stake since then: those started since, plus those already in flight when that success
came back (their failures count, so they count in the denominator too). The ratio matters under concurrency:
in a wave of simultaneous requests the instant failures (a 503 from a load balancer, a refused connection)
come back before the slower successes still in flight, so a run of consecutive failures alone opens the
breaker on a healthy endpoint (a 60 s soak at the reliability suite's 6.5% fault rate did exactly that with
waves of 64). Leaving the in-flight attempts out of the denominator did the same in a subtler way: one
success reset it to zero while 255 attempts were still out, and the next burst of ten instant 5xx among
them opened the circuit (the flaky 10,000-call reliability run on a loaded machine: 121 calls refused with
``circuit_open``). A dead endpoint fails every attempt, so it still opens once half the attempts out
have failed.

One breaker serves one scheduler, i.e. one run and its one client endpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from ._errors import (
    CircuitOpenError,
    ConfigError,
    ProviderConnectionError,
    ProviderStatusError,
    ProviderTimeoutError,
)

__all__ = ["DEFAULT_BREAKER", "Circuit", "CircuitBreaker", "counts_as_failure"]


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    """When to stop sending attempts to an endpoint that keeps failing, and when to try again.

    Attributes:
        failure_threshold: failed attempts (connection errors, timeouts, 5xx) since the last success that
            open the circuit. Default 10.
        failure_ratio: ...and the least fraction of the attempts started since the last success that must have
            failed. Default 0.5.
        reset_timeout_s: seconds the circuit stays open before one probe attempt is let through. Default 5.
        max_reset_timeout_s: each failed probe doubles the open time, up to this many seconds. Default 60.

    Raises:
        ConfigError: on a threshold below 1 or a non-positive duration.
    """

    failure_threshold: int = 10
    failure_ratio: float = 0.5
    reset_timeout_s: float = 5.0
    max_reset_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ConfigError(f"CircuitBreaker.failure_threshold must be >= 1, got {self.failure_threshold}")
        if not 0 < self.failure_ratio <= 1:
            raise ConfigError(f"CircuitBreaker.failure_ratio must be in (0, 1], got {self.failure_ratio}")
        if not 0 < self.reset_timeout_s <= self.max_reset_timeout_s:
            raise ConfigError("CircuitBreaker needs 0 < reset_timeout_s <= max_reset_timeout_s")


#: The breaker every run gets unless ``RLM(circuit_breaker=...)`` says otherwise.
DEFAULT_BREAKER = CircuitBreaker()


def counts_as_failure(error: BaseException) -> bool:
    """Whether an attempt's error is a sign of a failing endpoint (see the module docstring)."""
    if isinstance(error, ProviderConnectionError | ProviderTimeoutError):
        return True
    return isinstance(error, ProviderStatusError) and (error.status or 0) >= 500


class Circuit:
    """The breaker's state for one scheduler. Runs on the event loop, so it needs no lock.

    Args:
        policy: thresholds and timeouts.
        clock: monotonic seconds (the scheduler passes ``anyio.current_time``).
    """

    def __init__(self, policy: CircuitBreaker, clock: Callable[[], float]) -> None:
        self._policy = policy
        self._clock = clock
        self._failures = 0
        self._started = 0  # attempts at stake since the last success: started since, or in flight then
        self._in_flight = 0  # admitted attempts not yet recorded
        self._open_until: float | None = None
        self._open_for = policy.reset_timeout_s
        self._probing = False
        self.opened = 0

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"`` (the open time has passed; a probe may go)."""
        if self._open_until is None:
            return "closed"
        return "open" if self._clock() < self._open_until or self._probing else "half_open"

    def check_open(self) -> None:
        """Refuse early, before a rate-limit token or a slot is taken, while the circuit is open.

        Raises:
            CircuitOpenError: the circuit is open (or half-open with its probe already out).
        """
        if self._open_until is not None and self.state == "open":
            self._refuse()

    def before_attempt(self) -> bool:
        """Admit one attempt or refuse it.

        Returns:
            True when the attempt is the half-open probe (report its end with :meth:`record`).

        Raises:
            CircuitOpenError: the circuit is open, or half-open with its probe already out.
        """
        if self._open_until is None:  # closed (what ``state`` would say, without its call on the hot path)
            self._started += 1
            self._in_flight += 1
            return False
        if self.state == "half_open":
            self._probing = True
            self._started += 1
            self._in_flight += 1
            return True
        self._refuse()

    def _refuse(self) -> NoReturn:
        assert self._open_until is not None
        left = max(self._open_until - self._clock(), 0.0)
        probe = "a probe is out" if self._probing else f"next probe in {left:.2f} s"
        raise CircuitOpenError(
            f"circuit open: {self._failures} of the last {self._started} attempts failed with no success; {probe}"
        )

    def record(self, error: BaseException | None, *, probe: bool) -> None:
        """Record how an admitted attempt ended: None for a response, else its error."""
        self._in_flight = max(self._in_flight - 1, 0)
        if error is None and not probe and self._open_until is None:  # the hot path, a response while closed:
            self._failures = 0  # what _close does that is not already so
            self._started = self._in_flight
            return
        if probe:
            self._probing = False
        failed = error is not None and counts_as_failure(error)
        if error is None or (probe and not failed):  # a response, or a probe the endpoint answered (even a 4xx)
            self._close()
            return
        if not failed:
            return
        self._failures += 1
        if probe:
            self._open_for = min(self._open_for * 2, self._policy.max_reset_timeout_s)
            self._open_until = self._clock() + self._open_for
            self.opened += 1
        elif self._open_until is None and self._failures >= max(
            self._policy.failure_threshold, self._policy.failure_ratio * self._started
        ):
            self._open_until = self._clock() + self._open_for
            self.opened += 1

    def abandoned(self, *, probe: bool) -> None:
        """An admitted attempt was cancelled before it ended: it proves nothing either way. When it was the
        probe, the next attempt probes instead."""
        self._in_flight = max(self._in_flight - 1, 0)
        if probe:
            self._probing = False

    def _close(self) -> None:
        self._failures = 0
        self._started = self._in_flight  # still out: their failures will count, so must they
        self._open_until = None
        self._open_for = self._policy.reset_timeout_s
