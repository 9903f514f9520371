"""The one module that works below rq's public API. Written against rq 3.0 (pinned `rq>=3.0,<3.1`).

rq stays the queue of record: every job is a real rq job (`rq:job:<id>` hash, made from rq's own
`Job.create(...).to_dict()`), queued in a real rq queue, held in rq's StartedJobRegistry with an rq
Execution while a worker has it, and finished into rq's Finished/Failed/Canceled registries with an
rq Result. So `rq info`, rq-dashboard, and rq's own abandoned-job detection and retries
(`StartedJobRegistry.cleanup`, run by the workers' maintenance) see our jobs exactly as rq's own
workers would leave them.

What rq does per job in several blocking round trips, the Redis functions of common/rq_functions.lua
do per *batch* in one call each (FCALL through common/redis_functions.py), atomically with this
service's own event writes. Entry points: enqueue (front end), cancel (front end), take, progress,
requeue, heartbeat (workers), append (rq's failure callback). The rq_* helpers they share mirror:

  rq_enqueue         Queue.enqueue_call -> Queue._enqueue_async_job (_prepare_for_queue, _persist_job,
                     push_job_id) and Queue.enqueue_job's `SADD rq:queues`
  rq_start           Queue.dequeue_any (pop, skip jobs whose hash is gone) + executions.prepare_execution
                     (Execution.create, ExecutionRegistry.add, StartedJobRegistry.add_execution, the
                     worker's execution index) + BaseWorker.prepare_job_execution (Job.heartbeat,
                     Job.prepare_for_execution, PERSIST). Popping and registering in one atomic step
                     replaces rq's intermediate list: a taken job is always in StartedJobRegistry.
  rq_end_execution   executions.cleanup_execution (Execution.delete)
  rq_succeeded       BaseWorker.handle_job_success (Job._handle_success, FinishedJobRegistry.add,
                     Job.cleanup) but without Result.create SUCCESSFUL: our jobs return nothing to rq,
                     and the Result stream would be a fifth of what an ended job keeps in Redis;
                     our jobs have no dependents.
  rq_failed          BaseWorker.handle_job_failure without retry (status FAILED, or STOPPED for a job
                     stopped on request), FailedJobRegistry.add, Result.create_failure, Job.cleanup
  rq_canceled        Job.cancel (status CANCELED, removed from its queue, CanceledJobRegistry.add)
  rq_requeue         Queue._enqueue_job(at_front=True) after cleanup_execution
  heartbeat          BaseWorker.maintain_heartbeats (Execution.heartbeat, Job.heartbeat)

The rq job hash itself is rq's: JobTemplates builds it with `Job.create(...).to_dict()`.

`tests/test_rq_contract.py` runs a burst worker with a fake engine against real valkey and reads
the outcome back through rq's public API; it fails loudly when rq changes any of this.
"""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone

import redis
from rq import Callback, Queue, Retry
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import utcformat

from . import redis_layout as layout
from .errors import JobError
from .redis_functions import run_script, run_script_async

RQ_VERSION_WRITTEN_AGAINST = (3, 0)
QUEUE_KEY_PREFIX = Queue.redis_queue_namespace_prefix  # "rq:queue:"


def check_rq_version() -> None:
    """Refuse to run on an rq whose internals these scripts were not written against."""
    import rq

    major_minor = tuple(int(part) for part in rq.__version__.split(".")[:2])
    if major_minor != RQ_VERSION_WRITTEN_AGAINST:
        raise RuntimeError(
            f"florence2-serve's queue scripts mirror rq {'.'.join(map(str, RQ_VERSION_WRITTEN_AGAINST))}.x "
            f"internals; rq {rq.__version__} is installed (pip install 'rq>=3.0,<3.1')"
        )


def queue_key(queue_name: str) -> str:
    return QUEUE_KEY_PREFIX + queue_name


class Clock:
    """One instant in the forms rq stores: ISO text, float seconds, integer seconds."""

    __slots__ = ("iso", "ts", "int")

    def __init__(self, moment: datetime | None = None):
        moment = moment or datetime.now(timezone.utc)
        self.iso = utcformat(moment)
        self.ts = moment.timestamp()
        self.int = int(self.ts)


# --------------------------------------------------------------------------------------------
# The rq job hash, made by rq itself.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobOptions:
    """What the front end sets on every rq job (rq's own enqueue_call arguments)."""

    timeout: int
    ttl: int
    max_retries: int


