"""Failed calls in the standard rich error model (google.rpc.Status in the status details trailer).

Every error the front end returns is a ServiceError: a gRPC code, a stable reason (ErrorInfo), a
message for people, and where they apply BadRequest field violations and RetryInfo. grpcio-status
puts it in `grpc-status-details-bin`, where every language's gRPC library can read it.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from florence2_serve.common.errors import DOMAIN, Reason

# What UNAVAILABLE replies advise as the first retry delay.
RETRY_DELAY_S = 1.0


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, reason: Reason, message: str, *,
                 violations: list[tuple[str, str]] | None = None, retry_after_s: float | None = None,
                 metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.violations = violations or []
        self.retry_after_s = retry_after_s
        self.metadata = {key: str(value) for key, value in (metadata or {}).items()}

    def to_status(self) -> grpc.Status:
        return rpc_status.to_status(self.to_rpc_status())

    def to_rpc_status(self) -> status_pb2.Status:
        """The google.rpc.Status message itself (what HTTP answers carry as JSON)."""
        details = [error_details_pb2.ErrorInfo(reason=self.reason.value, domain=DOMAIN, metadata=self.metadata)]
        if self.violations:
            details.append(error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=name, description=text)
                for name, text in self.violations]))
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(int(self.retry_after_s * 1000))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        packed = []
        for detail in details:
            holder = any_pb2.Any()
            holder.Pack(detail)
            packed.append(holder)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)

    async def abort(self, context) -> None:
        status = self.to_status()
        await context.abort(status.code, status.details, status.trailing_metadata)


def invalid(field: str, message: str, reason: Reason = Reason.INVALID_FIELD, **metadata) -> ServiceError:
    """INVALID_ARGUMENT about one request field (its path in the request, e.g. job.generation.num_beams)."""
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, reason, message, violations=[(field, message)],
                        metadata=metadata)


def unavailable(reason: Reason, message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, reason, message, retry_after_s=RETRY_DELAY_S)


def not_found(message: str, reason: Reason = Reason.JOB_NOT_FOUND) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, reason, message)


STORE_DOWN = "the job store (Redis) is unreachable; retry with backoff"
INTERNAL_MESSAGE = "internal error in the front end (logged there)"


def store_unavailable() -> ServiceError:
    return unavailable(Reason.STORE_UNAVAILABLE, STORE_DOWN)


def internal() -> ServiceError:
    return ServiceError(grpc.StatusCode.INTERNAL, Reason.INTERNAL, INTERNAL_MESSAGE)
