"""The blocking client. `with Florence2Client("host:port") as client: client.detect("car.jpg", "base")`.

Calls retry UNAVAILABLE (RetryPolicy); a job's event stream survives a front-end restart: the client
reconnects and resumes with Watch after the last event it saw, so the caller never notices.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Iterable, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from florence2_serve.common.tasks import Task
from florence2_serve.v1 import florence2_pb2 as pb

from .core import PARAMETERS_DOC, STREAM_CLOSE_WAIT_S, ClientCore, DetectOutcome, DetectRunBase, RunState, health_error
from .errors import Florence2Error, RpcError
from .connection import network_problem
from .image_input import ImageInput


class Florence2Client(ClientCore):
    __doc__ = ('A blocking client of the Florence-2 service: ``with Florence2Client("host:port") as client:'
               "\n" '    result = client.detect("car.jpg", "base", "OD")``.' "\n" + PARAMETERS_DOC)

    def _open_channel(self, credentials, options):
        return (grpc.secure_channel(self.address, credentials, options=options) if credentials
                else grpc.insecure_channel(self.address, options=options))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.channel.close()

    def check_connection(self, timeout: float = 3.0) -> None:
        """Wait up to `timeout` s for a connection; ServerUnreachable (why, and what to try) if none comes up."""
        ready = grpc.channel_ready_future(self.channel)
        try:  # the common mistakes (a typo, nothing started) are certain at once: say so without waiting
            ready.result(timeout=min(0.5, timeout))
            return
        except grpc.FutureTimeoutError:
            problem = network_problem(self.address, timeout)
            if problem is not None:
                ready.cancel()
                raise problem from None
        try:
            ready.result(timeout=max(0.0, timeout - 0.5))
        except grpc.FutureTimeoutError:
            ready.cancel()
            raise self._unreachable(timeout) from None

    # -- unary calls ---------------------------------------------------------------------------------

    def _unary(self, method, request, timeout: float | None = None):
        attempts = self.retry.start()
        while True:
            try:
                return method(request, timeout=timeout or self.timeout, metadata=self._metadata())
            except grpc.RpcError as exc:
                error = RpcError.from_grpc(exc)
                delay = attempts.next_delay(error)
                if delay is None:
                    raise error from None
                time.sleep(delay)

    def submit(self, spec: pb.JobSpec, timeout: float | None = None) -> pb.SubmitResponse:
        return self._unary(self.stub.Submit, pb.SubmitRequest(job=spec), timeout)

    def get_job(self, job_id: str = "", *, request_id: str = "") -> pb.Job:
        return self._unary(self.stub.GetJob, pb.GetJobRequest(job_id=job_id, request_id=request_id)).job

    def cancel(self, job_id: str) -> pb.CancelJobResponse:
        return self._unary(self.stub.CancelJob, pb.CancelJobRequest(job_id=job_id))

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self._unary(self.stub.ListModels, pb.ListModelsRequest()).models)

    def limits(self) -> pb.ServiceLimits:
        return self._unary(self.stub.ListModels, pb.ListModelsRequest()).limits

    def health(self, service: str = "") -> str:
        """grpc.health.v1 status of the front end (""), the service, or a model by its name."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            response = self._unary(stub.Check, health_pb2.HealthCheckRequest(service=service), self.timeout or 5)
        except RpcError as exc:
            raise health_error(exc, service) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    # -- event streams -----------------------------------------------------------------------------

    def run(self, spec: pb.JobSpec, timeout: float | None = None) -> Iterator[pb.JobEvent]:
        """Submit and stream the job's events until it ends, across front-end restarts."""
        return self._follow(RunState(), spec, timeout)

    def watch(self, job_id: str, after_event_id: str = "", timeout: float | None = None) -> Iterator[pb.JobEvent]:
        """A job's events after `after_event_id` until it ends, across front-end restarts."""
        return self._follow(RunState(job_id, after_event_id), None, timeout)

    def _follow(self, state: RunState, spec: pb.JobSpec | None, timeout: float | None) -> Iterator[pb.JobEvent]:
        timeout = timeout or self.timeout
        deadline = time.monotonic() + timeout if timeout else None
        attempts = self.retry.start()
        while True:
            method, request = state.resume_request(spec)
            remaining = None if deadline is None else max(0.001, deadline - time.monotonic())
            call = getattr(self.stub, method)(request, timeout=remaining, metadata=self._metadata())
            try:
                for response in call:
                    attempts.reset()
                    state.see(response.event)
                    yield response.event
                    if state.done:
                        _closed_by_server(call)
                        return
                return  # closed by the server: the job has ended (a Watch of an ended job may close empty)
            except grpc.RpcError as exc:
                error = RpcError.from_grpc(exc)
            finally:
                call.cancel()
            delay = attempts.next_delay(error)
            if delay is None:
                raise state.timed_out(error, timeout, submitted_here=spec is not None)
            time.sleep(delay)

    # -- results -------------------------------------------------------------------------------------

    def detect(self, image: ImageInput, model: str, task: Task | str = Task.OD, timeout: float | None = None,
               **options) -> pb.Result:
        """Run `task` on `image` (bytes, path, PIL image, numpy array, binary file) and return its Result.

        Raises JobFailed when the job ends FAILED, CANCELLED or EXPIRED, RpcError when the service
        refuses the request; UNAVAILABLE is retried and a broken stream resumed.
        """
        state = RunState()
        for _ in self._follow(state, self.spec(image, model, task, **options), timeout):
            pass
        return state.outcome()

    def detect_tasks(self, image: ImageInput, model: str, tasks: list, timeout: float | None = None,
                     **options) -> list[pb.Result]:
        """Several tasks on one image (each a Task, its name, or a (task, text[, region]) tuple): one
        Submit, one job per task, the image encoded once on the worker. Results in the order of `tasks`;
        JobFailed if one of them fails."""
        submitted = self.submit(self.tasks_spec(image, model, tasks, **options), timeout)
        return [self.wait(job_id, timeout) for job_id in (submitted.job_id, *submitted.more_job_ids)]

    def wait(self, job_id: str, timeout: float | None = None) -> pb.Result:
        """Wait for a submitted job to end: its Result, or JobFailed."""
        state = RunState(job_id)
        for _ in self._follow(state, None, timeout):
            pass
        return state.outcome()

    def detect_many(self, images: Iterable[ImageInput], model: str, task: Task | str = Task.OD, *,
                    concurrency: int = 4, timeout: float | None = None, **options) -> "DetectRun":
        """Results of many images as they complete (an iterator of DetectOutcome, in completion order),
        at most `concurrency` jobs in flight; a failing image is an outcome with an error, never an
        exception. `DetectRun.cancel()` stops the run and cancels its jobs on the server."""
        return DetectRun(self, images, model, task, concurrency, timeout, options)


