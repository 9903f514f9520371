"""The v1 contract from a client's side, on the job core without a model (a no-op worker): structured
errors, AIP-155 idempotency, bounded inputs, model discovery, per-model health, reflection v1 and the
terminal events."""

from __future__ import annotations

import io
import os
import signal
import struct
import threading
import time
import uuid
import zlib

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from PIL import Image

from florence2_serve.client import job_spec
from florence2_serve.common import redis_layout as layout
from florence2_serve.common.tasks import Task
from florence2_serve.v1 import florence2_pb2 as pb
from service_helpers import reason_of, wait_for


def _details(exc: grpc.RpcError) -> dict:
    """The google.rpc.Status details of a failed call, by type, as the client read them."""
    found = {"ErrorInfo": error_details_pb2.ErrorInfo(reason=exc.reason, domain=exc.domain)}
    if exc.violations:
        found["BadRequest"] = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in exc.violations])
    if exc.retry_delay_s is not None:
        found["RetryInfo"] = error_details_pb2.RetryInfo()
        found["RetryInfo"].retry_delay.FromMilliseconds(int(exc.retry_delay_s * 1000))
    return found


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


def _spec(stack, **overrides) -> pb.JobSpec:
    spec = job_spec(stack.image, "nop", Task.CAPTION, request_id="")
    for name, value in overrides.items():
        setattr(spec, name, value)
    return spec


@pytest.fixture
def stack(noop_stack, tiny_png):
    noop_stack.image = tiny_png
    return noop_stack


# -- structured errors and input bounds --------------------------------------------------------

