"""What a worker reports about the jobs it ended: metrics, a debug log line with the job's fields,
and (with tracing on) the job's spans. Called once the endings are written to Redis."""

from __future__ import annotations

import logging
import time

from florence2_serve.common import tracing
from florence2_serve.common.log_setup import job_fields
from florence2_serve.common.rq_bridge import ClosedJob, Finished
from florence2_serve.common.tasks import Task
from florence2_serve.v1 import florence2_pb2 as pb

from . import metrics

log = logging.getLogger(__name__)
_NO_TIMINGS = pb.Timings()


def report_ended(model: str, ended: list[Finished]) -> None:
    now = time.time()
    for item in ended:
        if item.outcome == "started":
            continue
        record = item.job.record
        task = Task(record.task).name
        reason = item.error.reason if item.error else ""
        metrics.job_ended(model, task, item.state, reason)
        log.debug("job %s ended %s %s", record.job_id, item.state, reason,
                  extra=job_fields(record.job_id, model, task, record.request_id))
        timings = item.result.timings if item.result is not None else None
        if timings is not None:
            metrics.job_stages(model, timings, now - record.created)
        if record.trace:
            started = record.created + (timings.queue_ms / 1000 if timings is not None else now - record.created)
            tracing.job_spans(record.trace, record.job_id, model, task, record.created, started,
                              timings or _NO_TIMINGS, now, item.state)


def report_closed(model: str, closed: list[ClosedJob]) -> None:
    """Jobs the take call ended instead of handing them over (cancelled or expired before they ran)."""
    for job in closed:
        metrics.job_ended(model, Task(job.task).name if job.task else "", job.state, job.reason)
