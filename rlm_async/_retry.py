"""The retry policy: which failures are retried, and how long to wait before the next attempt.

The reference is openai-python's ``_base_client`` (``_should_retry``, ``_parse_retry_after_header``,
``_calculate_retry_timeout`` and ``_constants``): retry 408, 409, 429 and every status >= 500, connection
errors and timeouts; prefer ``retry-after-ms``, then ``Retry-After`` as seconds or as an HTTP date; honour a
server-directed delay up to 120 s; otherwise back off 0.5 s doubling to at most 8 s, less up to 25% jitter.

One deliberate difference: where openai-python falls back to its own backoff when the server asks for more
than 120 s, rlm_async does not retry at all and raises ``LLMCallError(kind="retry_after_too_long")`` at once:
a provider that asks for minutes of silence is telling the run to stop, not to knock again in 8 seconds.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ._errors import (
    ConfigError,
    ProviderConnectionError,
    ProviderError,
    ProviderResponseError,
    ProviderStatusError,
    ProviderTimeoutError,
)

__all__ = ["RetryPolicy", "parse_retry_after"]

#: openai-python ``MAX_RETRY_AFTER_DELAY``: the longest server-directed wait honoured, in seconds.
MAX_RETRY_AFTER_S = 120.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How the scheduler retries one call. The only retry layer: the SDK's own retries are off.

    Attributes:
        max_retries: retries after the first attempt (so at most ``max_retries + 1`` attempts);
            default 2, openai-python's ``DEFAULT_MAX_RETRIES``.
        initial_backoff_s: first backoff in seconds; default 0.5 (openai-python ``INITIAL_RETRY_DELAY``).
        max_backoff_s: backoff cap in seconds; default 8.0 (openai-python ``MAX_RETRY_DELAY``).
        jitter: the backoff is multiplied by a uniform factor in ``[1 - jitter, 1]``; default 0.25
            (openai-python).
        max_retry_after_s: the longest Retry-After honoured, in seconds; a longer one is a typed error
            without retry. Default 120 (openai-python ``MAX_RETRY_AFTER_DELAY``).
        attempt_timeout_s: the limit on one HTTP attempt, in seconds; a slower attempt is a
            ``ProviderTimeoutError`` and is retried. Default 600 (openai-python ``DEFAULT_TIMEOUT``).

    Raises:
        ConfigError: on a negative count or a non-positive duration.
    """

    max_retries: int = 2
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    jitter: float = 0.25
    max_retry_after_s: float = MAX_RETRY_AFTER_S
    attempt_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {self.max_retries}")
        for name in ("initial_backoff_s", "max_backoff_s", "max_retry_after_s", "attempt_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"jitter must be in [0, 1), got {self.jitter}")

    def describe(self) -> dict[str, Any]:
        """The policy as a plain dict (field name -> value), for traces."""
        return asdict(self)

    def is_retryable(self, error: BaseException, *, now: float | None = None) -> bool:
        """Whether ``error`` from one attempt deserves another attempt (ignoring the attempt count).

        Retryable: ``ProviderConnectionError``, ``ProviderTimeoutError``, ``ProviderResponseError`` (a
        truncated body is a transport fault) and ``ProviderStatusError`` with status 408, 409, 429 or >= 500,
        unless its Retry-After exceeds ``max_retry_after_s``. An ``x-should-retry: true|false`` header wins,
        as in openai-python. Anything else, cancellation included, is never retried.
        """
        if isinstance(error, ProviderConnectionError | ProviderTimeoutError | ProviderResponseError):
            return True
        if not isinstance(error, ProviderStatusError):
            return False
        if self.retry_after_too_long(error, now=now):
            return False
        should = error.headers.get("x-should-retry")
        if should in ("true", "false"):
            return should == "true"
        status = error.status or 0
        return status in (408, 409, 429) or status >= 500

    def retry_after_too_long(self, error: ProviderError, *, now: float | None = None) -> bool:
        """True when the server asked for a wait longer than ``max_retry_after_s``."""
        delay = parse_retry_after(error.headers, now=now)
        return delay is not None and delay > self.max_retry_after_s

    def wait_s(
        self,
        retry_number: int,
        error: BaseException | None,
        *,
        now: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> float:
        """Seconds to wait before retry number ``retry_number`` (1 for the first retry).

        A server-directed delay (``retry-after-ms`` / ``Retry-After``) in ``(0, max_retry_after_s]`` is
        honoured exactly; otherwise ``min(initial_backoff_s * 2**(retry_number - 1), max_backoff_s)`` times a
        jitter factor in ``[1 - jitter, 1]`` (openai-python ``_calculate_retry_timeout``).
        """
        if isinstance(error, ProviderError):
            delay = parse_retry_after(error.headers, now=now)
            if delay is not None and 0 < delay <= self.max_retry_after_s:
                return delay
        exponent = min(max(retry_number - 1, 0), 1000)
        backoff = min(self.initial_backoff_s * 2.0**exponent, self.max_backoff_s)
        return max(backoff * (1 - self.jitter * rand()), 0.0)


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """The server-directed delay in seconds, or None when the headers name none (or name it badly).

    Order as in openai-python: ``retry-after-ms`` (milliseconds, float allowed), then ``retry-after`` as
    seconds (float allowed), then ``retry-after`` as an HTTP date (RFC 9110 section 10.2.3), measured from
    ``now`` (Unix seconds; default ``time.time()``). A numeric overflow to infinity counts as "too long"
    (returned as ``inf``); a negative or past value is returned as is and is not honoured by the policy.
    Header names are matched case-insensitively.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        raw = lowered.get(name)
        if raw is None:
            continue
        try:
            value = float(raw)
        except ValueError:
            continue
        if math.isnan(value):
            continue
        return value / divisor
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    try:
        parsed = email.utils.parsedate_tz(raw)
        if parsed is None:
            return None
        when = email.utils.mktime_tz(parsed)
    except (TypeError, ValueError, OverflowError, OSError):
        return None
    return float(when - (time.time() if now is None else now))
