"""Cache directives: request Cache-Control and Pragma, response storability, usability of an entry
of a given age, and the Cache-Status header."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.cache.control import (
    MAX_DELTA_SECONDS,
    RequestDirectives,
    cache_status,
    remaining_ttl,
    request_directives,
    response_forbids_storing,
    usable,
)
from gateway.types import Header

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

ANY = MAX_DELTA_SECONDS


def cc(*values: bytes) -> list[Header]:
    return [(b"cache-control", value) for value in values]


# --- request_directives


def test_no_header_means_no_directives() -> None:
    assert request_directives([]) == RequestDirectives()
    assert request_directives([(b"content-type", b"application/json")]) == RequestDirectives()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"no-store", RequestDirectives(no_store=True)),
        (b"no-cache", RequestDirectives(no_cache=True)),
        (b"only-if-cached", RequestDirectives(only_if_cached=True)),
        (b"max-age=60", RequestDirectives(max_age=60)),
        (b"min-fresh=10", RequestDirectives(min_fresh=10)),
        (b"max-stale=30", RequestDirectives(max_stale=30)),
        (b"max-stale", RequestDirectives(max_stale=ANY)),
        (b"max-age=0", RequestDirectives(max_age=0)),
        (b"max-age=007", RequestDirectives(max_age=7)),
        (b"", RequestDirectives()),
        (b" , ,, ", RequestDirectives()),
        (b'public, must-understand, x-ext="a, b", stale-if-error=5', RequestDirectives()),  # unknown
    ],
)
def test_each_directive(value: bytes, expected: RequestDirectives) -> None:
    assert request_directives(cc(value)) == expected


def test_names_and_directives_in_any_case() -> None:
    headers = [(b"Cache-Control", b"No-Cache, MAX-AGE=5"), (b"CACHE-CONTROL", b"Max-Stale=7, ONLY-IF-CACHED")]
    assert request_directives(headers) == RequestDirectives(no_cache=True, max_age=5, max_stale=7, only_if_cached=True)


def test_directives_across_several_lines() -> None:
    headers = [
        (b"cache-control", b"max-age=60"),
        (b"accept", b"*/*"),
        (b"cache-control", b"min-fresh=5, no-store"),
        (b"cache-control", b"max-stale"),
    ]
    assert request_directives(headers) == RequestDirectives(no_store=True, max_age=60, min_fresh=5, max_stale=ANY)


def test_repeated_directives_keep_the_most_restrictive_value() -> None:
    assert request_directives(cc(b"max-age=60, max-age=30", b"max-age=90")).max_age == 30
    assert request_directives(cc(b"min-fresh=5", b"min-fresh=20, min-fresh=1")).min_fresh == 20
    assert request_directives(cc(b"max-stale", b"max-stale=9")).max_stale == 9
    assert request_directives(cc(b"max-stale=9, max-stale=x")).max_stale == 9


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b'max-age="60"', 60),
        (b'max-age = "60" ', 60),
        (b"max-age= 60", 60),
        (b'max-age="6\\0"', 60),  # a quoted-pair
        (b'max-age="60", no-cache', 60),
        (b'x="a,max-age=1", max-age=60', 60),  # a comma inside quotes separates nothing
    ],
)
def test_quoted_and_spaced_values(value: bytes, expected: int) -> None:
    assert request_directives(cc(value)).max_age == expected


def test_a_comma_inside_quotes_does_not_start_a_directive() -> None:
    assert request_directives(cc(b'x="no-store, max-age=1", max-stale=2')) == RequestDirectives(max_stale=2)


@pytest.mark.parametrize(
    "value",
    [
        b"max-age",
        b"max-age=",
        b"max-age=-1",
        b"max-age=1.5",
        b"max-age=abc",
        b'max-age="1"x',
        b"max-age=1 2",
        b"max-age=\xb2",
    ],
)
def test_an_invalid_max_age_is_max_age_zero(value: bytes) -> None:
    assert request_directives(cc(value)) == RequestDirectives(max_age=0)


@pytest.mark.parametrize("directive", [b"min-fresh", b"max-stale"])
@pytest.mark.parametrize("argument", [b"=", b"=-1", b"=1.5", b"=abc", b'="1', b"=1s", b"=+5"])
def test_invalid_min_fresh_and_max_stale_are_ignored(directive: bytes, argument: bytes) -> None:
    assert request_directives(cc(directive + argument)) == RequestDirectives()


def test_a_bare_min_fresh_is_ignored() -> None:
    assert request_directives(cc(b"min-fresh")) == RequestDirectives()


@pytest.mark.parametrize("digits", [b"2147483648", b"2147483649", b"99999999999", b"9" * 5000])
def test_huge_delta_seconds_become_2_to_the_31(digits: bytes) -> None:
    got = request_directives(cc(b"max-age=" + digits, b"min-fresh=" + digits, b"max-stale=" + digits))
    assert got == RequestDirectives(max_age=2**31, min_fresh=2**31, max_stale=2**31)
    assert request_directives(cc(b"max-age=2147483647")).max_age == 2**31 - 1


def test_pragma_no_cache_only_without_cache_control() -> None:
    assert request_directives([(b"pragma", b"no-cache")]) == RequestDirectives(no_cache=True)
    assert request_directives([(b"Pragma", b"foo, No-Cache")]) == RequestDirectives(no_cache=True)
    assert request_directives([(b"pragma", b"foo")]) == RequestDirectives()
    assert request_directives([(b"pragma", b"no-cache"), (b"cache-control", b"max-age=5")]) == RequestDirectives(
        max_age=5
    )
    assert request_directives([(b"cache-control", b""), (b"pragma", b"no-cache")]) == RequestDirectives()


@FUZZ
@given(st.lists(st.tuples(st.sampled_from([b"cache-control", b"Pragma", b"x"]) | st.binary(max_size=20), st.binary())))
def test_garbage_never_raises(headers: list[Header]) -> None:
    directives = request_directives(headers)
    for value in (directives.max_age, directives.min_fresh, directives.max_stale):
        assert value is None or 0 <= value <= MAX_DELTA_SECONDS
    response_forbids_storing(headers)


@FUZZ
@given(st.text(alphabet='max-agestl=0123456789",\\ \t;-', max_size=40))
def test_directive_like_garbage_never_raises(text: str) -> None:
    request_directives(cc(text.encode()))


# --- response_forbids_storing


@pytest.mark.parametrize(
    ("headers", "forbids"),
    [
        ([], False),
        (cc(b"max-age=60, public"), False),
        (cc(b"no-store"), True),
        (cc(b"Private"), True),
        (cc(b'private="set-cookie"'), True),
        (cc(b"no-cache"), False),  # what event streams say to proxies that buffer: not a ban on storing
        (cc(b"max-age=60", b"s-maxage=10, NO-STORE"), True),
        (cc(b'x="no-store"'), False),
        ([(b"pragma", b"no-cache")], False),
        ([(b"x-cache-control", b"no-store")], False),
    ],
)
def test_response_forbids_storing(headers: list[Header], forbids: bool) -> None:
    assert response_forbids_storing(headers) is forbids


# --- usable

D = RequestDirectives


@pytest.mark.parametrize(
    ("age", "ttl", "directives", "expected"),
    [
        # fresh while age < ttl
        (0, 300, D(), True),
        (299.9, 300, D(), True),
        (300, 300, D(), False),
        (0, 0, D(), False),
        (-5, 300, D(), True),  # a clock step back counts as age 0
        # no-cache: never
        (0, 300, D(no_cache=True), False),
        (0, 300, D(no_cache=True, max_stale=ANY), False),
        # max-age caps the age
        (59.9, 300, D(max_age=60), True),
        (60, 300, D(max_age=60), False),
        (0, 300, D(max_age=0), False),
        (5, 10, D(max_age=60), True),
        (10, 10, D(max_age=60), False),
        # min-fresh: still fresh that long after now
        (0, 300, D(min_fresh=299), True),
        (1, 300, D(min_fresh=299), False),
        (0.5, 300, D(min_fresh=299), True),
        (0, 300, D(min_fresh=0), True),
        (40, 300, D(max_age=60, min_fresh=19), True),
        (40, 300, D(max_age=60, min_fresh=20), False),  # min-fresh measured against min(ttl, max_age)
        # max-stale: a stale entry within it of its own lifetime
        (300, 300, D(max_stale=0), True),
        (300.1, 300, D(max_stale=0), False),
        (330, 300, D(max_stale=30), True),
        (330.5, 300, D(max_stale=30), False),
        (10**9, 300, D(max_stale=ANY), True),
        # max-stale does not lift a max-age cap nor a min-fresh wish
        (70, 300, D(max_age=60, max_stale=ANY), False),
        (310, 300, D(max_age=600, max_stale=30), True),  # measured from ttl, not min(ttl, max_age)
        (310, 300, D(max_age=305, max_stale=30), False),
        (310, 300, D(min_fresh=0, max_stale=30), False),
        (290, 300, D(min_fresh=20, max_stale=ANY), False),
    ],
)
def test_usable(age: float, ttl: float, directives: RequestDirectives, expected: bool) -> None:
    assert usable(age, ttl, directives) is expected


@FUZZ
@given(st.floats(0, 1e6), st.floats(0, 1e6), st.integers(0, ANY))
def test_a_request_without_directives_gets_exactly_the_fresh(age: float, ttl: float, max_stale: int) -> None:
    assert usable(age, ttl, D()) is (age < ttl)
    assert usable(age, ttl, D(max_stale=max_stale)) is (age < ttl or age - ttl <= max_stale)


@pytest.mark.parametrize(
    ("age", "ttl", "expected"),
    [(0, 300, 300), (10.2, 300, 289), (10.9, 300, 289), (300, 300, 0), (300.5, 300, -1), (0, float("inf"), 2**31)],
)
def test_remaining_ttl(age: float, ttl: float, expected: int) -> None:
    assert remaining_ttl(age, ttl) == expected


# --- cache_status


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"hit": True, "ttl": 290}, b"flexai-gateway; hit; ttl=290"),
        ({"hit": False, "fwd": "miss", "stored": True}, b"flexai-gateway; fwd=miss; stored"),
        ({"hit": False, "fwd": "request"}, b"flexai-gateway; fwd=request"),
        (
            {"hit": False, "fwd": "bypass", "detail": "not-deterministic"},
            b"flexai-gateway; fwd=bypass; detail=not-deterministic",
        ),
        ({"hit": False, "fwd": "miss", "collapsed": True}, b"flexai-gateway; fwd=miss; collapsed"),
        ({"hit": True, "ttl": -3}, b"flexai-gateway; hit; ttl=-3"),
        ({"hit": True, "name": "edge"}, b"edge; hit"),
        ({"hit": False, "fwd": "stale", "ttl": 0, "stored": True}, b"flexai-gateway; fwd=stale; ttl=0; stored"),
    ],
)
def test_cache_status(kwargs: dict[str, object], expected: bytes) -> None:
    assert cache_status(**kwargs) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("detail", "expected"),
    [
        ("body too_large", b"detail=body-too-large"),
        ('a"b;c=d', b"detail=a-b-c-d"),
        ("429-upstream", b"detail=x429-upstream"),
        ("", b"detail=x"),
        ("é", b"detail=x-"),
        ("\r\nX-Injected: 1", b"detail=x--X-Injected--1"),
    ],
)
def test_detail_is_sanitised_to_a_token(detail: str, expected: bytes) -> None:
    status = cache_status(hit=False, fwd="bypass", detail=detail)
    assert status == b"flexai-gateway; fwd=bypass; " + expected
    assert status.isascii()


@FUZZ
@given(st.text(), st.text())
def test_cache_status_is_always_one_ascii_line(fwd: str, detail: str) -> None:
    status = cache_status(hit=False, fwd=fwd, detail=detail, name=detail)
    assert status.isascii()
    assert b"\r" not in status
    assert b"\n" not in status
    assert status.count(b";") == 2
    assert status.count(b",") == 0