class JobTemplates:
    """The rq job hash of our jobs, made by rq's `Job.create(...).to_dict()`, one per queue.

    Every one of our jobs calls the same function with the same (no) arguments, so the hash differs
    between jobs only in its two timestamps, which the enqueue script fills in. The rest is kept in
    Redis under a key named by its content (so front ends with other settings never share one) and
    copied by the script: a submit sends one key name instead of ~20 fields.
    """

    PER_JOB = ("created_at", "enqueued_at")

    def __init__(self, options: JobOptions):
        self.options = options
        self._fields: dict[str, dict] = {}
        self._keys: dict[str, str] = {}

    def key(self, queue_name: str) -> str:
        found = self._keys.get(queue_name)
        if found is None:
            fields = self.fields(queue_name)
            digest = hashlib.sha1(repr(sorted(fields.items())).encode()).hexdigest()[:16]
            found = self._keys[queue_name] = f"{layout.PREFIX}:rq-template:{digest}"
        return found

    def fields(self, queue_name: str) -> dict:
        found = self._fields.get(queue_name)
        if found is None:
            found = self._fields[queue_name] = self._build(queue_name)
        return found

    async def store(self, connection, queue_name: str) -> None:
        flat = [item for pair in self.fields(queue_name).items() for item in pair]
        await connection.execute("HSET", self.key(queue_name), *flat)

    def _build(self, queue_name: str) -> dict:
        options = self.options
        job = Job.create(
            layout.JOB_FUNCTION, connection=redis.Redis(), serializer=JSONSerializer, id="template",
            timeout=options.timeout or -1, result_ttl=options.ttl, failure_ttl=options.ttl, ttl=options.ttl,
            retry=Retry(max=options.max_retries, enqueue_at_front=True) if options.max_retries else None,
            on_failure=Callback(layout.FAILURE_CALLBACK), origin=queue_name,
        )  # Job.create needs a connection object but does no I/O
        job._status = "queued"  # what Queue._prepare_for_queue sets
        return {key: value for key, value in job.to_dict().items()
                if key not in self.PER_JOB and value is not None and value != ""}


def encode_exc_string(text: str) -> str:
    """rq's Result keeps failure text as base64(zlib(text)) (Result.serialize)."""
    return base64.b64encode(zlib.compress(text.encode())).decode() if text else ""


# --------------------------------------------------------------------------------------------
# Python side of each script: argument layout in, typed reply out.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Enqueued:
    job_id: str
    created: bool  # False: request_id named an existing job
    queued_event_id: str = ""
    same_payload: bool = True  # for an existing job: was it submitted with this payload?


class QueueFull(Exception):
    """The model's queues hold max_queue_depth jobs; the message says so and advises a retry."""


async def enqueue(connection, record: layout.JobRecord, image: bytes, payload_fingerprint: str, *,
                  ttl: int, max_depth: int, templates: JobTemplates, priority: int) -> Enqueued:
    """Store the job and put it on its model's queue at `priority`, atomically; idempotent per request_id."""
    clock = Clock()
    queue_name = layout.queue_name(record.model, priority)
    record.queue = queue_key(queue_name)
    queues = layout.rq_queue_keys(record.model)
    args = [record.job_id, record.request_id, payload_fingerprint, ttl, max_depth, record.queue,
            layout.wake_key(record.model), image, repr(record.created), templates.key(queue_name), clock.iso,
            len(queues), *queues, *[item for pair in record.to_hash().items() for item in pair]]
    try:
        reply = await run_script_async(connection, "enqueue", args)
    except redis.exceptions.ResponseError as exc:
        if str(exc).startswith("OOM"):
            raise QueueFull("Redis is at its memory limit (maxmemory); retry with backoff once jobs have "
                            "ended and their results expired") from None
        raise
    if int(reply[0]) == -2:  # first job of this queue (or Redis lost its data): store the template
        await templates.store(connection, queue_name)
        reply = await run_script_async(connection, "enqueue", args)
    status = int(reply[0])
    if status == 1:
        return Enqueued(record.job_id, True, _text(reply[1]))
    if status == 0:
        return Enqueued(_text(reply[1]), False, same_payload=bool(int(reply[2])))
    raise QueueFull(f"queue of model {record.model!r} is full ({max_depth} jobs); retry with backoff")


@dataclass
class TakenJob:
    """A job a worker took: in rq's StartedJobRegistry until finished or requeued."""

    queue_key: str
    job_id: str
    execution_id: str
    record: layout.JobRecord
    image: bytes


_EXC_EXPIRED = encode_exc_string("deadline passed before the job ran; it was not run")
_EXC_GONE = encode_exc_string("job data expired before it ran")


@dataclass(frozen=True)
class ClosedJob:
    """A job TAKE ended instead of handing it over (cancelled or expired before it ran, data gone)."""

    job_id: str
    state: str
    reason: str
    task: str  # "" when its data was gone


class Taken(list):
    """The jobs a take handed over, and how many queued jobs it left to idle workers (`deferred`)."""

    deferred = 0


