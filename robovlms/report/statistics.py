"""The statistics of a report: Wilson score intervals of success rates."""

from __future__ import annotations

import math

from scipy.stats import binomtest

CONFIDENCE = 0.95
RATE_COLUMNS = ["episodes", "successes", "success", "wilson_low", "wilson_high"]


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a success rate; unlike the normal approximation it stays in [0, 1] and is not
    empty at 0/n or n/n."""
    if n == 0:
        return math.nan, math.nan
    interval = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def rate(successes: int, episodes: int) -> dict[str, float]:
    low, high = wilson_interval(successes, episodes)
    return {"episodes": int(episodes), "successes": int(successes),
            "success": successes / episodes if episodes else math.nan, "wilson_low": low, "wilson_high": high}
