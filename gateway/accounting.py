"""What one request used and cost, and where that goes: limits, budgets, the ledger, the access log.

The pipeline opens an ``Exchange`` per request, lets ``Accounting.admit`` apply the key's rate
limits and budgets before forwarding, gives the relay a ``UsageMeter`` that reads usage from the
response bytes, and calls ``finish`` once, on every path (served, refused, cut short): that settles
the reservations with the real numbers, records the request in the ledger, and writes one access
log line. Nothing here blocks the request path: ledger writes are batched off it, and so are the
access log's (``gateway.ops.json_log.write_fields``, when the gateway's own JSON handler is the only
one the line would reach; the logging call otherwise).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from gateway import endpoints
from gateway.catalog.bounds import prompt_tokens_lower_bound
from gateway.exchange import Exchange, Outcome
from gateway.headers import content_encoding
from gateway.ops.json_log import UtcMillis, write_fields
from gateway.state.store import Claim, StateStore
from gateway.types import Header
from gateway.usage.meter import DECODABLE_ENCODINGS, UsageMeter
from gateway.usage.model import Usage
from gateway.usage.pricing import TOKEN_ENDPOINTS, UNIT_RULES, cost_usd, max_cost_usd, min_cost_usd
from gateway.usage.rewrite import client_wants_usage, with_include_usage
from gateway.usage.schema import UsageRecord

access_logger = logging.getLogger("gateway.access")
# The access log line's fields, in order (docs/usage.md, "The access log").
ACCESS_LINE_FIELDS: Final = (
    "time", "level", "logger", "request_id", "key", "team", "method", "endpoint", "model", "status", "outcome",
    "error_code", "latency_ms", "ttfb_ms", "prompt_tokens", "completion_tokens", "cost_usd", "cache",
    "requested_model", "fallback_from",
)  # fmt: skip

COST_HEADER = b"x-gateway-cost-usd"
# The member added to the usage object of a stream's usage chunk when its client asked for usage.
STREAM_COST_MEMBER = "cost_usd"
STREAMED_USAGE_PATHS = frozenset({endpoints.CHAT, endpoints.COMPLETIONS})
# Endpoints the upstream bills; any other (polling a video job) costs nothing.
BILLED_PATHS = TOKEN_ENDPOINTS | frozenset(UNIT_RULES)


class Accounting:
    def __init__(
        self,
        store: StateStore,
        *,
        include_usage: bool,
        stream_cost: bool,
        access_log: bool,
        bill_hits: bool = False,
        on_finish: Callable[[Exchange], None] | None = None,
    ) -> None:
        """``bill_hits``: an answer from the cache costs its caller the full price (else nothing)."""
        self._store = store
        self._bill_hits = bill_hits
        self._include_usage = include_usage
        self._stream_cost = stream_cost
        self._access_log = access_log
        self._on_finish = on_finish
        self._times = UtcMillis()  # the access line's time (the event loop's thread only)
        self._line = access_line_template()  # copied for each line (the event loop's thread only)

    async def admit(self, exchange: Exchange, requested_tokens: int) -> list[Header]:
        """Apply the key's rate limits and budgets (raising 429/402); returns the rate-limit headers."""
        caller, entry = exchange.caller, exchange.entry
        if caller is None or entry is None:
            return []
        budgeted = caller.budget_usd_daily is not None or caller.budget_usd_monthly is not None
        if caller.tpm is None and not budgeted:
            claim = Claim(caller, 0, requested_tokens, None, budgeted=False)
        else:
            # Counting the prompt's words costs a pass over it: only for keys with token limits or budgets.
            lower_bound = prompt_tokens_lower_bound(exchange.path, exchange.fields)
            minimum = min_cost_usd(entry, exchange.path, exchange.fields, lower_bound) if budgeted else None
            claim = Claim(caller, lower_bound, requested_tokens, minimum, budgeted=budgeted)
        exchange.hold = await self._store.admit(claim)
        return exchange.hold.headers

    @property
    def ledger_dropped(self) -> int:
        """Usage records the ledger dropped (0 without a ledger)."""
        return self._store.records_dropped

    def request_body(self, exchange: Exchange, body: bytes) -> tuple[bytes, bool]:
        """The body to forward, and whether the gateway asked for usage the client did not."""
        if not self._include_usage or exchange.path not in STREAMED_USAGE_PATHS or client_wants_usage(exchange.fields):
            return body, False
        rewritten = with_include_usage(body, exchange.fields)
        return (body, False) if rewritten is None else (rewritten, True)

    def start_response(
        self, exchange: Exchange, status: int, headers: Sequence[Header], event_stream: bool, strip: bool
    ) -> None:
        """Open the response's meter: ``strip`` when the gateway asked for usage the client did not."""
        exchange.status = exchange.upstream_status = status
        entry = exchange.entry
        if entry is None:
            return
        if exchange.usage is not None and exchange.from_cache and not event_stream:
            return  # a stored whole body: its usage was read when it was stored, nothing to meter
        encoding = content_encoding(headers)
        if encoding is not None and (event_stream or encoding not in DECODABLE_ENCODINGS):
            # The gateway asks only for what it can read (headers.upstream_accept_encoding): an
            # upstream that answers otherwise is charged the request's ceiling, never nothing.
            exchange.unmetered = True
            return
        annotate = None
        if event_stream and not strip and self._stream_cost and exchange.path in STREAMED_USAGE_PATHS:
            path, fields = exchange.path, exchange.fields
            free = exchange.from_cache and not self._bill_hits

            def annotate(usage: Usage) -> dict[str, float] | None:
                cost = 0.0 if free else cost_usd(entry, path, usage, fields)
                return None if cost is None else {STREAM_COST_MEMBER: round(cost, 10)}

        exchange.meter = UsageMeter(event_stream, strip, annotate=annotate, content_encoding=encoding)

    def cost_headers(self, exchange: Exchange, body: bytes) -> list[Header]:
        """For a whole (non-streamed) body: its usage and cost, to send as a response header."""
        if exchange.entry is None:
            return []
        if exchange.meter is not None:
            exchange.meter.feed(body)
            exchange.usage = exchange.meter.finish()
            exchange.meter = None  # already read: finish() must not count it again
        elif exchange.usage is None:
            return []
        exchange.cost = self._cost(exchange)
        return [] if exchange.cost is None else [(COST_HEADER, f"{exchange.cost:.8f}".encode())]

    def finish(self, exchange: Exchange) -> None:
        """Settle and record the request: exactly once, on every path."""
        if exchange.finished:
            return
        exchange.finished = True
        if exchange.meter is not None:
            exchange.usage = exchange.meter.finish()
            exchange.cost = self._cost(exchange)
        elif exchange.cost is None:
            exchange.cost = self._cost(exchange)
        usage = exchange.usage
        # An answer from the cache draws no tokens per minute (the upstream did no work for it).
        tokens = usage.total_tokens if usage and not exchange.from_cache else 0
        if exchange.unmetered and exchange.hold is not None:
            tokens = max(tokens, exchange.hold.reserved_tokens)  # unreadable usage: at least the estimate
        self._store.settle(exchange.hold, tokens, exchange.cost)
        latency_ms = (time.perf_counter() - exchange.started) * 1000
        ttfb_ms = None if exchange.first_byte is None else (exchange.first_byte - exchange.started) * 1000
        caller, entry = exchange.caller, exchange.entry
        if entry is not None:
            self._store.record(
                UsageRecord(  # by position, in column order (keywords cost ~0.6 us more per request)
                    exchange.arrived,  # ts
                    exchange.request_id,
                    caller.name if caller else None,  # key_name
                    caller.team if caller else None,  # team
                    entry.model_name,  # model
                    exchange.path,  # endpoint
                    exchange.status,
                    usage.prompt_tokens if usage else 0,
                    usage.completion_tokens if usage else 0,
                    usage.total_tokens if usage else 0,
                    exchange.cost,  # cost_usd
                    str(exchange.outcome),  # (a plain str, bound to SQLite as it is: gateway.usage.ledger)
                    exchange.outcome is Outcome.CLIENT_DISCONNECTED,  # cut
                    latency_ms,
                    ttfb_ms,
                    exchange.cache,
                    exchange.saved_cost,  # saved_usd
                    exchange.requested_model,
                    exchange.fallback_from,
                )
            )
        if self._access_log and access_logger.isEnabledFor(logging.INFO):
            self._log(exchange, latency_ms, ttfb_ms, self._times, self._line)
        if self._on_finish is not None:
            self._on_finish(exchange)

    def _cost(self, exchange: Exchange) -> float | None:
        """What the request costs its caller; an answer from the cache also records what it saved."""
        if not exchange.from_cache:
            return _cost(exchange)
        entry = exchange.entry
        full = None if entry is None else cost_usd(entry, exchange.path, exchange.usage, exchange.fields)
        exchange.saved_cost = full
        return full if self._bill_hits else 0.0

    @staticmethod
    def _log(
        exchange: Exchange, latency_ms: float, ttfb_ms: float | None, times: UtcMillis, template: dict[str, Any]
    ) -> None:
        # The arrival as every line's time; latencies to 10 us, as round(x, 2) would but without its
        # decimal conversion (~0.2 us each): at most a last digit apart, in rare halfway cases.
        # The line is a copy of ``template`` (its keys in order, "level" and "logger" set) with each
        # value replaced: a copy and replacements take ~3k instructions fewer than a dict display
        # inserting twenty keys.
        usage, caller, entry = exchange.usage, exchange.caller, exchange.entry
        line = template.copy()
        line["time"] = times.format(exchange.arrived)
        line["request_id"] = exchange.request_id
        line["key"] = caller.name if caller else None
        line["team"] = caller.team if caller else None
        line["method"] = exchange.method
        line["endpoint"] = exchange.path
        line["model"] = entry.model_name if entry else None
        line["status"] = exchange.status
        line["outcome"] = exchange.outcome
        line["error_code"] = exchange.error_code
        line["latency_ms"] = round(latency_ms * 100) / 100
        line["ttfb_ms"] = None if ttfb_ms is None else round(ttfb_ms * 100) / 100
        line["prompt_tokens"] = usage.prompt_tokens if usage else None
        line["completion_tokens"] = usage.completion_tokens if usage else None
        line["cost_usd"] = exchange.cost
        line["cache"] = exchange.cache
        line["requested_model"] = exchange.requested_model
        line["fallback_from"] = exchange.fallback_from
        if write_fields(access_logger, line, whole=True):  # the JSON line, buffered
            return
        del line["level"], line["logger"]  # (the record's own)
        summary = f"{exchange.method} {exchange.path} {exchange.status} {line['outcome']} {line['latency_ms']}ms"
        access_logger.info(summary, extra={"access": line})


def access_line_template() -> dict[str, Any]:
    """The access log line's fields in their order, with the two that never change filled in."""
    line: dict[str, Any] = dict.fromkeys(ACCESS_LINE_FIELDS)
    line["level"], line["logger"] = "info", access_logger.name
    return line


def _cost(exchange: Exchange) -> float | None:
    """What the request cost, by one rule for every path (None: unknown, the reservation stands).

    Nothing sent upstream, or an upstream error answer: 0. A served request: its price for the usage
    it reported; the request's ceiling when the answer could not be read; 0 for an endpoint that is
    not billed (polling a video job). A request that went upstream and got no answer (a timeout, a
    broken connection) may still be billed upstream: unknown.
    """
    entry, status = exchange.entry, exchange.upstream_status
    if exchange.upstream_started is None:
        return 0.0
    if status is None or entry is None:
        return None
    if not 200 <= status < 300 or exchange.path not in BILLED_PATHS:
        return 0.0
    if exchange.unmetered:
        return max_cost_usd(entry, exchange.path, exchange.fields)
    return cost_usd(entry, exchange.path, exchange.usage, exchange.fields)
