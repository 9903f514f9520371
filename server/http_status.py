"""HTTP calls through the gRPC servicer: the call context the servicer sees, and errors as HTTP answers.

The HTTP port runs the very methods gRPC runs (server/servicer.py), so validation, limits, metrics and
error reasons cannot differ. What a method would send as a gRPC status it raises here as `HttpAbort`,
holding the same google.rpc.Status; the HTTP layer answers with the status code grpc-gateway and
Google's APIs give that gRPC code and the Status as JSON (protobuf's JSON mapping, details with @type).
"""

from __future__ import annotations

import json

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2  # noqa: F401 - the details' types, for JSON @type lookups

from .errors import ServiceError

# grpc-gateway's runtime.HTTPStatusFromCode (the mapping google.rpc.Code documents).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
DETAILS_KEY = "grpc-status-details-bin"


class HttpAbort(grpc.aio.AbortError):
    """A servicer method ended the call with this google.rpc.Status."""

    def __init__(self, status: status_pb2.Status):
        super().__init__(status.message)
        self.status = status


class HttpCallContext:
    """The part of grpc.aio.ServicerContext the servicer uses, for a call that came over HTTP."""

    def __init__(self):
        self._code: grpc.StatusCode | None = None

    def time_remaining(self) -> float | None:
        return None  # HTTP carries no call deadline; JobSpec.timeout limits the job

    def code(self) -> grpc.StatusCode | None:
        return self._code

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()) -> None:
        self._code = code
        status = None
        for key, value in trailing_metadata or ():
            if key == DETAILS_KEY:
                status = status_pb2.Status.FromString(value)
        raise HttpAbort(status or status_pb2.Status(code=code.value[0], message=details))


def http_status_of(status: status_pb2.Status) -> int:
    return HTTP_STATUS.get(CODE_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN), 500)


def status_json(status: status_pb2.Status) -> str:
    """google.rpc.Status in protobuf's JSON mapping: {"code", "message", "details": [{"@type", ...}]}."""
    return json.dumps(json_format.MessageToDict(status), ensure_ascii=False)


def error_status(error: ServiceError) -> status_pb2.Status:
    return error.to_rpc_status()


def message_json(message) -> str:
    """A response message in the canonical JSON mapping, every field present (as grpc-gateway writes them)."""
    return json.dumps(json_format.MessageToDict(message, always_print_fields_with_no_presence=True),
                      ensure_ascii=False, separators=(",", ":"))
