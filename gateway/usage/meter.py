"""Read ``usage`` out of response bytes as they are relayed, without changing them.

A ``UsageMeter`` watches the bytes of one response (a JSON body or a server-sent event stream) and
reports the ``Usage`` it saw. Relaying is never delayed and the bytes are never changed, with one
exception: when the gateway itself asked the upstream for streamed usage on the client's behalf
(``with_include_usage``), the meter removes that one extra usage-only event from the stream, so
the client receives exactly what it would have received without the gateway's request.

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
from dataclasses import dataclass
from typing import Any, Final

import orjson

from gateway.catalog.entries import non_negative
from gateway.jsonvalues import as_object

# A JSON body longer than this is not kept: its usage is then unknown (None).
MAX_JSON_BYTES: Final = 1 << 20
# The largest token count believed from an upstream (2**53 - 1: exact as a float, fits SQLite's
# INTEGER and every JSON reader): a larger reported number is clamped to it, never passed on.
MAX_COUNT: Final = (1 << 53) - 1
# An SSE event (or line) longer than this is not inspected, and not held back for stripping.
MAX_EVENT_BYTES: Final = 1 << 20

_CR: Final = 0x0D
_LF: Final = 0x0A
_WHITESPACE: Final = b" \t\r\n"

# What a CR that ended the previous chunk terminated (its LF, if any, is the next chunk's first byte).
_CR_IN_EVENT: Final = 0  # a line inside an event: the LF belongs to the event
_CR_EMITTED: Final = 1  # the blank line of an event sent on: send the LF on
_CR_DROPPED: Final = 2  # the blank line of the stripped usage event: drop the LF too

_INCLUDE_USAGE_MEMBER: Final = b'"stream_options":{"include_usage":true},'

# Content-Encodings a JSON body is metered through, and zlib's window bits for each.
DECODABLE_ENCODINGS: Final = {b"gzip": 16 + zlib.MAX_WBITS, b"x-gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}


@dataclass(frozen=True, slots=True)
class Usage:
    """What a response reported it used. Token counts are 0 when absent.

    ``total_tokens`` is the upstream's, or prompt + completion when it sent none. ``cached_tokens``
    comes from ``cache_read_input_tokens`` (FlexAI) or ``prompt_tokens_details.cached_tokens``
    (OpenAI). ``units``/``unit``: a non-token quantity the response reported, today the seconds of
    audio of a transcription (``unit == "second"``): the verbose_json ``duration`` when present,
    else a ``{"type": "duration", "seconds": n}`` usage block.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    units: float | None = None
    unit: str | None = None


# Given the usage an event reported: members to add to its usage object (None: leave the event alone).
Annotate = Callable[[Usage], Mapping[str, Any] | None]


def usage_from_response(obj: Any) -> Usage | None:
    """The usage of a decoded JSON response body (a completion, an embedding list, a
    transcription, images, a video job, ...), or None when it reports none."""
    if not isinstance(obj, dict):
        return None
    block = obj.get("usage")
    reported = _reported_units(obj, block)
    if not isinstance(block, dict):
        return None if reported is None else Usage(units=reported[0], unit=reported[1])
    usage = _token_usage(block)
    if reported is None:
        return usage
    return Usage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens, usage.cached_tokens, *reported)


def _reported_units(obj: Mapping[str, Any], block: Any) -> tuple[float, str] | None:
    """A non-token quantity the answer itself reports, so that it is billed rather than what the
    request asked for: seconds of audio (a transcription's ``duration`` or a duration usage block),
    seconds of video (a video job's ``seconds``), images made (the entries of an images answer)."""
    seconds = non_negative(obj.get("duration"))
    if seconds is None and isinstance(block, dict) and block.get("type") == "duration":
        seconds = non_negative(block.get("seconds"))
    if seconds is None and str(obj.get("object", "")).startswith("video"):
        raw = obj.get("seconds")
        seconds = non_negative(int(raw) if isinstance(raw, str) and raw.isdigit() and len(raw) < 6 else raw)
    if seconds is not None:
        return seconds, "second"
    data = obj.get("data")
    if isinstance(data, list) and data and all(isinstance(d, dict) and ("b64_json" in d or "url" in d) for d in data):
        return float(len(data)), "image"
    return None


