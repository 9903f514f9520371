"""The one owner of the Redis layout: key names, queue names, job fields, event encoding.

Front end and workers both go through this module (it imports no torch). Everything a job owns
expires `ttl` seconds after its last write; a job's image is deleted as soon as the job ends.
The writes themselves are Lua scripts (`common/rq_bridge.py`) so that a job's events, its state
and rq's bookkeeping change together.

  f2s:job:{id}            hash   the request (ids and options only), its rq queue and its state
  f2s:image:{id}          string the encoded image bytes, until the job ends
  f2s:events:{id}         stream QUEUED, STARTED, RESULT, DONE | FAILED | CANCELLED | EXPIRED; a
                                 result is a serialized florence2.v1.Result (base64), an error a
                                 JobError (common/errors.py, JSON). When the job ends the stream is
                                 folded into the job's hash (field `events`, JSON) and deleted: an
                                 ended job keeps ~2 KB, not ~10 (read_events reads either form)
  f2s:cancel:{id}         string set by CancelJob for a job a worker has taken
  f2s:request:{rid}       string request_id -> "job_id fingerprint" (idempotent Submit)
  f2s:notify              pubsub every event as it is written: [job_id, event_id, type, state,
                                 time, error, result] * n, JSON (one reader per front end)
  f2s:wake:{m}            list   a token while model m has queued jobs: idle workers block on it
  f2s:idle:{m}            zset   worker ids of model m whose model is idle -> when that lapses; busy
                                 workers leave queued jobs to them (rq_bridge TAKE)
  f2s:worker:{wid}        hash   a live worker's description (expires unless heartbeated)
  f2s:model-workers:{m}   set    worker ids that served model m
  f2s:models              set    every model name a worker registered
  f2s:tokenizer:{digest}  string a worker's tokenizer (tokenizers JSON): the front end counts text tokens
  rq:queue:florence2:{m}        rq's queue of model m at priority 0
  rq:queue:florence2:{m}:p{N}   ... at priority N (1-9); workers drain the highest first
"""

from __future__ import annotations

import base64
import functools
import json
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterator

from rq.defaults import RQ_KEY_PREFIX

PREFIX = "f2s"
QUEUE_PREFIX = "florence2:"
NOTIFY_CHANNEL = f"{PREFIX}:notify"
MIN_PRIORITY, MAX_PRIORITY = 0, 9
EVENT_FIELDS = 7  # per event in a notification


class JobState(str, Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED)


class EventType(str, Enum):
    QUEUED = "QUEUED"
    STARTED = "STARTED"
    RESULT = "RESULT"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"

    @property
    def terminal(self) -> bool:
        return self in (EventType.DONE, EventType.FAILED, EventType.CANCELLED, EventType.EXPIRED)


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def image_key(job_id: str) -> str:
    return f"{PREFIX}:image:{job_id}"


def events_key(job_id: str) -> str:
    return f"{PREFIX}:events:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"{PREFIX}:cancel:{job_id}"


def request_key(request_id: str) -> str:
    return f"{PREFIX}:request:{request_id}"


def worker_key(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}"


def model_workers_key(model: str) -> str:
    return f"{PREFIX}:model-workers:{model}"


MODELS_KEY = f"{PREFIX}:models"


def tokenizer_key(digest: str) -> str:
    return f"{PREFIX}:tokenizer:{digest}"


def encode_result(serialized: bytes) -> str:
    """A serialized florence2.v1.Result as event fields carry it (text: notifications are JSON)."""
    return base64.b64encode(serialized).decode()


def decode_result(text: str | bytes) -> bytes:
    return base64.b64decode(text)


def wake_key(model: str) -> str:
    return f"{PREFIX}:wake:{model}"


def idle_key(model: str) -> str:
    return f"{PREFIX}:idle:{model}"


def check_priority(priority: int) -> int:
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority must be between {MIN_PRIORITY} and {MAX_PRIORITY} (higher runs sooner), "
                         f"got {priority}")
    return priority


def queue_name(model: str, priority: int = 0) -> str:
    """rq queue name of a model at a priority level (rq stores it at rq:queue:<name>)."""
    check_priority(priority)
    return f"{QUEUE_PREFIX}{model}" if priority == 0 else f"{QUEUE_PREFIX}{model}:p{priority}"


def rq_queue_key(model: str, priority: int = 0) -> str:
    return f"{RQ_KEY_PREFIX}:queue:{queue_name(model, priority)}"


def queue_names(model: str) -> list[str]:
    """Every priority level's queue of a model, the order workers drain them (highest first)."""
    return [queue_name(model, p) for p in range(MAX_PRIORITY, MIN_PRIORITY - 1, -1)]


@functools.lru_cache(maxsize=1024)
def rq_queue_keys(model: str) -> tuple[str, ...]:
    return tuple(f"{RQ_KEY_PREFIX}:queue:{name}" for name in queue_names(model))


# rq job function path: workers never call it (they batch), but an rq job names one.
JOB_FUNCTION = "florence2_serve.worker.jobs.run_job"
# Runs (in a worker) when rq finds a job abandoned by a dead worker.
FAILURE_CALLBACK = "florence2_serve.worker.jobs.on_failure"


