"""The seams the next features plug into (issue #14): a source that answers without the upstream,
a source that taps what is relayed, and the state store behind limits, budgets and the ledger.

The services are opened as the app opens them (``open_services``) in front of the simulated
upstream on 127.0.0.1; the request stack is built on them with ``build_stack`` and driven in
process (nothing here is about sockets), with the official SDK where it applies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson

from gateway import endpoints
from gateway.app import build_stack
from gateway.config import load_settings
from gateway.demo import DemoState
from gateway.exchange import Exchange
from gateway.proxy.forward import Forwarder, Source
from gateway.server.thread import LocalServer
from gateway.services import open_services
from gateway.state.budgets import Budgets
from gateway.state.limits import RateLimiter
from gateway.state.shaping import Slot, UpstreamShaper
from gateway.state.store import Claim, Hold, LocalStore, SharedState
from gateway.types import Header, Scope
from gateway.upstream.base import UpstreamResponse
from gateway.upstream.breaker import Pass
from gateway.usage.schema import UsageRecord
from tests.helpers.gateway import CHAT_MODEL, forwarded, key_secret, key_table, keys_config


@dataclass
class Canned:
    """An answer that never saw the upstream."""

    status: int
    headers: list[Header]
    body: bytes
    closed: bool = False

    async def _chunks(self) -> AsyncIterator[bytes]:
        yield self.body

    def iter_raw(self) -> AsyncIterator[bytes]:
        return self._chunks()

    def arrived_size(self) -> int | None:
        return len(self.body)

    async def aclose(self) -> None:
        self.closed = True


class Answering:
    """A source that answers chat completions itself (as a cache hit would)."""

    def __init__(self) -> None:
        self.answers: list[Canned] = []

    async def forward(
        self, scope: Scope, endpoint: endpoints.Endpoint, body: bytes, exchange: Exchange, breaker_pass: Pass | None
    ) -> UpstreamResponse:
        usage = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
        completion = {
            "id": "chatcmpl-canned",
            "object": "chat.completion",
            "created": 0,
            "model": CHAT_MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "canned"}, "finish_reason": "stop"}],
            "usage": usage,
        }
        answer = Canned(200, [(b"content-type", b"application/json")], orjson.dumps(completion))
        self.answers.append(answer)
        return answer


@dataclass
class Tapped:
    """The inner source's answer, its chunks copied as they are relayed."""

    inner: UpstreamResponse
    seen: list[bytes] = field(default_factory=list)

    @property
    def status(self) -> int:
        return self.inner.status

    @property
    def headers(self) -> list[Header]:
        return list(self.inner.headers)

    async def _chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner.iter_raw():
            self.seen.append(chunk)
            yield chunk

    def iter_raw(self) -> AsyncIterator[bytes]:
        return self._chunks()

    def arrived_size(self) -> int | None:
        return self.inner.arrived_size()

    async def aclose(self) -> None:
        await self.inner.aclose()


class Tapping:
    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.tapped: list[Tapped] = []

    async def forward(
        self, scope: Scope, endpoint: endpoints.Endpoint, body: bytes, exchange: Exchange, breaker_pass: Pass | None
    ) -> UpstreamResponse:
        tapped = Tapped(await self.inner.forward(scope, endpoint, body, exchange, breaker_pass))
        self.tapped.append(tapped)
        return tapped


def env(upstream: LocalServer) -> dict[str, str]:
    return {"GATEWAY_UPSTREAM_URL": upstream.url, "GATEWAY_USAGE_PATH": ""}


async def test_a_source_can_answer_without_the_upstream(upstream: LocalServer, demo_state: DemoState) -> None:
    settings = load_settings(None, env(upstream))
    source = Answering()
    async with open_services(settings) as services:
        await services.catalog.current()
        stack = build_stack(settings, services, source=source)
        transport = httpx.ASGITransport(app=stack.proxy)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]}
            raw = await http.post("/v1/chat/completions", json=body)
    assert raw.status_code == 200
    assert raw.json()["choices"][0]["message"]["content"] == "canned"
    # Metered like an upstream answer (the cost header is computed from its usage), and billed
    # nothing: no request went upstream. The upstream saw nothing.
    assert raw.headers["x-gateway-cost-usd"] == "0.00000000"
    assert forwarded(demo_state) == []
    assert source.answers[0].closed


async def test_a_source_can_tap_what_is_relayed(upstream: LocalServer, demo_state: DemoState) -> None:
    settings = load_settings(None, env(upstream))
    async with open_services(settings) as services:
        await services.catalog.current()
        tapping = Tapping(Forwarder(settings, services))
        stack = build_stack(settings, services, source=tapping)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=stack.proxy), base_url="http://gw") as http:
            body = {"model": CHAT_MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            answer = await http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200
    (tapped,) = tapping.tapped
    upstream_bytes = b"".join(tapped.seen)
    assert upstream_bytes.endswith(b"data: [DONE]\n\n")
    # The tap sees the upstream's bytes; the client got them without the usage chunk the gateway
    # asked for on its behalf, every other byte identical.
    events = upstream_bytes.split(b"\n\n")
    usage_only = [e for e in events if b'"choices":[]' in e and b'"usage":{' in e]
    assert len(usage_only) == 1
    assert answer.content == b"\n\n".join(e for e in events if e not in usage_only)
    assert forwarded(demo_state) == ["POST /v1/chat/completions"]


class RecordingStore:
    """The in-process store, each call of the request path noted."""

    def __init__(self) -> None:
        self.inner = LocalStore(RateLimiter(), Budgets(None), UpstreamShaper(0, 0, 5.0), None)
        self.calls: list[str] = []
        self.records: list[UsageRecord] = []

    async def admit(self, claim: Claim) -> Hold:
        self.calls.append("admit")
        return await self.inner.admit(claim)

    def settle(self, hold: Hold | None, tokens: int, cost: float | None) -> None:
        self.calls.append(f"settle {tokens}")
        self.inner.settle(hold, tokens, cost)

    def record(self, record: UsageRecord) -> None:
        self.calls.append("record")
        self.records.append(record)

    async def upstream_slot(self) -> Slot:
        self.calls.append("slot")
        return await self.inner.upstream_slot()

    @property
    def records_dropped(self) -> int:
        return 0

    def shared_state(self) -> SharedState | None:
        return None


async def test_limits_budgets_shaping_and_the_ledger_go_through_the_state_store(
    upstream: LocalServer, tmp_path: Path
) -> None:
    """A backend given to open_services sees every admission, slot, settlement and record, and
    its refusal is the client's answer: the request path holds no state of its own."""
    config = keys_config(tmp_path / "gateway.toml", key_table("alice", "rpm = 1"))
    settings = load_settings(config, {**env(upstream), "GATEWAY_UPSTREAM_API_KEY": "sk-org"})
    store = RecordingStore()
    async with open_services(settings, store=store) as services:
        await services.catalog.current()
        stack = build_stack(settings, services)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=stack.proxy), base_url="http://gw") as http:
            auth = {"authorization": f"Bearer {key_secret('alice')}"}
            body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]}
            served = await http.post("/v1/chat/completions", json=body, headers=auth)
            limited = await http.post("/v1/chat/completions", json=body, headers=auth)
    assert served.status_code == 200
    assert limited.status_code == 429
    total = served.json()["usage"]["total_tokens"]
    assert store.calls == ["admit", "slot", f"settle {total}", "record", "admit", "settle 0", "record"]
    assert [(r.status, r.outcome) for r in store.records] == [(200, "completed"), (429, "refused")]
