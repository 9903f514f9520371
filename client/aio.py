"""The asyncio client (grpc.aio): the same requests, retries and resumption as the blocking one."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from florence2_serve.common.tasks import Task
from florence2_serve.v1 import florence2_pb2 as pb

from .core import PARAMETERS_DOC, STREAM_CLOSE_WAIT_S, ClientCore, DetectOutcome, DetectRunBase, RunState, health_error
from .errors import Florence2Error, RpcError
from .connection import network_problem
from .image_input import ImageInput


class AsyncFlorence2Client(ClientCore):
    __doc__ = ('The asyncio client: ``async with AsyncFlorence2Client("host:port") as client:'
               "\n" '    result = await client.detect("car.jpg", "base", "OD")``.' "\n" + PARAMETERS_DOC)

    def _open_channel(self, credentials, options):
        return (grpc.aio.secure_channel(self.address, credentials, options=options) if credentials
                else grpc.aio.insecure_channel(self.address, options=options))

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def check_connection(self, timeout: float = 3.0) -> None:
        """Wait up to `timeout` s for a connection; ServerUnreachable (why, and what to try) if none comes up."""
        ready = asyncio.ensure_future(self.channel.channel_ready())
        try:  # the common mistakes (a typo, nothing started) are certain at once: say so without waiting
            await asyncio.wait_for(asyncio.shield(ready), min(0.5, timeout))
            return
        except asyncio.TimeoutError:
            problem = await asyncio.to_thread(network_problem, self.address, timeout)
            if problem is not None:
                ready.cancel()
                raise problem from None
        try:
            await asyncio.wait_for(ready, max(0.0, timeout - 0.5))
        except asyncio.TimeoutError:
            raise await asyncio.to_thread(self._unreachable, timeout) from None

    async def _unary(self, method, request, timeout: float | None = None):
        attempts = self.retry.start()
        while True:
            try:
                return await method(request, timeout=timeout or self.timeout, metadata=self._metadata())
            except grpc.RpcError as exc:
                error = RpcError.from_grpc(exc)
                delay = attempts.next_delay(error)
                if delay is None:
                    raise error from None
                await asyncio.sleep(delay)

    async def submit(self, spec: pb.JobSpec, timeout: float | None = None) -> pb.SubmitResponse:
        return await self._unary(self.stub.Submit, pb.SubmitRequest(job=spec), timeout)

    async def get_job(self, job_id: str = "", *, request_id: str = "") -> pb.Job:
        return (await self._unary(self.stub.GetJob, pb.GetJobRequest(job_id=job_id, request_id=request_id))).job

    async def cancel(self, job_id: str) -> pb.CancelJobResponse:
        return await self._unary(self.stub.CancelJob, pb.CancelJobRequest(job_id=job_id))

    async def list_models(self) -> list[pb.ModelInfo]:
        return list((await self._unary(self.stub.ListModels, pb.ListModelsRequest())).models)

    async def health(self, service: str = "") -> str:
        """grpc.health.v1 status of the front end (""), the service, or a model by its name."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            response = await self._unary(stub.Check, health_pb2.HealthCheckRequest(service=service),
                                         self.timeout or 5)
        except RpcError as exc:
            raise health_error(exc, service) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def run(self, spec: pb.JobSpec, timeout: float | None = None) -> AsyncIterator[pb.JobEvent]:
        return self._follow(RunState(), spec, timeout)

    def watch(self, job_id: str, after_event_id: str = "", timeout: float | None = None) -> AsyncIterator[pb.JobEvent]:
        return self._follow(RunState(job_id, after_event_id), None, timeout)

    async def _follow(self, state: RunState, spec: pb.JobSpec | None, timeout: float | None):
        timeout = timeout or self.timeout
        deadline = time.monotonic() + timeout if timeout else None
        attempts = self.retry.start()
        while True:
            method, request = state.resume_request(spec)
            remaining = None if deadline is None else max(0.001, deadline - time.monotonic())
            call = getattr(self.stub, method)(request, timeout=remaining, metadata=self._metadata())
            try:
                async for response in call:
                    attempts.reset()
                    state.see(response.event)
                    yield response.event
                    if state.done:
                        await _closed_by_server(call)
                        return
                return  # closed by the server: the job has ended (a Watch of an ended job may close empty)
            except grpc.RpcError as exc:
                error = RpcError.from_grpc(exc)
            finally:
                call.cancel()
            delay = attempts.next_delay(error)
            if delay is None:
                raise state.timed_out(error, timeout, submitted_here=spec is not None)
            await asyncio.sleep(delay)

    async def detect(self, image: ImageInput, model: str, task: Task | str = Task.OD, timeout: float | None = None,
                     **options) -> pb.Result:
        state = RunState()
        async for _ in self._follow(state, self.spec(image, model, task, **options), timeout):
            pass
        return state.outcome()

    async def detect_tasks(self, image: ImageInput, model: str, tasks: list, timeout: float | None = None,
                           **options) -> list[pb.Result]:
        """As Florence2Client.detect_tasks: one Submit, one job per task, results in the order of `tasks`."""
        submitted = await self.submit(self.tasks_spec(image, model, tasks, **options), timeout)
        return list(await asyncio.gather(*(self.wait(job_id, timeout)
                                           for job_id in (submitted.job_id, *submitted.more_job_ids))))

    async def wait(self, job_id: str, timeout: float | None = None) -> pb.Result:
        """Wait for a submitted job to end: its Result, or JobFailed."""
        state = RunState(job_id)
        async for _ in self._follow(state, None, timeout):
            pass
        return state.outcome()

    def detect_many(self, images: Iterable[ImageInput], model: str, task: Task | str = Task.OD, *,
                    concurrency: int = 4, timeout: float | None = None, **options) -> "AsyncDetectRun":
        """`async for outcome in client.detect_many(paths, "base")`: as Florence2Client.detect_many."""
        return AsyncDetectRun(self, images, model, task, concurrency, timeout, options)


class AsyncDetectRun(DetectRunBase):
    async def __aiter__(self):
        source = enumerate(self.images)
        pending: set[asyncio.Task] = set()
        try:
            while True:
                while len(pending) < self.concurrency and not self.in_flight.stopped:
                    item = next(source, None)
                    if item is None:
                        break
                    pending.add(asyncio.create_task(self._one(*item)))
                if not pending:
                    return
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    yield task.result()
        finally:
            if pending:
                await self.cancel()
                for task in pending:
                    task.cancel()

    async def _one(self, index: int, image) -> DetectOutcome:
        outcome, spec = self._prepare(index, image)
        if spec is None:
            return outcome
        state, error = RunState(), None
        try:
            async for event in self.client._follow(state, spec, self.timeout):
                self.in_flight.known(spec.request_id, event.job_id)
        except Florence2Error as exc:
            error = exc
        return self._finish(outcome, state, error)

    async def cancel(self) -> int:
        self.in_flight.stopped = True
        cancelled = 0
        for request_id, job_id in self.in_flight.snapshot():
            try:
                job_id = job_id or (await self.client.get_job(request_id=request_id)).job_id
                cancelled += bool((await self.client.cancel(job_id)).cancelled)
            except Florence2Error:
                continue
        return cancelled


async def _closed_by_server(call) -> None:
    """Wait (briefly) for the status of a stream the server is ending, rather than cancel it (core.py)."""
    try:
        await asyncio.wait_for(call.code(), STREAM_CLOSE_WAIT_S)
    except (asyncio.TimeoutError, grpc.RpcError):
        pass
