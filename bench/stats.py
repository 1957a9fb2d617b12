"""What every benchmark here reports of a list of samples (seconds): median, p95, min, max."""

from __future__ import annotations

import math
import statistics


def summary(samples: list[float]) -> dict[str, float]:
    """Median, p95 (nearest rank), min and max, in milliseconds."""
    ordered = sorted(samples)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
    return {
        "median": round(statistics.median(ordered) * 1000, 2),
        "p95": round(p95 * 1000, 2),
        "min": round(ordered[0] * 1000, 2),
        "max": round(ordered[-1] * 1000, 2),
    }
