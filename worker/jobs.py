"""What rq knows our jobs by. The batching worker runs jobs itself; these exist for rq's bookkeeping."""

from __future__ import annotations

import collections
import logging

from rq.exceptions import AbandonedJobError

from florence2_serve.common import rq_bridge
from florence2_serve.common.errors import JobError, Reason
from florence2_serve.common.log_setup import job_fields
from florence2_serve.common.redis_layout import EventType, JobRecord, JobState, job_key
from florence2_serve.common.tasks import Task

log = logging.getLogger(__name__)

# Jobs this process's maintenance put back in a queue after their worker was lost; the batching
# worker takes them next, ahead of the jobs it had already taken (BatchWorker.work).
requeued_after_loss: collections.deque[str] = collections.deque(maxlen=10_000)


def run_job() -> None:
    raise RuntimeError("florence2 jobs are run by `florence2 worker` (it batches them), not by a plain rq worker")


def _model_of(job) -> str:
    """The model of an rq job, from its queue's name (florence2:<model>[:p<N>])."""
    origin = (job.origin or "").removeprefix("florence2:")
    return origin.rsplit(":p", 1)[0] if ":p" in origin else origin


def _log_fields(connection, job) -> dict:
    """The job's fields for a log line: model, and task and request_id from its record (while it exists)."""
    model, task, request_id = _model_of(job), "", ""
    try:
        data = connection.hmget(job_key(job.id), ["spec", "request_id"])
        if data[0]:
            record = JobRecord.from_spec(job.id, data[0])
            model, task, request_id = record.model, Task(record.task).name, (data[1] or b"").decode()
    except Exception:  # noqa: BLE001 - a log line must never fail the recovery it reports
        log.debug("job %s: no record to name its task", job.id, exc_info=True)
    return job_fields(job.id, model, task, request_id)


def on_failure(job, connection, exc_type, exc_value, traceback) -> None:
    """rq's failure callback. rq calls it (in a worker's maintenance) for a job whose worker died."""
    if exc_type is None or not issubclass(exc_type, AbandonedJobError):
        return  # failures our workers handle write their own events
    ttl = job.result_ttl if job.result_ttl and job.result_ttl > 0 else 3600
    fields = _log_fields(connection, job)
    if job.retries_left:
        log.warning("job %s lost its worker; re-running it (%d retries left)", job.id, job.retries_left,
                    extra=fields)
        rq_bridge.append_event(connection, job.id, EventType.QUEUED.value, JobState.QUEUED.value,
                               JobError(Reason.WORKER_LOST.value,
                                        "back in the queue: the worker running it stopped heartbeating"), ttl)
        requeued_after_loss.append(job.id)
        return
    reason = "the worker running this job died (or stopped heartbeating) on every attempt; giving up"
    log.warning("job %s: %s", job.id, reason, extra=fields)
    rq_bridge.append_event(connection, job.id, EventType.FAILED.value, JobState.FAILED.value,
                           JobError(Reason.WORKER_LOST.value, reason), ttl)
