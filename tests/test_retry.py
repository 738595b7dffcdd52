"""Table tests for the retry policy, after openai-python's tests of _parse_retry_after_header and
_should_retry."""

from __future__ import annotations

import email.utils

import pytest

from rlm_async import (
    ConfigError,
    ProviderConnectionError,
    ProviderResponseError,
    ProviderStatusError,
    ProviderTimeoutError,
    RetryPolicy,
    parse_retry_after,
)

NOW = 1_700_000_000.0


def http_date(offset_s: float) -> str:
    return email.utils.formatdate(NOW + offset_s, usegmt=True)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after": "20"}, 20.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # ms wins
        ({"retry-after-ms": "bogus", "retry-after": "9"}, 9.0),
        ({"retry-after": "-10"}, -10.0),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "not a date"}, None),
        ({"retry-after": http_date(30)}, 30.0),
        ({"retry-after": http_date(-30)}, -30.0),
        ({"retry-after": "1e400"}, float("inf")),
    ],
)
def test_parse_retry_after(headers, expected):
    assert parse_retry_after(headers, now=NOW) == expected


def status(code: int, **headers: str) -> ProviderStatusError:
    return ProviderStatusError(f"HTTP {code}", status=code, headers=headers)


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (status(408), True),
        (status(409), True),
        (status(429), True),
        (status(500), True),
        (status(502), True),
        (status(503), True),
        (status(400), False),
        (status(401), False),
        (status(404), False),
        (status(422), False),
        (status(400, **{"x-should-retry": "true"}), True),
        (status(503, **{"x-should-retry": "false"}), False),
        (status(429, **{"retry-after": "120"}), True),
        (status(429, **{"retry-after": "121"}), False),
        (status(429, **{"retry-after-ms": "120001"}), False),
        (status(429, **{"retry-after": http_date(600)}), False),
        (ProviderConnectionError("reset"), True),
        (ProviderTimeoutError("slow"), True),
        (ProviderResponseError("truncated"), True),
        (ValueError("not a provider error"), False),
    ],
)
def test_is_retryable(error, retryable):
    assert RetryPolicy().is_retryable(error, now=NOW) is retryable


@pytest.mark.parametrize(
    ("retry_number", "expected"),
    [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 8.0), (50, 8.0)],
)
def test_backoff_doubles_to_the_cap_without_jitter(retry_number, expected):
    assert RetryPolicy().wait_s(retry_number, None, rand=lambda: 0.0) == expected


def test_jitter_takes_off_at_most_a_quarter():
    assert RetryPolicy().wait_s(1, None, rand=lambda: 0.999999) == pytest.approx(0.375, abs=1e-5)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "3"}, 3.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "120"}, 120.0),
        ({"retry-after": "0"}, 0.5),  # not positive: fall back to backoff
        ({"retry-after": "-5"}, 0.5),
        ({"retry-after": http_date(10)}, 10.0),
    ],
)
def test_server_directed_wait_is_honoured_exactly(headers, expected):
    error = status(429, **headers)
    assert RetryPolicy().wait_s(1, error, now=NOW, rand=lambda: 0.0) == pytest.approx(expected)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_retries": -1}, {"initial_backoff_s": 0}, {"attempt_timeout_s": -1}, {"jitter": 1.0}, {"jitter": -0.1}],
)
def test_bad_policy_is_a_config_error(kwargs):
    with pytest.raises(ConfigError):
        RetryPolicy(**kwargs)
