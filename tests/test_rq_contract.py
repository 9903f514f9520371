"""Contract with rq 3.0: what common/rq_bridge.py writes below rq's API, read back through rq's public API.

An in-process burst worker with a fake engine against real valkey, the way rq and arq test their
workers. Any rq change that moves a key, a field or a registry makes one of these fail loudly.
"""

from __future__ import annotations

import asyncio
import base64
import time
import zlib

import pytest
from rq import Queue, Retry, Callback
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer

from florence2_serve.common import redis_layout as layout
from florence2_serve.common.errors import JobError
from florence2_serve.common import rq_bridge
from florence2_serve.common.redis_layout import EventType, JobRecord
from florence2_serve.server.redis_pipe import PipelinedRedis
from florence2_serve.worker.batch_worker import BatchWorker
from florence2_serve.worker.noop import NoopEngine
from florence2_serve.worker.settings import WorkerSettings
from service_helpers import enqueue_directly

MODEL = "contract"
OPTIONS = rq_bridge.JobOptions(timeout=600, ttl=3600, max_retries=2)


class FakeEngine(NoopEngine):
    """The no-op engine, except that a request whose text is 'fail' fails."""

    def run_batch(self, requests):
        outcomes = super().run_batch(requests)
        for outcome in outcomes:
            if outcome.request.text == "fail":
                outcome.result = None
                outcome.error = JobError("INFERENCE_FAILED", "inference failed: the fake engine was asked to fail")
        return outcomes


@pytest.fixture
def submit(valkey, tiny_png):
    """submit(priority=0, text='', job_id=None) -> job id, through the front end's enqueue function."""
    def do(priority: int = 0, text: str = "", job_id: str | None = None, task: str = "<CAPTION>") -> str:
        record = JobRecord(job_id=job_id or f"job-{time.monotonic_ns()}", model=MODEL, task=task, text=text,
                           priority=priority)
        return enqueue_directly(valkey.connection_url, record, tiny_png, OPTIONS)
    return do


@pytest.fixture
def burst_worker(connection):
    """burst_worker(engine=None) runs a BatchWorker in this process until the queues are empty."""

    def run(engine=None, **settings) -> BatchWorker:
        worker = BatchWorker(connection, WorkerSettings(model_name=MODEL, model_path="noop", worker_id="contract-w",
                                                        batch_size=4, **settings),
                             engine or FakeEngine(), {"kind": "noop"})
        worker.register()
        worker.work(burst=True)
        return worker
    return run


def rq_queue(connection, priority: int = 0) -> Queue:
    return Queue(layout.queue_name(MODEL, priority), connection=connection, serializer=JSONSerializer)


def event_types(connection, job_id: str) -> list[str]:
    return [e.type.value for e in layout.read_events(connection, job_id)]


def test_enqueued_job_is_the_job_rq_itself_would_enqueue(connection, submit):
    job_id = submit()
    ours = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    queue = rq_queue(connection)
    theirs = queue.enqueue_call(
        layout.JOB_FUNCTION, job_id="reference", timeout=OPTIONS.timeout, result_ttl=OPTIONS.ttl,
        failure_ttl=OPTIONS.ttl, ttl=OPTIONS.ttl, retry=Retry(max=OPTIONS.max_retries, enqueue_at_front=True),
        on_failure=Callback(layout.FAILURE_CALLBACK))
    theirs = Job.fetch("reference", connection=connection, serializer=JSONSerializer)
    for attribute in ("func_name", "args", "kwargs", "description", "timeout", "result_ttl", "failure_ttl", "ttl",
                      "retries_left", "retry_intervals", "enqueue_at_front_on_retry", "origin",
                      "failure_callback"):
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute
    assert ours.get_status() == JobStatus.QUEUED
    assert queue.get_job_ids() == [job_id, "reference"]
    assert queue in Queue.all(connection=connection)
    ours_fields = {k for k, v in connection.hgetall(ours.key).items() if v != b""}
    theirs_fields = {k for k, v in connection.hgetall(theirs.key).items() if v != b""}
    assert ours_fields == theirs_fields
    assert 0 < connection.ttl(ours.key) <= OPTIONS.ttl