def take(connection: redis.Redis, model: str, *, worker_name: str, worker_id: str, max_jobs: int,
         heartbeat_ttl: int, result_ttl: int, execution_prefix: str,
         closed: list[ClosedJob] | None = None, mode: str = "", idle_ttl: float = 0.0,
         leave_per_idle: int = 1) -> Taken:
    """Up to max_jobs jobs of `model`, highest priority first; [] when its queues are empty. Jobs the
    call ended instead of handing over are appended to `closed`, when given.

    mode "idle": the worker's model has nothing to do; if it gets nothing it is registered as idle
    for idle_ttl seconds. mode "busy": it has; it leaves up to leave_per_idle queued jobs to each idle
    worker of the model and takes only the rest (what it left is `deferred`). Any take ends the
    worker's idle registration."""
    clock = Clock()
    reply = run_script(connection, "take", [
        max_jobs, worker_name, worker_id, clock.iso, repr(clock.ts), clock.int, heartbeat_ttl, execution_prefix,
        layout.wake_key(model), result_ttl, _EXC_EXPIRED, _EXC_GONE, layout.idle_key(model),
        repr(clock.ts + idle_ttl), mode, leave_per_idle, *layout.rq_queue_keys(model)])
    taken = Taken()
    for entry in reply:
        if entry[0] == b"deferred":
            taken.deferred = int(entry[1])
            continue
        if entry[0] == b"closed":
            _, job_id, state, reason, spec = entry
            if closed is not None:
                task = json.loads(spec)["task"] if spec else ""
                closed.append(ClosedJob(_text(job_id), _text(state), _text(reason), task))
            continue
        qkey, job_id, execution_id, spec, image = entry
        record = layout.JobRecord.from_spec(_text(job_id), spec, queue=_text(qkey))
        taken.append(TakenJob(_text(qkey), _text(job_id), _text(execution_id), record, image))
    return taken


def _job_triples(jobs) -> list:
    return [item for job in jobs for item in (job.job_id, job.queue_key, job.execution_id)]


@dataclass
class Finished:
    """What became of a taken job: started (by the model), or ended ok | failed | stopped (on request)."""

    job: TakenJob
    outcome: str
    state: str = ""
    error: JobError | None = None
    result: object = None  # florence2.v1.Result of a job that ended ok
    started_at: float = 0.0

    def script_fields(self) -> list:
        """The 6 per-job fields after (id, queue key, execution id) that PROGRESS takes."""
        result = layout.encode_result(self.result.SerializeToString()) if self.result is not None else ""
        error = self.error.encode() if self.error else ""
        exc = encode_exc_string(self.error.message) if self.error and self.outcome in ("failed", "stopped") else ""
        return [self.outcome, self.state, error, result, self.started_at, exc]


def progress(connection: redis.Redis, ended: list[Finished], *, ttl: int, worker_name: str, worker_id: str,
             worked_s: float, counters: tuple[str, int] = ("", 0), idle: tuple[str, float] = ("", 0.0)) -> None:
    """Write the jobs the model started, then the jobs that ended (STARTED always goes first: a batch
    starts before it ends); `counters` = (our worker registration key, generate calls to add); `idle`
    = (the model's idle set key, seconds) registers the worker as idle if it then holds no job (see take)."""
    if not ended:
        return
    clock = Clock()
    started = [item.job.job_id for item in ended if item.outcome == "started"]
    idle_key, idle_ttl = idle
    args = [ttl, repr(clock.ts), worker_name, clock.iso, clock.int, repr(clock.ts), repr(worked_s), *counters,
            worker_id, idle_key, repr(clock.ts + idle_ttl), len(started), *started]
    for item in ended:
        if item.outcome == "started":
            continue
        job = item.job
        outcome, state, error, result, started_at, exc = item.script_fields()
        args += [job.job_id, job.queue_key, job.execution_id, outcome, state, error, result,
                 repr(started_at or clock.ts), exc]
    run_script(connection, "progress", args)


REQUEUED_WORKER_STOPPED = JobError("WORKER_STOPPED", "back in the queue: the worker that had taken it stopped")


def requeue(connection: redis.Redis, jobs: list[TakenJob], *, model: str, ttl: int, worker_name: str,
            reason: JobError = REQUEUED_WORKER_STOPPED) -> int:
    """Put taken jobs back at the front of their queues (their QUEUED event says `reason`)."""
    if not jobs:
        return 0
    clock = Clock()
    return int(run_script(connection, "requeue", [ttl, repr(clock.ts), worker_name, clock.iso, layout.wake_key(model),
                                                reason.encode(), *_job_triples(jobs)]))


def heartbeat(connection: redis.Redis, jobs: list[TakenJob], *, ttl: int) -> None:
    if not jobs:
        return
    clock = Clock()
    run_script(connection, "heartbeat", [clock.iso, repr(clock.ts), clock.int, ttl, *_job_triples(jobs)])


async def cancel(connection, job_id: str, *, ttl: int) -> tuple[str, bool]:
    """(state after the call, whether this call cancelled the job or flagged it); ("", False) if unknown."""
    clock = Clock()
    state, acted = await run_script_async(connection, "cancel", [job_id, ttl, repr(clock.ts), clock.int])
    return _text(state), bool(int(acted))


def append_event(connection: redis.Redis, job_id: str, event_type: str, state: str, error: JobError, ttl: int) -> bool:
    """Append an event to a job that has not ended; False when it had ended (or is gone)."""
    clock = Clock()
    return bool(run_script(connection, "append", [job_id, event_type, state, repr(clock.ts), error.encode(), ttl]))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
