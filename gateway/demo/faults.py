"""Switches to make the simulated upstream fail one model, for tests of routing and fallback.

Set on ``DemoState`` while it runs:

- ``faults[model]``: ``"500"``, ``"503"`` (an error answer before any byte of a reply),
  ``"429"`` (rate limited, with ``Retry-After: 0``), or ``"midstream"`` (a stream that breaks
  after its first events: the connection is closed without the end of the body);
- ``delays[model]``: seconds to wait before answering that model (a slow model);
- ``status_health[model]``: the health ``/api/status`` reports for it (the catalog is unchanged);
- ``status_fault``: ``"404"`` (no status endpoint), ``"malformed"`` (a body that is not a status
  document) or ``"hang"`` (no answer while it is set) for ``GET /api/status``.

A connection reset before the first byte needs the raw socket, which an ASGI app does not have:
the tests put ``tests.helpers.upstreams.ResettingFront`` in front of this upstream for that.
"""

from __future__ import annotations

import asyncio

import orjson
from starlette.responses import Response

from gateway.demo.common import error_response
from gateway.demo.state import DemoState

HANG_SECONDS = 30.0  # "hang" answers after this long (bounded: tests stop their servers)
MIDSTREAM_EVENTS = 2  # "midstream": events sent before the stream breaks


class MidStreamFault(Exception):
    """Raised by a stream the ``midstream`` fault breaks (the server then drops the connection)."""


def requested_model(body: bytes) -> str | None:
    """The ``model`` of a JSON request body (None for another body)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


async def fault_answer(state: DemoState, body: bytes) -> Response | None:
    """The answer a switched fault gives this request instead of the endpoint's (after the delay)."""
    if not state.faults and not state.delays:
        return None
    model = requested_model(body)
    if model is None:
        return None
    delay = state.delays.get(model)
    if delay:
        await asyncio.sleep(delay)
    fault = state.faults.get(model)
    if fault in ("429", "500", "503"):
        state.fault_answers += 1
    if fault == "429":
        return error_response(429, "Rate limit exceeded (simulated)", "rate_limit_error", "rate_limit_exceeded",
                              {"retry-after": "0"})  # fmt: skip
    if fault in ("500", "503"):
        return error_response(int(fault), f"The model '{model}' failed (simulated)", "server_error", None)
    return None


def breaks_midstream(state: DemoState, model: object) -> bool:
    return isinstance(model, str) and state.faults.get(model) == "midstream"


async def status_fault(state: DemoState) -> Response | None:
    """The answer of ``GET /api/status`` under ``status_fault`` (None: the real one)."""
    fault = state.status_fault
    if fault == "404":
        return error_response(404, "Not Found", "invalid_request_error", "not_found")
    if fault == "malformed":
        return Response(b"<html>status page</html>", media_type="text/html")
    if fault == "hang":  # until switched off, at most HANG_SECONDS
        for _ in range(int(HANG_SECONDS / 0.05)):
            if state.status_fault != "hang":
                break
            await asyncio.sleep(0.05)
    return None
