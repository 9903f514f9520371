"""The HTTP/JSON port: the routes the proto's google.api.http rules declare, served by the gRPC servicer.

aiohttp runs in the front end's own asyncio loop, beside grpc.aio, so an HTTP call is one more caller of
the same servicer methods (validation, limits, metrics and error reasons are shared, not copied). Run
and Watch stream Server-Sent Events: one event per JobEvent, `id:` its event id (a reconnect's
Last-Event-ID resumes after it, as Watch's after_event_id does), `data:` the RunResponse/WatchResponse
JSON, a `: keep-alive` comment while a job is quiet, and `event: error` with a google.rpc.Status when a
stream fails after it started. Also: /healthz, /readyz[?model=], /v1/openapi.json and the playground.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web
from google.api import annotations_pb2

from florence2_serve.common.errors import Reason, quote
from florence2_serve.v1 import florence2_pb2 as pb

from . import http_requests, openapi
from .http_site import start_site
from .probes import Probes, error_response
from .errors import ServiceError, internal
from .http_status import HttpAbort, HttpCallContext, error_status, message_json, status_json

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Florence2Service"]
PLAYGROUND = Path(__file__).resolve().parent / "playground"
OPEN_PATHS = ("/healthz", "/readyz", "/v1/openapi.json")


@dataclass(frozen=True)
class Binding:
    """One HTTP route of a service method (a google.api.http rule or one of its additional bindings)."""

    method: object  # MethodDescriptor
    verb: str
    template: str
    body: str

    @property
    def route(self) -> str:
        """aiohttp's form: a variable never swallows the `:verb` suffix or a `/`."""
        return re.sub(r"\{(\w+)\}", r"{\1:[^/:]+}", self.template)

    @property
    def path_fields(self) -> list[str]:
        return re.findall(r"\{(\w+)\}", self.template)


def bindings() -> list[Binding]:
    found = []
    for method in SERVICE.methods:
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        for each in (rule, *rule.additional_bindings):
            verb = each.WhichOneof("pattern")
            found.append(Binding(method, verb, getattr(each, verb), each.body))
    return found


