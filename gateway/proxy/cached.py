"""The response cache in the request path: a ``Source`` in front of the upstream.

For a forwarded request with a model, ``CachingSource.forward``:

1. asks the policy whether the cache applies (else ``Cache-Status: ...; fwd=bypass; detail=...``);
2. computes the key: endpoint, resolved model, partition (whose answers this caller may get),
   namespace, the canonical body (without ``model``: an alias and the model serving it share
   entries; and without the fields the gateway rewrites), stream or not;
3. replays a stored answer the request's ``Cache-Control`` accepts (``hit``, with ``Age``), or
   answers 504 ``not_cached`` to ``only-if-cached``;
4. joins an identical request in flight (``collapsed``): at most ``collapse_timeout`` for its
   headers, then upstream on its own (also when the first one's answer is not shared); with the
   Redis tier, one in flight on another replica too (``gateway.cache.remote_flights``): the
   replica that claims the key's lead fetches and mirrors its flight, the others join it;
5. else goes upstream (``fwd=miss``, or ``fwd=request`` when told ``no-cache``) through a flight
   that identical requests may join and that captures a 200 for the store while it is relayed.

Whatever it returns is relayed, metered and accounted by the proxy like any upstream answer; what
the cache did is written on the exchange (``cache``, ``cache_headers``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from python_multipart.multipart import parse_options_header

from gateway import endpoints
from gateway.auth.keys import Caller
from gateway.cache.control import accepts_coding, cache_status, remaining_ttl, request_directives, usable
from gateway.cache.control import response_forbids_storing as upstream_forbids_storing
from gateway.cache.flights import Flight, FlightListener, FlightReader
from gateway.cache.key import cache_key, json_material, multipart_material, partition_of_credential
from gateway.cache.policy import Policy
from gateway.cache.remote_flights import Elsewhere
from gateway.cache.responses import ResponseCache, Stored
from gateway.cache.store import Entry
from gateway.config import Settings
from gateway.errors import InvalidRequest, NotCached
from gateway.exchange import Exchange
from gateway.headers import header_value
from gateway.proxy.forward import Source, streamed
from gateway.types import Header, Scope
from gateway.upstream.base import Headers, UpstreamResponse
from gateway.upstream.breaker import Pass

if TYPE_CHECKING:
    from gateway.ops.spans import Tracing

CACHE_STATUS = b"cache-status"
NAMESPACE_HEADER = b"x-gateway-cache-namespace"
MAX_NAMESPACE_CHARS = 128


class CachingSource:
    def __init__(self, settings: Settings, cache: ResponseCache, inner: Source, tracing: Tracing | None = None) -> None:
        """``tracing``: told when admission ends for a request the cache answers itself."""
        self._cache = cache
        self._inner = inner
        self._tracing = tracing
        self._policy = Policy(settings.cache)
        self._auth_mode = settings.auth_mode
        self._partition = settings.cache.partition
        self._collapse_timeout = settings.cache.collapse_timeout
        self._max_entry_bytes = settings.cache.max_entry_bytes
        # Collapsing across replicas: with the Redis tier, and collapsing on.
        self._fleet = cache.remote.flights if cache.remote is not None and settings.cache.collapse else None
        # The body's model is left out: the key has the resolved model (the one that serves) as its
        # own component, so a request naming an alias and one naming the model that serves it share
        # one entry. The gateway asks for a stream's usage itself when include_usage is on: that
        # member is then the gateway's, not the client's, and two requests that differ only there
        # get one answer.
        self._omit: tuple[tuple[str, ...], ...] = (("model",),)
        if settings.usage.include_usage:
            self._omit += (("stream_options", "include_usage"),)

    async def forward(
        self, scope: Scope, endpoint: endpoints.Endpoint, body: bytes, exchange: Exchange, breaker_pass: Pass | None
    ) -> UpstreamResponse:
        entry = exchange.entry
        headers: list[Header] = scope["headers"]
        directives = request_directives(headers)
        verdict = (
            self._policy.decide(exchange.path, entry.model_name, exchange.fields, directives)
            if entry is not None
            else None
        )
        if entry is None or verdict is None or not verdict.cacheable:
            detail = verdict.detail if verdict is not None else "endpoint"
            return await self._bypass(detail, scope, endpoint, body, exchange, breaker_pass)
        namespace = _namespace(headers)
        try:
            material = self._material(endpoint, headers, body, exchange)
        except ValueError:
            return await self._bypass("unreadable-body", scope, endpoint, body, exchange, breaker_pass)
        key = cache_key(
            endpoint=exchange.path,
            model=entry.model_name,
            partition=self._partition_of(headers, exchange.caller),
            namespace=namespace,
            material=material,
            variant="stream" if streamed(exchange.fields) else "whole",
        )
        refresh = directives.no_cache or directives.max_age == 0  # go upstream, store the new answer
        if not refresh:
            stored = self._cache.lookup(key)
            if stored is None and self._cache.remote is not None:
                stored = await self._cache.lookup_remote(key)
            if stored is not None and accepts_coding(headers, header_value(stored.headers, b"content-encoding")):
                age = self._cache.now() - stored.stored_at
                if usable(age, stored.ttl, directives):
                    self._admitted()
                    return _hit(stored, age, exchange)
        if directives.only_if_cached:
            raise NotCached(
                "No stored answer fits this request, and its Cache-Control says only-if-cached.",
                headers=[(CACHE_STATUS, cache_status(hit=False, fwd="miss", detail="only-if-cached"))],
            )
        mirror = None
        if not refresh:
            reader = await self._follow(key)
            if reader is None and not directives.no_store and self._fleet is not None:
                lead = await self._fleet.lead(key)
                if isinstance(lead, Elsewhere):  # another replica fetches it: join that
                    self._admitted()  # waiting for the answer is not admission
                    reader = await self._fleet.join(key)
                else:
                    mirror = lead  # this one leads (or, None, Redis does not answer)
            if reader is not None:
                exchange.cached("collapsed")
                exchange.cache_headers = ((CACHE_STATUS, cache_status(hit=False, fwd="miss", collapsed=True)),)
                return reader
        return await self._fetch(key, Stored(entry.model_name, namespace, verdict.ttl), refresh, directives.no_store,
                                 mirror, scope, endpoint, body, exchange, breaker_pass)  # fmt: skip

    async def _bypass(
        self,
        detail: str,
        scope: Scope,
        endpoint: endpoints.Endpoint,
        body: bytes,
        exchange: Exchange,
        breaker_pass: Pass | None,
    ) -> UpstreamResponse:
        exchange.cached("bypass")
        exchange.cache_headers = ((CACHE_STATUS, cache_status(hit=False, fwd="bypass", detail=detail)),)
        return await self._inner.forward(scope, endpoint, body, exchange, breaker_pass)

    async def _follow(self, key: str) -> UpstreamResponse | None:
        """A reader of the identical request in flight, or None (none, not shared, or too slow)."""
        flight = self._cache.joinable(key)
        if flight is None:
            return None
        self._admitted()  # waiting for the answer is not admission
        if not await flight.wait_ready(self._collapse_timeout):
            return None
        return flight.reader() if flight.capturing else None  # past the capture limit: its start is gone

    async def _fetch(
        self,
        key: str,
        stored: Stored,
        refresh: bool,
        no_store: bool,
        mirror: FlightListener | None,
        scope: Scope,
        endpoint: endpoints.Endpoint,
        body: bytes,
        exchange: Exchange,
        breaker_pass: Pass | None,
    ) -> UpstreamResponse:
        fwd = "request" if refresh else "miss"
        exchange.cached("refresh" if refresh else "miss")
        if no_store:  # may be served from the cache, never stored: nothing to share either
            exchange.cache_headers = ((CACHE_STATUS, cache_status(hit=False, fwd=fwd, detail="no-store")),)
            return await self._inner.forward(scope, endpoint, body, exchange, breaker_pass)
        flight = self._cache.begin(key, stored)
        flight.listener = mirror  # other replicas join through it (this one leads the fleet's fetch)
        try:
            response = await self._inner.forward(scope, endpoint, body, exchange, breaker_pass)
        except BaseException:
            flight.decline()
            raise
        reason = _unstorable(response)
        if reason is not None:
            flight.decline()  # followers go upstream on their own, never sent this answer
            self._cache.skip(reason)
            exchange.cache_headers = ((CACHE_STATUS, cache_status(hit=False, fwd=fwd, detail=reason)),)
            return response
        reader = await _share(flight, response, self._max_entry_bytes)
        exchange.cache_headers = ((CACHE_STATUS, cache_status(hit=False, fwd=fwd, stored=flight.stored)),)
        return reader

    def _admitted(self) -> None:
        if self._tracing is not None:
            self._tracing.admitted()

    def _material(self, endpoint: endpoints.Endpoint, headers: list[Header], body: bytes, exchange: Exchange) -> bytes:
        if endpoint.body == "multipart":
            content_type = header_value(headers, b"content-type") or b""
            boundary = parse_options_header(content_type)[1].get(b"boundary")
            if not boundary:
                raise ValueError("no multipart boundary")
            return multipart_material(body, boundary, omit=(b"model",))
        return json_material(exchange.fields, self._omit)

    def _partition_of(self, headers: list[Header], caller: Caller | None) -> str:
        """Whose answers this caller may receive: never another credential's in pass-through mode."""
        if self._auth_mode == "passthrough":
            return "credential:" + partition_of_credential(header_value(headers, b"authorization") or b"")
        if caller is None or self._partition == "global":
            return "global"  # open mode: one organisation's key and no caller identity
        if self._partition == "team" and caller.team:
            return "team:" + caller.team
        return "key:" + caller.name


