"""Functions rq knows jobs by. The batching worker runs jobs itself; these exist for rq's bookkeeping."""

from __future__ import annotations

import logging

from florence2_serve.common import redis_layout as layout
from florence2_serve.common.redis_layout import Event, EventType, JobState

log = logging.getLogger(__name__)


def run_job(job_id: str) -> None:
    raise RuntimeError(
        f"job {job_id} must be run by `florence2 worker` (it batches jobs), not by a plain rq worker"
    )


def on_failure(job, connection, exc_type, exc_value, traceback) -> None:
    """rq failure callback; for abandoned jobs (worker died) it is the only place that sees them."""
    if exc_type is None or exc_type.__name__ != "AbandonedJobError":
        return  # failures the worker handled already wrote their event
    ttl = job.result_ttl if job.result_ttl and job.result_ttl > 0 else 3600
    if job.retries_left:
        log.warning("job %s lost its worker; retrying (%d retries left)", job.id, job.retries_left)
        with connection.pipeline() as pipe:
            pipe.hset(layout.job_key(job.id), "state", JobState.QUEUED.value)
            pipe.execute()
        return
    reason = "the worker running this job died (or stopped heartbeating) on every attempt; giving up"
    with connection.pipeline() as pipe:
        layout.add_event(pipe, job.id, Event(EventType.FAILED, JobState.FAILED, error=reason), ttl)
        pipe.execute()
