"""The pure parts of routing: the body for another model, the /api/status document, the
strategies' ranking, and which health source is fresher."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from gateway.catalog.cache import Catalog
from gateway.catalog.entries import ModelEntry, parse_entry
from gateway.catalog.health import LiveHealth
from gateway.catalog.status import StatusFeed, StatusFormatError, parse_status
from gateway.config import CatalogSettings
from gateway.demo import default_catalog
from gateway.routing.body import with_model
from gateway.routing.latency import Latencies
from gateway.routing.strategies import rank
from tests.helpers.clocks import FakeClock
from tests.helpers.gateway import CHAT_MODEL

LLAMA = "Llama-3.1-8B-Instruct"


def entry(name: str, **changes: Any) -> ModelEntry:
    raw = next(m for m in default_catalog() if m["model_name"] == name)
    parsed, problem = parse_entry({**raw, **changes})
    assert parsed is not None, problem
    return parsed


# --------------------------------------------------------------------------- the body


def test_only_the_model_member_changes_in_the_clients_bytes() -> None:
    body = b'{ "model" : "alias",\n  "messages": [{"role":"user","content":"say \\"model\\": \\"alias\\""}], "n":1.0}'
    fields = orjson.loads(body)
    assert with_model(body, fields, "Real-Model") == body.replace(b'"model" : "alias"', b'"model":"Real-Model"')


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "al\\u0069as", "messages": []}',  # the name spelled with an escape
        b'{"model": "alias", "metadata": {"model": "alias"}}',  # the member twice
    ],
)
def test_a_body_whose_model_member_is_not_found_once_is_re_encoded(body: bytes) -> None:
    fields = orjson.loads(body)
    rewritten = with_model(body, fields, "Real-Model")
    assert rewritten is not None
    assert orjson.loads(rewritten) == {**fields, "model": "Real-Model"}
    assert list(orjson.loads(rewritten)) == list(fields)  # key order kept


def test_a_multipart_model_field_is_replaced_found_by_its_boundary() -> None:
    model_part = b'--b7\r\nContent-Disposition: form-data; name="model"\r\n\r\nstt\r\n'
    # A file whose bytes look like a model part (without the boundary line): left alone.
    file_part = (
        b'--b7\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        b'--b\r\nx; name="model"\r\n\r\nstt\r\n'
    )
    body = file_part + model_part + b"--b7--\r\n"
    rewritten = with_model(body, {"model": "stt"}, "whisper-large-v3", boundary=b"b7")
    assert rewritten == file_part + model_part.replace(b"stt", b"whisper-large-v3") + b"--b7--\r\n"
    assert with_model(b"--b7--\r\n", {"model": "stt"}, "whisper", boundary=b"b7") is None


# --------------------------------------------------------------------------- /api/status


def test_the_status_document_is_read_per_model() -> None:
    data = {
        "status": "degraded",
        "models": [
            {"name": "a", "status": "OK"},
            {"name": "b", "status": "down", "error": "probe failed"},
            {"name": "c", "status": "unknown"},
            {"name": 3, "status": "ok"},
            "junk",
        ],
        "health_data_age_seconds": 40,
    }
    reading = parse_status(data, now=100.0)
    assert reading.models == {"a": "healthy", "b": "down"}
    assert (reading.measured_at, reading.overall) == (60.0, "degraded")
    malformed: list[Any] = [[], {"models": "none"}, {"status": "ok"}]
    for bad in malformed:
        with pytest.raises(StatusFormatError):
            parse_status(bad, now=0.0)


def test_the_fresher_of_the_catalog_and_the_status_decides() -> None:
    clock = FakeClock()
    catalog_body = orjson.dumps(default_catalog())
    status_body = orjson.dumps({"models": [{"name": CHAT_MODEL, "status": "down"}], "health_data_age_seconds": 5})

    async def catalog_fetch() -> bytes:
        return catalog_body

    async def status_fetch() -> bytes:
        return status_body

    async def scenario() -> list[tuple[str | None, str]]:
        settings = CatalogSettings(status_interval=1.0)
        catalog = Catalog(catalog_fetch, settings, clock=clock)
        feed = StatusFeed(status_fetch, settings, clock=clock)
        health = LiveHealth(catalog, feed)
        seen: list[tuple[str | None, str]] = []
        snapshot = await catalog.current()  # fetched at T0
        chat = snapshot.entries[CHAT_MODEL]
        clock.advance(10)
        feed.start()
        for _ in range(100):  # the first read, measured at T0 + 10 - 5: after the catalog
            await asyncio.sleep(0)
            if feed.reading is not None:
                break
        effective, source = health.explain(chat)
        seen.append((effective.health_status, source))
        assert health.effective(chat) is effective  # one copy, reused
        clock.advance(301)  # the reading's health data is now too old to use
        effective, source = health.explain(chat)
        seen.append((effective.health_status, source))
        await feed.aclose()
        await catalog.aclose()
        return seen

    assert asyncio.run(scenario()) == [("down", "status"), ("healthy", "catalog")]


# --------------------------------------------------------------------------- strategies


def test_cheapest_ranks_by_this_requests_cost_and_unpriced_last() -> None:
    qwen, llama = entry(CHAT_MODEL), entry(LLAMA)
    unpriced = entry("Phi-3.5-mini-instruct", input_per_mtok=None)
    fields = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 100}
    ranked = rank([unpriced, qwen, llama], "cheapest", "/v1/chat/completions", fields, Latencies(5))
    assert [e.model_name for e in ranked] == [LLAMA, CHAT_MODEL, unpriced.model_name]


def test_fastest_ranks_unmeasured_first_then_by_the_windows_mean() -> None:
    qwen, llama, phi = entry(CHAT_MODEL), entry(LLAMA), entry("Phi-3.5-mini-instruct")
    latencies = Latencies(2)
    latencies.record(CHAT_MODEL, 0.5)
    latencies.record(LLAMA, 9.0)
    latencies.record(LLAMA, 0.1)
    latencies.record(LLAMA, 0.1)  # the window keeps the latest 2: a mean of 0.1
    ranked = rank([qwen, llama, phi], "fastest", "/v1/chat/completions", {}, latencies)
    assert [e.model_name for e in ranked] == [phi.model_name, LLAMA, CHAT_MODEL]
    assert rank([qwen, llama], "ordered", "/v1/chat/completions", {}, latencies) == [qwen, llama]


def test_a_reloaded_fastest_window_keeps_the_latest_measures() -> None:
    latencies = Latencies(3)
    for seconds in (9.0, 1.0, 2.0):
        latencies.record(LLAMA, seconds)
    latencies.resize(2)  # [routing] fastest_window changed by a config reload
    assert latencies.mean(LLAMA) == 1.5
    latencies.record(LLAMA, 4.0)
    assert latencies.mean(LLAMA) == 3.0
    latencies.resize(4)
    latencies.record(LLAMA, 6.0)
    assert latencies.mean(LLAMA) == 4.0  # 2, 4, 6
