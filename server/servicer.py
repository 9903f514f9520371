"""The florence2.v1.Florence2Service implementation (grpc.aio): validation and status codes.

Every RPC maps Redis trouble to UNAVAILABLE with a plain message (retry with backoff) and any
other unexpected error to INTERNAL; no library exception text reaches a client.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time

import grpc

from florence2_serve.common import redis_layout as layout
from florence2_serve.common.generation import GenerationSettings
from florence2_serve.common.images import ImageError, ImageLimits, probe_image
from florence2_serve.common.redis_layout import Event, EventType, JobState
from florence2_serve.common.rq_bridge import QueueFull
from florence2_serve.common.tasks import SPECS, Input, Task, region_tokens, validate_inputs
from florence2_serve.v1 import florence2_pb2 as pb
from florence2_serve.v1 import florence2_pb2_grpc as pb_grpc

from . import convert, metrics
from .events import BadEventId
from .jobs import REDIS_ERRORS, EventIdOutOfRange, JobStore, NoWorker, UnknownJob, new_job_id, new_record
from .settings import ServerSettings

log = logging.getLogger(__name__)

REDIS_DOWN = "the job store (Redis) is unreachable; retry with backoff"
INTERNAL = "internal error in the front end (logged there)"
# Images up to this size are checked on the event loop; bigger ones in a thread.
INLINE_IMAGE_CHECK_BYTES = 256 * 1024
# Kinds of worker that serve Florence-2 tasks, DETECT, or both.
FLORENCE2_KINDS = {"native", "remote", "noop"}
DETECT_KINDS = {"yolo", "noop"}


def _guarded_unary(method):
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except REDIS_ERRORS:
            await context.abort(grpc.StatusCode.UNAVAILABLE, REDIS_DOWN)
        except Exception:  # noqa: BLE001 - never leak library text to a client
            log.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL)
    return wrapper


def _guarded_stream(method):
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            async for message in method(self, request, context):
                yield message
        except grpc.aio.AbortError:
            raise
        except REDIS_ERRORS:
            await context.abort(grpc.StatusCode.UNAVAILABLE, REDIS_DOWN)
        except Exception:  # noqa: BLE001
            log.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL)
    return wrapper


class Florence2Servicer(pb_grpc.Florence2ServiceServicer):
    def __init__(self, settings: ServerSettings, store: JobStore):
        self.settings = settings
        self.store = store
        self.limits = ImageLimits(max_pixels=settings.max_image_pixels, max_bytes=settings.max_image_bytes)

    # -- validation -------------------------------------------------------------------------

    async def _validated(self, spec: pb.JobSpec, context) -> tuple[Task, dict, list | None, float | None]:
        """(task, generation options, region, job timeout in seconds or None), or abort."""
        if not spec.model:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model is required (see ListModels)")
        timeout_s = None
        try:
            task = convert.task_from_proto(spec.task)
            region = None
            if spec.HasField("region"):
                region = [spec.region.x1, spec.region.y1, spec.region.x2, spec.region.y2]
            validate_inputs(task, spec.text, tuple(region) if region else None)
            generation = convert.generation_from_proto(spec.generation)
            GenerationSettings.from_options(generation)
            layout.check_priority(spec.priority)
            if spec.HasField("timeout"):
                timeout_s = spec.timeout.ToTimedelta().total_seconds()
                if timeout_s <= 0:
                    raise ValueError(f"timeout must be positive, got {timeout_s:g} s")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if len(spec.image) > self.settings.max_image_bytes:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"image is {len(spec.image)} bytes, over the limit of {self.settings.max_image_bytes} bytes",
            )
        if SPECS[task].input is not Input.REGION:
            region = None
        return task, generation, region, timeout_s

    def _inspect(self, spec: pb.JobSpec, region: list[float] | None) -> str:
        """The request's digest; ImageError/ValueError when the image (or the region on it) is not acceptable."""
        info = probe_image(spec.image, self.limits)
        if region is not None:
            region_tokens(tuple(region), (info.width, info.height))
        return _fingerprint(spec)

    async def _submit(self, spec: pb.JobSpec, context, call_deadline: bool, job_id: str | None = None):
        """Validate and enqueue: the rq_bridge.Enqueued outcome and the record."""
        task, generation, region, timeout_s = await self._validated(spec, context)
        try:
            kinds = await self.store.check_model(spec.model)
        except NoWorker as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        if task is Task.DETECT and not kinds & DETECT_KINDS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"task DETECT needs a YOLOv8 worker; model {spec.model!r} is served by Florence-2 workers",
            )
        if task is not Task.DETECT and not kinds & FLORENCE2_KINDS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"model {spec.model!r} is YOLOv8, which serves task DETECT only; {task.name} needs Florence-2",
            )
        try:
            if len(spec.image) <= INLINE_IMAGE_CHECK_BYTES:
                fingerprint = self._inspect(spec, region)
            else:
                fingerprint = await asyncio.to_thread(self._inspect, spec, region)
        except ImageError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad image: {exc}")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        now = time.time()
        deadlines = [now + timeout_s] if timeout_s else []
        remaining = context.time_remaining() if call_deadline else None
        if remaining is not None:
            deadlines.append(now + remaining)
        record = new_record(spec.model, task.value, spec.text, region, generation, spec.request_id,
                            spec.priority, min(deadlines) if deadlines else None, self.settings.job_timeout_s, job_id)
        try:
            enqueued = await self.store.submit(record, spec.image, fingerprint, spec.priority)
        except QueueFull as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if enqueued.created:
            metrics.JOBS_SUBMITTED.labels(model=spec.model).inc()
        return enqueued, record

    # -- RPCs ---------------------------------------------------------------------------------

    @_guarded_unary
    async def Submit(self, request: pb.SubmitRequest, context) -> pb.SubmitResponse:
        enqueued, _ = await self._submit(request.job, context, call_deadline=False)
        if enqueued.created:
            return pb.SubmitResponse(job_id=enqueued.job_id, created=True, state=pb.JOB_STATE_QUEUED)
        existing, _ = await self._get_or_abort(enqueued.job_id, context)
        return pb.SubmitResponse(job_id=enqueued.job_id, created=False, state=convert.state_to_proto(existing.state))

    @_guarded_stream
    async def Run(self, request: pb.RunRequest, context):
        job_id = new_job_id()
        # Watch before the job exists: its events all arrive through the hub, none read back.
        watcher = self.store.watch_new(job_id)
        try:
            enqueued, record = await self._submit(request.job, context, call_deadline=True, job_id=job_id)
        except BaseException:
            self.store.unwatch(watcher)
            raise
        if enqueued.created:
            queued = Event(EventType.QUEUED, JobState.QUEUED, time=record.created, event_id=enqueued.queued_event_id)
            yield pb.RunResponse(event=convert.event_to_proto(job_id, queued))
            stream = self.store.events(job_id, enqueued.queued_event_id, watcher=watcher)
        else:  # request_id named an existing job: stream it from its start
            self.store.unwatch(watcher)
            stream = self.store.events(enqueued.job_id)
        async for message in self._relay(enqueued.job_id, stream, pb.RunResponse, context):
            yield message

    @_guarded_stream
    async def Watch(self, request: pb.WatchRequest, context):
        if not request.job_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "job_id is required")
        try:
            stream = self.store.events(request.job_id, request.after_event_id)
            async for message in self._relay(request.job_id, stream, pb.WatchResponse, context):
                yield message
        except BadEventId as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except EventIdOutOfRange as exc:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(exc))

    async def _relay(self, job_id: str, stream, wrap, context):
        metrics.OPEN_STREAMS.inc()
        try:
            async for event in stream:
                yield wrap(event=convert.event_to_proto(job_id, event))
        except UnknownJob as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        finally:
            metrics.OPEN_STREAMS.dec()

    async def _get_or_abort(self, job_id: str, context):
        if not job_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "job_id is required")
        try:
            return await self.store.get(job_id)
        except UnknownJob as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))

    @_guarded_unary
    async def GetJob(self, request: pb.GetJobRequest, context) -> pb.GetJobResponse:
        record, result = await self._get_or_abort(request.job_id, context)
        return pb.GetJobResponse(job=convert.job_to_proto(record, result))

    @_guarded_unary
    async def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.CancelJobResponse:
        if not request.job_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "job_id is required")
        wait_s = self.settings.cancel_wait_s
        remaining = context.time_remaining()
        if remaining is not None:
            wait_s = max(0.0, min(wait_s, remaining - 0.2))
        try:
            state, cancelled = await self.store.cancel(request.job_id, wait_s)
        except UnknownJob as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        return pb.CancelJobResponse(job_id=request.job_id, state=convert.state_to_proto(state), cancelled=cancelled)

    @_guarded_unary
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        response = pb.ListModelsResponse()
        for name in await self.store.models():
            workers = await self.store.live_workers(name)
            info = pb.ModelInfo(name=name, live_workers=len(workers), queue_depth=await self.store.queue_depth(name))
            for view in workers:
                f = view.fields
                info.workers.append(pb.WorkerInfo(
                    worker_id=view.worker_id, host=f.get("host", ""), device=f.get("device", ""),
                    dtype=f.get("dtype", ""), attention=f.get("attention", ""),
                    batch_size=int(f.get("batch_size", 0)), model_id=f.get("model_id", ""),
                    model_revision=f.get("model_revision", ""), random_weights=f.get("random_weights") == "1",
                    jobs_done=int(f.get("jobs_done", 0)), generate_calls=int(f.get("generate_calls", 0)),
                    state=f.get("state", ""),
                ))
            info.random_weights = any(w.random_weights for w in info.workers)
            response.models.append(info)
        return response


def _fingerprint(spec: pb.JobSpec) -> str:
    """A digest of everything that defines the job except its request_id."""
    header = pb.JobSpec()
    header.CopyFrom(spec)
    header.image = b""
    header.request_id = ""
    digest = hashlib.blake2b(header.SerializeToString(deterministic=True), digest_size=16)
    digest.update(spec.image)
    return digest.hexdigest()
