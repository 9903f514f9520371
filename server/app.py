"""Front-end assembly: `create_server(settings) -> (server, port)`, health, reflection, auth, serve()."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import logging
import signal
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from florence2_serve.v1 import florence2_pb2 as pb

from florence2_serve.common.errors import Reason
from florence2_serve.common.redis_url import redact

from . import reflection_v1
from .errors import ServiceError
from .jobs import REDIS_ERRORS, JobStore
from .registration import add_florence2_service
from .servicer import Florence2Servicer
from .settings import ServerSettings

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Florence2Service"].full_name
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class AcceptedTokens:
    """The bearer tokens accepted now: those given directly (comma-separated, for rotation) and those
    in a token file (one per line, # comments), re-read when the file changes (checked every 2 s)."""

    CHECK_S = 2.0

    def __init__(self, tokens: str, token_file: str = ""):
        self.fixed = {token.strip() for token in tokens.split(",") if token.strip()}
        self.file = Path(token_file) if token_file else None
        self._from_file: set[str] = set()
        self._mtime = None
        self._checked = 0.0
        self._reload()

    def _reload(self) -> None:
        if self.file is None:
            return
        try:
            mtime = self.file.stat().st_mtime_ns
            if mtime != self._mtime:
                lines = self.file.read_text().splitlines()
                self._from_file = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
                self._mtime = mtime
        except OSError:
            log.warning("token file %s is unreadable; keeping the tokens read before", self.file)

    def accepts(self, authorization: str) -> bool:
        """Does an `authorization` value (`Bearer <token>`) carry a token accepted now?"""
        scheme, _, credentials = str(authorization).strip().partition(" ")
        # The scheme is case-insensitive (RFC 9110 §11.1); the token is compared exactly.
        given = credentials.strip().encode() if scheme.lower() == "bearer" else b""
        # Compare with every token (no early exit): the time taken says nothing about which matched.
        matched = [bool(given) and hmac.compare_digest(given, expected) for expected in self.current()]
        return any(matched)

    def current(self) -> list[bytes]:
        now = time.monotonic()
        if self.file is not None and now - self._checked >= self.CHECK_S:
            self._checked = now
            self._reload()
        return [token.encode() for token in self.fixed | self._from_file]


class TokenAuth(grpc.aio.ServerInterceptor):
    """Require `authorization: Bearer <token>` on the Florence2 service (health/reflection stay open)."""

    def __init__(self, tokens: AcceptedTokens):
        self.tokens = tokens

        async def deny(request, context):
            await ServiceError(grpc.StatusCode.UNAUTHENTICATED, Reason.UNAUTHENTICATED,
                               "missing or invalid token (authorization: Bearer …)").abort(context)

        self.deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self.deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_METHODS):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if self.tokens.accepts(metadata.get("authorization", "")):
            return await continuation(handler_call_details)
        streaming = method.endswith(("/Run", "/Watch"))
        return self.deny_stream if streaming else self.deny_unary


class FrontEnd:
    """A running front end: the grpc.aio server, its Redis store and the health updater."""

    def __init__(self, server: grpc.aio.Server, port: int, store: JobStore, health_servicer, settings):
        self.server, self.port, self.store = server, port, store
        self.health_servicer, self.settings = health_servicer, settings
        self._health_task: asyncio.Task | None = None
        self._model_names: set[str] = set()
        self._collector = None
        self.servicer = None
        self.http = None  # server/http_api.HttpApi when the settings give an HTTP port
        self.http_port = 0
        self.probes = None  # server/probes.ProbeListener with --health-port
        self.health_port = 0

    @property
    def http_url(self) -> str | None:
        """The HTTP port's base URL (the playground is at its root); None without one."""
        if self.http is None:
            return None
        host = self.settings.http_bind_host
        host = "127.0.0.1" if host in ("", "0.0.0.0") else (f"[{host}]" if ":" in host else host)
        return f"{'https' if self.settings.tls_cert else 'http'}://{host}:{self.http_port}"

    async def start(self) -> None:
        if self.settings.metrics_port:
            from prometheus_client import start_http_server

            try:
                start_http_server(self.settings.metrics_port, addr=self.settings.metrics_bind_host)
            except OSError as exc:
                raise AddressInUse(f"cannot serve metrics on port {self.settings.metrics_port}: "
                                   f"{exc.strerror or exc}") from None
            from .metrics import register_queue_collector

            self._collector = register_queue_collector(self.settings.redis_url)
        await self.store.start()
        await self.server.start()
        try:
            if self.http is not None:
                self.http_port = await self.http.start(self.settings.http_bind_host, self.settings.http_port)
            if self.probes is not None:
                self.health_port = await self.probes.start(self.settings.health_bind_host, self.settings.health_port)
        except AddressInUse:
            await self.server.stop(None)
            for listener in (self.http, self.probes):
                if listener is not None:
                    await listener.stop()  # nothing to do for one that never started
            await self.store.close()
            raise
        await self._update_health()
        self._health_task = asyncio.create_task(self._health_loop())
        log.info("front end listening: %s", self.describe())

    def describe(self) -> str:
        """What is on, for the start line: ports, TLS / mTLS, tokens, reflection, probes, metrics, Redis."""
        s = self.settings
        tls = "mTLS" if s.tls_client_ca else ("TLS" if s.tls_cert else "plaintext")
        parts = [f"gRPC on port {self.port} ({tls})",
                 f"HTTP on port {self.http_port} ({tls})" if self.http is not None else "no HTTP",
                 f"tokens {'required' if s.auth_enabled else 'off'}",
                 f"reflection {'on' if s.reflection else 'off'}",
                 f"probes on http://{s.health_bind_host}:{self.health_port}" if self.probes is not None
                 else "no probe port",
                 f"metrics on http://{s.metrics_bind_host}:{s.metrics_port}/metrics" if s.metrics_port
                 else "no metrics",
                 f"redis {redact(s.redis_url)}"]
        return "; ".join(parts)

    async def _update_health(self) -> None:
        """The server and service names follow Redis; each model name follows its live workers."""
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        ok = await self.store.ping()
        status = serving if ok else not_serving
        await self.health_servicer.set("", status)
        await self.health_servicer.set(SERVICE_NAME, status)
        if not ok:
            for name in self._model_names:
                await self.health_servicer.set(name, not_serving)
            return
        try:
            names = await self.store.models()
            for name in names:
                live = bool(await self.store.live_workers(name))
                await self.health_servicer.set(name, serving if live else not_serving)
            self._model_names = set(names)
        except REDIS_ERRORS:
            pass  # the next round sees Redis down

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            await self._update_health()

    async def stop(self, grace: float = 5.0) -> None:
        if self._health_task:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self.servicer is not None:
            self.servicer.stopping = True  # streams ended by our shutdown are no client's disconnect
        await self.health_servicer.enter_graceful_shutdown()
        await asyncio.gather(self.server.stop(grace), *(listener.stop() for listener in (self.http, self.probes)
                                                       if listener is not None))
        await self.store.close()
        if self._collector is not None:
            from prometheus_client import REGISTRY

            REGISTRY.unregister(self._collector)


