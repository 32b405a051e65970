"""Server-sent events: a list of events sent ``token_delay`` apart, counted in ``DemoState``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.responses import StreamingResponse

from gateway.demo.faults import MIDSTREAM_EVENTS, MidStreamFault, breaks_midstream
from gateway.demo.state import DemoState


def _sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def _sse(state: DemoState, events: list[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Send ``events`` as SSE, ``token_delay`` apart, then ``[DONE]``; count how the stream ended."""
    state.streams_started += 1
    finished = False
    breaks = bool(events) and breaks_midstream(state, events[0].get("model"))
    try:
        for index, event in enumerate(events):
            if index and state.token_delay > 0:
                await asyncio.sleep(state.token_delay)
            if breaks and index == MIDSTREAM_EVENTS:
                raise MidStreamFault("the stream breaks here (simulated)")
            yield _sse_event(event)
        yield b"data: [DONE]\n\n"
        finished = True
    finally:
        if finished:
            state.streams_completed += 1
        else:
            state.streams_cancelled += 1


def sse_response(state: DemoState, events: list[dict[str, Any]]) -> StreamingResponse:
    headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
    return StreamingResponse(_sse(state, events), media_type="text/event-stream", headers=headers)
