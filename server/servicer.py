"""The florence2.v1.Florence2Service implementation (grpc.aio): validation and status codes.

Every failed call carries the rich error model (server/errors.py); every RPC is guarded by
server/rpc_guard.py, so no library exception text reaches a client.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

import grpc

from florence2_serve.common import tracing
from florence2_serve.common.errors import Reason, quote
from florence2_serve.common.generation import MAX_NUM_BEAMS
from florence2_serve.common.images import ImageLimits
from florence2_serve.common.log_setup import job_fields
from florence2_serve.common.model_arg import MAX_MODEL_NAME
from florence2_serve.common.proto_enums import checkpoint_format_to_proto, state_to_proto, task_name, task_to_proto
from florence2_serve.common.redis_layout import MAX_PRIORITY, Event, EventType, JobState
from florence2_serve.common.rq_bridge import QueueFull
from florence2_serve.v1 import florence2_pb2 as pb
from florence2_serve.v1 import florence2_pb2_grpc as pb_grpc

from . import convert, metrics, validation
from .capabilities import ModelCapabilities
from .errors import ServiceError, invalid, not_found, unavailable
from .events import BadEventId
from .image_gate import ImageGate
from .jobs import EventIdOutOfRange, JobStore, NoWorker, UnknownJob, new_job_id, new_record
from .more_tasks import more_task_request_id, more_task_specs
from .rpc_guard import guarded_stream, guarded_unary
from .settings import ServerSettings

log = logging.getLogger(__name__)


def _reused(request_id: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.ALREADY_EXISTS, Reason.REQUEST_ID_REUSED,
        f"request_id {quote(request_id)} was already used for a different request (another task, "
        "text, region, options or image); use a new request_id for a new request",
        violations=[("job.request_id", "already used with a different payload")])


def _no_worker(exc: NoWorker) -> ServiceError:
    reason = Reason.NO_LIVE_WORKER if exc.known else Reason.UNKNOWN_MODEL
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, reason, str(exc))


class Florence2Servicer(pb_grpc.Florence2ServiceServicer):
    def __init__(self, settings: ServerSettings, store: JobStore):
        self.settings = settings
        self.store = store
        self._background: set[asyncio.Task] = set()
        # Set when the front end shuts down: the streams it ends then are not clients going away.
        self.stopping = False
        self.images = ImageGate(ImageLimits(max_pixels=settings.max_image_pixels, max_bytes=settings.max_image_bytes),
                                settings.image_check_pixels)

    def limits(self) -> pb.ServiceLimits:
        s = self.settings
        return pb.ServiceLimits(
            max_image_bytes=s.max_image_bytes, max_image_pixels=s.max_image_pixels,
            max_message_bytes=s.max_message_bytes, max_request_id_length=validation.MAX_REQUEST_ID,
            max_model_name_length=MAX_MODEL_NAME, max_num_beams=MAX_NUM_BEAMS, max_priority=MAX_PRIORITY)

    # -- submission ------------------------------------------------------------------------------

    async def _existing(self, spec: pb.JobSpec) -> str | None:
        """The job a known request_id names (or ALREADY_EXISTS when its payload differs); None when unknown."""
        if not spec.request_id:
            return None
        found = await self.store.find_request(spec.request_id)
        if found is None:
            return None
        job_id, fingerprint = found
        if not _same_payload(spec, fingerprint):
            raise _reused(spec.request_id)
        return job_id

    async def _refused_unless_known(self, spec: pb.JobSpec, refusal: ServiceError) -> str:
        """AIP-155: a known request_id returns its job whatever a check says (a retry needs neither a live
        worker nor, again, the image). The request is looked up only once a check refuses the job: a job that
        passes them is enqueued at once, and the enqueue answers a known request_id itself, atomically (one
        Redis round trip fewer on every new job's path)."""
        existing_id = await self._existing(spec)
        if existing_id is None:
            raise refusal
        return existing_id

    async def _capabilities(self, spec: pb.JobSpec) -> ModelCapabilities:
        try:
            return await self.store.check_model(spec.model)
        except NoWorker as exc:
            raise _no_worker(exc) from None

    async def _check(self, spec: pb.JobSpec, image_checked: bool = False):
        """Every check of a job before it is queued: (CheckedSpec, the model's capabilities)."""
        checked = validation.check_spec(spec, self.settings.max_image_bytes)
        model = await self._capabilities(spec)
        validation.check_for_model(spec, checked, model)
        if spec.text:
            validation.check_text_tokens(spec, await self.store.count_tokens(spec.text, model), model)
        if not image_checked:
            await self.images.check(spec.image, checked.region)
        return checked, model

    async def _submit(self, spec: pb.JobSpec, checked: validation.CheckedSpec, context, call_deadline: bool,
                      job_id: str | None = None):
        """Enqueue a job that passed _check (`checked`: what it found): the rq_bridge.Enqueued outcome and the
        record."""
        now = time.time()
        deadlines = [now + checked.timeout_s] if checked.timeout_s else []
        remaining = context.time_remaining() if call_deadline else None
        if remaining is not None:
            deadlines.append(now + remaining)
        record = new_record(spec.model, checked.task.value, spec.text, checked.region, checked.generation,
                            spec.request_id, spec.priority, min(deadlines) if deadlines else None,
                            self.settings.job_timeout_s, job_id, checked.detection)
        with tracing.rpc_span("Run" if call_deadline else "Submit", model=spec.model, task=checked.task.name,
                              job_id=record.job_id) as carrier:
            record.trace = carrier
            try:
                enqueued = await self.store.submit(record, spec.image, _fingerprint(spec), spec.priority)
            except QueueFull as exc:
                raise unavailable(Reason.QUEUE_FULL, str(exc)) from None
        if not enqueued.created and not enqueued.same_payload:
            raise _reused(spec.request_id)
        if enqueued.created:
            metrics.JOBS_SUBMITTED.labels(spec.model, checked.task.name).inc()
        return enqueued, record

    # -- RPCs ---------------------------------------------------------------------------------

    @guarded_unary
    async def Submit(self, request: pb.SubmitRequest, context) -> pb.SubmitResponse:
        spec = request.job
        validation.check_request_id(spec.request_id)
        try:
            more = await more_task_specs(spec, self._check)
            checked, _ = await self._check(spec)
        except ServiceError as refusal:
            existing_id = await self._refused_unless_known(spec, refusal)
        else:
            enqueued, _ = await self._submit(spec, checked, context, call_deadline=False)
            if enqueued.created:
                more_ids = [(await self._submit(sibling, sibling_checked, context, call_deadline=False))[0].job_id
                            for sibling, sibling_checked in more]
                return pb.SubmitResponse(job_id=enqueued.job_id, created=True, state=pb.JOB_STATE_QUEUED,
                                         more_job_ids=more_ids)
            existing_id = enqueued.job_id
        existing, _ = await self._get(existing_id)
        more_ids = []
        for index in range(len(request.job.more_tasks)):  # a retry: the jobs its first call created
            found = await self.store.find_request(more_task_request_id(request.job.request_id, index))
            if found:
                more_ids.append(found[0])
        return pb.SubmitResponse(job_id=existing_id, created=False, state=state_to_proto(existing.state),
                                 more_job_ids=more_ids)

    @guarded_stream
    async def Run(self, request: pb.RunRequest, context):
        if request.job.more_tasks:
            raise invalid("job.more_tasks", "Run streams one job; submit several tasks on one image with Submit "
                                            "and Watch each job")
        validation.check_request_id(request.job.request_id)
        try:
            checked, _ = await self._check(request.job)
        except ServiceError as refusal:
            existing_id = await self._refused_unless_known(request.job, refusal)
        else:
            job_id = new_job_id()
            # Watch before the job exists: its events all arrive through the hub, none read back.
            watcher = self.store.watch_new(job_id)
            try:
                enqueued, record = await self._submit(request.job, checked, context, call_deadline=True,
                                                      job_id=job_id)
            except BaseException:
                self.store.unwatch(watcher)
                raise
            if enqueued.created:
                queued = Event(EventType.QUEUED, JobState.QUEUED, time=record.created,
                               event_id=enqueued.queued_event_id)
                ended = False
                try:
                    yield pb.RunResponse(event=convert.event_to_proto(job_id, queued))
                    stream = self.store.events(job_id, enqueued.queued_event_id, watcher=watcher)
                    async for message in self._relay(job_id, stream, pb.RunResponse):
                        yield message
                    ended = True
                finally:
                    if not ended and request.job.cancel_on_disconnect and not self.stopping:
                        self._cancel_later(job_id, request.job)
                return
            self.store.unwatch(watcher)
            existing_id = enqueued.job_id
        # request_id named an existing job: stream it from its start
        async for message in self._relay(existing_id, self.store.events(existing_id), pb.RunResponse):
            yield message

    def _cancel_later(self, job_id: str, spec: pb.JobSpec) -> None:
        """Cancel a job whose Run stream the client dropped (it asked for that: cancel_on_disconnect)."""
        fields = job_fields(job_id, spec.model, task_name(spec.task), spec.request_id)

        async def cancel():
            try:
                state, acted = await self.store.cancel(job_id, 0.0)
                if acted:
                    what = ("cancelled" if state is JobState.CANCELLED
                            else "being cancelled (its worker stops it at the next step)")
                    log.info("job %s %s: its client dropped the stream (cancel_on_disconnect)", job_id, what,
                             extra=fields)
                else:
                    log.debug("job %s had already ended %s when its client dropped the stream", job_id,
                              state.name, extra=fields)
            except Exception:  # noqa: BLE001 - Redis away: the job runs on, as without the flag
                log.warning("could not cancel job %s after its client went away", job_id, exc_info=True,
                            extra=fields)
            finally:
                self._background.discard(task)

        task = asyncio.get_running_loop().create_task(cancel())
        self._background.add(task)

    @guarded_stream
    async def Watch(self, request: pb.WatchRequest, context):
        validation.check_job_id(request.job_id)
        try:
            stream = self.store.events(request.job_id, request.after_event_id)
            async for message in self._relay(request.job_id, stream, pb.WatchResponse):
                yield message
        except BadEventId as exc:
            raise invalid("after_event_id", str(exc)) from None
        except EventIdOutOfRange as exc:
            raise ServiceError(grpc.StatusCode.OUT_OF_RANGE, Reason.EVENT_ID_OUT_OF_RANGE, str(exc)) from None

    async def _relay(self, job_id: str, stream, wrap):
        """The job's events as messages; the terminal DONE carries the result (self-contained)."""
        metrics.OPEN_STREAMS.inc()
        result = None
        try:
            async for event in stream:
                if event.type is EventType.RESULT:
                    result = event.result
                elif event.type is EventType.DONE:
                    if result is None:  # resumed after the RESULT event
                        result = await self.store.result_of(job_id)
                    yield wrap(event=convert.event_to_proto(job_id, event, result))
                    continue
                yield wrap(event=convert.event_to_proto(job_id, event))
        except UnknownJob as exc:
            raise not_found(str(exc)) from None
        finally:
            metrics.OPEN_STREAMS.dec()

    async def _get(self, job_id: str):
        try:
            return await self.store.get(job_id)
        except UnknownJob as exc:
            raise not_found(str(exc)) from None

    @guarded_unary
    async def GetJob(self, request: pb.GetJobRequest, context) -> pb.GetJobResponse:
        if request.job_id and request.request_id:
            raise invalid("request_id", "give job_id or request_id, not both")
        if request.request_id:
            validation.check_request_id(request.request_id, "request_id")
            found = await self.store.find_request(request.request_id)
            if found is None:
                raise not_found(f"no job was submitted with request_id {quote(request.request_id)} "
                                f"(or it expired {self.settings.result_ttl_s} s after it last changed)")
            job_id = found[0]
        else:
            validation.check_job_id(request.job_id)
            job_id = request.job_id
        record, result = await self._get(job_id)
        return pb.GetJobResponse(job=convert.job_to_proto(record, result))

    @guarded_unary
    async def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.CancelJobResponse:
        validation.check_job_id(request.job_id)
        wait_s = self.settings.cancel_wait_s
        remaining = context.time_remaining()
        if remaining is not None:
            wait_s = max(0.0, min(wait_s, remaining - 0.2))
        try:
            state, cancelled = await self.store.cancel(request.job_id, wait_s)
        except UnknownJob as exc:
            raise not_found(str(exc)) from None
        return pb.CancelJobResponse(job_id=request.job_id, state=state_to_proto(state), cancelled=cancelled)

    @guarded_unary
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        limits = self.limits()
        response = pb.ListModelsResponse(limits=limits)
        for name in await self.store.models():
            workers = await self.store.live_workers(name)
            info = pb.ModelInfo(name=name, live_workers=len(workers), queue_depth=await self.store.queue_depth(name),
                                limits=limits)
            for view in workers:
                info.workers.append(_worker_info(view))
            info.random_weights = any(w.random_weights for w in info.workers)
            if workers:
                model = ModelCapabilities.of_workers([view.fields for view in workers])
                info.kind = model.kind
                info.tasks.extend(sorted(task_to_proto(task) for task in model.tasks))
                info.max_new_tokens = model.max_new_tokens
                info.max_text_tokens = model.max_text_tokens
            formats = {worker.source_format for worker in info.workers}
            info.source_format = formats.pop() if len(formats) == 1 else pb.CHECKPOINT_FORMAT_UNSPECIFIED
            response.models.append(info)
        return response


def _worker_info(view) -> pb.WorkerInfo:
    f = view.fields
    return pb.WorkerInfo(
        worker_id=view.worker_id, host=f.get("host", ""), device=f.get("device", ""),
        dtype=f.get("dtype", ""), attention=f.get("attention", ""),
        batch_size=int(f.get("batch_size", 0)), model_id=f.get("model_id", ""),
        model_revision=f.get("model_revision", ""), random_weights=f.get("random_weights") == "1",
        jobs_done=int(f.get("jobs_done", 0)), generate_calls=int(f.get("generate_calls", 0)),
        state=f.get("state", ""), source_format=checkpoint_format_to_proto(f.get("source_format", "")),
        converted=f.get("converted") == "1", engine=f.get("engine", ""), engine_note=f.get("engine_note", ""),
    )


def _fingerprint(spec: pb.JobSpec) -> str:
    """'<digest of the request>:<digest of the image>': everything that defines the job but its request_id."""
    header = pb.JobSpec()
    header.CopyFrom(spec)
    header.image = b""
    header.request_id = ""
    request = hashlib.blake2b(header.SerializeToString(deterministic=True), digest_size=16).hexdigest()
    return f"{request}:{hashlib.blake2b(spec.image, digest_size=16).hexdigest()}"


def _same_payload(spec: pb.JobSpec, stored: str) -> bool:
    """Does a retry match the job's stored fingerprint? A retry may leave the image out (the id names
    the job); any image it carries must be the job's."""
    request, _, image = _fingerprint(spec).partition(":")
    stored_request, _, stored_image = stored.partition(":")
    return request == stored_request and (not spec.image or image == stored_image)