class HttpApi:
    def __init__(self, servicer, settings, tokens=None):
        self.servicer, self.settings, self.tokens = servicer, settings, tokens
        self.limits = http_requests.BodyLimits(settings.max_image_bytes, settings.http_read_timeout_s)
        self.origins = {o.strip() for o in settings.http_cors_origins.split(",") if o.strip()}
        self._runner: web.AppRunner | None = None
        self._openapi: str | None = None
        self.port = 0

    # -- the application ------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._cors, self._auth],
                              client_max_size=self.limits.json_bytes)
        for binding in bindings():
            app.router.add_route(binding.verb.upper(), binding.route, self._handler(binding))
        Probes(self.servicer.store).add_routes(app)
        app.router.add_get("/v1/openapi.json", self._openapi_document)
        app.router.add_get("/", self._index)
        app.router.add_static("/playground/", PLAYGROUND, show_index=False)
        return app

    @web.middleware
    async def _errors(self, request, handler):
        try:
            return await handler(request)
        except ServiceError as exc:
            return error_response(error_status(exc))
        except web.HTTPMethodNotAllowed as exc:
            error = ServiceError(grpc.StatusCode.UNIMPLEMENTED, Reason.NO_SUCH_METHOD,
                                 f"{request.method} is not served on {request.path} (allowed: "
                                 f"{', '.join(sorted(exc.allowed_methods))}); see /v1/openapi.json")
            response = error_response(error_status(error), headers={"Allow": ",".join(sorted(exc.allowed_methods))})
            response.set_status(405)
            return response
        except web.HTTPNotFound:
            error = ServiceError(grpc.StatusCode.NOT_FOUND, Reason.NO_SUCH_METHOD,
                                 f"nothing is served at {quote(request.path)}; see /v1/openapi.json")
            return error_response(error_status(error))
        except web.HTTPException:
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:  # noqa: BLE001
            log.exception("HTTP %s %s failed", request.method, request.path)
            return error_response(error_status(internal()))

    @web.middleware
    async def _cors(self, request, handler):
        origin = request.headers.get("Origin")
        allowed = origin is not None and ("*" in self.origins or origin in self.origins)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if not allowed:
                raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, Reason.ORIGIN_NOT_ALLOWED,
                                   f"origin {quote(origin or '')} is not allowed (--http-cors-origin)")
            response = web.Response(status=204)
            response.headers.update({
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": "Authorization, Content-Type, Last-Event-ID",
                "Access-Control-Max-Age": "600"})
        else:
            response = await handler(request)
        if allowed:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        return response

    @web.middleware
    async def _auth(self, request, handler):
        if (self.tokens is not None and request.path.startswith("/v1/") and request.path not in OPEN_PATHS
                and not self.tokens.accepts(request.headers.get("Authorization", ""))):
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, Reason.UNAUTHENTICATED,
                               "missing or invalid token (Authorization: Bearer …)")
        return await handler(request)

    # -- service methods ------------------------------------------------------------------------

    def _handler(self, binding: Binding):
        behavior = getattr(self.servicer, binding.method.name)

        async def handle(request: web.Request) -> web.StreamResponse:
            message = await self._request_message(binding, request)
            if binding.method.server_streaming:
                return await self._stream(request, behavior(message, HttpCallContext()))
            try:
                reply = await behavior(message, HttpCallContext())
            except HttpAbort as abort:
                return error_response(abort.status)
            return web.Response(text=message_json(reply), content_type="application/json")
        return handle

    async def _request_message(self, binding: Binding, request: web.Request):
        message = getattr(pb, binding.method.input_type.name)()
        if binding.body == "job":
            # the media type alone (aiohttp's request.content_type parses every parameter with the email package)
            media_type = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
            if media_type == "multipart/form-data":
                message.job.CopyFrom(await http_requests.form_job(request, self.limits))
            else:  # JSON, whatever the client labelled it (curl -d says x-www-form-urlencoded)
                message.job.CopyFrom(http_requests.job_from_json(await http_requests.json_body(request, self.limits)))
        elif binding.body == "*":
            http_requests.parse_message(await http_requests.json_body(request, self.limits), message, "")
        fields = message.DESCRIPTOR.fields_by_name
        for key, value in request.query.items():
            name = http_requests._proto_name(key)
            if name not in fields or name == binding.body or name in binding.path_fields:
                raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_FIELD,
                                   f"{request.method} {binding.template} takes no query parameter {quote(key)}",
                                   violations=[(key, "not a parameter of this method")])
            http_requests.parse_message({name: value}, message, "")
        for name in binding.path_fields:
            setattr(message, name, request.match_info[name])
        resume = request.headers.get("Last-Event-ID")
        if resume is not None and "after_event_id" in fields:  # an EventSource reconnecting
            message.after_event_id = resume
        return message

    async def _stream(self, request: web.Request, events) -> web.StreamResponse:
        """The servicer's stream as Server-Sent Events; an error before the first event is a plain error reply."""
        pending = asyncio.ensure_future(anext(events, None))
        try:
            try:
                first = await pending
            except HttpAbort as abort:
                return error_response(abort.status)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                                   "X-Accel-Buffering": "no"})
            await response.prepare(request)
            ready = [_sse(first)] if first is not None else []  # nothing after the event a reconnect named
            try:
                while ready:
                    pending = asyncio.ensure_future(anext(events, None))
                    await asyncio.sleep(0)  # an event already delivered to this stream arrives in this one step
                    if not pending.done():  # the events that came together leave in one write (one syscall)
                        await response.write(b"".join(ready))
                        ready.clear()
                        while not (await asyncio.wait({pending}, timeout=self.settings.http_keepalive_s))[0]:
                            await response.write(b": keep-alive\n\n")
                    message = pending.result()
                    if message is None:
                        break
                    ready.append(_sse(message))
                if ready:
                    await response.write(b"".join(ready))
            except HttpAbort as abort:
                ready.append(f"event: error\ndata: {status_json(abort.status)}\n\n".encode())
                await response.write(b"".join(ready))
            return response
        finally:
            if not pending.done():  # the client went away mid-wait: the stream ends as a dropped gRPC call would
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            await events.aclose()

    # -- plain endpoints ----------------------------------------------------------------------------

    async def _openapi_document(self, request):
        if self._openapi is None:
            self._openapi = json.dumps(openapi.document(bindings()), indent=1)
        return web.Response(text=self._openapi, content_type="application/json")

    async def _index(self, request):
        return web.FileResponse(PLAYGROUND / "index.html")

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        self._runner, self.port = await start_site(self.app(), host, port, "HTTP", ssl_context=self._tls(),
                                                   handler_cancellation=True, shutdown_timeout=2.0)
        return self.port

    def _tls(self) -> ssl.SSLContext | None:
        s = self.settings
        if not s.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(s.tls_cert, s.tls_key)
        if s.tls_client_ca:
            context.load_verify_locations(s.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _sse(message) -> bytes:
    return f"id: {message.event.event_id}\ndata: {message_json(message)}\n\n".encode()
