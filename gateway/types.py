"""The ASGI types, once (as starlette/types.py), and a header as ASGI gives it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
# (name, value): names lower-cased in what a server gives the app; as received from an upstream.
Header = tuple[bytes, bytes]
