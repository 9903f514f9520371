"""A pipelined asyncio Redis connection for the front end's hot path, on hiredis's C reply parser.

Why not redis-py's asyncio client here: measured on the 2-core machine, it spends 180-250 us of
Python CPU per command (about 350 function calls for a PING: a pool checkout, a task and two
timeouts per call), which alone would exceed the front end's whole budget per request. This
connection writes each command into a buffer that goes out once per event-loop iteration (so the
commands of many concurrent RPCs travel, and are executed by Redis, as one pipeline) and resolves
replies in order. Errors are redis-py's exception classes, so callers handle one family.

`PipelinedRedis` executes commands; `Subscriber` holds a SUBSCRIBE and hands every message to a
callback. Both reconnect on the next use after the connection was lost.
"""

from __future__ import annotations

import asyncio
import collections
import time
import ssl
from urllib.parse import parse_qs, unquote, urlparse

import hiredis
import redis

from florence2_serve.common.redis_url import is_sentinel, parse_sentinel_url

CONNECT_TIMEOUT_S = 2.0
REPLY_TIMEOUT_S = 10.0  # a connection whose oldest reply is this late is dropped (all pending fail)


def parse_redis_url(url: str) -> dict:
    """redis[s]://[[user]:password@]host[:port][/db][?ssl_ca_certs=…&ssl_certfile=…&ssl_keyfile=…] ->
    connection settings. rediss:// is TLS, with the query parameters redis-py reads from the same URL
    (so workers, which use redis-py, and the front end take one URL)."""
    if is_sentinel(url):
        target = parse_sentinel_url(url)
        query = dict(target.query)
        return {"host": None, "port": None, "sentinel": target, "username": target.username,
                "password": target.password, "db": target.db, "ssl": _ssl_context(query) if target.tls else None}
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "valkey", "rediss", "valkeys"):
        raise ValueError(f"the front end needs a redis://, rediss:// or redis+sentinel:// URL "
                         f"(got {parsed.scheme or 'no'} scheme)")
    db = parsed.path.lstrip("/")
    query = {key: values[-1] for key, values in parse_qs(parsed.query).items()}
    return {"host": parsed.hostname or "127.0.0.1", "port": parsed.port or 6379,
            "username": unquote(parsed.username) if parsed.username else None,
            "password": unquote(parsed.password) if parsed.password else None,
            "db": int(db) if db else 0,
            "ssl": _ssl_context(query) if parsed.scheme in ("rediss", "valkeys") else None}


def _ssl_context(query: dict) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=query.get("ssl_ca_certs"))
    if query.get("ssl_certfile"):
        context.load_cert_chain(query["ssl_certfile"], query.get("ssl_keyfile"))
    if query.get("ssl_cert_reqs", "required") == "none":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _error(reply: hiredis.ReplyError) -> redis.RedisError:
    message = str(reply)
    if message.startswith("NOSCRIPT"):
        return redis.exceptions.NoScriptError(message)
    if message.startswith("READONLY"):  # a ConnectionError: callers treat it as Redis being away (retry)
        return redis.exceptions.ReadOnlyError(message)
    return redis.exceptions.ResponseError(message)


class _Protocol(asyncio.Protocol):
    def __init__(self, on_push=None):
        self.reader = hiredis.Reader(replyError=hiredis.ReplyError)
        self.pending: collections.deque[tuple[asyncio.Future, float]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.buffer: list[bytes] = []
        self.flush_scheduled = False
        self.on_push = on_push
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            if self.pending:
                future, _ = self.pending.popleft()
                if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("READONLY") and self.transport:
                    # A failover made this server a replica: drop the connection, so the next command
                    # reconnects to the master the sentinels name now.
                    self.transport.abort()
                if not future.done():
                    if isinstance(reply, hiredis.ReplyError):
                        future.set_exception(_error(reply))
                    else:
                        future.set_result(reply)
            elif self.on_push is not None:
                self.on_push(reply)

    def connection_lost(self, exc) -> None:
        self.transport = None
        error = redis.exceptions.ConnectionError("connection to Redis lost")
        while self.pending:
            future, _ = self.pending.popleft()
            if not future.done():
                future.set_exception(error)
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self, packed: bytes, future: asyncio.Future) -> None:
        self.buffer.append(packed)
        self.pending.append((future, time.monotonic()))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.transport is not None and self.buffer:
            self.transport.write(b"".join(self.buffer))
        self.buffer.clear()