def client_wants_usage(fields: Mapping[str, Any]) -> bool:
    """Whether the client itself asked for streamed usage (``stream_options.include_usage: true``)."""
    options = as_object(fields.get("stream_options"))
    return options is not None and options.get("include_usage") is True


def with_include_usage(body: bytes, fields: Mapping[str, Any]) -> bytes | None:
    """The request body with ``stream_options.include_usage = true``, or None to forward it as is.

    This is the one place the gateway changes request bytes: FlexAI reports the usage of a streamed
    completion only when asked, and without it spend cannot be tracked. Call it only for
    ``/v1/chat/completions`` and ``/v1/completions``; ``fields`` is ``body`` already parsed (a JSON
    object). Then the meter of the response must strip the extra usage event
    (``UsageMeter(True, strip_usage_chunk=True)``) and the caller must send the new Content-Length.

    - Not streamed (``fields["stream"] is not True``), or the client already set
      ``include_usage: true``: None.
    - No ``stream_options`` key: the bytes ``"stream_options":{"include_usage":true},`` are
      inserted right after the body's first ``{``; every other byte (key order, whitespace,
      number spelling, escapes) is the client's.
    - ``stream_options`` present (null, or an object whose ``include_usage`` is not ``true``): the
      whole body is re-encoded with orjson from ``fields``, ``stream_options`` keeping its place and
      its other options, ``include_usage`` set to ``true``. Whitespace and number spelling may
      change; key order is kept (duplicate keys collapse to the last value, as parsed).
    - ``stream_options`` of another type (the upstream will refuse it), or a body orjson cannot
      re-encode: None.
    """
    if fields.get("stream") is not True or client_wants_usage(fields):
        return None
    if "stream_options" not in fields:
        brace = body.find(b"{")
        if brace < 0:
            return None
        return body[: brace + 1] + _INCLUDE_USAGE_MEMBER + body[brace + 1 :]
    raw = fields["stream_options"]
    options = as_object(raw)
    if options is None and raw is not None:
        return None
    try:
        return orjson.dumps({**fields, "stream_options": {**(options or {}), "include_usage": True}})
    except orjson.JSONEncodeError:  # what orjson cannot encode (an integer beyond 64 bits, deep nesting)
        return None


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
        "_after_cr",
        "_annotate",
        "_body",
        "_cr_context",
        "_data",
        "_data_size",
        "_decoder",
        "_event_oversize",
        "_event_passthrough",
        "_event_stream",
        "_finished",
        "_held",
        "_line",
        "_line_oversize",
        "_max_event",
        "_max_json",
        "_not_data_only",
        "_overflow",
        "_rewrite",
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
        # Event streams: the parser
        self._line = bytearray()  # the unfinished line (without its line end)
        self._line_oversize = False
        self._data: list[bytes] = []  # the current event's data lines
        self._data_size = 0
        self._event_oversize = False
        self._not_data_only = False  # the current event has lines other than data lines
        self._after_cr = False  # the previous chunk ended with CR
        self._cr_context = _CR_IN_EVENT
        # Event streams, stripping: the raw bytes of the unfinished event, held back
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
        return self._scan(chunk)

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
        # A stream that ended (or was cut) inside an event: inspect what arrived of it.
        if self._line and not self._line_oversize:
            self._take_line(bytes(self._line))
        if self._data and not self._event_oversize:
            self._inspect(b"\n".join(self._data))
        self._line.clear()
        self._data.clear()
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

    def _scan(self, chunk: bytes) -> bytes:
        rewrite = self._rewrite
        out: list[bytes] = []
        n = len(chunk)
        pos = 0
        seg = 0  # stripping: where the chunk's bytes not yet sent on, dropped or held start
        if self._after_cr:
            self._after_cr = False
            if chunk[0] == _LF:  # the LF of a CRLF that the previous chunk's CR started
                pos = 1
                if self._cr_context == _CR_EMITTED:
                    out.append(b"\n")
                    seg = 1
                elif self._cr_context == _CR_DROPPED:
                    seg = 1
        next_cr = chunk.find(b"\r", pos)
        next_lf = chunk.find(b"\n", pos)
        while pos < n:
            if 0 <= next_cr < pos:
                next_cr = chunk.find(b"\r", pos)
            if 0 <= next_lf < pos:
                next_lf = chunk.find(b"\n", pos)
            if next_cr < 0 and next_lf < 0:
                self._add_partial_line(chunk, pos, n)
                break
            j = next_lf if next_cr < 0 else next_cr if next_lf < 0 else min(next_cr, next_lf)
            end = j + 1
            if chunk[j] == _CR:
                if end < n:
                    if chunk[end] == _LF:
                        end += 1
                else:
                    self._after_cr = True
            self._add_partial_line(chunk, pos, j)
            event_ended, replacement = self._end_line()
            pos = end
            if event_ended:
                if rewrite:
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
                self._cr_context = _CR_EMITTED if replacement is None else _CR_DROPPED
            else:
                self._cr_context = _CR_IN_EVENT
        if not rewrite:
            return chunk
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

    def _add_partial_line(self, chunk: bytes, start: int, stop: int) -> None:
        if start >= stop or self._line_oversize:
            return
        if len(self._line) + stop - start > self._max_event:
            self._line.clear()
            self._line_oversize = True
            return
        self._line += chunk[start:stop]

    def _end_line(self) -> tuple[bool, bytes | None]:
        """A line ended: whether it ended the event, and what replaces that event (None: itself)."""
        if self._line_oversize:
            self._line_oversize = False
            self._event_oversize = True
            self._data.clear()
            return False, None
        if not self._line:
            replacement = None
            if self._data and not self._event_oversize:
                replacement = self._inspect(self._data[0] if len(self._data) == 1 else b"\n".join(self._data))
            self._data.clear()
            self._data_size = 0
            self._event_oversize = False
            self._not_data_only = False
            return True, replacement
        line = bytes(self._line)
        self._line.clear()
        if not self._event_oversize:
            self._take_line(line)
        return False, None

    def _take_line(self, line: bytes) -> None:
        if not line.startswith(b"data"):
            self._not_data_only = True
            return
        if len(line) == 4:
            value = b""
        elif line[4] == 0x3A:  # "data:"
            value = line[6:] if line[5:6] == b" " else line[5:]
        else:
            self._not_data_only = True
            return  # another field whose name starts with "data"
        self._data_size += len(value)
        if self._data_size > self._max_event:
            self._event_oversize = True
            self._data.clear()
            return
        self._data.append(value)

    def _inspect(self, data: bytes) -> bytes | None:
        """Record the usage an event's data carries; returns what replaces the event when rewriting
        (``b""``: the usage-only chunk to strip), None to send it on as it is."""
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
        if self._annotate is None or self._not_data_only:
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


def _token_usage(block: Mapping[str, Any]) -> Usage:
    prompt = _count(block, "prompt_tokens", "input_tokens")
    completion = _count(block, "completion_tokens", "output_tokens")
    total = _count(block, "total_tokens") or prompt + completion
    cached = _count(block, "cache_read_input_tokens")
    if not cached:
        for name in ("prompt_tokens_details", "input_tokens_details"):
            details = block.get(name)
            if isinstance(details, dict):
                cached = _count(details, "cached_tokens")
                if cached:
                    break
    return Usage(prompt, completion, total, cached)


def _count(block: Mapping[str, Any], *names: str) -> int:
    """The first of ``names`` holding a non-negative whole number (at most MAX_COUNT), else 0."""
    for name in names:
        raw = block.get(name)
        if type(raw) is int and 0 <= raw <= MAX_COUNT:  # the usual case, without the general checks below
            return raw
        value = non_negative(raw)
        if value is not None and value == int(value):
            return min(int(value), MAX_COUNT)
    return 0
