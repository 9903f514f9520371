"""What the sync and asyncio clients share: settings, request building, event bookkeeping.

Only I/O differs between `Florence2Client` and `AsyncFlorence2Client` (httpx's BaseClient / Client /
AsyncClient split): both build requests, channels and outcomes here.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc

from florence2_serve.common.proto_enums import TERMINAL_EVENT_TYPES, state_name, task_to_proto
from florence2_serve.common.tasks import Task
from florence2_serve.v1 import florence2_pb2 as pb
from florence2_serve.v1 import florence2_pb2_grpc as pb_grpc

from .connection import ServerUnreachable, check_tls_inputs, diagnose, with_default_port
from .errors import Florence2Error, JobFailed, RpcError
from .image_input import ImageInput, image_bytes
from .retry import RetryPolicy

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024
# After a job's terminal event the server ends the stream at once; a client waits this long for that
# status instead of cancelling the call. A stream cancelled between its last message and its status
# leaves grpc.aio (server and client) a native operation array it never frees (grpc/grpc#43360):
# about 80 bytes per stream, which added up to the front end's slow growth in the soak benchmark.
STREAM_CLOSE_WAIT_S = 2.0


def job_spec(image: ImageInput, model: str, task: Task | str = Task.OD, text: str = "",
             region: tuple[float, float, float, float] | None = None, request_id: str | None = None,
             priority: int = 0, num_beams: int = 0, max_new_tokens: int = 0, min_new_tokens: int = 0,
             repetition_penalty: float = 0.0, timeout_s: float | None = None,
             cancel_on_disconnect: bool = False, more_tasks: Iterable = (), channels: str = "rgb",
             confidence: float | None = None, iou: float | None = None, max_detections: int = 0) -> pb.JobSpec:
    """A JobSpec; `request_id` defaults to a fresh UUID, which makes retries of it safe. `more_tasks`:
    further tasks on the same image, each a Task (or its name) or a (task, text[, region]) tuple.
    `channels="bgr"`: a numpy image is in OpenCV's BGR(A) order (default RGB(A)). `confidence`, `iou` and
    `max_detections` tune a DETECT (YOLO) job's boxes (unset: the worker's 0.25, 0.7 and 300)."""
    task = task if isinstance(task, Task) else Task.parse(task)
    spec = pb.JobSpec(
        model=model, task=task_to_proto(task), image=image_bytes(image, channels), text=text,
        request_id=request_id if request_id is not None else str(uuid.uuid4()), priority=priority,
        generation=pb.GenerationOptions(num_beams=num_beams, max_new_tokens=max_new_tokens,
                                        min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty),
        cancel_on_disconnect=cancel_on_disconnect,
    )
    if region is not None:
        spec.region.CopyFrom(_region(region))
    if confidence is not None or iou is not None or max_detections:
        spec.detection.SetInParent()
        if confidence is not None:
            spec.detection.confidence = confidence
        if iou is not None:
            spec.detection.iou = iou
        spec.detection.max_detections = max_detections
    if timeout_s is not None:
        spec.timeout.FromMilliseconds(int(timeout_s * 1000))
    for item in more_tasks:
        extra_task, extra_text, extra_region = task_request(item)
        extra = spec.more_tasks.add(task=task_to_proto(extra_task), text=extra_text)
        if extra_region is not None:
            extra.region.CopyFrom(_region(extra_region))
    return spec


def _region(region: tuple[float, float, float, float]) -> pb.Region:
    return pb.Region(x1=region[0], y1=region[1], x2=region[2], y2=region[3])


def task_request(item) -> tuple[Task, str, tuple | None]:
    """A task of several on one image: a Task, its name, or a (task, text[, region]) tuple."""
    parts = item if isinstance(item, tuple) else (item,)
    task, text, region = parts[0], parts[1] if len(parts) > 1 else "", parts[2] if len(parts) > 2 else None
    return (task if isinstance(task, Task) else Task.parse(task)), text, region


def health_error(error: "RpcError", service: str) -> "RpcError":
    """The health service answers an unknown name with a bare NOT_FOUND: say what was not found."""
    if error.code() == grpc.StatusCode.NOT_FOUND and not error.details():
        return RpcError(grpc.StatusCode.NOT_FOUND, f"no model {service!r} has registered (see `florence2 models`)",
                        "UNKNOWN_MODEL")
    return error


PARAMETERS_DOC = """
    Parameters (all keyword-only but the address):

    - ``address``: ``host:port`` of a front end (port 50051 when left out), or a gRPC target such as
      ``dns:///florence2-frontend-grpc.florence2.svc.cluster.local:50051``; default ``$FLORENCE2_SERVER``,
      then ``127.0.0.1:50051``.
    - ``token``: bearer token sent with every call (the server's ``--token``).
    - ``timeout``: seconds each call may take; for a job's stream, the whole wait. None: no limit.
    - ``retry``: the RetryPolicy for UNAVAILABLE (default: retry with backoff); ``NO_RETRY`` turns it off.
    - ``tls``: connect with TLS, trusting the system roots unless ``root_certificates`` (PEM bytes) is given.
    - ``certificate_chain`` and ``private_key``: PEM bytes of a client certificate, together (mutual TLS);
      checked before anything connects (ValueError).
    - ``load_balancing``: ``"round_robin"`` (default) spreads calls over every address the target resolves
      to; ``"pick_first"`` keeps one connection.

    ``check_connection()`` fails in seconds, naming the cause (unknown host, nothing listening, TLS or
    certificate trouble), where a call would otherwise retry in silence.
"""


class ClientCore:
    __doc__ = "Connection settings of either client, and the channel each opens.\n" + PARAMETERS_DOC

    LOAD_BALANCING = ("round_robin", "pick_first")

    def __init__(self, address: str | None = None, *, token: str = "", timeout: float | None = None,
                 retry: RetryPolicy | None = None, tls: bool = False, root_certificates: bytes | None = None,
                 certificate_chain: bytes | None = None, private_key: bytes | None = None,
                 load_balancing: str = "round_robin"):
        if load_balancing not in self.LOAD_BALANCING:
            raise ValueError(f"load_balancing must be one of {', '.join(self.LOAD_BALANCING)}, got {load_balancing!r}")
        # Before any channel exists: gRPC's C core aborts the process on a certificate without its key.
        check_tls_inputs(root_certificates, certificate_chain, private_key)
        self.load_balancing = load_balancing
        self.address = with_default_port(address or os.environ.get("FLORENCE2_SERVER") or DEFAULT_ADDRESS)
        self.token = token
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.tls = tls or root_certificates is not None or certificate_chain is not None
        self._tls_files = (root_certificates, private_key, certificate_chain)
        self.channel = self._open_channel(self._credentials(), self._options())
        self.stub = pb_grpc.Florence2ServiceStub(self.channel)

    def _open_channel(self, credentials, options):
        """The sync or asyncio gRPC channel to self.address (each client's own)."""
        raise NotImplementedError

    def _unreachable(self, timeout: float) -> "ServerUnreachable":
        root, key, chain = self._tls_files
        return diagnose(self.address, self.tls, root, chain, key, timeout)

    def _metadata(self) -> tuple:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def _options(self) -> list:
        service_config = {"loadBalancingConfig": [{self.load_balancing: {}}]}
        return [("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE),
                ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE),
                ("grpc.service_config", json.dumps(service_config))]

    def _credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        root, key, chain = self._tls_files
        return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)

    def spec(self, image: ImageInput, model: str, task: Task | str = Task.OD, **options) -> pb.JobSpec:
        return job_spec(image, model, task, **options)

    def tasks_spec(self, image: ImageInput, model: str, tasks: list, **options) -> pb.JobSpec:
        """One JobSpec for several tasks on `image`: the first is the job's task, the rest its more_tasks."""
        if not tasks:
            raise ValueError("tasks must name at least one task")
        first, *rest = tasks
        task, text, region = task_request(first)
        return self.spec(image, model, task, text=text, region=region, more_tasks=rest, **options)


class RunState:
    """One job's events as a client follows them: where to resume after an outage, and the outcome."""

    def __init__(self, job_id: str = "", after_event_id: str = ""):
        self.job_id = job_id
        self.last_event_id = after_event_id
        self.result: pb.Result | None = None
        self.failure: JobFailed | None = None
        self.done = False

    def see(self, event: pb.JobEvent) -> None:
        self.job_id = event.job_id or self.job_id
        self.last_event_id = event.event_id or self.last_event_id
        if event.HasField("result"):
            self.result = event.result
        if event.type in TERMINAL_EVENT_TYPES:
            self.done = True
            if event.type != pb.EVENT_TYPE_DONE:
                self.failure = JobFailed(event.job_id, state_name(event.state), event.error.message, event.error.reason)

    def resume_request(self, spec: pb.JobSpec | None):
        """(method name, request) that continues from here: Run again until the job is known (its
        request_id makes that idempotent), then Watch after the last event seen."""
        if not self.job_id and spec is not None:
            return "Run", pb.RunRequest(job=spec)
        return "Watch", pb.WatchRequest(job_id=self.job_id, after_event_id=self.last_event_id)

    def timed_out(self, error: "RpcError", timeout: float | None, submitted_here: bool) -> "RpcError":
        """A DEADLINE_EXCEEDED of our own timeout (not the service's): say so, and what became of the job.
        A job this call submitted (Run) carries the call's deadline and ends EXPIRED with it; a job only
        waited on (Watch) runs on."""
        if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED or error.reason:
            return error
        if not self.job_id:
            fate = "the job may not have been created"
        elif submitted_here:
            fate = (f"job {self.job_id} had the same deadline and ends EXPIRED (get_job({self.job_id!r}) shows it; "
                    "submit() then wait() to keep a job running past a wait)")
        else:
            fate = f"job {self.job_id} runs on: wait({self.job_id!r}) or get_job({self.job_id!r}) later"
        timed = RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, f"gave up waiting after {timeout:g} s; {fate}",
                         "DEADLINE_EXCEEDED")
        timed.job_id = self.job_id
        return timed

    def outcome(self) -> pb.Result:
        """The result, or JobFailed."""
        if self.failure is not None:
            raise self.failure
        if self.result is None:
            raise JobFailed(self.job_id, "UNKNOWN", "the job's stream ended without a result")
        return self.result


