"""Redis records and events -> florence2.v1 messages. Results need no conversion: workers build the
proto's Result and the stream carries it serialized."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from florence2_serve.common.errors import JobError
from florence2_serve.common.proto_enums import event_type_to_proto, state_to_proto, task_to_proto
from florence2_serve.common.redis_layout import Event, JobRecord
from florence2_serve.v1 import florence2_pb2 as pb


def _timestamp(seconds: float) -> Timestamp:
    nanos = int(seconds * 1e9)
    return Timestamp(seconds=nanos // 1_000_000_000, nanos=nanos % 1_000_000_000)


def error_to_proto(encoded: str) -> pb.JobError | None:
    error = JobError.decode(encoded)
    if error is None:
        return None
    return pb.JobError(reason=error.reason, message=error.message, metadata=error.metadata)


def event_to_proto(job_id: str, event: Event, result: bytes | None = None) -> pb.JobEvent:
    """`result` (serialized) is attached when the event has none of its own (a DONE event)."""
    message = pb.JobEvent(event_id=event.event_id, job_id=job_id, type=event_type_to_proto(event.type),
                          state=state_to_proto(event.state), time=_timestamp(event.time))
    serialized = event.result if event.result is not None else result
    if serialized is not None:
        message.result.ParseFromString(serialized)
    error = error_to_proto(event.error)
    if error is not None:
        message.error.CopyFrom(error)
    return message


def job_to_proto(record: JobRecord, result: bytes | None) -> pb.Job:
    job = pb.Job(
        job_id=record.job_id, request_id=record.request_id, model=record.model,
        task=task_to_proto(record.task), state=state_to_proto(record.state),
        created_time=_timestamp(record.created), worker_id=record.worker_id,
    )
    error = error_to_proto(record.error)
    if error is not None:
        job.error.CopyFrom(error)
    if record.deadline is not None:
        job.deadline.CopyFrom(_timestamp(record.deadline))
    if result is not None:
        job.result.ParseFromString(result)
    return job
