"""The worker process: one model for its lifetime, rq's SimpleWorker loop, dynamic batching.

rq hands the worker one job (blocking, reliable hand-off into rq's intermediate list); the worker
then takes up to batch_size - 1 more ready jobs of the same queue without blocking (waiting at
most batch_wait_ms for them), runs them as one batched generate and appends STARTED, RESULT and
DONE / FAILED / CANCELLED to each job's event stream. SIGTERM finishes the batch in hand, takes
no more and exits 0 (rq's warm shutdown).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

import redis
from rq import Queue, SimpleWorker
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import now
from rq.worker import WorkerStatus

from florence2_serve.common import redis_layout as layout
from florence2_serve.common.generation import GenerationSettings
from florence2_serve.common.images import ImageError, decode_image
from florence2_serve.common.redis_layout import Event, EventType, JobRecord, JobState
from florence2_serve.common.tasks import Task

from .engine import InferenceOutcome, InferenceRequest, create_engine
from .presence import InFlight, Presence
from .settings import WorkerSettings

log = logging.getLogger(__name__)


@dataclass
class _Prepared:
    job: Job
    record: JobRecord | None
    request: InferenceRequest | None
    cancel: threading.Event
    error: str = ""
    expired: bool = False


class BatchRunner:
    """Runs a batch of rq jobs through the engine and writes their events."""

    def __init__(self, engine, settings: WorkerSettings, presence: Presence):
        self.engine = engine
        self.settings = settings
        self.presence = presence
        self.connection: redis.Redis = presence.connection

    def _load(self, jobs: list[Job]) -> list[_Prepared]:
        with self.connection.pipeline(transaction=False) as pipe:
            for job in jobs:
                pipe.hgetall(layout.job_key(job.id))
                pipe.get(layout.image_key(job.id))
                pipe.exists(layout.cancel_key(job.id))
            replies = pipe.execute()
        prepared = []
        for index, job in enumerate(jobs):
            data, image_bytes, cancelled = replies[3 * index: 3 * index + 3]
            cancel = threading.Event()
            if cancelled:
                cancel.set()
            if not data or image_bytes is None:
                prepared.append(_Prepared(job, None, None, cancel, error="job data expired before it ran"))
                continue
            record = JobRecord.from_hash(data)
            entry = _Prepared(job, record, None, cancel)
            prepared.append(entry)
            if record.expired():
                entry.expired = True
                continue
            try:
                image = decode_image(image_bytes)
                generation = GenerationSettings(**record.generation)
                task = Task(record.task)
            except (ImageError, ValueError, TypeError) as exc:
                entry.error = f"bad request: {exc}"
                continue
            deadline = record.deadline
            entry.request = InferenceRequest(
                image=image, task=task, text=record.text,
                region=tuple(record.region) if record.region else None, generation=generation,
                should_stop=_stop_check(cancel, deadline), request_id=job.id,
            )
        return prepared

    def run(self, worker: "BatchingWorker", jobs: list[Job], queue: Queue) -> None:
        ttl = self.settings.result_ttl_s
        executions = {}
        for job in jobs:
            executions[job.id] = worker.prepare_execution(job)
            worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
            job.started_at = now()
        prepared = self._load(jobs)
        runnable = [p for p in prepared if p.request and not p.cancel.is_set()]
        with self.connection.pipeline(transaction=False) as pipe:
            for p in prepared:
                if p in runnable:
                    layout.add_event(pipe, p.job.id, Event(EventType.STARTED, JobState.RUNNING), ttl)
                    pipe.hset(layout.job_key(p.job.id), "worker_id", self.settings.worker_id)
                else:
                    layout.add_event(pipe, p.job.id, _not_run_event(p), ttl)
            self.presence.set_state(pipe, "busy")
            pipe.execute()
        for p in runnable:
            self.presence.track(p.job.id, InFlight(p.job, executions[p.job.id], queue, p.cancel))
        calls_before = self.engine.generate_calls
        try:
            outcomes = self.engine.run_batch([p.request for p in runnable]) if runnable else []
        except Exception as exc:  # noqa: BLE001 - engine errors are per request; this is a last resort
            log.exception("batch failed")
            outcomes = [InferenceOutcome(p.request, error=f"inference failed: {exc}") for p in runnable]
        finally:
            for p in runnable:
                self.presence.untrack(p.job.id)
        finished = time.time()
        # One transaction: a blocked reader of a job's stream wakes once, with RESULT and DONE together.
        with self.connection.pipeline(transaction=True) as pipe:
            for p, outcome in zip(runnable, outcomes):
                for event in self._outcome_events(p, outcome, finished):
                    layout.add_event(pipe, p.job.id, event, ttl)
            self.presence.set_state(pipe, "idle")
            if self.engine.generate_calls > calls_before:
                self.presence.record_batch(pipe, len(runnable))
            pipe.execute()
        for job in jobs:
            worker.finish(job, queue, executions[job.id])

    def _outcome_events(self, p: _Prepared, outcome, finished: float) -> list[Event]:
        if outcome.cancelled:
            if p.cancel.is_set():
                return [Event(EventType.CANCELLED, JobState.CANCELLED, error="cancelled while running")]
            return [Event(EventType.FAILED, JobState.EXPIRED, error="deadline exceeded while running")]
        if outcome.error:
            return [Event(EventType.FAILED, JobState.FAILED, error=outcome.error)]
        result = outcome.result
        result.worker_id = self.settings.worker_id
        started = p.job.started_at.timestamp() if p.job.started_at else finished
        result.timings.queue_ms = max(0.0, (started - p.record.created) * 1000)
        return [Event(EventType.RESULT, JobState.RUNNING, result=result.to_dict()),
                Event(EventType.DONE, JobState.SUCCEEDED)]


def _stop_check(cancel: threading.Event, deadline: float | None):
    if deadline is None:
        return cancel.is_set
    return lambda: cancel.is_set() or time.time() >= deadline


def _not_run_event(p: _Prepared) -> Event:
    if p.cancel.is_set():
        return Event(EventType.CANCELLED, JobState.CANCELLED, error="cancelled before it ran")
    if p.expired:
        return Event(EventType.FAILED, JobState.EXPIRED, error="deadline passed before the job ran; it was not run")
    return Event(EventType.FAILED, JobState.FAILED, error=p.error or "job could not be run")


class BatchingWorker(SimpleWorker):
    """rq's SimpleWorker (no fork per job) that runs several queued jobs per batched generate."""

    def __init__(self, *args, runner: BatchRunner, settings: WorkerSettings, **kwargs):
        super().__init__(*args, **kwargs)
        self.runner = runner
        self.batch_settings = settings
        self.last_batch_size = 1

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        # Short, refreshed by Presence: a dead worker's jobs are found abandoned quickly.
        return self.batch_settings.job_heartbeat_ttl_s

    def execute_job(self, job: Job, queue: Queue) -> None:
        jobs = [job] + self._take_more(queue)
        self.last_batch_size = len(jobs)
        log.debug("batch of %d jobs", len(jobs))
        self.runner.run(self, jobs, queue)
        self.set_state(WorkerStatus.IDLE)

    def _take_more(self, queue: Queue) -> list[Job]:
        """Up to batch_size - 1 more ready jobs, without blocking on rq.

        Waiting (up to batch_wait_ms) for jobs that have not arrived yet only pays off under
        concurrent load: a lone sequential client would pay the wait on every request. So the
        worker waits only when the previous batch held several jobs or more jobs are already queued.
        """
        extra: list[Job] = []
        wait_until = time.monotonic() + self.batch_settings.batch_wait_ms / 1000
        while len(extra) < self.batch_settings.batch_size - 1:
            taken = Queue.dequeue_any([queue], None, connection=self.connection, job_class=self.job_class,
                                      serializer=self.serializer)
            if taken is not None:
                extra.append(taken[0])
            elif time.monotonic() >= wait_until or (not extra and self.last_batch_size <= 1):
                break
            else:
                time.sleep(0.0005)
        return extra

    def finish(self, job: Job, queue: Queue, execution) -> None:
        # Our own events hold the outcome; for rq every handled job finished (no rq-level retry
        # of a deterministic failure — retries are for jobs whose worker died).
        self._finalize_success(job, queue, execution, None)


