"""The client's exceptions: every failure a caller sees is a Florence2Error, never a raw gRPC object."""

from __future__ import annotations

import grpc


class Florence2Error(Exception):
    """Base of every error the client raises."""


class RpcError(Florence2Error, grpc.RpcError):
    """A call the service refused or could not answer.

    `code()` is the gRPC status code and `details()` its message, as on grpc's own errors; `reason`
    the stable google.rpc.ErrorInfo reason (README's error table; "" when the failure came from the
    transport, not the service), `violations` the BadRequest (field, description) pairs,
    `retry_delay_s` the RetryInfo advice (None when absent).
    """

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "", metadata: dict | None = None,
                 violations: list[tuple[str, str]] | None = None, retry_delay_s: float | None = None):
        label = f"{code.name}" + (f" [{reason}]" if reason else "")
        super().__init__(f"{label}: {message}")
        self.status_code, self.message, self.reason = code, message, reason
        self.metadata = metadata or {}
        self.violations = violations or []
        self.retry_delay_s = retry_delay_s
        self.domain = ""  # ErrorInfo.domain: "florence2-serve.v1" for this service's own errors
        self.job_id = ""  # set when the client gave up waiting on a job that runs on (DEADLINE_EXCEEDED)

    def code(self) -> grpc.StatusCode:
        return self.status_code

    def details(self) -> str:
        return self.message

    @classmethod
    def from_grpc(cls, exc: grpc.RpcError) -> "RpcError":
        from google.rpc import error_details_pb2

        code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
        message = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
        reason, metadata, violations, delay, domain = "", {}, [], None, ""
        for detail in status_details(exc):
            info, bad, retry = (error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest(),
                                error_details_pb2.RetryInfo())
            if detail.Unpack(info):
                reason, metadata = info.reason, dict(info.metadata)
                domain = info.domain
            elif detail.Unpack(bad):
                violations = [(v.field, v.description) for v in bad.field_violations]
            elif detail.Unpack(retry):
                delay = retry.retry_delay.ToMilliseconds() / 1000
        error = cls(code or grpc.StatusCode.UNKNOWN, message or "", reason, metadata, violations, delay)
        error.domain = domain
        return error


DETAILS_KEY = "grpc-status-details-bin"


def status_details(exc: grpc.RpcError) -> list:
    """The google.rpc.Status details (Any messages) a failed call carried; [] when none.

    Read from the trailing metadata directly, so the same code serves grpc and grpc.aio errors.
    """
    from google.rpc import status_pb2

    trailing = exc.trailing_metadata() if callable(getattr(exc, "trailing_metadata", None)) else None
    for key, value in trailing or ():
        if key == DETAILS_KEY:
            try:
                return list(status_pb2.Status.FromString(value).details)
            except Exception:  # noqa: BLE001 - a malformed trailer is no details, not a crash
                return []
    return []


class JobFailed(Florence2Error):
    """The job ended FAILED, CANCELLED or EXPIRED. `reason` is its JobError's stable reason."""

    def __init__(self, job_id: str, state: str, error: str, reason: str = ""):
        super().__init__(f"job {job_id} {state}" + (f" [{reason}]" if reason else "") + f": {error}")
        self.job_id, self.state, self.error, self.reason = job_id, state, error, reason
