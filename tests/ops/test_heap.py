"""The serving GC policy: start-up's heap frozen, young collections less often."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gateway.ops.heap import SERVING_THRESHOLDS, freeze_startup_heap


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


@pytest.mark.usefixtures("restored_gc")
def test_freezing_the_startup_heap_sets_the_serving_thresholds() -> None:
    assert gc.get_threshold() != SERVING_THRESHOLDS
    kept = [object() for _ in range(3)]  # something alive at "start-up"
    freeze_startup_heap()
    assert gc.get_threshold() == SERVING_THRESHOLDS
    assert gc.get_freeze_count() >= len(kept)