def test_burst_worker_finishes_jobs_the_way_rq_records_them(connection, submit, burst_worker):
    ids = [submit(priority=p) for p in (0, 3, 0)]
    worker = burst_worker()
    for job_id in ids:
        job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
        assert job.get_status() == JobStatus.FINISHED
        assert job.worker_name == "contract-w" and job.started_at and job.ended_at
        assert job.latest_result() is None  # the result is in our events; rq keeps no copy of nothing
        assert event_types(connection, job_id) == ["QUEUED", "STARTED", "RESULT", "DONE"]
        queue = Queue(job.origin, connection=connection, serializer=JSONSerializer)
        assert job_id in queue.finished_job_registry.get_job_ids()
        assert queue.started_job_registry.get_job_ids() == [] and queue.count == 0
        assert job.get_executions() == []
        assert not connection.exists(layout.image_key(job_id))  # an ended job keeps no image
    rq_worker = connection.hgetall(worker.rq_worker.key)
    assert int(rq_worker[b"successful_job_count"]) == 3 and b"death" in rq_worker


def test_failed_job_lands_in_rqs_failed_registry_with_the_reason(connection, submit, burst_worker):
    ok, bad = submit(), submit(text="fail")
    burst_worker()
    assert Job.fetch(ok, connection=connection, serializer=JSONSerializer).get_status() == JobStatus.FINISHED
    job = Job.fetch(bad, connection=connection, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FAILED
    assert bad in rq_queue(connection).failed_job_registry.get_job_ids()
    result = job.latest_result()
    assert result.type == Result.Type.FAILED and "fake engine was asked to fail" in result.exc_string
    assert event_types(connection, bad)[-1] == "FAILED"


def test_abandoned_job_is_found_and_retried_by_rq_at_the_front_of_its_queue(connection, submit, burst_worker):
    first = submit()
    taken = rq_bridge.take(connection, MODEL, worker_name="dead-w", worker_id="dead-w", max_jobs=1, heartbeat_ttl=3,
                           result_ttl=OPTIONS.ttl, execution_prefix="x")
    assert [t.job_id for t in taken] == [first]
    later = submit()
    queue = rq_queue(connection)
    assert queue.started_job_registry.get_job_ids() == [first]
    # The worker "died": nobody heartbeats. rq's own cleanup, past the heartbeat TTL, retries the job.
    StartedJobRegistry(queue.name, connection=connection, serializer=JSONSerializer).cleanup(
        timestamp=time.time() + 60)
    job = Job.fetch(first, connection=connection, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.QUEUED and job.retries_left == 1
    assert queue.get_job_ids() == [first, later]  # ahead of newer work
    assert event_types(connection, first) == ["QUEUED", "QUEUED"]
    burst_worker()
    assert event_types(connection, first) == ["QUEUED", "QUEUED", "STARTED", "RESULT", "DONE"]
    assert Job.fetch(first, connection=connection, serializer=JSONSerializer).get_status() == JobStatus.FINISHED


def test_abandoned_job_without_retries_ends_failed_with_the_reason(connection, submit):
    job_id = submit()
    connection.hset(Job.key_for(job_id), "retries_left", 0)
    rq_bridge.take(connection, MODEL, worker_name="dead-w", worker_id="dead-w", max_jobs=1, heartbeat_ttl=3,
                   result_ttl=OPTIONS.ttl, execution_prefix="x")
    StartedJobRegistry(layout.queue_name(MODEL), connection=connection, serializer=JSONSerializer).cleanup(
        timestamp=time.time() + 60)
    assert Job.fetch(job_id, connection=connection, serializer=JSONSerializer).get_status() == JobStatus.FAILED
    events = layout.read_events(connection, job_id)
    assert events[-1].type is EventType.FAILED and "died" in JobError.decode(events[-1].error).message
    assert JobError.decode(events[-1].error).reason == "WORKER_LOST"


def test_a_job_whose_terminal_event_is_written_never_runs_again(connection, submit, burst_worker):
    job_id = submit()
    burst_worker()
    before = event_types(connection, job_id)
    connection.rpush(layout.rq_queue_key(MODEL), job_id)  # as a stale retry of rq's would
    burst_worker()
    assert event_types(connection, job_id) == before == ["QUEUED", "STARTED", "RESULT", "DONE"]
    assert connection.hget(layout.job_key(job_id), "state") == b"SUCCEEDED"
    assert rq_queue(connection).started_job_registry.get_job_ids() == []


def test_cancel_of_a_queued_job_is_rqs_cancel(connection, submit, valkey):
    job_id = submit()

    async def go():
        pipe = PipelinedRedis(valkey.connection_url)
        try:
            return await rq_bridge.cancel(pipe, job_id, ttl=OPTIONS.ttl)
        finally:
            await pipe.close()

    assert asyncio.run(go()) == ("CANCELLED", True)
    job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.CANCELED
    assert job_id in rq_queue(connection).canceled_job_registry.get_job_ids()
    assert rq_queue(connection).count == 0
    assert event_types(connection, job_id) == ["QUEUED", "CANCELLED"]
    assert asyncio.run(go()) == ("CANCELLED", False)


def test_requeue_puts_taken_jobs_back_at_the_front(connection, submit):
    first, second = submit(), submit()
    taken = rq_bridge.take(connection, MODEL, worker_name="w", worker_id="w", max_jobs=1, heartbeat_ttl=3,
                           result_ttl=OPTIONS.ttl, execution_prefix="x")
    assert rq_bridge.requeue(connection, taken, model=MODEL, ttl=OPTIONS.ttl, worker_name="w") == 1
    queue = rq_queue(connection)
    assert queue.get_job_ids() == [first, second]
    assert queue.started_job_registry.get_job_ids() == []
    assert Job.fetch(first, connection=connection, serializer=JSONSerializer).get_status() == JobStatus.QUEUED
    assert event_types(connection, first) == ["QUEUED", "QUEUED"]


def test_priorities_drain_highest_first_and_fifo_within_a_level(connection, submit):
    order = [submit(priority=p, job_id=f"p{p}-{i}") for i, p in enumerate([0, 5, 1, 5, 9, 0])]
    taken = rq_bridge.take(connection, MODEL, worker_name="w", worker_id="w", max_jobs=10, heartbeat_ttl=3,
                           result_ttl=OPTIONS.ttl, execution_prefix="x")
    assert [t.job_id for t in taken] == ["p9-4", "p5-1", "p5-3", "p1-2", "p0-0", "p0-5"]
    assert len(order) == 6


def test_heartbeat_keeps_a_held_job_out_of_rqs_cleanup(connection, submit):
    job_id = submit()
    taken = rq_bridge.take(connection, MODEL, worker_name="w", worker_id="w", max_jobs=1, heartbeat_ttl=3,
                           result_ttl=OPTIONS.ttl, execution_prefix="x")
    registry = StartedJobRegistry(layout.queue_name(MODEL), connection=connection, serializer=JSONSerializer)
    rq_bridge.heartbeat(connection, taken, ttl=100)
    registry.cleanup(timestamp=time.time() + 60)  # within the refreshed TTL: still held
    assert Job.fetch(job_id, connection=connection, serializer=JSONSerializer).get_status() == JobStatus.STARTED
    assert registry.get_job_ids(cleanup=False) == [job_id]


def test_finish_records_exc_string_the_way_rq_encodes_it():
    text = "deadline exceeded while running"
    assert zlib.decompress(base64.b64decode(rq_bridge.encode_exc_string(text))).decode() == text


def test_refuses_an_rq_it_was_not_written_against(monkeypatch):
    import rq

    monkeypatch.setattr(rq, "__version__", "3.1.0")
    with pytest.raises(RuntimeError, match="rq 3.0.x"):
        rq_bridge.check_rq_version()
    monkeypatch.setattr(rq, "__version__", "3.0.4")
    rq_bridge.check_rq_version()


def test_engine_that_changes_the_batch_size_fails_the_batch_loudly(connection, submit, burst_worker):
    class Shrinking(NoopEngine):
        def run_batch(self, requests):
            return super().run_batch(requests)[:-1]

    ids = [submit() for _ in range(2)]
    burst_worker(Shrinking())
    for job_id in ids:
        events = layout.read_events(connection, job_id)
        assert events[-1].type is EventType.FAILED and JobError.decode(events[-1].error).reason == "INFERENCE_FAILED"


def test_rq_sees_our_workers_and_queues(connection, submit):
    from rq import Worker

    worker = BatchWorker(connection, WorkerSettings(model_name=MODEL, model_path="noop", worker_id="seen-w"),
                         FakeEngine(), {"kind": "noop"})
    worker.register()
    try:
        submit()
        (seen,) = Worker.all(connection=connection)
        assert seen.name == "seen-w" and seen.get_state() == "idle"
        assert set(seen.queue_names()) == set(layout.queue_names(MODEL))
        assert [q.name for q in Queue.all(connection=connection)] == [layout.queue_name(MODEL)]
    finally:
        worker.presence.unregister()
    assert Worker.all(connection=connection) == []