async def _master_address(target) -> tuple[str, int]:
    """Ask the sentinels, in order, where the master is now (SENTINEL GET-MASTER-ADDR-BY-NAME)."""
    for host, port in target.sentinels:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError):
            continue
        try:
            commands = [("AUTH", target.sentinel_password)] if target.sentinel_password else []
            commands.append(("SENTINEL", "GET-MASTER-ADDR-BY-NAME", target.master))
            writer.write(b"".join(hiredis.pack_command(c) for c in commands))
            parser = hiredis.Reader(replyError=hiredis.ReplyError)
            replies = []
            while len(replies) < len(commands):
                data = await asyncio.wait_for(reader.read(4096), CONNECT_TIMEOUT_S)
                if not data:
                    break
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    replies.append(reply)
            answer = replies[-1] if len(replies) == len(commands) else None
            if isinstance(answer, list) and len(answer) == 2:
                return answer[0].decode(), int(answer[1])
        except (OSError, asyncio.TimeoutError, ValueError):
            pass
        finally:
            writer.close()
    raise redis.exceptions.ConnectionError(f"no sentinel knows a master named {target.master!r}")


async def _open(settings: dict, on_push=None) -> _Protocol:
    loop = asyncio.get_running_loop()
    host, port = settings["host"], settings["port"]
    if settings.get("sentinel") is not None:  # where the master is now: asked at every (re)connection
        host, port = await _master_address(settings["sentinel"])
    try:
        _, protocol = await asyncio.wait_for(
            loop.create_connection(lambda: _Protocol(on_push), host, port, ssl=settings["ssl"]),
            timeout=CONNECT_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError) as exc:
        raise redis.exceptions.ConnectionError(f"cannot connect to Redis at {host}:{port}") from exc
    handshake = []
    if settings["password"] is not None:
        handshake.append(("AUTH", settings["username"], settings["password"]) if settings["username"]
                         else ("AUTH", settings["password"]))
    if settings["db"]:
        handshake.append(("SELECT", settings["db"]))
    for command in handshake:
        future = loop.create_future()
        protocol.send(hiredis.pack_command(command), future)
        try:
            await asyncio.wait_for(future, timeout=CONNECT_TIMEOUT_S)
        except BaseException:
            protocol.transport.close()
            raise
    return protocol


class PipelinedRedis:
    """One connection; `await execute(*args)` from any number of tasks, pipelined automatically."""

    def __init__(self, url: str):
        self.settings = parse_redis_url(url)
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future | None = None
        self._retry_after = 0.0
        self._watchdog: asyncio.TimerHandle | None = None

    async def _connection(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            return protocol
        if self._connecting is not None:
            return await asyncio.shield(self._connecting)
        if time.monotonic() < self._retry_after:
            raise redis.exceptions.ConnectionError("Redis is unreachable (reconnecting)")
        loop = asyncio.get_running_loop()
        self._connecting = loop.create_future()
        try:
            self._protocol = await _open(self.settings)
        except BaseException as exc:
            self._retry_after = time.monotonic() + 0.2
            self._connecting.set_exception(exc)
            self._connecting.exception()  # retrieved: no "never retrieved" warning
            self._connecting = None
            raise
        self._connecting.set_result(self._protocol)
        self._connecting = None
        return self._protocol

    async def execute(self, *args):
        protocol = await self._connection()
        future = asyncio.get_running_loop().create_future()
        protocol.send(hiredis.pack_command(args), future)
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(1.0, self._check_replies)
        return await future

    def _check_replies(self) -> None:
        """Drop a connection whose replies stopped coming (its pending calls fail with ConnectionError)."""
        self._watchdog = None
        protocol = self._protocol
        if protocol is None or not protocol.pending:
            return
        if time.monotonic() - protocol.pending[0][1] > REPLY_TIMEOUT_S and protocol.transport is not None:
            protocol.transport.abort()
            return
        self._watchdog = asyncio.get_running_loop().call_later(1.0, self._check_replies)

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
            await self._protocol.lost


class Subscriber:
    """SUBSCRIBE to one channel and hand every message's payload to `on_message`."""

    def __init__(self, url: str, channel: str, on_message):
        self.settings = parse_redis_url(url)
        self.channel = channel.encode()
        self.on_message = on_message
        self._protocol: _Protocol | None = None

    def _push(self, reply) -> None:
        if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
            self.on_message(reply[2])

    async def run_once(self, on_subscribed) -> None:
        """Subscribe, call on_subscribed(), then deliver messages until the connection is lost."""
        protocol = await _open(self.settings, on_push=self._push)
        self._protocol = protocol
        future = asyncio.get_running_loop().create_future()
        protocol.send(hiredis.pack_command(("SUBSCRIBE", self.channel)), future)
        try:
            await asyncio.wait_for(future, timeout=CONNECT_TIMEOUT_S)
            on_subscribed()
            await protocol.lost
        finally:
            if protocol.transport is not None:
                protocol.transport.close()
            self._protocol = None
        raise redis.exceptions.ConnectionError("subscription to Redis lost")
