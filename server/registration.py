"""The Florence2 service's gRPC method handlers, with request bodies decoded safely.

The generated `add_Florence2ServiceServicer_to_server` hands gRPC the messages' `FromString`: a body that
is not the method's message (random bytes, a string field holding invalid UTF-8) then raises inside
gRPC, which answers UNKNOWN with protobuf's exception text and logs a traceback per call. Here a body
that does not decode becomes an `Undecodable` request, answered INVALID_ARGUMENT with the stable reason
MALFORMED_REQUEST before the method runs, and logged as one line at most per interval, however many
arrive (anyone who can connect could otherwise fill the log).
"""

from __future__ import annotations

import logging
import threading
import time

import grpc
from google.protobuf.message import DecodeError

from florence2_serve.common.errors import Reason
from florence2_serve.v1 import florence2_pb2 as pb

from .errors import ServiceError

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Florence2Service"]
LOG_INTERVAL_S = 60.0


class Undecodable:
    """A request body that is not the method's protobuf message."""

    __slots__ = ("message_name",)

    def __init__(self, message_name: str):
        self.message_name = message_name


class _RateLimitedLog:
    """One warning per interval, saying how many malformed bodies arrived since the last."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S):
        self.interval_s = interval_s
        self.lock = threading.Lock()
        self.last = -interval_s
        self.suppressed = 0

    def note(self, method: str) -> None:
        with self.lock:
            now = time.monotonic()
            if now - self.last < self.interval_s:
                self.suppressed += 1
                return
            suppressed, self.suppressed, self.last = self.suppressed, 0, now
        log.warning("refused a malformed %s request body (not its protobuf message)%s", method,
                    f"; {suppressed} more since the last such line" if suppressed else "")


def _decoder(message_class):
    def decode(data: bytes):
        try:
            return message_class.FromString(data)
        except (DecodeError, ValueError, UnicodeDecodeError):
            return Undecodable(message_class.DESCRIPTOR.full_name)
    return decode


def _refusal(request: Undecodable) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, Reason.MALFORMED_REQUEST,
                        f"the request body is not a valid {request.message_name} message")


def _unary(behavior, method: str, limiter: _RateLimitedLog):
    async def handle(request, context):
        if isinstance(request, Undecodable):
            limiter.note(method)
            await _refusal(request).abort(context)
        return await behavior(request, context)
    return handle


def _streaming(behavior, method: str, limiter: _RateLimitedLog):
    async def handle(request, context):
        if isinstance(request, Undecodable):
            limiter.note(method)
            await _refusal(request).abort(context)
        async for message in behavior(request, context):
            yield message
    return handle


def add_florence2_service(servicer, server) -> None:
    """Register every method of florence2.v1.Florence2Service on `server`, served by `servicer`."""
    limiter = _RateLimitedLog()
    handlers = {}
    for method in SERVICE.methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        behavior = getattr(servicer, method.name)
        if method.client_streaming:
            raise NotImplementedError(f"{method.full_name}: client streaming is not served")
        if method.server_streaming:
            make, wrap = grpc.unary_stream_rpc_method_handler, _streaming
        else:
            make, wrap = grpc.unary_unary_rpc_method_handler, _unary
        handlers[method.name] = make(wrap(behavior, method.name, limiter),
                                     request_deserializer=_decoder(request_class),
                                     response_serializer=response_class.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
