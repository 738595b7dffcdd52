"""The simulator's latency model: TTFT + prefill + decode, log-normal jitter, rare slow outliers."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .._errors import ConfigError

__all__ = ["PROFILES", "LatencyModel"]


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """Seconds one request takes, before the time scale is applied.

    ``ttft_s + prompt_tokens / prefill_tok_per_s + completion_tokens / decode_tok_per_s``, times a log-normal
    factor with median 1 (``jitter_sigma`` is the sigma of its log), times ``outlier_factor`` for a fraction
    ``outlier_rate`` of requests. This is the usual decomposition of serving latency into time to first
    token and per-token decode (as vLLM's benchmarks report TTFT and TPOT).

    Attributes:
        ttft_s: time to first token for an empty prompt, seconds.
        prefill_tok_per_s: prompt tokens processed per second (adds to TTFT).
        decode_tok_per_s: completion tokens generated per second.
        jitter_sigma: sigma of the log-normal jitter; 0 for none.
        outlier_rate: fraction of requests that are slow outliers.
        outlier_factor: how much slower an outlier is.
    """

    ttft_s: float = 0.3
    prefill_tok_per_s: float = 20_000.0
    decode_tok_per_s: float = 150.0
    jitter_sigma: float = 0.15
    outlier_rate: float = 0.005
    outlier_factor: float = 4.0

    def __post_init__(self) -> None:
        if self.ttft_s < 0 or self.prefill_tok_per_s <= 0 or self.decode_tok_per_s <= 0:
            raise ConfigError("LatencyModel needs ttft_s >= 0 and positive token rates")
        if self.jitter_sigma < 0 or not 0 <= self.outlier_rate <= 1 or self.outlier_factor < 1:
            raise ConfigError("LatencyModel needs jitter_sigma >= 0, outlier_rate in [0, 1], outlier_factor >= 1")

    def mean_s(self, prompt_tokens: int, completion_tokens: int) -> float:
        """The latency without jitter or outliers, seconds (for ideal-bound calculations)."""
        return self.ttft_s + prompt_tokens / self.prefill_tok_per_s + completion_tokens / self.decode_tok_per_s

    def sample_s(self, prompt_tokens: int, completion_tokens: int, rng: random.Random) -> float:
        """One draw of the latency, seconds."""
        seconds = self.mean_s(prompt_tokens, completion_tokens)
        if self.jitter_sigma:
            seconds *= math.exp(rng.gauss(0.0, self.jitter_sigma))
        if self.outlier_rate and rng.random() < self.outlier_rate:
            seconds *= self.outlier_factor
        return seconds


#: Named latency profiles. ``fast``: a small hosted model (~0.3 s TTFT, ~150 tok/s decode); ``reasoning``: a
#: model that thinks before it answers (seconds of TTFT); ``instant``: no latency, for tests of everything else.
PROFILES: dict[str, LatencyModel] = {
    "fast": LatencyModel(),
    "reasoning": LatencyModel(ttft_s=4.0, prefill_tok_per_s=10_000.0, decode_tok_per_s=60.0, jitter_sigma=0.3),
    "instant": LatencyModel(
        ttft_s=0.0, prefill_tok_per_s=1e12, decode_tok_per_s=1e12, jitter_sigma=0.0, outlier_rate=0.0
    ),
}
