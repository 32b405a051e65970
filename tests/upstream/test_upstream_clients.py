"""Both upstream clients behind the seam (aiohttp, the default, and httpx) keep the same contract."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from gateway.demo import DemoState, default_catalog
from gateway.server.thread import LocalServer, serve_in_thread
from tests.helpers.gateway import CHAT_MODEL, StartGateway

CLIENTS = ["builtin", "aiohttp", "httpx"]
MESSAGES: Any = [{"role": "user", "content": "hello"}]


@pytest.fixture(params=CLIENTS)
def client_env(request: pytest.FixtureRequest) -> dict[str, str]:
    return {"GATEWAY_UPSTREAM_CLIENT": request.param}


@pytest.fixture
def sdk(start_gateway: StartGateway, client_env: dict[str, str]) -> Iterator[openai.OpenAI]:
    gateway = start_gateway(client_env)
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-x", max_retries=0, timeout=10) as client:
        yield client


def test_json_stream_binary_and_multipart(sdk: openai.OpenAI, demo_state: DemoState) -> None:
    reply = sdk.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
    assert reply.choices[0].message.content
    chunks = list(sdk.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, stream=True))
    assert len(chunks) > 3
    speech = sdk.audio.speech.create(model="Kokoro-82M", voice="af_bella", input="hello", response_format="wav")
    assert speech.content.startswith(b"RIFF")
    upload = bytes(range(256)) * 40
    text = sdk.audio.transcriptions.create(model="whisper-large-v3", file=("a.wav", upload))
    assert str(len(upload)) in text.text
    forwarded = [r for r in demo_state.requests if r.path == "/v1/audio/transcriptions"]
    assert upload in forwarded[-1].body
    assert all("cookie" not in r.headers for r in demo_state.requests)


def test_compressed_bodies_are_relayed_compressed(start_gateway: StartGateway, client_env: dict[str, str]) -> None:
    catalog = orjson.dumps(default_catalog())
    payload = orjson.dumps({"object": "list", "data": [{"embedding": [0.5] * 64, "index": 0}]})

    async def gzipping(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/api/models":
            headers, body = [(b"content-type", b"application/json")], catalog
        else:
            headers = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]
            body = gzip.compress(payload)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    with serve_in_thread(gzipping) as upstream:
        gateway = start_gateway(client_env, upstream_url=upstream.url)
        with (
            httpx.Client(timeout=10) as client,
            client.stream(
                "POST",
                gateway.url + "/v1/embeddings",
                json={"model": "bge-m3", "input": "x"},
                headers={"accept-encoding": "gzip"},
            ) as response,
        ):
            raw = b"".join(response.iter_raw())
    assert response.headers["content-encoding"] == "gzip"
    assert gzip.decompress(raw) == payload


def test_unreachable_upstream_is_502_without_its_address(
    start_gateway: StartGateway, client_env: dict[str, str], upstream: LocalServer
) -> None:
    with serve_in_thread(_catalog_only()) as short_lived:
        gateway = start_gateway({**client_env, "GATEWAY_UPSTREAM_RETRIES": "1"}, upstream_url=short_lived.url)
        assert httpx.get(gateway.url + "/readyz", timeout=10).status_code in (200, 503)
        httpx.get(gateway.url + "/v1/models", timeout=10)  # the catalog is loaded
        address = f"{short_lived.port}"
    answer = httpx.post(gateway.url + "/v1/chat/completions", json={"model": CHAT_MODEL, "messages": MESSAGES})
    assert answer.status_code == 502
    assert answer.json()["error"]["code"] == "upstream_unavailable"
    assert address not in answer.text


def _catalog_only() -> Any:
    catalog = orjson.dumps(default_catalog())

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": catalog})

    return app