def describe(settings: WorkerSettings, loaded) -> dict:
    return {
        "model": settings.model_name, "model_id": loaded.model_id, "model_revision": loaded.revision,
        "kind": loaded.kind, "device": str(loaded.device), "dtype": loaded.dtype_name,
        "attention": loaded.attention, "random_weights": "1" if loaded.random_weights else "0",
        "batch_size": settings.batch_size, "host": socket.gethostname(), "started": time.time(),
    }


def _exit_with_parent() -> None:
    """Linux: have the kernel send SIGTERM when our parent exits (then rq's warm shutdown runs)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_worker(settings: WorkerSettings) -> int:
    """Load the model once, register, work until SIGTERM/SIGINT. Returns the exit code."""
    from . import flash_attn_shim

    if settings.exit_with_parent:
        _exit_with_parent()
    flash_attn_shim.install()  # before transformers is imported
    from .loader import LoadOptions, ModelLoadError, load_model

    try:
        loaded = load_model(settings.model_path, LoadOptions(
            device=settings.device, dtype=settings.dtype, attention=settings.attention, kind=settings.kind))
    except (ModelLoadError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    connection = redis.Redis.from_url(settings.redis_url)
    presence = Presence(connection, settings, describe(settings, loaded))
    queue = Queue(layout.queue_name(settings.model_name), connection=connection, serializer=JSONSerializer)
    runner = BatchRunner(create_engine(loaded), settings, presence)
    worker = BatchingWorker(
        [queue], connection=connection, serializer=JSONSerializer, name=settings.worker_id,
        worker_ttl=20, maintenance_interval=settings.maintenance_interval_s,
        runner=runner, settings=settings,
    )
    presence.register()
    presence.start()
    log.info("worker %s serving model %s from queue %s (batch %d, wait %.1f ms)", settings.worker_id,
             settings.model_name, queue.name, settings.batch_size, settings.batch_wait_ms)
    try:
        worker.work(with_scheduler=False)
    finally:
        presence.stop()
        presence.unregister()
        connection.close()
    log.info("worker %s stopped", settings.worker_id)
    return 0
