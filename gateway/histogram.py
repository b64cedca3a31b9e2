"""A fixed-bucket histogram the pipeline fills per batch and the metrics endpoint reads at scrape time.

One bisect and two additions per observation: no lock (both sides run in the event loop), no dependency.

>>> h = BucketHistogram((0.1, 0.5))
>>> for seconds in (0.05, 0.1, 0.3, 2.0):
...     h.observe(seconds)
>>> h.cumulative(), h.count, h.sum
([('0.1', 2), ('0.5', 3), ('+Inf', 4)], 4, 2.45)
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

__all__ = ["LATENCY_BUCKETS_S", "BucketHistogram"]

# Batch latency (first arrival → acked): batches close every flush_interval_ms (200 ms by default).
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)


class BucketHistogram:
    """Counts of observations ``<=`` each upper bound (Prometheus ``le`` semantics), plus their sum."""

    def __init__(self, bounds: Sequence[float]) -> None:
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"bucket bounds must be increasing and not empty, got {list(bounds)}")
        self.bounds = tuple(float(b) for b in bounds)
        self._counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self._counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, observations <= le)`` per bucket, ending with ``+Inf``; the form Prometheus expects."""
        out = []
        total = 0
        for bound, n in zip((*(f"{b:g}" for b in self.bounds), "+Inf"), self._counts, strict=True):
            total += n
            out.append((bound, total))
        return out
