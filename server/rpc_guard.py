"""What every RPC of the servicer shares: it is counted and timed, and any failure is answered with the rich
error model (server/errors.py): Redis trouble as UNAVAILABLE (STORE_UNAVAILABLE, with RetryInfo), any other
unexpected error as INTERNAL, logged here; no library exception text reaches a client."""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import grpc

from . import metrics
from .errors import ServiceError, internal, store_unavailable
from .jobs import REDIS_ERRORS

log = logging.getLogger(__name__)


class _Answered:
    """Counts an RPC in florence2_requests_total and times it (florence2_request_duration_seconds)."""

    def __init__(self, name: str, context):
        self.name, self.context, self.started = name, context, time.perf_counter()
        self.code = grpc.StatusCode.OK

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, _tb):
        if kind is not None and issubclass(kind, (asyncio.CancelledError, GeneratorExit)):
            self.code = grpc.StatusCode.CANCELLED
        elif kind is not None:  # aborted: the code the abort set (the guard set it too)
            try:
                self.code = self.context.code() or self.code
            except (AttributeError, TypeError):
                pass
        metrics.REQUESTS.labels(self.name, self.code.name).inc()
        metrics.REQUEST_SECONDS.labels(self.name).observe(time.perf_counter() - self.started)
        return False

    async def fail(self, exc: Exception) -> None:
        """Answer with the rich error for `exc` (never library text) and record its code; raises AbortError."""
        if isinstance(exc, ServiceError):
            error = exc
        elif isinstance(exc, REDIS_ERRORS):
            error = store_unavailable()
        else:
            log.exception("%s failed", self.name)
            error = internal()
        self.code = error.code
        await error.abort(self.context)


def guarded_unary(method):
    @functools.wraps(method)
    async def wrapper(self, request, context):
        with _Answered(method.__name__, context) as answered:
            try:
                return await method(self, request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001
                await answered.fail(exc)
    return wrapper


def guarded_stream(method):
    @functools.wraps(method)
    async def wrapper(self, request, context):
        with _Answered(method.__name__, context) as answered:
            try:
                async for message in method(self, request, context):
                    yield message
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001
                await answered.fail(exc)
    return wrapper