class AddressInUse(RuntimeError):
    """The gRPC or metrics address cannot be bound (another process holds it); the message names it."""


class RedisUnreachable(RuntimeError):
    """REDIS_URL does not answer; the message names it."""


def create_server(settings: ServerSettings, address: str | None = None) -> tuple[FrontEnd, int]:
    """Build (not start) the front end bound to `address` (port 0 picks a free port)."""
    tokens = AcceptedTokens(settings.token, settings.token_file) if settings.auth_enabled else None
    interceptors = [TokenAuth(tokens)] if tokens is not None else []
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            # Never share a port with another process: a second stack must fail, not split clients.
            ("grpc.so_reuseport", 0),
        ],
    )
    store = JobStore(settings)
    servicer = Florence2Servicer(settings, store)
    add_florence2_service(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        reflected = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME, reflection_v1.SERVICE_NAME)
        reflection.enable_server_reflection(reflected, server)
        reflection_v1.enable(server, reflected)
    bind = address or settings.address
    check_free(bind)
    try:
        credentials = server_credentials(settings)
        port = server.add_secure_port(bind, credentials) if credentials else server.add_insecure_port(bind)
    except RuntimeError:
        port = 0
    if port == 0:
        raise AddressInUse(f"cannot listen on {bind}: the port is in use or the address is not available")
    front_end = FrontEnd(server, port, store, health_servicer, settings)
    front_end.servicer = servicer
    if settings.http_port >= 0:
        from .http_api import HttpApi

        front_end.http = HttpApi(servicer, settings, tokens)
    if settings.health_port:
        from .probes import ProbeListener

        front_end.probes = ProbeListener(store)
    return front_end, port


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files (mutual TLS with a client CA); None: plaintext."""
    if not settings.tls_cert:
        return None
    read = (lambda path: Path(path).read_bytes())
    client_ca = read(settings.tls_client_ca) if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([(read(settings.tls_key), read(settings.tls_cert))],
                                       root_certificates=client_ca, require_client_auth=client_ca is not None)


def check_free(address: str) -> None:
    """AddressInUse before gRPC tries a busy port (gRPC would log its own multi-line complaint first)."""
    import socket

    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or int(port) == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's own listener does
        try:
            probe.bind((host, int(port)))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(f"cannot listen on {address}: the port is in use") from None


async def check_redis(url: str) -> None:
    """RedisUnreachable (one line) unless `url` answers a PING within a few seconds."""
    import redis

    from .redis_pipe import PipelinedRedis

    try:
        connection = PipelinedRedis(url)
    except ValueError as exc:
        raise RedisUnreachable(f"cannot use Redis at {redact(url)}: {exc}") from None
    try:
        await asyncio.wait_for(connection.execute("PING"), timeout=5)
    except (redis.RedisError, OSError, asyncio.TimeoutError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "no answer"
        raise RedisUnreachable(f"cannot reach Redis at {redact(url)}: {reason}") from None
    finally:
        await connection.close()


async def serve(settings: ServerSettings, ready=None) -> None:
    """Run until SIGINT/SIGTERM, then stop gracefully. AddressInUse / RedisUnreachable before serving."""
    await check_redis(settings.redis_url)
    front_end, port = create_server(settings)
    await front_end.start()
    if ready is not None:
        ready(front_end)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("front end stopping")
    await front_end.stop()
