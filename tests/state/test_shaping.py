"""Upstream-aware shaping: the gateway's own cap on requests to the upstream."""

from __future__ import annotations

import threading

import httpx

from gateway.demo import DemoState
from gateway.server.thread import serve_in_thread
from tests.helpers.gateway import CHAT_PATH, StartGateway, chat_body
from tests.helpers.upstreams import StreamControl, held_stream_upstream

BODY = chat_body("hi")


def test_concurrency_cap_queues_briefly_then_answers_429(start_gateway: StartGateway) -> None:
    control = StreamControl()
    with serve_in_thread(held_stream_upstream(control)) as upstream:
        gateway = start_gateway(
            {"GATEWAY_UPSTREAM_CONCURRENCY": "1", "GATEWAY_UPSTREAM_QUEUE_TIMEOUT": "1.0"}, upstream_url=upstream.url
        )
        with httpx.Client(base_url=gateway.url, timeout=10) as client:
            held = client.send(client.build_request("POST", CHAT_PATH, json={**BODY, "stream": True}), stream=True)
            try:
                lines = held.iter_lines()  # keep the iterator: dropping it would close the stream
                next(line for line in lines if line)  # the one upstream slot is taken
                refused = client.post(CHAT_PATH, json={**BODY, "stream": True})  # waits 1 s, then gives up
                assert refused.status_code == 429
                assert refused.json()["error"]["code"] == "upstream_capacity"
                assert refused.headers["retry-after"] == "1"
                # A request that arrives while the slot is taken waits for it instead of failing.
                waiting: list[int] = []
                second = threading.Thread(target=lambda: waiting.append(client.post(CHAT_PATH, json=BODY).status_code))
                second.start()
                threading.Timer(0.3, control.release.set).start()
                list(lines)
                second.join(10)
            finally:
                held.close()
        assert waiting == [200]


def test_rpm_cap_refuses_beyond_the_rate_without_calling_upstream(
    start_gateway: StartGateway, demo_state: DemoState
) -> None:
    gateway = start_gateway({"GATEWAY_UPSTREAM_RPM": "2", "GATEWAY_UPSTREAM_QUEUE_TIMEOUT": "0.2"})
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        answers = [client.post(CHAT_PATH, json=BODY) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[2].json()["error"]["code"] == "upstream_capacity"
    assert 50 <= int(answers[2].headers["retry-after"]) <= 60
    assert len([r for r in demo_state.requests if r.path == CHAT_PATH]) == 2