async def _share(flight: Flight, response: UpstreamResponse, max_entry_bytes: int) -> FlightReader:
    """Share a 200 through ``flight``: at once when its body has arrived whole (no task), else read
    off the upstream by the flight's own task while every participant relays it."""
    size = response.arrived_size()
    if size is None or size > max_entry_bytes:
        return flight.share(response)
    try:
        body = b"".join([chunk async for chunk in response.iter_raw()])  # arrived: never waits
    finally:
        await response.aclose()
    return flight.share_whole(response.status, response.headers, body)


def _hit(entry: Entry, age: float, exchange: Exchange) -> UpstreamResponse:
    exchange.cached("hit")
    exchange.usage = entry.usage  # a whole body's, read when it was stored (None for a stream)
    exchange.cache_headers = (
        (CACHE_STATUS, cache_status(hit=True, ttl=remaining_ttl(age, entry.ttl))),
        (b"age", str(max(0, int(age))).encode()),
    )
    return Replay(entry)


def _unstorable(response: UpstreamResponse) -> str | None:
    if response.status != 200:
        return "status"
    if upstream_forbids_storing(response.headers):
        return "upstream-no-store"
    return None


def _namespace(headers: list[Header]) -> str:
    """The caller's own cache namespace (``X-Gateway-Cache-Namespace``), "" when none."""
    value = header_value(headers, NAMESPACE_HEADER)
    if value is None:
        return ""
    text = value.decode("latin-1").strip()
    if len(text) > MAX_NAMESPACE_CHARS or not text.isprintable():
        raise InvalidRequest(
            f"X-Gateway-Cache-Namespace must be at most {MAX_NAMESPACE_CHARS} printable characters.",
            code="invalid_cache_namespace",
        )
    return text


class Replay:
    """A stored answer as an ``UpstreamResponse``: relayed, metered and accounted like a live one."""

    __slots__ = ("_body", "headers", "status")

    def __init__(self, entry: Entry) -> None:
        self.status = entry.status
        self.headers: Headers = entry.headers
        self._body = entry.body

    def iter_raw(self) -> AsyncIterator[bytes]:
        return _once(self._body)

    def arrived_size(self) -> int | None:
        return len(self._body)

    async def aclose(self) -> None:
        return None


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body
