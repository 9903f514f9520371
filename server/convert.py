"""Conversions between the Redis/JSON shapes and the florence2.v1 protobuf messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from florence2_serve.common.redis_layout import Event, EventType, JobRecord, JobState
from florence2_serve.common.tasks import Task
from florence2_serve.v1 import florence2_pb2 as pb


def task_to_proto(task: Task | str) -> int:
    task = task if isinstance(task, Task) else Task(task)
    return pb.Task.Value(f"TASK_{task.name}")


def task_from_proto(value: int) -> Task:
    """Proto enum -> Task; ValueError for TASK_UNSPECIFIED or unknown numbers."""
    if value == pb.TASK_UNSPECIFIED:
        raise ValueError("task is required")
    try:
        name = pb.Task.Name(value)
    except ValueError:
        raise ValueError(f"unknown task number {value}") from None
    return Task[name.removeprefix("TASK_")]


_STATES = {state: pb.JobState.Value(f"JOB_STATE_{state.value}") for state in JobState}
_EVENT_TYPES = {event_type: pb.EventType.Value(f"EVENT_TYPE_{event_type.value}") for event_type in EventType}


def state_to_proto(state: JobState | str) -> int:
    return _STATES[JobState(state)]


def event_type_to_proto(event_type: EventType) -> int:
    return _EVENT_TYPES[event_type]


def _timestamp(seconds: float) -> Timestamp:
    nanos = int(seconds * 1e9)
    return Timestamp(seconds=nanos // 1_000_000_000, nanos=nanos % 1_000_000_000)


def result_to_proto(data: dict) -> pb.Result:
    result = pb.Result(
        task=task_to_proto(data["task"]), text=data.get("text", ""), raw_text=data.get("raw_text", ""),
        image_width=data.get("image_width", 0), image_height=data.get("image_height", 0),
        model_id=data.get("model_id", ""), model_revision=data.get("model_revision", ""),
        worker_id=data.get("worker_id", ""), generated_tokens=data.get("generated_tokens", 0),
        batch_size=data.get("batch_size", 0), timings=pb.Timings(**data.get("timings", {})),
    )
    for box in data.get("boxes", []):
        message = pb.Box(x1=box["x1"], y1=box["y1"], x2=box["x2"], y2=box["y2"], label=box.get("label", ""))
        if box.get("score") is not None:
            message.score = box["score"]
        result.boxes.append(message)
    result.polygons.extend(pb.Polygon(points=p["points"], label=p.get("label", "")) for p in data.get("polygons", []))
    result.ocr.extend(pb.OcrQuad(points=q["points"], text=q.get("text", "")) for q in data.get("ocr", []))
    return result


def event_to_proto(job_id: str, event: Event) -> pb.JobEvent:
    message = pb.JobEvent(
        event_id=event.event_id, job_id=job_id, type=_EVENT_TYPES[event.type],
        state=_STATES[event.state], error=event.error, time=_timestamp(event.time),
    )
    if event.result is not None:
        message.result.CopyFrom(result_to_proto(event.result))
    return message


def job_to_proto(record: JobRecord, result: dict | None) -> pb.Job:
    job = pb.Job(
        job_id=record.job_id, request_id=record.request_id, model=record.model,
        task=task_to_proto(record.task), state=state_to_proto(record.state), error=record.error,
        created_time=_timestamp(record.created), worker_id=record.worker_id,
    )
    if record.deadline is not None:
        job.deadline.CopyFrom(_timestamp(record.deadline))
    if result is not None:
        job.result.CopyFrom(result_to_proto(result))
    return job


def generation_from_proto(options: pb.GenerationOptions) -> dict:
    """Only the options the client set (zero means default)."""
    values = {
        "num_beams": options.num_beams, "max_new_tokens": options.max_new_tokens,
        "min_new_tokens": options.min_new_tokens, "repetition_penalty": options.repetition_penalty,
    }
    return {key: value for key, value in values.items() if value}
