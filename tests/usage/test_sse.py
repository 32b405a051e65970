"""The incremental SSE splitter: events found the same however the stream is cut into chunks."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.usage.sse import SseSplitter

FRAMINGS = [b"\n", b"\r\n", b"\r"]
PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# (data, data_only, absolute end offset) per event; then the data of an unfinished last event.
Found = tuple[list[tuple[bytes | None, bool, int]], bytes | None]


def stream(nl: bytes) -> bytes:
    """Events of every kind: one data line, several, an empty data line, comments and other fields."""
    return nl.join(
        [
            b'data: {"a":1}',
            b"",
            b"data:first",
            b"data: second",
            b"data",
            b"",
            b": a comment",
            b"",
            b"event: update",
            b"data: with a field",
            b"id: 7",
            b"",
            b"datum: not data",
            b"data:  two spaces",
            b"",
            b"data: [DONE]",
            b"",
            b"data: unfinished",
        ]
    )


EXPECTED_DATA = [
    (b'{"a":1}', True),
    (b"first\nsecond\n", True),
    (None, False),
    (b"with a field", False),
    (b" two spaces", False),
    (b"[DONE]", True),
]


def reference(body: bytes, max_event: int = 1 << 20) -> Found:
    """The events of a whole body, found by a plain (non-incremental) reading of the SSE rules."""
    events: list[tuple[bytes | None, bool, int]] = []
    data: list[bytes] = []
    only, oversize, pos = True, False, 0
    for match in re.finditer(rb"([^\r\n]*)(\r\n|\r|\n)", body):
        line, pos = match.group(1), match.end()
        if len(line) > max_event:
            oversize = True
        elif not line:
            joined = b"\n".join(data) if data else None
            events.append((None if oversize else joined, only, pos))
            data, only, oversize = [], True, False
        elif line == b"data" or line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
            if sum(map(len, data)) > max_event:
                oversize = True
        else:
            only = False
    tail = body[pos:]
    if tail and len(tail) <= max_event and (tail == b"data" or tail.startswith(b"data:")):
        value = tail[5:]
        data.append(value[1:] if value.startswith(b" ") else value)
    return events, (b"\n".join(data) if data and not oversize else None)


def split(chunks: Sequence[bytes], max_event: int = 1 << 20) -> Found:
    """Feed ``chunks`` to one splitter; event ends made absolute (a CRLF cut after its CR: past the LF)."""
    splitter = SseSplitter(max_event)
    found: list[tuple[bytes | None, bool, int]] = []
    offset = 0
    for chunk in chunks:
        events = splitter.feed(chunk)
        if splitter.lead and found and found[-1][2] == offset:
            data, only, end = found[-1]
            found[-1] = (data, only, end + 1)  # the LF that completes the CRLF belongs to that event
        found.extend((data, only, offset + end) for end, data, only in events)
        offset += len(chunk)
    return found, splitter.close()


@pytest.mark.parametrize("nl", FRAMINGS)
def test_one_chunk_matches_the_reference(nl: bytes) -> None:
    body = stream(nl)
    events, tail = split([body])
    assert (events, tail) == reference(body)
    assert [(data, only) for data, only, _ in events] == EXPECTED_DATA
    assert tail == b"unfinished"


@pytest.mark.parametrize("nl", FRAMINGS)
def test_split_at_every_offset(nl: bytes) -> None:
    body = stream(nl)
    expected = reference(body)
    for cut in range(len(body) + 1):
        assert split([body[:cut], body[cut:]]) == expected, cut


@pytest.mark.parametrize("nl", FRAMINGS)
def test_split_byte_by_byte(nl: bytes) -> None:
    body = stream(nl)
    assert split([body[i : i + 1] for i in range(len(body))]) == reference(body)


@PROPERTY
@given(st.data())
def test_split_anywhere_with_mixed_line_ends(data: st.DataObject) -> None:
    parts = data.draw(st.lists(st.sampled_from([b"data: x", b"data:", b": c", b"id: 1", b"", b"datax"]), max_size=12))
    ends = data.draw(st.lists(st.sampled_from(FRAMINGS), min_size=len(parts), max_size=len(parts)))
    body = b"".join(p + e for p, e in zip(parts, ends, strict=True))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=6)))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    assert split(chunks) == reference(body)


def test_a_cr_then_lf_in_the_next_chunk_is_one_line_end() -> None:
    splitter = SseSplitter()
    assert splitter.feed(b"data: a\r\n\r") == [(10, b"a", True)]
    assert splitter.cr_pending
    assert splitter.feed(b"\ndata: b\r\r") == [(10, b"b", True)]
    assert splitter.lead == 1
    assert splitter.cr_pending
    assert splitter.feed(b"\r") == [(1, None, True)]  # a CR after a CR: a blank line of its own
    assert splitter.lead == 0


def test_an_empty_chunk_changes_nothing() -> None:
    splitter = SseSplitter()
    assert splitter.feed(b"data: a\r") == []
    assert splitter.feed(b"") == []
    assert splitter.feed(b"\n\n") == [(2, b"a", True)]
    assert splitter.lead == 1


@pytest.mark.parametrize("nl", FRAMINGS)
@pytest.mark.parametrize("size", [1, 7, 1000])
def test_oversize_lines_and_events_lose_their_data_not_their_boundaries(nl: bytes, size: int) -> None:
    limit = 16
    long = b"data: " + b"x" * 40
    body = nl.join([b"data: short", b"", long, b"", b"data: 0123456789", b"data: 0123456789", b"", long, b"data: ok"])
    body += nl + nl + b"data: after" + nl + nl + long
    expected = reference(body, limit)
    assert [(data, only) for data, only, _ in expected[0]] == [
        (b"short", True),
        (None, True),  # one line over the bound
        (None, True),  # data over the bound in total
        (None, True),
        (b"after", True),
    ]
    assert expected[1] is None  # an unfinished oversize last line
    chunks = [body[i : i + size] for i in range(0, len(body), size)]
    assert split(chunks, limit) == expected


def test_memory_is_bounded_by_the_limit() -> None:
    splitter = SseSplitter(64)
    for _ in range(1000):
        assert splitter.feed(b"data: " + b"y" * 100) == []
    assert len(splitter._line) == 0
    assert splitter.feed(b"\n\ndata: z\n\n") == [(2, None, True), (11, b"z", True)]


def test_close_resets_the_splitter() -> None:
    splitter = SseSplitter()
    splitter.feed(b"data: a\ndata: b")
    assert splitter.close() == b"a\nb"
    assert splitter.close() is None
    assert splitter.feed(b"data: c\n\n") == [(9, b"c", True)]