class DetectRun(DetectRunBase):
    def __iter__(self) -> Iterator[DetectOutcome]:
        source = enumerate(self.images)
        pending: set[Future] = set()
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="detect") as pool:
            try:
                while True:
                    while len(pending) < self.concurrency and not self.in_flight.stopped:
                        item = next(source, None)
                        if item is None:
                            break
                        pending.add(pool.submit(self._one, *item))
                    if not pending:
                        return
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield future.result()
            finally:
                if pending:  # abandoned (an exception, Ctrl-C, or the caller stopped iterating)
                    self.cancel()

    def _one(self, index: int, image) -> DetectOutcome:
        outcome, spec = self._prepare(index, image)
        if spec is None:
            return outcome
        state, error = RunState(), None
        try:
            for event in self.client._follow(state, spec, self.timeout):
                self.in_flight.known(spec.request_id, event.job_id)
        except Florence2Error as exc:
            error = exc
        return self._finish(outcome, state, error)

    def cancel(self) -> int:
        """Submit nothing more and cancel every job still running on the server; how many were cancelled."""
        self.in_flight.stopped = True
        cancelled = 0
        for request_id, job_id in self.in_flight.snapshot():
            try:
                job_id = job_id or self.client.get_job(request_id=request_id).job_id
                cancelled += bool(self.client.cancel(job_id).cancelled)
            except Florence2Error:
                continue  # never submitted, or gone: nothing to cancel
        return cancelled


def _closed_by_server(call) -> None:
    """Wait (briefly) for the status of a stream the server is ending, rather than cancel it (core.py)."""
    closed = threading.Event()
    call.add_done_callback(lambda _call: closed.set())
    closed.wait(STREAM_CLOSE_WAIT_S)
