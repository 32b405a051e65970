"""Streaming over real sockets: chunks relayed as they arrive, disconnects cancel the upstream."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest

from gateway.server.thread import LocalServer, serve_in_thread
from tests.helpers.gateway import CHAT_MODEL, StartGateway
from tests.helpers.upstreams import StreamControl, held_stream_upstream

WAIT = 10.0  # seconds: the bound on every wait below


@pytest.fixture
def control() -> StreamControl:
    return StreamControl()


@pytest.fixture(params=["aiohttp", "httpx"])
def held_gateway(
    control: StreamControl, start_gateway: StartGateway, request: pytest.FixtureRequest
) -> Iterator[LocalServer]:
    with serve_in_thread(held_stream_upstream(control)) as upstream:
        yield start_gateway({"GATEWAY_UPSTREAM_CLIENT": request.param}, upstream_url=upstream.url)


def _stream_request(client: httpx.Client) -> httpx.Request:
    return client.build_request(
        "POST",
        "/v1/chat/completions",
        json={"model": CHAT_MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    )


def test_first_chunk_reaches_the_client_before_upstream_sends_the_rest(
    held_gateway: LocalServer, control: StreamControl
) -> None:
    with httpx.Client(base_url=held_gateway.url, timeout=WAIT) as client:
        response = client.send(_stream_request(client), stream=True)
        try:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["x-accel-buffering"] == "no"
            lines = response.iter_lines()
            # The upstream holds everything after the first chunk until we release it: a proxy that
            # buffered the stream could not deliver this line (the read would time out instead).
            first = next(line for line in lines if line)
            assert b"first" in first.encode()
            assert not control.finished.is_set()
            control.release.set()
            rest = [line for line in lines if line]
        finally:
            response.close()
    assert [b"second" in r.encode() for r in rest[:2]] == [True, False]
    assert rest[-1] == "data: [DONE]"


def test_client_disconnect_mid_stream_cancels_the_upstream_stream(
    held_gateway: LocalServer, control: StreamControl
) -> None:
    with httpx.Client(base_url=held_gateway.url, timeout=WAIT) as client:
        response = client.send(_stream_request(client), stream=True)
        next(line for line in response.iter_lines() if line)
        response.close()  # the client goes away while the upstream is still generating
        assert control.cancelled.wait(WAIT), "the upstream stream was not cancelled after the disconnect"
        assert not control.finished.is_set()
        # The gateway is still healthy and streams again.
        assert client.get("/healthz").status_code == 200


def test_sdk_stream_is_relayed_chunk_by_chunk_from_the_demo_upstream(
    start_gateway: StartGateway,
) -> None:
    import openai

    gateway = start_gateway()
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-x", max_retries=0, timeout=WAIT) as sdk:
        stream = sdk.chat.completions.create(
            model=CHAT_MODEL,
            messages=[{"role": "user", "content": "Say something"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("This is a simulated reply")
    assert len([c for c in chunks if c.choices]) > 3  # many chunks, not one buffered blob
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


def test_demo_upstream_counts_a_cancelled_stream_after_sdk_client_closes(
    start_gateway: StartGateway, demo_state: object
) -> None:
    from gateway.demo import DemoState

    assert isinstance(demo_state, DemoState)
    demo_state.token_delay = 0.2  # a stream that runs for seconds
    gateway = start_gateway()
    with httpx.Client(base_url=gateway.url, timeout=WAIT) as client:
        with client.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": CHAT_MODEL, "stream": True, "messages": [{"role": "user", "content": "x " * 50}]},
        ) as response:
            next(line for line in response.iter_lines() if line)
        for _ in range(int(WAIT / 0.02)):
            if demo_state.streams_cancelled:
                break
            threading.Event().wait(0.02)
    assert demo_state.streams_cancelled == 1
    assert demo_state.streams_completed == 0
