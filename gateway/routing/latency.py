"""The gateway's own measure of each model's speed, for the ``fastest`` strategy.

``Latencies.record`` keeps the time to first byte (from sending a request upstream until its
response headers arrived) of the latest ``window`` requests per model; ``mean`` is their average.
Only models of the catalog are recorded, so the table is bounded by the catalog's size.
"""

from __future__ import annotations

from collections import deque


class Latencies:
    def __init__(self, window: int) -> None:
        self._window = window
        self._samples: dict[str, deque[float]] = {}

    def record(self, model: str, seconds: float) -> None:
        samples = self._samples.get(model)
        if samples is None:
            samples = self._samples[model] = deque(maxlen=self._window)
        samples.append(seconds)

    def resize(self, window: int) -> None:
        """Keep the latest ``window`` requests per model from now on (a config reload)."""
        if window != self._window:
            self._window = window
            self._samples = {model: deque(s, maxlen=window) for model, s in self._samples.items()}

    def mean(self, model: str) -> float | None:
        """The mean time to first byte of the model's latest requests; None before the first."""
        samples = self._samples.get(model)
        return sum(samples) / len(samples) if samples else None

    def means(self) -> dict[str, float]:
        return {model: sum(s) / len(s) for model, s in self._samples.items() if s}
