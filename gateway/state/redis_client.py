"""The Redis side of the shared state: redis-py's asyncio client (imported only when configured),
the shapes the stores use of it, and the answers shared by everything that depends on it."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from gateway.config import SHARED_INSTALL, SettingsError, SharedSettings
from gateway.errors import GatewayError
from gateway.state.redis_batch import Send


class SharedStateUnavailable(GatewayError):
    """The ``closed`` fallback policy's answer while Redis does not answer."""

    status = 503
    code = "shared_state_unavailable"


class RedisClient(Protocol):
    """redis-py's asyncio client, as the shared store uses it (its scripts: ``pipelined``)."""

    def set(self, name: str, value: int, *, ex: int, nx: bool) -> Awaitable[Any]: ...

    async def aclose(self) -> None: ...


def redis_client(settings: SharedSettings) -> tuple[Any, tuple[type[Exception], ...]]:
    """redis-py's asyncio client for ``settings.redis_url`` (imported here: only when configured),
    and the errors it raises when Redis is unreachable."""
    try:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError
    except ImportError as exc:
        raise SettingsError(f"[shared] redis_url: redis-py is not installed ({exc}): {SHARED_INSTALL}") from exc
    client = aioredis.from_url(
        settings.redis_url,
        socket_timeout=settings.timeout * 4,
        socket_connect_timeout=settings.timeout * 4,
        retry=Retry(NoBackoff(), 0),  # the callers' own timeout, breaker and fallback decide
    )
    return client, (RedisError,)


def pipelined(client: Any) -> Send:
    """Send commands on one of ``client``'s pooled connections in one write and read their replies.

    Lower than redis-py's ``Pipeline`` on purpose: the commands are packed by hiredis in one call
    each (redis-py encodes every argument in Python first: about 7 % of the gateway's CPU at 64
    clients with the shared store), with no pipeline object per batch. Without hiredis (redis-py
    installed without its extra), redis-py's own packer."""
    from redis.exceptions import ResponseError

    pack_command: Callable[..., bytes] | None
    try:
        from hiredis import pack_command
    except ImportError:  # redis-py without its hiredis extra: its own packer, per connection
        pack_command = None

    pool = client.connection_pool

    async def send(commands: list[tuple[Any, ...]]) -> list[Any]:
        connection = await pool.get_connection()
        try:
            if pack_command is not None:
                packed: bytes | list[bytes] = b"".join([pack_command(command) for command in commands])
            else:
                packed = connection.pack_commands(commands)
            await connection.send_packed_command(packed, check_health=False)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:  # read whole: the connection stays in step
                    replies.append(exc)
        except BaseException:
            await connection.disconnect(nowait=True)  # replies may be left unread: never reuse it
            raise
        finally:
            await pool.release(connection)
        return replies

    return send


def part(limit: int, replicas: int) -> int:
    """One replica's share of a fleet-wide ``limit`` (0 stays 0: no limit)."""
    return 0 if limit <= 0 else max(1, math.floor(limit / replicas))


def text(value: Any) -> str:
    """A script's reply item as text (redis-py answers bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)
