"""Python client for the florence2.v1 service (sync and asyncio). No torch.

    from florence2_serve.client import Florence2Client

    with Florence2Client("127.0.0.1:50051") as client:
        result = client.detect("car.jpg", "base", "OD")
"""

from florence2_serve.common.tasks import Task

from .aio import AsyncDetectRun, AsyncFlorence2Client
from .client import DetectRun, Florence2Client
from .connection import ServerUnreachable
from .core import DetectOutcome, job_spec
from .errors import Florence2Error, JobFailed, RpcError
from .json_output import to_json
from .retry import NO_RETRY, RetryPolicy

__all__ = [
    "AsyncDetectRun", "AsyncFlorence2Client", "DetectOutcome", "DetectRun", "Florence2Client", "Florence2Error",
    "JobFailed", "NO_RETRY", "RetryPolicy", "RpcError", "ServerUnreachable", "Task", "job_spec", "to_json",
]
