"""Read ``usage`` out of response bytes as they are relayed, without changing them.

A ``UsageMeter`` watches the bytes of one response (a JSON body or a server-sent event stream) and
reports the ``Usage`` it saw. Relaying is never delayed and the bytes are never changed, with one
exception: when the gateway itself asked the upstream for streamed usage on the client's behalf
(``gateway.usage.rewrite.with_include_usage``), the meter removes that one extra usage-only event
from the stream, so the client receives exactly what it would have received without the gateway's
request. The stream's events are found by ``gateway.usage.sse``; what a usage object means is
``gateway.usage.model``.

One more rewrite is asked for by the caller, never made on its own: with ``annotate``, the usage
events of a stream whose client asked for usage get extra members in their ``usage`` object (the
gateway's cost), re-encoded with orjson.

A compressed JSON body (``Content-Encoding: gzip`` or ``deflate``) is metered from a decompressed
copy, bounded like any JSON body; the client still gets the upstream's compressed bytes. Other
encodings, and compressed event streams, yield no usage (FlexAI sends SSE uncompressed, and the
gateway asks for ``identity`` when the client sent no ``Accept-Encoding``).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import Any, Final

import orjson

from gateway.usage.model import Usage, _token_usage, usage_from_response
from gateway.usage.sse import MAX_EVENT_BYTES, SseSplitter

# A JSON body longer than this is not kept: its usage is then unknown (None).
MAX_JSON_BYTES: Final = 1 << 20

_WHITESPACE: Final = b" \t\r\n"

# What a CR that ended the previous chunk terminated (its LF, if any, is the next chunk's first byte).
_CR_IN_EVENT: Final = 0  # a line inside an event: the LF belongs to the event
_CR_EMITTED: Final = 1  # the blank line of an event sent on: send the LF on
_CR_DROPPED: Final = 2  # the blank line of the stripped usage event: drop the LF too

# Content-Encodings a JSON body is metered through, and zlib's window bits for each.
DECODABLE_ENCODINGS: Final = {b"gzip": 16 + zlib.MAX_WBITS, b"x-gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}

# Given the usage an event reported: members to add to its usage object (None: leave the event alone).
Annotate = Callable[[Usage], Mapping[str, Any] | None]


class UsageMeter:
    """Watches the bytes of one response as they are relayed and reports its usage.

    Per chunk: ``out = meter.feed(chunk)`` and send ``out`` on (it may be empty). At the end of the
    body: send ``meter.flush()`` (bytes held back, only ever non-empty when stripping), then
    ``meter.finish()`` gives the usage. After a cut stream call ``finish()`` alone: it returns what
    was seen.

    JSON bodies (``event_stream=False``): every chunk is returned unchanged; up to
    ``max_json_bytes`` are kept and parsed at ``finish()`` (a longer body: usage None). With
    ``content_encoding`` (a key of ``DECODABLE_ENCODINGS``) the body is decompressed for metering,
    at most ``max_json_bytes`` of output (a bomb costs nothing). ``strip_usage_chunk`` and
    ``annotate`` are ignored.

    Event streams: ``data:`` lines are scanned as they pass (events may be split across chunks at any
    byte; LF, CRLF and CR line ends), only events mentioning a ``"usage"`` object are parsed, and the
    last usage object wins. Without stripping, each chunk is returned at once, untouched (the very
    same object). With ``strip_usage_chunk`` (the gateway added ``include_usage``), events whose
    data is an object with ``"choices": []`` and a ``usage`` object are removed, bytes and blank
    line included, and every other byte is kept; complete events go out at once, and only an
    unfinished event at the end of a chunk is held back, until it completes (or exceeds
    ``max_event_bytes``: then it is sent on and no longer a candidate).

    With ``annotate`` (the client asked for usage itself), events made of ``data:`` lines only whose
    data is an object with a ``usage`` object are replaced by ``data: <json>`` whose ``usage`` has
    the members ``annotate`` returns added (the rest of the object as parsed, re-encoded); holding
    back works as for stripping. ``rewrites`` tells whether the meter may change the body's length.
    """

    __slots__ = (
        "_annotate",
        "_body",
        "_cr_context",
        "_decoder",
        "_event_passthrough",
        "_event_stream",
        "_finished",
        "_held",
        "_max_event",
        "_max_json",
        "_overflow",
        "_rewrite",
        "_splitter",
        "_strip",
        "_usage",
        "document",
    )

    def __init__(
        self,
        event_stream: bool,
        strip_usage_chunk: bool,
        *,
        annotate: Annotate | None = None,
        content_encoding: bytes | None = None,
        max_json_bytes: int = MAX_JSON_BYTES,
        max_event_bytes: int = MAX_EVENT_BYTES,
    ) -> None:
        self._event_stream = event_stream
        self._strip = event_stream and strip_usage_chunk
        self._annotate = annotate if event_stream else None
        self._rewrite = self._strip or self._annotate is not None
        self._max_json = max_json_bytes
        self._max_event = max_event_bytes
        self._usage: Usage | None = None
        self._finished = False
        self.document: Any = None  # a JSON body, parsed (after ``finish``); None when not readable
        # JSON bodies
        self._body = bytearray()
        self._overflow = False  # the body is not usable: too long, or not decodable
        wbits = DECODABLE_ENCODINGS.get(content_encoding or b"")
        self._decoder = None if wbits is None or event_stream else zlib.decompressobj(wbits)
        # Event streams: the events of the stream, found as its chunks pass
        self._splitter = SseSplitter(max_event_bytes)
        # Event streams, rewriting: the raw bytes of the unfinished event, held back
        self._cr_context = _CR_IN_EVENT
        self._held = bytearray()
        self._event_passthrough = False  # the current event was too long to hold: sent on as it comes

    @property
    def rewrites(self) -> bool:
        """Whether the bytes sent on may differ from those fed (the body's length is then unknown)."""
        return self._rewrite

    def feed(self, chunk: bytes) -> bytes:
        """Watch one chunk; returns the bytes to send on to the client."""
        if not self._event_stream:
            self._keep_json(chunk)
            return chunk
        if not chunk:
            return chunk
        if self._rewrite:
            return self._rewrite_events(chunk)
        for _end, data, data_only in self._splitter.feed(chunk):
            if data is not None:
                self._inspect(data, data_only)
        return chunk

    def flush(self) -> bytes:
        """The bytes held back at the end of the body (an unfinished last event); send them on."""
        held = bytes(self._held)
        self._held.clear()
        return held

    def finish(self) -> Usage | None:
        """The usage seen (the last one of a stream), or None. Idempotent."""
        if self._finished:
            return self._usage
        self._finished = True
        if not self._event_stream:
            if not self._overflow and self._body:
                try:
                    self.document = orjson.loads(self._body)
                except orjson.JSONDecodeError:
                    self.document = None
                self._usage = usage_from_response(self.document)
            self._body = bytearray()
            return self._usage
        # A stream that ended (or was cut) inside an event: inspect what arrived of it (to record
        # its usage only: nothing can be replaced any more).
        data = self._splitter.close()
        if data is not None:
            self._inspect(data, False)
        return self._usage

    # JSON bodies

    def _keep_json(self, chunk: bytes) -> None:
        if self._overflow:
            return
        if self._decoder is not None:
            try:  # at most one byte past the bound: enough to know the body is too long
                chunk = self._decoder.decompress(chunk, self._max_json - len(self._body) + 1)
            except zlib.error:
                self._overflow = True
                self._body = bytearray()
                return
        if len(self._body) + len(chunk) > self._max_json:
            self._overflow = True
            self._body = bytearray()
            return
        self._body += chunk

    # Event streams

    def _rewrite_events(self, chunk: bytes) -> bytes:
        """Stripping or annotating: the chunk's complete events, each sent on, dropped or replaced;
        an unfinished event at its end is held back (see the class docstring)."""
        splitter = self._splitter
        events = splitter.feed(chunk)
        if not events and (not splitter.lead or self._cr_context == _CR_IN_EVENT):
            # No event ends here (the usual case of small chunks): all of it continues the current one.
            if splitter.cr_pending:
                self._cr_context = _CR_IN_EVENT
            if self._event_passthrough:
                return chunk
            self._held += chunk
            if len(self._held) <= self._max_event:
                return b""
            held = chunk if len(self._held) == len(chunk) else bytes(self._held)
            self._held.clear()
            self._event_passthrough = True
            return held
        out: list[bytes] = []
        n = len(chunk)
        seg = 0  # where the chunk's bytes not yet sent on, dropped or held start
        if splitter.lead:  # the LF of a CRLF whose CR ended the previous chunk
            if self._cr_context == _CR_EMITTED:
                out.append(b"\n")
                seg = 1
            elif self._cr_context == _CR_DROPPED:
                seg = 1
        replacement = None
        end = 0
        for end, data, data_only in events:
            replacement = None if data is None else self._inspect(data, data_only)
            if self._event_passthrough:  # its first bytes went out already: too late
                replacement = None
            if replacement is None:
                if self._held:
                    out.append(bytes(self._held))
                out.append(chunk[seg:end])
            elif replacement:
                out.append(replacement)
            self._held.clear()
            self._event_passthrough = False
            seg = end
        if splitter.cr_pending:  # what the CR that ends the chunk ended decides the fate of its LF
            self._cr_context = _CR_IN_EVENT if end != n else _CR_EMITTED if replacement is None else _CR_DROPPED
        if seg < n:
            if self._event_passthrough:
                out.append(chunk[seg:])
            else:
                self._held += chunk[seg:]
                if len(self._held) > self._max_event:
                    out.append(bytes(self._held))
                    self._held.clear()
                    self._event_passthrough = True
        if len(out) == 1 and len(out[0]) == n:
            return chunk
        return b"".join(out)

    def _inspect(self, data: bytes, data_only: bool) -> bytes | None:
        """Record the usage an event's data carries; returns what replaces the event when rewriting
        (``b""``: the usage-only chunk to strip), None to send it on as it is. An event with lines
        other than data lines (``data_only`` false) is never annotated."""
        if not _mentions_usage_object(data):
            return None
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict):
            return None
        block = obj.get("usage")
        if not isinstance(block, dict):
            return None
        self._usage = usage = _token_usage(block)
        if self._strip:
            choices = obj.get("choices")
            return b"" if isinstance(choices, list) and not choices else None
        if self._annotate is None or not data_only:
            return None
        members = self._annotate(usage)
        if not members:
            return None
        try:
            return b"data: " + orjson.dumps({**obj, "usage": {**block, **members}}) + b"\n\n"
        except orjson.JSONEncodeError:
            return None


def _mentions_usage_object(data: bytes) -> bool:
    """A cheap test before parsing: ``"usage"`` followed by ``:`` and ``{`` (not ``null``)."""
    size = len(data)
    i = data.find(b'"usage"')
    while i >= 0:
        j = i + 7
        while j < size and data[j] in _WHITESPACE:
            j += 1
        if j < size and data[j] == 0x3A:  # ":"
            j += 1
            while j < size and data[j] in _WHITESPACE:
                j += 1
            if j < size and data[j] == 0x7B:  # "{"
                return True
        i = data.find(b'"usage"', i + 7)
    return False
