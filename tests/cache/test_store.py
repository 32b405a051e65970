"""The in-memory tier: bounded in bytes, least recently used evicted first, expiry by the clock."""

from __future__ import annotations

import random

import pytest

from gateway.cache.store import ENTRY_OVERHEAD, Entry, MemoryStore


class Clock:
    """A clock that moves only when told."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def entry(
    clock: Clock,
    body: bytes = b"x" * 100,
    *,
    ttl: float = 60.0,
    model: str = "m",
    namespace: str = "ns",
    headers: tuple[tuple[bytes, bytes], ...] = ((b"content-type", b"application/json"),),
) -> Entry:
    return Entry(
        status=200,
        headers=headers,
        body=body,
        event_stream=False,
        model=model,
        namespace=namespace,
        stored_at=clock(),
        ttl=ttl,
    )


def test_entry_size_counts_body_headers_and_overhead() -> None:
    clock = Clock()
    e = entry(clock, b"abc", headers=((b"a", b"bc"), (b"de", b"")))
    assert e.size == 3 + 3 + 2 + ENTRY_OVERHEAD
    assert entry(clock, b"", headers=()).size == ENTRY_OVERHEAD


def test_put_then_get() -> None:
    clock = Clock()
    store = MemoryStore(10_000, clock=clock)
    e = entry(clock)
    assert store.put("k", e) is True
    assert store.get("k") is e
    assert store.get("other") is None
    assert (store.entries, store.bytes) == (1, e.size)


def test_bytes_never_exceed_the_bound() -> None:
    clock = Clock()
    store = MemoryStore(20_000, clock=clock)
    rng = random.Random(7)
    for i in range(2_000):
        store.put(f"k{rng.randrange(300)}", entry(clock, b"x" * rng.randrange(0, 4_000), ttl=rng.uniform(1, 50)))
        if i % 7 == 0:
            store.get(f"k{rng.randrange(300)}")
        clock.advance(rng.uniform(0, 0.5))
        assert store.bytes <= 20_000
    assert store.evictions > 0
    assert store.entries > 0


def test_least_recently_used_goes_first_and_is_counted() -> None:
    clock = Clock()
    one = entry(clock).size
    store = MemoryStore(3 * one, clock=clock)
    for key in "abc":
        assert store.put(key, entry(clock))
    assert store.get("a") is not None  # a is now more recent than b and c
    assert store.put("d", entry(clock))
    assert store.get("b") is None
    assert store.evictions == 1
    assert store.put("e", entry(clock))
    assert store.get("c") is None
    assert [k for k in "ade" if store.get(k) is not None] == ["a", "d", "e"]
    assert store.evictions == 2
    assert store.entries == 3


def test_a_big_entry_evicts_as_many_as_it_needs() -> None:
    clock = Clock()
    small = entry(clock, b"")
    store = MemoryStore(10 * small.size, clock=clock)
    for i in range(10):
        store.put(str(i), small)
    assert store.put("big", entry(clock, b"x" * (3 * small.size - ENTRY_OVERHEAD), headers=()))  # 3 smalls
    assert store.evictions == 3
    assert [store.get(str(i)) is None for i in range(4)] == [True, True, True, False]


def test_expiry_at_the_boundary() -> None:
    clock = Clock()
    store = MemoryStore(10_000, clock=clock)
    store.put("k", entry(clock, ttl=60))
    clock.advance(59.999)
    assert store.get("k") is not None
    clock.advance(0.001)  # stored_at + ttl: gone
    assert store.get("k") is None
    assert store.entries == 0
    assert store.bytes == 0
    assert store.expirations == 1
    assert store.evictions == 0


def test_stale_grace_keeps_expired_entries_that_long() -> None:
    clock = Clock()
    store = MemoryStore(10_000, stale_grace=30, clock=clock)
    e = entry(clock, ttl=60)
    store.put("k", e)
    clock.advance(89.9)
    assert store.get("k") is e  # stale, still there for max-stale requests
    clock.advance(0.1)
    assert store.get("k") is None


def test_expired_entries_make_room_without_counting_as_evictions() -> None:
    clock = Clock()
    one = entry(clock).size
    store = MemoryStore(2 * one, clock=clock)
    store.put("short", entry(clock, ttl=1))
    store.put("long", entry(clock, ttl=100))
    clock.advance(2)
    assert store.put("new", entry(clock))
    assert store.get("long") is not None
    assert (store.evictions, store.expirations) == (0, 1)


def test_an_entry_stored_long_ago_may_already_be_gone() -> None:
    clock = Clock()
    store = MemoryStore(10_000, stale_grace=10, clock=clock)
    old = entry(clock, ttl=60)
    clock.advance(70)
    assert store.put("k", old) is False
    assert store.get("k") is None
    clock.advance(-1)
    assert store.put("k", old) is True


def test_replacing_the_same_key() -> None:
    clock = Clock()
    store = MemoryStore(10_000, clock=clock)
    first, second = entry(clock, b"1" * 10), entry(clock, b"2" * 500)
    store.put("k", first)
    assert store.put("k", second)
    assert store.get("k") is second
    assert (store.entries, store.bytes, store.evictions) == (1, second.size, 0)


def test_replacing_near_capacity_does_not_evict_the_replaced_key_as_an_eviction() -> None:
    clock = Clock()
    one = entry(clock).size
    store = MemoryStore(2 * one, clock=clock)
    store.put("a", entry(clock))
    store.put("b", entry(clock))
    assert store.put("a", entry(clock, b"y" * 100))
    assert store.evictions == 0
    assert store.get("b") is not None


def test_a_too_large_entry_is_refused() -> None:
    clock = Clock()
    small = entry(clock)
    store = MemoryStore(small.size, clock=clock)
    assert store.put("fits", small) is True
    big = entry(clock, b"x" * 101)
    assert store.put("big", big) is False
    assert store.get("big") is None
    assert store.get("fits") is small  # nothing evicted for it
    assert store.evictions == 0
    assert store.put("fits", big) is False  # and the key it would have replaced is empty
    assert store.get("fits") is None
    assert MemoryStore(0, clock=clock).put("k", small) is False


def test_purge() -> None:
    clock = Clock()
    store = MemoryStore(100_000, clock=clock)
    for model in ("m1", "m2"):
        for namespace in ("a", "b"):
            store.put(f"{model}/{namespace}", entry(clock, model=model, namespace=namespace))
    assert store.purge(model="m1") == 2
    assert store.get("m1/a") is None
    assert store.get("m2/a") is not None
    assert store.purge(namespace="b") == 1
    assert store.get("m2/b") is None
    assert store.purge(model="m2", namespace="b") == 0
    assert store.purge(model="nope") == 0
    store.put("x", entry(clock))
    assert store.purge() == 2
    assert (store.entries, store.bytes, store.evictions) == (0, 0, 0)


def test_purge_does_not_count_expired_entries_nor_change_recency() -> None:
    clock = Clock()
    one = entry(clock).size
    store = MemoryStore(3 * one, clock=clock)
    store.put("old", entry(clock, ttl=1, model="m"))
    store.put("a", entry(clock, model="other"))
    store.put("b", entry(clock, model="other"))
    clock.advance(5)
    assert store.purge(model="m") == 0
    store.put("c", entry(clock))
    store.put("d", entry(clock))  # evicts a, the least recently used: purge did not touch it
    assert store.get("a") is None
    assert store.get("b") is not None


def test_delete() -> None:
    clock = Clock()
    store = MemoryStore(10_000, clock=clock)
    store.put("k", entry(clock, ttl=1))
    store.delete("k")
    store.delete("k")
    assert store.get("k") is None
    store.put("k", entry(clock, ttl=1))
    clock.advance(2)
    store.delete("k")  # expired: no error
    assert store.entries == 0


@pytest.mark.parametrize(("max_bytes", "grace"), [(-1, 0.0), (10, -1.0)])
def test_invalid_bounds_are_refused(max_bytes: int, grace: float) -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        MemoryStore(max_bytes, stale_grace=grace)