@pytest.mark.parametrize("mutate,code,reason,field", [
    (lambda s: s.generation.CopyFrom(pb.GenerationOptions(repetition_penalty=float("nan"))),
     grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "job.generation.repetition_penalty"),
    (lambda s: s.generation.CopyFrom(pb.GenerationOptions(repetition_penalty=float("inf"))),
     grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "job.generation.repetition_penalty"),
    (lambda s: s.generation.CopyFrom(pb.GenerationOptions(min_new_tokens=50, max_new_tokens=10)),
     grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "job.generation.min_new_tokens"),
    (lambda s: s.generation.CopyFrom(pb.GenerationOptions(max_new_tokens=5000)),
     grpc.StatusCode.INVALID_ARGUMENT, "TOKEN_LIMIT", "job.generation.max_new_tokens"),
    (lambda s: setattr(s, "task", pb.TASK_TYPE_CAPTION_TO_PHRASE_GROUNDING) or setattr(s, "text", "x" * 1_000_000),
     grpc.StatusCode.INVALID_ARGUMENT, "TOKEN_LIMIT", "job.text"),
    (lambda s: setattr(s, "task", pb.TASK_TYPE_CAPTION_TO_PHRASE_GROUNDING) or setattr(s, "text", "y" * 300),
     grpc.StatusCode.INVALID_ARGUMENT, "TOKEN_LIMIT", "job.text"),
    (lambda s: setattr(s, "request_id", "r" * 1_000_000), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD",
     "job.request_id"),
    (lambda s: setattr(s, "request_id", "has space"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD",
     "job.request_id"),
    (lambda s: setattr(s, "model", "m" * 100_000), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "job.model"),
    (lambda s: setattr(s, "priority", 10), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "job.priority"),
    (lambda s: setattr(s, "image", b""), grpc.StatusCode.INVALID_ARGUMENT, "IMAGE_UNREADABLE", "job.image"),
    (lambda s: setattr(s, "task", pb.TASK_TYPE_REGION_TO_CATEGORY) or s.region.CopyFrom(
        pb.Region(x1=float("nan"), y1=0, x2=5, y2=5)), grpc.StatusCode.INVALID_ARGUMENT, "REGION_OUT_OF_BOUNDS",
     "job.region"),
])
def test_every_bound_is_checked_at_submit_with_a_short_structured_error(stack, mutate, code, reason, field):
    spec = _spec(stack)
    mutate(spec)
    error = _refused(lambda: stack.client.submit(spec))
    details = _details(error)
    assert error.code() == code and details["ErrorInfo"].reason == reason, error.details()
    assert details["ErrorInfo"].domain == "florence2-serve.v1"
    assert [v.field for v in details["BadRequest"].field_violations] == [field]
    assert len(error.details()) < 300 and "object at 0x" not in error.details()
    assert stack.client.list_models()[0].queue_depth == 0  # nothing was queued


def test_an_image_bomb_is_refused_from_its_header_with_our_limit(stack):
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))
    error = _refused(lambda: stack.client.submit(_spec(stack, image=bomb)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and reason_of(error) == "IMAGE_TOO_LARGE"
    assert "30000x30000" in error.details() and "limit of 50000000 pixels" in error.details()


def test_an_unreadable_image_says_so_without_library_text(stack):
    error = _refused(lambda: stack.client.submit(_spec(stack, image=b"GIF89a-not-really")))
    assert reason_of(error) == "IMAGE_UNREADABLE"
    assert "BytesIO" not in error.details() and "cannot identify" not in error.details()


@pytest.mark.parametrize("call", ["get", "cancel", "watch"])
@pytest.mark.parametrize("job_id", ["", "x" * 10_000, "not-a-job"])
def test_job_ids_are_checked_in_every_rpc(stack, call, job_id):
    client = stack.client
    rpc = {"get": lambda: client.get_job(job_id), "cancel": lambda: client.cancel(job_id),
           "watch": lambda: list(client.watch(job_id))}[call]
    error = _refused(rpc)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and reason_of(error) == "INVALID_FIELD"
    assert len(error.details()) < 200


def test_queue_full_is_unavailable_with_retry_info(valkey, front_end_factory, worker_factory, tiny_png):
    from florence2_serve.client import NO_RETRY, Florence2Client

    front = front_end_factory(valkey.connection_url, max_queue_depth=1)
    worker = worker_factory(valkey.connection_url, "nop=noop", "--kind", "noop", worker_id="full-w1")
    worker.process.send_signal(signal.SIGSTOP)  # registered, but takes nothing
    try:
        with Florence2Client(f"127.0.0.1:{front.port}", timeout=10, retry=NO_RETRY) as client:
            client.submit(job_spec(tiny_png, "nop", Task.CAPTION))
            error = _refused(lambda: client.submit(job_spec(tiny_png, "nop", Task.CAPTION)))
        details = _details(error)
        assert error.code() == grpc.StatusCode.UNAVAILABLE and details["ErrorInfo"].reason == "QUEUE_FULL"
        assert details["RetryInfo"].retry_delay.ToMilliseconds() == 1000
    finally:
        worker.process.send_signal(signal.SIGCONT)


def test_redis_down_is_unavailable_with_a_plain_message(valkey, front_end_factory, tiny_png):
    from florence2_serve.client import NO_RETRY, Florence2Client

    front = front_end_factory(valkey.connection_url)
    valkey.stop()
    with Florence2Client(f"127.0.0.1:{front.port}", timeout=10, retry=NO_RETRY) as client:
        error = _refused(lambda: client.get_job(uuid.uuid4().hex))
    assert error.code() == grpc.StatusCode.UNAVAILABLE and reason_of(error) == "STORE_UNAVAILABLE"
    assert "Redis" in error.details() and "Error" not in error.details()


# -- AIP-155 --------------------------------------------------------------------------------------

def test_a_known_request_id_returns_its_job_before_anything_else_is_checked(stack):
    client = stack.client
    request_id = f"retry-{uuid.uuid4()}"
    first = client.submit(_spec(stack, request_id=request_id))
    assert first.created
    without_image = _spec(stack, request_id=request_id, image=b"")
    again = client.submit(without_image)
    assert (again.job_id, again.created) == (first.job_id, False)
    assert list(client.watch(first.job_id))[-1].type == pb.EVENT_TYPE_DONE
    # The model's only worker is gone (paused; its registration removed): a retry still gets its job.
    stack.worker.process.send_signal(signal.SIGSTOP)
    try:
        stack.redis.delete(layout.model_workers_key("nop"), layout.worker_key("nop-w1"))
        time.sleep(2.2)  # the front end's liveness answer lapses
        assert client.submit(_spec(stack, request_id=request_id)).job_id == first.job_id
        events = list(client.run(_spec(stack, request_id=request_id)))
        assert events[-1].type == pb.EVENT_TYPE_DONE and events[-1].job_id == first.job_id
        error = _refused(lambda: client.submit(_spec(stack, request_id=f"new-{uuid.uuid4()}")))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and reason_of(error) == "NO_LIVE_WORKER"
    finally:
        stack.worker.process.send_signal(signal.SIGCONT)


def test_a_new_job_is_enqueued_without_a_request_id_lookup_first(stack, monkeypatch):
    """The enqueue answers a known request_id itself, atomically: the front end looks one up (a Redis round
    trip) only for a job its checks refuse."""
    from florence2_serve.server.jobs import JobStore

    looked_up = []
    find_request = JobStore.find_request

    async def counted(self, request_id):
        looked_up.append(request_id)
        return await find_request(self, request_id)

    monkeypatch.setattr(JobStore, "find_request", counted)
    client = stack.client
    request_id, run_id = f"new-{uuid.uuid4()}", f"new-{uuid.uuid4()}"
    first = client.submit(_spec(stack, request_id=request_id))
    assert list(client.run(_spec(stack, request_id=run_id)))[-1].type == pb.EVENT_TYPE_DONE
    again = client.submit(_spec(stack, request_id=request_id))
    assert (again.job_id, again.created) == (first.job_id, False)
    rerun = list(client.run(_spec(stack, request_id=run_id)))
    assert rerun[0].type == pb.EVENT_TYPE_QUEUED and rerun[-1].type == pb.EVENT_TYPE_DONE
    assert looked_up == []
    assert client.submit(_spec(stack, request_id=request_id, image=b"")).job_id == first.job_id
    assert looked_up == [request_id]


@pytest.mark.parametrize("change", [
    {"task": pb.TASK_TYPE_OD},
    {"task": pb.TASK_TYPE_CAPTION_TO_PHRASE_GROUNDING, "text": "a car"},
    {"priority": 3},
    {"image": "other"},
])
def test_the_same_request_id_with_another_payload_is_refused(stack, change):
    client = stack.client
    request_id = str(uuid.uuid4())
    job_id = client.submit(_spec(stack, request_id=request_id)).job_id
    other = _spec(stack, request_id=request_id)
    for name, value in change.items():
        if value == "other":
            buffer = io.BytesIO()
            Image.new("RGB", (16, 16), (0, 0, 255)).save(buffer, format="PNG")
            value = buffer.getvalue()
        setattr(other, name, value)
    for call in (lambda: client.submit(other), lambda: list(client.run(other))):
        error = _refused(call)
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS and reason_of(error) == "REQUEST_ID_REUSED"
    assert client.get_job(job_id).task == pb.TASK_TYPE_CAPTION


def test_a_job_can_be_looked_up_by_its_request_id(stack):
    client = stack.client
    request_id = f"lookup:{uuid.uuid4()}"
    job_id = client.submit(_spec(stack, request_id=request_id)).job_id
    job = client.stub.GetJob(pb.GetJobRequest(request_id=request_id), timeout=10).job
    assert job.job_id == job_id and job.request_id == request_id
    error = _refused(lambda: client.stub.GetJob(pb.GetJobRequest(request_id="never-used"), timeout=10))
    assert error.code() == grpc.StatusCode.NOT_FOUND and reason_of(error) == "JOB_NOT_FOUND"


# -- events -----------------------------------------------------------------------------------------

def test_an_expired_job_ends_with_its_own_event_and_a_structured_error(stack):
    client = stack.client
    blocker = client.submit(job_spec(stack.image, "nop", Task.CAPTION, min_new_tokens=1500, max_new_tokens=1500,
                                     priority=9)).job_id
    wait_for(lambda: client.get_job(blocker).state == pb.JOB_STATE_RUNNING, message="blocker running")
    spec = _spec(stack)
    spec.timeout.FromMilliseconds(300)
    job_id = client.submit(spec).job_id
    events = list(client.watch(job_id))
    assert [e.type for e in events] == [pb.EVENT_TYPE_QUEUED, pb.EVENT_TYPE_EXPIRED]
    assert events[-1].state == pb.JOB_STATE_EXPIRED and events[-1].error.reason == "DEADLINE_EXCEEDED"
    job = client.get_job(job_id)
    assert job.state == pb.JOB_STATE_EXPIRED and job.error.reason == "DEADLINE_EXCEEDED"


def test_a_cancelled_job_carries_a_structured_error(stack):
    client = stack.client
    job_id = client.submit(job_spec(stack.image, "nop", Task.CAPTION, min_new_tokens=3000, max_new_tokens=3000)).job_id
    wait_for(lambda: client.get_job(job_id).state == pb.JOB_STATE_RUNNING, message="running")
    client.cancel(job_id)
    last = list(client.watch(job_id))[-1]
    assert last.type == pb.EVENT_TYPE_CANCELLED and last.error.reason == "CANCELLED"


# -- discovery, health, reflection -------------------------------------------------------------

def test_list_models_describes_kind_tasks_and_limits(stack):
    response = stack.client.stub.ListModels(pb.ListModelsRequest(), timeout=10)
    (model,) = response.models
    assert model.kind == pb.MODEL_KIND_NOOP and len(model.tasks) == len(Task)
    assert (model.max_new_tokens, model.max_text_tokens) == (4096, 256)
    assert response.limits == model.limits
    assert response.limits.max_image_pixels == 50_000_000 and response.limits.max_request_id_length == 128
    assert response.limits.max_message_bytes > response.limits.max_image_bytes


def test_health_has_a_name_per_model(stack):
    stub = health_pb2_grpc.HealthStub(stack.client.channel)
    status = health_pb2.HealthCheckResponse.ServingStatus

    def check(name):
        return status.Name(stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status)

    wait_for(lambda: _health_or_none(check, "nop") == "SERVING", timeout=10, message="nop SERVING")
    stack.redis.sadd(layout.MODELS_KEY, "ghost")  # a model whose workers are gone
    wait_for(lambda: _health_or_none(check, "ghost") == "NOT_SERVING", timeout=10, message="ghost NOT_SERVING")
    error = _refused(lambda: check("never-registered"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def _health_or_none(check, name):
    try:
        return check(name)
    except grpc.RpcError:
        return None


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_v1_and_v1alpha(stack, version):
    method = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    call = stack.client.channel.stream_stream(method, request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                              response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="florence2.v1.Florence2Service"),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection")]
    listed, described, described_v1 = list(call(iter(requests), timeout=10))
    names = {service.name for service in listed.list_services_response.service}
    assert {"florence2.v1.Florence2Service", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert described.file_descriptor_response.file_descriptor_proto
    assert described_v1.file_descriptor_response.file_descriptor_proto


# -- bounded memory -----------------------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_concurrent_large_images_keep_the_front_end_memory_bounded(valkey, front_end_factory, worker_factory):
    from florence2_serve.client import Florence2Client

    front = front_end_factory(valkey.connection_url, image_check_pixels=50_000_000)
    worker_factory(valkey.connection_url, "nop=noop", "--kind", "noop", worker_id="mem-w1")
    buffer = io.BytesIO()
    Image.new("L", (7000, 7000), 128).save(buffer, format="PNG")  # 49 megapixels, a small file
    big = buffer.getvalue()
    peak, stop = [_rss_bytes()], threading.Event()
    baseline = peak[0]

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with Florence2Client(f"127.0.0.1:{front.port}", timeout=120) as client:
        results = []
        threads = [threading.Thread(target=lambda: results.append(client.submit(job_spec(big, "nop", Task.CAPTION))))
                   for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    stop.set()
    sampler.join()
    assert len(results) == 8
    # One 49 MP check at a time (~49 MB decoded, plus the decoder's own buffers); eight at once would
    # hold ~400 MB.
    assert peak[0] - baseline < 200 * 1024 * 1024, f"front end grew by {(peak[0] - baseline) / 2**20:.0f} MiB"
