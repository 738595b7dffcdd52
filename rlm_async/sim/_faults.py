"""Fault injection for the simulator: which fault, if any, a request gets."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from .._errors import ConfigError

__all__ = ["FAULT_KINDS", "FaultPlan"]

#: ``429`` rate limited (with Retry-After), ``500`` / ``503`` server errors, ``reset`` the connection closed
#: with no response, ``reset_body`` the connection closed halfway through the body, ``truncated`` a 200
#: whose JSON body is cut short, ``empty`` a 200 with no choices, ``hang`` no answer until the client gives
#: up, ``trickle`` a body sent in pieces over ``trickle_s``, ``spike`` a normal answer ten times slower.
FAULT_KINDS = ("429", "500", "503", "reset", "reset_body", "truncated", "empty", "hang", "trickle", "spike")


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """Fault rates per request, each in [0, 1], summing to at most 1.

    Attributes:
        rates: fault kind -> probability per request.
        retry_after_s: the Retry-After a simulated 429 asks for, seconds (before the time scale).
        spike_factor: how much slower a ``spike`` is.
        trickle_s: seconds (before the time scale) a ``trickle`` body takes to arrive, in ten pieces.
    """

    rates: Mapping[str, float] = field(default_factory=dict)
    retry_after_s: float = 1.0
    spike_factor: float = 10.0
    trickle_s: float = 30.0

    def __post_init__(self) -> None:
        unknown = set(self.rates) - set(FAULT_KINDS)
        if unknown:
            raise ConfigError(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(FAULT_KINDS)}")
        if any(not 0 <= r <= 1 for r in self.rates.values()) or sum(self.rates.values()) > 1 + 1e-9:
            raise ConfigError("fault rates must each be in [0, 1] and sum to at most 1")

    @classmethod
    def parse(cls, spec: str, **kwargs: float) -> FaultPlan:
        """``"429=0.05,500=0.01,reset=0.01"`` -> a FaultPlan. An empty spec means no faults.

        Raises:
            ConfigError: on a malformed item, an unknown kind or bad rates.
        """
        rates: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            kind, sep, value = item.partition("=")
            try:
                rates[kind.strip()] = float(value)
            except ValueError:
                raise ConfigError(f"bad fault item {item!r}: expected KIND=RATE, e.g. 429=0.05") from None
            if not sep:
                raise ConfigError(f"bad fault item {item!r}: expected KIND=RATE, e.g. 429=0.05")
        return cls(rates, **kwargs)

    def draw(self, rng: random.Random) -> str | None:
        """The fault for one request, or None."""
        if not self.rates:
            return None
        x = rng.random()
        for kind in FAULT_KINDS:
            x -= self.rates.get(kind, 0.0)
            if x < 0:
                return kind
        return None
