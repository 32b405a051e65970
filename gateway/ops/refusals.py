"""The most recent refusals, for the console: when, the error code, model, key name and message.

Never a request body, a header or a key: only what the gateway's own error answer said, cut to
``MESSAGE_LIMIT`` characters. A bounded ring kept per process (``Services.refusals``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final

from gateway.exchange import Exchange, Outcome

MESSAGE_LIMIT: Final = 300


@dataclass(frozen=True, slots=True)
class Refusal:
    at: float  # unix time the request arrived
    status: int
    code: str
    model: str | None
    key_name: str | None
    path: str
    message: str


class RecentRefusals:
    def __init__(self, size: int = 200) -> None:
        self._ring: deque[Refusal] = deque(maxlen=size)
        self.total = 0

    def observe(self, exchange: Exchange) -> None:
        """An ``Accounting`` ``on_finish`` hook: keeps the exchange if the gateway refused it."""
        if exchange.outcome != Outcome.REFUSED:
            return
        self.total += 1
        message = exchange.error_message or ""
        self._ring.append(
            Refusal(
                at=exchange.arrived,
                status=exchange.status,
                code=exchange.error_code or "",
                model=_model(exchange),
                key_name=exchange.caller.name if exchange.caller else None,
                path=exchange.path,
                message=message if len(message) <= MESSAGE_LIMIT else message[: MESSAGE_LIMIT - 1] + "…",
            )
        )

    def latest(self, limit: int = 100) -> list[Refusal]:
        """The newest first."""
        return list(reversed(self._ring))[:limit]


def _model(exchange: Exchange) -> str | None:
    """The catalog's name, else the name the client asked for (only that field of the body)."""
    if exchange.entry is not None:
        return exchange.entry.model_name
    asked = exchange.fields.get("model")
    return asked[:100] if isinstance(asked, str) else None
