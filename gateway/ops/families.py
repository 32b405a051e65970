"""Metric families kept as plain numbers per label values and exported at scrape time: the per-request
counters and histograms of ``gateway.ops.metrics``."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from itertools import accumulate

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric


class Counter:
    """A counter family kept as plain numbers per label values, exported at scrape time.

    Per-request updates happen on the event loop's thread only, as do scrapes, so no lock is
    taken: prometheus_client's own Counter and Histogram take one per update, a dozen per request
    (about a sixth of the gateway's own CPU per request, measured in-process).
    """

    __slots__ = ("_documentation", "_labels", "_name", "_values")

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self._name = name
        self._documentation = documentation
        self._labels = list(labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        values = self._values
        values[labels] = values.get(labels, 0.0) + amount

    def values(self) -> dict[tuple[str, ...], float]:
        """A copy of the value per label values (the console's live panel reads them)."""
        return dict(self._values)

    def family(self) -> Metric:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labels)
        for labels, value in self._values.items():
            family.add_metric(labels, value)
        return family


class Histogram:
    """A histogram family as plain per-bucket counts and a sum per label values (see ``Counter``)."""

    __slots__ = ("_bounds", "_documentation", "_labels", "_name", "_values")

    def __init__(self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]) -> None:
        self._name = name
        self._documentation = documentation
        self._labels = list(labels)
        self._bounds = tuple(buckets)
        # Per label values: the count of each bucket (not cumulative; the last is +Inf), then the sum.
        self._values: dict[tuple[str, ...], list[float]] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        counts = self._values.get(labels)
        if counts is None:
            counts = self._values[labels] = [0.0] * (len(self._bounds) + 2)
        counts[bisect_left(self._bounds, value)] += 1  # a bucket holds the values <= its bound
        counts[-1] += value

    @property
    def bounds(self) -> tuple[float, ...]:
        return self._bounds

    def counts(self) -> list[float]:
        """Per-bucket counts (not cumulative; the last is +Inf) over every label value."""
        total = [0.0] * (len(self._bounds) + 1)
        for counts in self._values.values():
            for i, count in enumerate(counts[:-1]):
                total[i] += count
        return total

    def family(self) -> Metric:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labels)
        names = [*(repr(float(bound)) for bound in self._bounds), "+Inf"]  # as prometheus_client spells them
        for labels, counts in self._values.items():
            cumulative = list(accumulate(counts[:-1]))
            family.add_metric(labels, list(zip(names, cumulative, strict=True)), sum_value=counts[-1])
        return family
