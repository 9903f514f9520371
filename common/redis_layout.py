"""The one owner of the Redis layout: key names, queue names, job fields, event encoding.

Front end and workers both go through this module (it imports no torch). Everything a job owns
expires `ttl` seconds after its last write.

  f2s:job:{id}            hash   the request (ids and options only) and its state
  f2s:image:{id}          string the encoded image bytes
  f2s:events:{id}         stream QUEUED, STARTED, RESULT, DONE | FAILED | CANCELLED
  f2s:cancel:{id}         string set by CancelJob; running workers poll it
  f2s:request:{rid}       string request_id -> job id (idempotent Submit)
  f2s:worker:{wid}        hash   a live worker's description (expires unless heartbeated)
  f2s:model-workers:{m}   set    worker ids that served model m
  f2s:models              set    every model name a worker registered
  rq:queue:florence2:{m}  rq's queue of the model's job ids
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

PREFIX = "f2s"
QUEUE_PREFIX = "florence2:"


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

    @property
    def terminal(self) -> bool:
        return self in (EventType.DONE, EventType.FAILED, EventType.CANCELLED)


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


def queue_name(model: str) -> str:
    """rq queue name of a model (rq stores it at rq:queue:<name>)."""
    return f"{QUEUE_PREFIX}{model}"


def rq_queue_key(model: str) -> str:
    return f"rq:queue:{queue_name(model)}"


# rq job function path: workers never call it through rq's usual path (they batch), but rq needs one.
JOB_FUNCTION = "florence2_serve.worker.jobs.run_job"
# Runs (in a worker) when rq finds a job abandoned by a dead worker.
FAILURE_CALLBACK = "florence2_serve.worker.jobs.on_failure"


@dataclass
class JobRecord:
    """What Submit stores about a job; the image lives under its own key."""

    job_id: str
    model: str
    task: str
    text: str = ""
    region: list[float] | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""
    priority: int = 0
    created: float = field(default_factory=time.time)
    deadline: float | None = None
    state: str = JobState.QUEUED.value
    worker_id: str = ""
    error: str = ""

    def to_hash(self) -> dict[str, str]:
        return {
            "job_id": self.job_id, "model": self.model, "task": self.task, "text": self.text,
            "region": json.dumps(self.region), "generation": json.dumps(self.generation),
            "request_id": self.request_id, "priority": str(self.priority), "created": repr(self.created),
            "deadline": "" if self.deadline is None else repr(self.deadline), "state": self.state,
            "worker_id": self.worker_id, "error": self.error,
        }

    @classmethod
    def from_hash(cls, data: dict) -> "JobRecord":
        data = {_s(k): _s(v) for k, v in data.items()}
        return cls(
            job_id=data["job_id"], model=data["model"], task=data["task"], text=data.get("text", ""),
            region=json.loads(data.get("region") or "null"),
            generation=json.loads(data.get("generation") or "{}"),
            request_id=data.get("request_id", ""), priority=int(data.get("priority") or 0),
            created=float(data.get("created") or 0), deadline=float(data["deadline"]) if data.get("deadline") else None,
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
    result: dict | None = None
    error: str = ""
    time: float = field(default_factory=time.time)
    event_id: str = ""

    def to_fields(self) -> dict[str, str]:
        fields = {"type": self.type.value, "state": self.state.value, "time": repr(self.time)}
        if self.result is not None:
            fields["result"] = json.dumps(self.result)
        if self.error:
            fields["error"] = self.error
        return fields

    @classmethod
    def from_entry(cls, event_id, fields: dict) -> "Event":
        fields = {_s(k): _s(v) for k, v in fields.items()}
        return cls(
            type=EventType(fields["type"]), state=JobState(fields["state"]),
            result=json.loads(fields["result"]) if "result" in fields else None,
            error=fields.get("error", ""), time=float(fields.get("time", 0)), event_id=_s(event_id),
        )


# add_event queues this many commands, the XADD (whose reply is the event id) first.
ADD_EVENT_COMMANDS = 4


def add_event(pipe, job_id: str, event: Event, ttl: int) -> None:
    """Queue an event append + job state update on a (sync or async) pipeline."""
    pipe.xadd(events_key(job_id), event.to_fields())
    pipe.expire(events_key(job_id), ttl)
    update = {"state": event.state.value}
    if event.error:
        update["error"] = event.error
    pipe.hset(job_key(job_id), mapping=update)
    pipe.expire(job_key(job_id), ttl)
