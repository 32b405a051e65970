"""One exception family for every refusal the gateway answers itself.

Each class knows its HTTP status, OpenAI error ``type`` and ``code``; ``render`` turns any of them
into the OpenAI error envelope ``{"error": {"message", "type", "param", "code"}}`` that the OpenAI
SDKs parse into the right exception (status decides the class: 400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 429 RateLimitError, 5xx InternalServerError).

This module imports nothing else from the gateway.
"""

from __future__ import annotations

import math

import orjson

from gateway.types import Send

Headers = list[tuple[bytes, bytes]]

JSON_CONTENT_TYPE = (b"content-type", b"application/json")


class GatewayError(Exception):
    """A request the gateway answers itself with an OpenAI-shaped error."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        headers: Headers | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after
        self.extra_headers: Headers = headers or []

    def body(self) -> bytes:
        return render(self.message, self.type, self.param, self.code)

    def headers(self) -> Headers:
        headers = [JSON_CONTENT_TYPE, *self.extra_headers]
        if self.retry_after is not None:
            # Retry-After is whole seconds (RFC 9110); never 0 so clients do not spin.
            headers.append((b"retry-after", str(max(1, math.ceil(self.retry_after))).encode()))
        return headers


def render(message: str, type_: str, param: str | None, code: str | None) -> bytes:
    """The OpenAI error envelope, with all four keys present (null where none applies)."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


# --- 4xx: the caller can fix these -------------------------------------------------------------


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ModelEndpointMismatch(InvalidRequest):
    code = "model_endpoint_mismatch"


class ModelNotFound(InvalidRequest):
    # OpenAI answers 404 for an unknown model, so the SDK raises NotFoundError.
    status = 404
    code = "model_not_found"


class UnknownPath(InvalidRequest):
    status = 404
    code = "unknown_url"


class JobNotFound(InvalidRequest):
    # FlexAI's own answer for a video job it does not know (or no longer keeps).
    status = 404
    code = "job_not_found"


class MethodNotAllowed(InvalidRequest):
    status = 405
    code = "method_not_allowed"


class BodyTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class UnsupportedMediaType(InvalidRequest):
    status = 415
    code = "unsupported_media_type"


class MalformedRequest(InvalidRequest):
    """The HTTP request itself is broken (answered by the server protocol, before the app)."""

    code = "invalid_http_request"


class HeaderTooLarge(InvalidRequest):
    status = 431
    code = "request_header_too_large"


class TooManyHeaders(HeaderTooLarge):
    code = "too_many_headers"


class HeaderTimeout(InvalidRequest):
    status = 408
    code = "request_timeout"


class BodyTimeout(InvalidRequest):
    """The client stopped sending its request body: 408, and the connection is closed (what is left
    of the body would otherwise be read as the next request)."""

    status = 408
    code = "request_timeout"

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"The request body stalled: nothing arrived for {seconds:g} seconds.", headers=[(b"connection", b"close")]
        )


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class ModelNotAllowed(GatewayError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class BudgetExceeded(GatewayError):
    # 402, as FlexAI answers for exhausted credit; the SDK does not retry it.
    status = 402
    type = "insufficient_quota"
    code = "budget_exceeded"


# --- 5xx: the gateway or the upstream cannot serve this now ------------------------------------


class InternalError(GatewayError):
    status = 500
    code = "internal_error"


class UpstreamError(GatewayError):
    """The upstream failed before answering. ``retryable``: the request was certainly not sent;
    ``upstream_status``: the HTTP status it answered instead, when it answered one."""

    def __init__(self, message: str, *, retryable: bool = False, upstream_status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.upstream_status = upstream_status


class UpstreamUnavailable(UpstreamError):
    status = 502
    code = "upstream_unavailable"


class CatalogUnavailable(GatewayError):
    status = 503
    code = "catalog_unavailable"


class Overloaded(GatewayError):
    status = 503
    code = "overloaded"


class TooManyConnections(GatewayError):
    status = 503
    code = "too_many_connections"


class ShuttingDown(GatewayError):
    """The gateway is draining before it exits: another instance (or this one restarted) will answer."""

    status = 503
    code = "shutting_down"

    def __init__(self, message: str = "The gateway is shutting down; retry the request.") -> None:
        super().__init__(message, retry_after=1, headers=[(b"connection", b"close")])


class ModelUnavailable(GatewayError):
    status = 503
    code = "model_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class NotCached(GatewayError):
    """``Cache-Control: only-if-cached`` and no stored answer fits (RFC 9111 section 5.2.1.7: 504)."""

    status = 504
    code = "not_cached"


async def send_error(send: Send, error: GatewayError, extra_headers: Headers) -> None:
    """Answer ``error`` on a raw ASGI ``send`` (nothing may have been sent yet)."""
    body = error.body()
    headers = [*error.headers(), (b"content-length", str(len(body)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
