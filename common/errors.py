"""The service's error vocabulary: stable reasons, and the structured error a failed job carries.

A reason is what a program switches on (google.rpc.ErrorInfo.reason for a failed call, JobError.reason
for a failed job); the message is for people and quotes user input only as a short prefix. The
README's error table lists every reason; `tests/test_errors.py` keeps it in step with this module.

A job's error travels through Redis (the job hash, its terminal event, the notification) as a small
JSON object; common/rq_functions.lua writes the few it decides itself in the same shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum

DOMAIN = "florence2-serve.v1"
# How much of a user-supplied string a message may quote.
QUOTE_CHARS = 40


class Reason(str, Enum):
    # Arguments (INVALID_ARGUMENT unless noted)
    INVALID_FIELD = "INVALID_FIELD"
    IMAGE_UNREADABLE = "IMAGE_UNREADABLE"
    IMAGE_TOO_LARGE = "IMAGE_TOO_LARGE"  # RESOURCE_EXHAUSTED for bytes, INVALID_ARGUMENT for pixels
    REGION_OUT_OF_BOUNDS = "REGION_OUT_OF_BOUNDS"
    TASK_NOT_SUPPORTED = "TASK_NOT_SUPPORTED"
    TOKEN_LIMIT = "TOKEN_LIMIT"
    # Models, jobs, requests
    UNKNOWN_MODEL = "UNKNOWN_MODEL"  # FAILED_PRECONDITION
    NO_LIVE_WORKER = "NO_LIVE_WORKER"  # FAILED_PRECONDITION
    JOB_NOT_FOUND = "JOB_NOT_FOUND"  # NOT_FOUND
    REQUEST_ID_REUSED = "REQUEST_ID_REUSED"  # ALREADY_EXISTS
    EVENT_ID_OUT_OF_RANGE = "EVENT_ID_OUT_OF_RANGE"  # OUT_OF_RANGE
    # The service
    QUEUE_FULL = "QUEUE_FULL"  # UNAVAILABLE
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"  # UNAVAILABLE: Redis unreachable
    UNAUTHENTICATED = "UNAUTHENTICATED"  # UNAUTHENTICATED
    MALFORMED_REQUEST = "MALFORMED_REQUEST"  # INVALID_ARGUMENT: the body is not the method's protobuf message
    UPLOAD_TOO_SLOW = "UPLOAD_TOO_SLOW"  # DEADLINE_EXCEEDED: an HTTP body slower than the read limit
    NO_SUCH_METHOD = "NO_SUCH_METHOD"  # NOT_FOUND (HTTP 404) / UNIMPLEMENTED (HTTP 405): no such path or verb
    ORIGIN_NOT_ALLOWED = "ORIGIN_NOT_ALLOWED"  # PERMISSION_DENIED: a CORS preflight from an origin not allowed
    INTERNAL = "INTERNAL"  # INTERNAL
    # How a job ended (JobError only)
    INFERENCE_FAILED = "INFERENCE_FAILED"
    CANCELLED = "CANCELLED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    JOB_TIMEOUT = "JOB_TIMEOUT"
    WORKER_LOST = "WORKER_LOST"
    WORKER_STOPPED = "WORKER_STOPPED"
    JOB_DATA_EXPIRED = "JOB_DATA_EXPIRED"


def quote(value: str, limit: int = QUOTE_CHARS) -> str:
    """A user-supplied string for a message: at most `limit` characters, marked when cut, in double quotes
    with control characters escaped as JSON escapes them (no language's repr)."""
    shown = value if len(value) <= limit else value[:limit] + "…"
    return json.dumps(shown, ensure_ascii=False)


@dataclass(frozen=True)
class JobError:
    """Why a job did not succeed (the proto's JobError)."""

    reason: str
    message: str
    metadata: dict[str, str] = field(default_factory=dict)

    def encode(self) -> str:
        data = {"reason": self.reason, "message": self.message}
        if self.metadata:
            data["metadata"] = {str(k): str(v) for k, v in self.metadata.items()}
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def decode(cls, text: str) -> "JobError | None":
        """The error stored in Redis; None for none. Text that is not ours becomes INTERNAL."""
        if not text:
            return None
        try:
            data = json.loads(text)
            return cls(str(data["reason"]), str(data["message"]), dict(data.get("metadata") or {}))
        except (ValueError, KeyError, TypeError):
            return cls(Reason.INTERNAL.value, text)


def job_error(reason: Reason, message: str, **metadata) -> str:
    """The encoded JobError, as Redis stores it."""
    return JobError(reason.value, message, {k: str(v) for k, v in metadata.items()}).encode()
