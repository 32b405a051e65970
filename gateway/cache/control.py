"""HTTP caching directives for the response cache: what a request's Cache-Control (and Pragma)
asks of a shared cache (RFC 9111 sections 5.2.1 and 5.4), whether an upstream's answer forbids
storing it (section 5.2.2), whether an entry of a given age may answer (section 4.2), whether a
stored body's content coding is one the client accepts (RFC 9110 section 12.5.3), and the
Cache-Status response header that says what the cache did (RFC 9211).

hishel (2.x) was considered and not adopted: its Cache-Control parser is private, rejects a whole
header for one malformed directive instead of ignoring that directive, and its freshness rules are
tied to its own request/response models and client stack, so this small parser, tested on its
own, costs less than the dependency.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from gateway.headers import header_value
from gateway.types import Header

# RFC 9111 section 1.2.2: delta-seconds too large to represent are taken as 2**31.
MAX_DELTA_SECONDS = 2**31
CACHE_STATUS_NAME = "flexai-gateway"

_CACHE_CONTROL = b"cache-control"
_PRAGMA = b"pragma"
_DIGITS = re.compile(r"[0-9]+")
# RFC 9110 section 5.6.2: the characters of a token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NOT_DETAIL_CHAR = re.compile(r"[^A-Za-z0-9-]")
_NOT_SF_TOKEN_CHAR = re.compile(r"[^!#$%&'*+\-.^_`|~0-9A-Za-z:/]")
_MAX_TOKEN_CHARS = 64


@dataclass(frozen=True, slots=True)
class RequestDirectives:
    """What a request's Cache-Control asks of the cache (RFC 9111 section 5.2.1). Delta-seconds are
    whole seconds, at most ``MAX_DELTA_SECONDS``; a bare ``max-stale`` (any staleness) is that."""

    no_store: bool = False
    no_cache: bool = False
    max_age: int | None = None
    min_fresh: int | None = None
    max_stale: int | None = None
    only_if_cached: bool = False


def request_directives(headers: Sequence[Header]) -> RequestDirectives:
    """The directives of every Cache-Control line of a request (header and directive names in any
    case, a comma-separated list on each line), never raising whatever the bytes.

    Values may be tokens or quoted strings (section 5.2 asks recipients to accept both). A
    directive whose value is not delta-seconds (absent, negative, not digits) is ignored, except
    ``max-age``: an invalid one is taken as ``max-age=0`` (section 4.2.1: treat invalid freshness
    information as stale), the choice that never serves an entry the client may have refused. A
    directive given more than once keeps its most restrictive value (section 4.2.1): the least
    max-age and max-stale, the greatest min-fresh. Unknown directives are ignored. ``Pragma:
    no-cache`` counts as ``no-cache`` only when the request has no Cache-Control line (section 5.4).
    """
    seen_cache_control = False
    pragma_no_cache = False
    no_store = no_cache = only_if_cached = False
    max_age: int | None = None
    min_fresh: int | None = None
    max_stale: int | None = None
    for raw_name, raw_value in headers:
        name = raw_name.strip().lower()
        if name == _PRAGMA:
            pragma_no_cache = pragma_no_cache or any(d == "no-cache" for d, _ in _directives(raw_value))
            continue
        if name != _CACHE_CONTROL:
            continue
        seen_cache_control = True
        for directive, argument in _directives(raw_value):
            if directive == "no-store":
                no_store = True
            elif directive == "no-cache":
                no_cache = True
            elif directive == "only-if-cached":
                only_if_cached = True
            elif directive == "max-age":
                seconds = _delta_seconds(argument)
                seconds = 0 if seconds is None else seconds
                max_age = seconds if max_age is None else min(max_age, seconds)
            elif directive == "min-fresh":
                seconds = _delta_seconds(argument)
                if seconds is not None:
                    min_fresh = seconds if min_fresh is None else max(min_fresh, seconds)
            elif directive == "max-stale":
                seconds = MAX_DELTA_SECONDS if argument is None else _delta_seconds(argument)
                if seconds is not None:
                    max_stale = seconds if max_stale is None else min(max_stale, seconds)
    return RequestDirectives(
        no_store=no_store,
        no_cache=no_cache or (pragma_no_cache and not seen_cache_control),
        max_age=max_age,
        min_fresh=min_fresh,
        max_stale=max_stale,
        only_if_cached=only_if_cached,
    )


def response_forbids_storing(headers: Sequence[Header]) -> bool:
    """Whether an upstream's answer may not be stored by a shared cache: its Cache-Control says
    ``no-store`` or ``private`` (with or without field names: the whole answer is kept out).

    ``no-cache`` does not forbid it here: event streams conventionally carry it to keep buffering
    proxies out of the way (FlexAI's do), not to ask every reuse to be revalidated, and an answer to
    a POST has no validators anyway; what may be reused, and for how long, is the operator's policy.
    """
    for raw_name, raw_value in headers:
        if raw_name.strip().lower() == _CACHE_CONTROL:
            for directive, _ in _directives(raw_value):
                if directive in ("no-store", "private"):
                    return True
    return False


def usable(age: float, ttl: float, directives: RequestDirectives) -> bool:
    """May an entry ``age`` seconds old, fresh for ``ttl`` seconds after it was stored, answer a
    request with these directives?

    Every directive given is a constraint, and all must hold (the most restrictive wins, as
    section 4.2.1 says of conflicts): ``no-cache`` never (the request must go upstream);
    ``max-age`` caps the entry's age (``age < max_age``; so ``max-age=0`` always goes upstream),
    which lowers the freshness lifetime for this request to ``min(ttl, max_age)``; ``min-fresh``
    wants the entry still fresh for that long (``age + min_fresh < min(ttl, max_age)``). A stale
    entry (``age >= ttl``) answers only a request with ``max-stale``, and only within it of its own
    lifetime (``age - ttl <= max_stale``): max-age lowers freshness, not the stale allowance,
    which is measured from the lifetime the upstream gave the answer; but max-stale licenses
    staleness only, so it never overrides a max-age cap on age or a min-fresh wish (a request with
    min-fresh wants a fresh answer, never a stale one). A negative age (a clock step) counts as 0.
    """
    if directives.no_cache:
        return False
    age = max(age, 0.0)
    lifetime = ttl if directives.max_age is None else min(ttl, directives.max_age)
    if directives.max_age is not None and age >= directives.max_age:
        return False
    if directives.min_fresh is not None:
        return age + directives.min_fresh < lifetime
    if age < ttl:
        return True
    return directives.max_stale is not None and age - ttl <= directives.max_stale


def remaining_ttl(age: float, ttl: float) -> int:
    """The seconds an entry of this age stays fresh, rounded down (negative once it is stale),
    for Cache-Status's ``ttl`` parameter; bounded by ``MAX_DELTA_SECONDS`` either way."""
    remaining = ttl - age
    if math.isnan(remaining):
        return 0
    return math.floor(max(-MAX_DELTA_SECONDS, min(MAX_DELTA_SECONDS, remaining)))


def cache_status(
    *,
    hit: bool,
    ttl: int | None = None,
    fwd: str | None = None,
    stored: bool = False,
    collapsed: bool = False,
    detail: str | None = None,
    name: str = CACHE_STATUS_NAME,
) -> bytes:
    """One RFC 9211 Cache-Status list member, e.g. ``flexai-gateway; hit; ttl=290`` or
    ``flexai-gateway; fwd=miss; stored``. Parameters come in a fixed order (hit, fwd, ttl, stored,
    collapsed, detail). ``fwd``, ``detail`` and ``name`` are made tokens: ``detail`` keeps letters,
    digits and ``-`` (anything else becomes ``-``), and a token not starting with a letter gets an
    ``x`` in front."""
    members = [_sf_token(name, _NOT_SF_TOKEN_CHAR)]
    if hit:
        members.append("hit")
    if fwd is not None:
        members.append(f"fwd={_sf_token(fwd, _NOT_SF_TOKEN_CHAR)}")
    if ttl is not None:
        members.append(f"ttl={int(ttl)}")
    if stored:
        members.append("stored")
    if collapsed:
        members.append("collapsed")
    if detail is not None:
        members.append(f"detail={_sf_token(detail, _NOT_DETAIL_CHAR)}")
    return "; ".join(members).encode("ascii")


def _directives(value: bytes) -> Iterator[tuple[str, str | None]]:
    """The (lower-cased name, argument or None) pairs of one comma-separated directive list.

    An argument is a token or a quoted-string (its escapes undone). A quoted-string left open (it
    runs to the end of the line) or followed by more text is an invalid argument, given as ``""``
    (which no directive accepts as delta-seconds); a member whose name is not a token is skipped.
    """
    text = value.decode("latin-1")
    i, n = 0, len(text)
    while i < n:
        end = i
        while end < n and text[end] not in ",=":
            end += 1
        name = text[i:end].strip(" \t").lower()
        argument: str | None = None
        i = end
        if i < n and text[i] == "=":
            i += 1
            while i < n and text[i] in " \t":
                i += 1
            if i < n and text[i] == '"':
                argument, i = _quoted(text, i + 1)
                rest_start = i
                while i < n and text[i] != ",":
                    i += 1
                if argument is None or text[rest_start:i].strip(" \t"):
                    argument = ""
            else:
                start = i
                while i < n and text[i] != ",":
                    i += 1
                argument = text[start:i].strip(" \t")
        i += 1  # past the comma
        if name and _TOKEN.fullmatch(name):
            yield name, argument


def _quoted(text: str, i: int) -> tuple[str | None, int]:
    """The content of a quoted-string whose opening quote is just before ``i`` and the index after
    its closing quote; (None, the end of ``text``) when it is never closed."""
    chars: list[str] = []
    n = len(text)
    while i < n:
        char = text[i]
        if char == '"':
            return "".join(chars), i + 1
        if char == "\\" and i + 1 < n:
            i += 1
            char = text[i]
        chars.append(char)
        i += 1
    return None, i


def _delta_seconds(argument: str | None) -> int | None:
    """A delta-seconds argument (RFC 9111 section 1.2.2), capped at ``MAX_DELTA_SECONDS``; None
    when absent or not digits (a sign, a fraction, a unit: all invalid)."""
    if argument is None or not _DIGITS.fullmatch(argument):
        return None
    digits = argument.lstrip("0") or "0"
    if len(digits) > len(str(MAX_DELTA_SECONDS)):  # never int() of a huge digit string
        return MAX_DELTA_SECONDS
    return min(int(digits), MAX_DELTA_SECONDS)


def _sf_token(text: str, not_allowed: re.Pattern[str]) -> str:
    token = not_allowed.sub("-", text[:_MAX_TOKEN_CHARS])
    if not token or not token[0].isascii() or not token[0].isalpha():
        token = "x" + token
    return token


def accepts_coding(headers: Sequence[Header], coding: bytes | None) -> bool:
    """Whether a request (its Accept-Encoding) accepts a body in content coding ``coding``
    (None: identity, always accepted)."""
    if coding is None:
        return True
    for item in (header_value(headers, b"accept-encoding") or b"").split(b","):
        name, _, params = item.partition(b";")
        if name.strip().lower() in (coding.lower(), b"*") and _quality(params) > 0:
            return True
    return False


def _quality(params: bytes) -> float:
    for param in params.split(b";"):
        name, _, value = param.partition(b"=")
        if name.strip().lower() == b"q":
            try:
                return float(value.strip())
            except ValueError:
                return 0.0
    return 1.0
