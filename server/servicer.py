"""The florence2.v1.Florence2Service implementation (grpc.aio): validation and status codes."""

from __future__ import annotations

import logging
import time

import grpc

from florence2_serve.common.generation import GenerationSettings
from florence2_serve.common.images import ImageError, ImageLimits, probe_image
from florence2_serve.common.redis_layout import Event, EventType, JobRecord, JobState
from florence2_serve.common.tasks import SPECS, Input, Task, region_tokens, validate_inputs
from florence2_serve.v1 import florence2_pb2 as pb
from florence2_serve.v1 import florence2_pb2_grpc as pb_grpc

from . import convert, metrics
from .jobs import JobStore, NoWorker, QueueFull, UnknownJob, new_record
from .settings import ServerSettings

log = logging.getLogger(__name__)


class Florence2Servicer(pb_grpc.Florence2ServiceServicer):
    def __init__(self, settings: ServerSettings, store: JobStore):
        self.settings = settings
        self.store = store
        self.limits = ImageLimits(max_pixels=settings.max_image_pixels, max_bytes=settings.max_image_bytes)

    # -- validation -------------------------------------------------------------------------

    async def _validated(self, spec: pb.JobSpec, context) -> tuple[Task, dict, list | None]:
        if not spec.model:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model is required (see ListModels)")
        try:
            task = convert.task_from_proto(spec.task)
            region = None
            if spec.HasField("region"):
                region = [spec.region.x1, spec.region.y1, spec.region.x2, spec.region.y2]
            validate_inputs(task, spec.text, tuple(region) if region else None)
            generation = convert.generation_from_proto(spec.generation)
            GenerationSettings(**generation)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if len(spec.image) > self.settings.max_image_bytes:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"image is {len(spec.image)} bytes, over the limit of {self.settings.max_image_bytes} bytes",
            )
        if SPECS[task].input is not Input.REGION:
            region = None
        return task, generation, region

    def _check_image(self, image: bytes, region: list[float] | None) -> None:
        """Runs in a worker thread, just before the job is stored: ImageError/ValueError when bad."""
        info = probe_image(image, self.limits)
        if region is not None:
            region_tokens(tuple(region), (info.width, info.height))

    async def _submit(self, spec: pb.JobSpec, context) -> tuple[JobRecord, str]:
        """Validate and enqueue: (record, id of its QUEUED event — "" for an existing job)."""
        task, generation, region = await self._validated(spec, context)
        try:
            kinds = await self.store.check_model(spec.model)
        except NoWorker as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        if task is Task.DETECT and "yolo" not in kinds:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"task DETECT needs a YOLOv8 worker; model {spec.model!r} is served by Florence-2 workers",
            )
        if task is not Task.DETECT and kinds == {"yolo"}:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"model {spec.model!r} is YOLOv8, which serves task DETECT only; {task.name} needs Florence-2",
            )
        remaining = context.time_remaining()
        deadline = time.time() + remaining if remaining is not None else None
        record = new_record(spec.model, task.value, spec.text, region, generation, spec.request_id,
                            spec.priority, deadline)
        try:
            record.job_id, queued_event_id = await self.store.submit(
                record, spec.image, check=lambda: self._check_image(spec.image, region))
        except ImageError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad image: {exc}")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except QueueFull as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if queued_event_id:
            metrics.JOBS_SUBMITTED.labels(model=spec.model).inc()
        return record, queued_event_id

    async def _stream(self, job_id: str, after: str, wrap, context):
        try:
            async for event in self.store.events(job_id, after):
                yield wrap(event=convert.event_to_proto(job_id, event))
        except UnknownJob as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))

    # -- RPCs ---------------------------------------------------------------------------------

    async def Submit(self, request: pb.SubmitRequest, context) -> pb.SubmitResponse:
        record, queued_event_id = await self._submit(request.job, context)
        if queued_event_id:
            return pb.SubmitResponse(job_id=record.job_id, created=True, state=pb.JOB_STATE_QUEUED)
        existing, _ = await self._get_or_abort(record.job_id, context)
        return pb.SubmitResponse(job_id=record.job_id, created=False, state=convert.state_to_proto(existing.state))

    async def Run(self, request: pb.RunRequest, context):
        record, queued_event_id = await self._submit(request.job, context)
        if queued_event_id:  # a new job: its first event is known without reading it back
            queued = Event(EventType.QUEUED, JobState.QUEUED, time=record.created, event_id=queued_event_id)
            yield pb.RunResponse(event=convert.event_to_proto(record.job_id, queued))
        async for message in self._stream(record.job_id, queued_event_id, pb.RunResponse, context):
            yield message

    async def Watch(self, request: pb.WatchRequest, context):
        if not request.job_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "job_id is required")
        await self._get_or_abort(request.job_id, context)
        async for message in self._stream(request.job_id, request.after_event_id, pb.WatchResponse, context):
            yield message

    async def _get_or_abort(self, job_id: str, context):
        try:
            return await self.store.get(job_id)
        except UnknownJob as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))

    async def GetJob(self, request: pb.GetJobRequest, context) -> pb.GetJobResponse:
        record, result = await self._get_or_abort(request.job_id, context)
        return pb.GetJobResponse(job=convert.job_to_proto(record, result))

    async def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.CancelJobResponse:
        try:
            state, cancelled = await self.store.cancel(request.job_id)
        except UnknownJob as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        return pb.CancelJobResponse(job_id=request.job_id, state=convert.state_to_proto(state), cancelled=cancelled)

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
