"""Helpers every endpoint shares: FlexAI's error envelope, JSON in and out, request field
checks, token estimation, ids and model resolution."""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.demo.state import DemoState


class UpstreamError(Exception):
    """An error answered in FlexAI's envelope."""

    def __init__(
        self, status: int, message: str, *, code: str | None = None, type_: str = "invalid_request_error"
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type_


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, headers=headers, media_type="application/json")


def error_response(
    status: int, message: str, type_: str, code: str | None, headers: Mapping[str, str] | None = None
) -> Response:
    return json_response({"error": {"message": message, "type": type_, "code": code}}, status, headers)


def bad_request(message: str, code: str | None = None) -> UpstreamError:
    return UpstreamError(400, message, code=code)


async def json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object", "invalid_json")
    return body


def int_field(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad_request(f"'{name}' must be an integer between {low} and {high}", "invalid_value")
    return value


def text_field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise bad_request(f"'{name}' is required and must be a non-empty string", "missing_required_parameter")
    return value


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def unix_time() -> int:
    return int(time.time())


def resolve_model(
    state: DemoState, name: object, endpoint: str, accepts: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The catalog entry for ``name`` if ``endpoint`` serves it, else the FlexAI error."""
    if not isinstance(name, str) or not name:
        raise bad_request("'model' is required", "missing_required_parameter")
    model = state.find_model(name)
    if model is None:
        raise bad_request(f"The model '{name}' does not exist", "model_not_found")
    if not accepts(model):
        raise bad_request(
            f"The model '{name}' (category {model.get('category')}) is not served by {endpoint}",
            "invalid_model_for_endpoint",
        )
    if model.get("health_status") == "maintenance":
        raise UpstreamError(
            503,
            f"The model '{name}' is under maintenance",
            code="model_unavailable",
            type_="service_unavailable",
        )
    return model


def supports(model: dict[str, Any], tag: str) -> bool:
    return tag in model.get("supports", [])


def check_context(model: dict[str, Any], prompt_tokens: int, max_tokens: int | None) -> None:
    window = int(model.get("context_window") or 0)
    needed = prompt_tokens + (max_tokens or 0)
    if window and needed > window:
        raise bad_request(
            f"This model's maximum context length is {window} tokens; the request needs {needed} "
            f"({prompt_tokens} in the prompt, {max_tokens or 0} for the completion)",
            "context_length_exceeded",
        )
