"""What a worker makes of its jobs: the jobs it holds, and how a batch's engine outcomes end them.

Kept apart from the threads that move jobs around (worker/batch_worker.py): these are plain
functions of a batch and the clock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from florence2_serve.common.errors import JobError, Reason
from florence2_serve.common.redis_layout import JobState
from florence2_serve.common.rq_bridge import Finished, TakenJob

from .inference import InferenceOutcome, InferenceRequest


class StopCheck:
    """A request's `should_stop`: the worker stops now, the job was cancelled, or its time is up.

    It refers to nothing of the job but these flags. A check that closed over its Held would make
    Held -> request -> check -> Held a reference cycle, and a cycle is freed only by the garbage
    collector's rare full pass: the decoded image (about 1 MB for 640x480, invisible to the
    collector's thresholds) of every finished job would stay alive until then.
    """

    __slots__ = ("stop_now", "cancel", "limit")

    def __init__(self, stop_now: threading.Event, cancel: threading.Event):
        self.stop_now = stop_now
        self.cancel = cancel
        self.limit = float("inf")  # stop generating at this time (deadline or job timeout)

    def __call__(self) -> bool:
        return self.stop_now.is_set() or self.cancel.is_set() or time.time() >= self.limit


@dataclass(eq=False)
class Held:
    """A job this worker has taken and not yet finished or requeued."""

    job: TakenJob
    taken_at: float = 0.0
    cancel: threading.Event = field(default_factory=threading.Event)
    request: InferenceRequest | None = None
    running: bool = False
    started_at: float = 0.0
    stop: StopCheck | None = None


@dataclass
class Batch:
    held: list[Held]
    outcomes: list[InferenceOutcome]


@dataclass
class Requeue:
    jobs: list[TakenJob]


def batch_endings(batch: Batch, worker_id: str, stopping_now: bool, ended: list[Finished],
                  requeue: list[TakenJob]) -> float:
    """Append each job's ending to `ended` (or, if the worker is stopping now, the job to `requeue`).

    Returns the seconds the batch's jobs spent running, summed (rq's total_working_time).
    """
    finished_at = time.time()
    worked = 0.0
    for held, outcome in zip(batch.held, batch.outcomes, strict=True):
        worked += finished_at - held.started_at
        job = held.job
        if outcome.result is not None and not outcome.cancelled:
            result = outcome.result
            result.worker_id = worker_id
            result.timings.queue_ms = max(0.0, (held.started_at - job.record.created) * 1000)
            ended.append(Finished(job, "ok", JobState.SUCCEEDED.value, result=result, started_at=held.taken_at))
        elif outcome.cancelled:
            if stopping_now and not held.cancel.is_set():
                requeue.append(job)
            else:
                ended.append(stopped(held, finished_at))
        else:
            ended.append(Finished(job, "failed", JobState.FAILED.value, outcome.error or INFERENCE_FAILED,
                                  started_at=held.taken_at))
    return worked


INFERENCE_FAILED = JobError(Reason.INFERENCE_FAILED.value, "inference failed on the worker (its log has the details)")
CANCELLED_BEFORE_RUN = JobError(Reason.CANCELLED.value, "cancelled before it ran")
EXPIRED_BEFORE_RUN = JobError(Reason.DEADLINE_EXCEEDED.value, "deadline passed before the job ran; it was not run")


def stopped(held: Held, now: float) -> Finished:
    """The ending of a job the engine stopped mid-generate: why it was stopped, said to its user."""
    job, record = held.job, held.job.record
    if held.cancel.is_set():
        return Finished(job, "stopped", JobState.CANCELLED.value,
                        JobError(Reason.CANCELLED.value, "cancelled while running"), started_at=held.taken_at)
    if record.deadline is not None and now >= record.deadline:
        return Finished(job, "failed", JobState.EXPIRED.value,
                        JobError(Reason.DEADLINE_EXCEEDED.value, "deadline exceeded while running; stopped"),
                        started_at=held.taken_at)
    if record.run_timeout_s and now >= held.started_at + record.run_timeout_s:
        return Finished(job, "failed", JobState.FAILED.value,
                        JobError(Reason.JOB_TIMEOUT.value,
                                 f"ran longer than the job timeout of {record.run_timeout_s:g} s; stopped",
                                 {"timeout_s": f"{record.run_timeout_s:g}"}),
                        started_at=held.taken_at)
    return Finished(job, "failed", JobState.FAILED.value, JobError(Reason.WORKER_STOPPED.value, "stopped"),
                    started_at=held.taken_at)