@dataclass
class JobRecord:
    """What Submit stores about a job; the image lives under its own key.

    In Redis the request is one JSON field (`spec`, written once); the scripts also need a few
    fields on their own (`request_id`, `queue`, `deadline`) and change `state`, `worker_id`, `error`.
    """

    job_id: str
    model: str
    task: str
    text: str = ""
    region: list[float] | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    # DETECT's confidence / iou / max_detections, as the client set them (server/validation.py).
    detection: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""
    priority: int = 0
    created: float = field(default_factory=time.time)
    deadline: float | None = None
    # Longest a worker may run the job once started (0: no limit).
    run_timeout_s: float = 0.0
    # W3C trace context of the RPC that submitted it (common/tracing.py); empty without tracing.
    trace: dict[str, str] = field(default_factory=dict)
    queue: str = ""  # the rq queue key it was enqueued on
    state: str = JobState.QUEUED.value
    worker_id: str = ""
    error: str = ""

    # The job id is the key's own suffix; it is not repeated in the spec.
    SPEC_FIELDS = ("model", "task", "text", "region", "generation", "detection", "priority", "created", "deadline",
                   "run_timeout_s", "trace", "request_id")

    # Left out of the stored spec while they hold these values (an ended job's record is kept for the
    # result TTL, so every byte is paid per job; reading the spec back gives the dataclass defaults).
    SPEC_DEFAULTS = {"text": "", "region": None, "generation": {}, "detection": {}, "priority": 0, "deadline": None,
                     "run_timeout_s": 0.0, "trace": {}, "request_id": ""}

    def spec_json(self) -> str:
        spec = {name: value for name in self.SPEC_FIELDS
                if (value := getattr(self, name)) != self.SPEC_DEFAULTS.get(name, ...)}
        return json.dumps(spec, separators=(",", ":"))

    def to_hash(self) -> dict[str, str]:
        fields = {"spec": self.spec_json(), "request_id": self.request_id,
                  "queue": self.queue, "state": self.state}
        if self.deadline is not None:
            fields["deadline"] = repr(self.deadline)
        if self.worker_id:
            fields["worker_id"] = self.worker_id
        if self.error:
            fields["error"] = self.error
        return fields

    @classmethod
    def from_spec(cls, job_id: str, spec: str | bytes, **fields) -> "JobRecord":
        values = json.loads(spec)
        values.pop("job_id", None)  # written by earlier versions
        return cls(job_id=job_id, **values, **fields)

    @classmethod
    def from_hash(cls, job_id: str, data: dict) -> "JobRecord":
        data = {_s(k): _s(v) for k, v in data.items()}
        spec = json.loads(data["spec"])
        spec["request_id"] = data.get("request_id", spec.get("request_id", ""))
        spec.pop("job_id", None)  # written by earlier versions
        return cls(
            job_id=job_id, **spec, queue=data.get("queue", ""),
            state=data.get("state", JobState.QUEUED.value), worker_id=data.get("worker_id", ""),
            error=data.get("error", ""),
        )

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now or time.time()) >= self.deadline


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class Event:
    type: EventType
    state: JobState
    result: bytes | None = None  # a serialized florence2.v1.Result
    error: str = ""  # an encoded JobError (common/errors.py)
    time: float = field(default_factory=time.time)
    event_id: str = ""

    def to_fields(self) -> dict[str, str]:
        fields = {"type": self.type.value, "state": self.state.value, "time": repr(self.time)}
        if self.result is not None:
            fields["result"] = encode_result(self.result)
        if self.error:
            fields["error"] = self.error
        return fields

    @classmethod
    def from_entry(cls, event_id, fields: dict) -> "Event":
        fields = {_s(k): _s(v) for k, v in fields.items()}
        return cls(
            type=EventType(fields["type"]), state=JobState(fields["state"]),
            result=decode_result(fields["result"]) if "result" in fields else None,
            error=fields.get("error", ""), time=float(fields.get("time", 0)), event_id=_s(event_id),
        )


def _event_id_parts(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def folded_events(folded: bytes | str, after: str = "") -> list[Event]:
    """An ended job's events from its hash's `events` field, those after event id `after` (exclusive)."""
    floor = _event_id_parts(after) if after else (-1, -1)
    events = []
    for event_id, etype, state, when, error, result in json.loads(folded):
        if _event_id_parts(event_id) > floor:
            events.append(Event(type=EventType(etype), state=JobState(state), time=float(when), error=error,
                                result=decode_result(result) if result else None, event_id=event_id))
    return events


def read_events(connection, job_id: str) -> list[Event]:
    """Every event of a job, live (its stream) or ended (folded into its hash), with a sync client."""
    entries = connection.xrange(events_key(job_id))
    if entries:
        return [Event.from_entry(entry_id, fields) for entry_id, fields in entries]
    folded = connection.hget(job_key(job_id), "events")
    return folded_events(folded) if folded else []


def notification_events(payload: bytes | str, wanted) -> Iterator[tuple[str, Event]]:
    """The events of one `f2s:notify` message whose job is in `wanted`, in the order written."""
    flat = json.loads(payload)
    for i in range(0, len(flat), EVENT_FIELDS):
        if flat[i] not in wanted:
            continue
        job_id, event_id, etype, state, when, error, result = flat[i:i + EVENT_FIELDS]
        yield job_id, Event(type=EventType(etype), state=JobState(state), result=decode_result(result) if result else None,
                            error=error, time=float(when), event_id=event_id)
