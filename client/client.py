"""Python client for the florence2.v1 service, sync and asyncio. No torch."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from florence2_serve.common.proto_enums import TASK_PREFIX, TERMINAL_EVENT_TYPES, state_name, task_to_proto
from florence2_serve.common.tasks import Task
from florence2_serve.v1 import florence2_pb2 as pb
from florence2_serve.v1 import florence2_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024
TERMINAL = TERMINAL_EVENT_TYPES


class JobFailed(RuntimeError):
    """The job ended FAILED, CANCELLED or EXPIRED; `reason` is its JobError's stable reason."""

    def __init__(self, job_id: str, state: str, error: str, reason: str = ""):
        super().__init__(f"job {job_id} {state}: {error}")
        self.job_id, self.state, self.error, self.reason = job_id, state, error, reason


def error_info(exc: grpc.RpcError):
    """The google.rpc.ErrorInfo of a failed call (its stable `reason`), or None."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(exc) if hasattr(exc, "trailing_metadata") else None
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    return None


def job_spec(image: bytes, model: str, task: Task | str = Task.OD, text: str = "",
             region: tuple[float, float, float, float] | None = None, request_id: str | None = None,
             priority: int = 0, num_beams: int = 0, max_new_tokens: int = 0, min_new_tokens: int = 0) -> pb.JobSpec:
    task = task if isinstance(task, Task) else Task.parse(task)
    spec = pb.JobSpec(
        model=model, task=task_to_proto(task), image=image, text=text,
        request_id=request_id if request_id is not None else uuid.uuid4().hex, priority=priority,
        generation=pb.GenerationOptions(num_beams=num_beams, max_new_tokens=max_new_tokens,
                                        min_new_tokens=min_new_tokens),
    )
    if region is not None:
        spec.region.CopyFrom(pb.Region(x1=region[0], y1=region[1], x2=region[2], y2=region[3]))
    return spec


def result_to_dict(result: pb.Result) -> dict:
    """A Result as plain JSON-friendly data (enum names, all fields present)."""
    data = MessageToDict(result, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    data["task"] = data["task"].removeprefix(TASK_PREFIX)
    return data


def event_to_dict(event: pb.JobEvent) -> dict:
    data = MessageToDict(event, preserving_proto_field_name=True)
    if event.HasField("result"):
        data["result"] = result_to_dict(event.result)
    return data


@dataclass
class _Common:
    address: str
    token: str = ""
    timeout: float | None = None

    def _metadata(self):
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def _options(self):
        return [("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE),
                ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE)]


def _outcome(event: pb.JobEvent) -> pb.Result | None:
    """The result once the stream has decided the job; JobFailed if it failed; None to read on.

    RESULT is written in one transaction with DONE, so seeing it means the job succeeded.
    """
    if event.type == pb.EVENT_TYPE_RESULT:
        return event.result
    if event.type in TERMINAL and event.type != pb.EVENT_TYPE_DONE:
        raise JobFailed(event.job_id, state_name(event.state), event.error.message, event.error.reason)
    return None


def _no_result() -> JobFailed:
    return JobFailed("", "UNKNOWN", "stream ended without a result")


class Florence2Client(_Common):
    """Blocking client. `with Florence2Client("host:port") as client: client.detect(...)`."""

    def __init__(self, address: str, token: str = "", timeout: float | None = None):
        super().__init__(address, token, timeout)
        self.channel = grpc.insecure_channel(address, options=self._options())
        self.stub = pb_grpc.Florence2ServiceStub(self.channel)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.channel.close()

    def submit(self, spec: pb.JobSpec, timeout: float | None = None) -> pb.SubmitResponse:
        return self.stub.Submit(pb.SubmitRequest(job=spec), timeout=timeout or self.timeout, metadata=self._metadata())

    def run(self, spec: pb.JobSpec, timeout: float | None = None) -> Iterator[pb.JobEvent]:
        for response in self.stub.Run(pb.RunRequest(job=spec), timeout=timeout or self.timeout, metadata=self._metadata()):
            yield response.event

    def watch(self, job_id: str, after_event_id: str = "", timeout: float | None = None) -> Iterator[pb.JobEvent]:
        request = pb.WatchRequest(job_id=job_id, after_event_id=after_event_id)
        for response in self.stub.Watch(request, timeout=timeout or self.timeout, metadata=self._metadata()):
            yield response.event

    def get_job(self, job_id: str) -> pb.Job:
        return self.stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=self.timeout, metadata=self._metadata()).job

    def cancel(self, job_id: str) -> pb.CancelJobResponse:
        return self.stub.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=self.timeout, metadata=self._metadata())

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout, metadata=self._metadata()).models)

    def health(self, service: str = "") -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout or 5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def detect(self, image: bytes, model: str, task: Task | str = Task.OD, timeout: float | None = None,
               **options) -> pb.Result:
        """Submit, wait and return the typed Result (JobFailed if the job did not succeed)."""
        spec = job_spec(image, model, task, **options)
        call = self.stub.Run(pb.RunRequest(job=spec), timeout=timeout or self.timeout, metadata=self._metadata())
        try:
            for response in call:
                result = _outcome(response.event)
                if result is not None:
                    return result
        finally:
            call.cancel()  # nothing after RESULT but DONE
        raise _no_result()


class AsyncFlorence2Client(_Common):
    """asyncio client over grpc.aio."""

    def __init__(self, address: str, token: str = "", timeout: float | None = None):
        super().__init__(address, token, timeout)
        self.channel = grpc.aio.insecure_channel(address, options=self._options())
        self.stub = pb_grpc.Florence2ServiceStub(self.channel)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def submit(self, spec: pb.JobSpec, timeout: float | None = None) -> pb.SubmitResponse:
        return await self.stub.Submit(pb.SubmitRequest(job=spec), timeout=timeout or self.timeout,
                                      metadata=self._metadata())

    async def run(self, spec: pb.JobSpec, timeout: float | None = None) -> AsyncIterator[pb.JobEvent]:
        call = self.stub.Run(pb.RunRequest(job=spec), timeout=timeout or self.timeout, metadata=self._metadata())
        async for response in call:
            yield response.event

    async def watch(self, job_id: str, after_event_id: str = "", timeout: float | None = None):
        call = self.stub.Watch(pb.WatchRequest(job_id=job_id, after_event_id=after_event_id),
                               timeout=timeout or self.timeout, metadata=self._metadata())
        async for response in call:
            yield response.event

    async def get_job(self, job_id: str) -> pb.Job:
        response = await self.stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=self.timeout, metadata=self._metadata())
        return response.job

    async def cancel(self, job_id: str) -> pb.CancelJobResponse:
        return await self.stub.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=self.timeout,
                                         metadata=self._metadata())

    async def list_models(self) -> list[pb.ModelInfo]:
        response = await self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout, metadata=self._metadata())
        return list(response.models)

    async def detect(self, image: bytes, model: str, task: Task | str = Task.OD, timeout: float | None = None,
                     **options) -> pb.Result:
        spec = job_spec(image, model, task, **options)
        call = self.stub.Run(pb.RunRequest(job=spec), timeout=timeout or self.timeout, metadata=self._metadata())
        try:
            async for response in call:
                result = _outcome(response.event)
                if result is not None:
                    return result
        finally:
            call.cancel()
        raise _no_result()
