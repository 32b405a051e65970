"""``create_demo_upstream()``: the route table, the request-recording middleware and the
exception handlers that answer in FlexAI's error envelope."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.demo.audio import speech, transcriptions
from gateway.demo.chat import chat_completions, completions
from gateway.demo.common import UpstreamError, error_response
from gateway.demo.faults import fault_answer
from gateway.demo.media import embeddings, images
from gateway.demo.models import api_models, api_status, v1_model, v1_models
from gateway.demo.state import DemoState, RecordedRequest
from gateway.demo.video import create_video, get_video


async def _on_upstream_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, UpstreamError)
    return error_response(exc.status, exc.message, exc.type, exc.code)


async def _on_http_exception(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = "not_found" if exc.status_code == 404 else None
    return error_response(exc.status_code, exc.detail, "invalid_request_error", code, exc.headers)


async def _on_crash(_request: Request, exc: Exception) -> Response:
    return error_response(500, f"simulated upstream failure: {type(exc).__name__}", "server_error", None)


class _RecordingMiddleware:
    """Reads each HTTP request body in full, records the request in ``DemoState.requests``,
    then replays the body to the app."""

    def __init__(self, app: ASGIApp, state: DemoState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        pending: list[Message] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                pending.append(message)
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        self.state.requests.append(_record(scope, body))
        if scope["method"] == "POST":
            faulty = await fault_answer(self.state, body)
            if faulty is not None:
                await faulty(scope, receive, send)
                return
        pending.insert(0, {"type": "http.request", "body": body, "more_body": False})

        async def replay() -> Message:
            return pending.pop(0) if pending else await receive()

        await self.app(scope, replay, send)


def _record(scope: Scope, body: bytes) -> RecordedRequest:
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return RecordedRequest(
        method=scope["method"],
        path=scope["path"],
        query=scope["query_string"].decode("latin-1"),
        headers=headers,
        body=body,
    )


def _bind(
    handler: Callable[[DemoState, Request], Awaitable[Response]], state: DemoState
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return await handler(state, request)

    endpoint.__name__ = handler.__name__
    return endpoint


def _routes(state: DemoState) -> list[Route]:
    table: list[tuple[str, str, Callable[[DemoState, Request], Awaitable[Response]]]] = [
        ("GET", "/api/models", api_models),
        ("GET", "/api/status", api_status),
        ("GET", "/v1/models", v1_models),
        ("GET", "/v1/models/{model:path}", v1_model),
        ("POST", "/v1/chat/completions", chat_completions),
        ("POST", "/v1/completions", completions),
        ("POST", "/v1/embeddings", embeddings),
        ("POST", "/v1/images/generations", images),
        ("POST", "/v1/audio/speech", speech),
        ("POST", "/v1/audio/transcriptions", transcriptions),
        ("POST", "/v1/videos/generations", create_video),
        ("GET", "/v1/videos/generations/{job_id}", get_video),
    ]
    return [Route(path, _bind(handler, state), methods=[method]) for method, path, handler in table]


def create_demo_upstream(state: DemoState | None = None) -> Starlette:
    """The simulated FlexAI upstream app, serving (and counting into) ``state``."""
    state = DemoState() if state is None else state
    app = Starlette(
        routes=_routes(state),
        middleware=[Middleware(_RecordingMiddleware, state=state)],
        exception_handlers={
            UpstreamError: _on_upstream_error,
            HTTPException: _on_http_exception,
            Exception: _on_crash,
        },
    )
    app.state.demo = state
    return app