@dataclass
class DetectOutcome:
    """One image of a detect_many run: its result, or the error that stopped it (never both)."""

    index: int
    source: object
    result: pb.Result | None = None
    error: Florence2Error | None = None
    job_id: str = ""
    request_id: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class InFlight:
    """The jobs a detect_many run has submitted and not seen end: what Ctrl-C must cancel."""

    jobs: dict[str, str] = field(default_factory=dict)  # request_id -> job_id ("" until known)
    stopped: bool = False

    def started(self, request_id: str) -> None:
        self.jobs[request_id] = ""

    def known(self, request_id: str, job_id: str) -> None:
        if request_id in self.jobs:
            self.jobs[request_id] = job_id

    def ended(self, request_id: str) -> None:
        self.jobs.pop(request_id, None)

    def snapshot(self) -> list[tuple[str, str]]:
        return list(self.jobs.items())


class DetectRunBase:
    """A detect_many run's state and its non-I/O steps; Florence2Client's DetectRun and the asyncio
    client's AsyncDetectRun add only the I/O."""

    def __init__(self, client, images, model: str, task, concurrency: int, timeout, options: dict):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.client, self.images, self.model, self.task = client, images, model, task
        self.concurrency, self.timeout, self.options = concurrency, timeout, options
        self.in_flight = InFlight()

    def _prepare(self, index: int, image) -> tuple[DetectOutcome, pb.JobSpec | None]:
        """The outcome to fill and the spec to run (None when the image itself is unusable)."""
        outcome = DetectOutcome(index, image)
        try:
            spec = self.client.spec(image, self.model, self.task, **self.options)
        except (TypeError, ValueError, OSError) as exc:
            outcome.error = Florence2Error(str(exc))
            return outcome, None
        outcome.request_id = spec.request_id
        self.in_flight.started(spec.request_id)
        return outcome, spec

    def _finish(self, outcome: DetectOutcome, state: "RunState", error: Florence2Error | None) -> DetectOutcome:
        if error is None:
            try:
                outcome.result = state.outcome()
            except Florence2Error as exc:
                error = exc
        outcome.error = error
        self.in_flight.ended(outcome.request_id)
        outcome.job_id = state.job_id
        return outcome

