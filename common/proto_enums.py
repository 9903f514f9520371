"""The one place where this service's enums meet the proto's (client, front end and workers use it).

Task has three spellings a user meets — the prompt token `<OD>`, the name `OD` (CLI, JSON output)
and the proto's `TASK_TYPE_OD` — and all three are derived from common/tasks.Task here.
"""

from __future__ import annotations

from florence2_serve.v1 import florence2_pb2 as pb

from .redis_layout import EventType, JobState
from .tasks import Task

TASK_PREFIX = "TASK_TYPE_"
_TASK_TO_PROTO = {task: pb.TaskType.Value(TASK_PREFIX + task.name) for task in Task}
_TASK_FROM_PROTO = {number: task for task, number in _TASK_TO_PROTO.items()}
_STATES = {state: pb.JobState.Value(f"JOB_STATE_{state.value}") for state in JobState}
_STATE_NAMES = {number: state for state, number in _STATES.items()}
_EVENT_TYPES = {event_type: pb.EventType.Value(f"EVENT_TYPE_{event_type.value}") for event_type in EventType}
_EVENT_TYPE_NAMES = {number: event_type for event_type, number in _EVENT_TYPES.items()}
TERMINAL_EVENT_TYPES = frozenset(_EVENT_TYPES[t] for t in EventType if t.terminal)


def task_to_proto(task: Task | str) -> int:
    return _TASK_TO_PROTO[task if isinstance(task, Task) else Task(task)]


def task_from_proto(value: int) -> Task:
    """Proto enum number -> Task; ValueError for TASK_TYPE_UNSPECIFIED or an unknown number."""
    if value == pb.TASK_TYPE_UNSPECIFIED:
        raise ValueError("task is required")
    try:
        return _TASK_FROM_PROTO[value]
    except KeyError:
        raise ValueError(f"unknown task number {value}") from None


def task_name(value: int) -> str:
    """'OD' for TASK_TYPE_OD (what the CLI and JSON output show)."""
    return task_from_proto(value).name


def state_to_proto(state: JobState | str) -> int:
    return _STATES[JobState(state)]


def state_name(value: int) -> str:
    """'SUCCEEDED' for JOB_STATE_SUCCEEDED."""
    found = _STATE_NAMES.get(value)
    return found.value if found else "UNSPECIFIED"


def event_type_to_proto(event_type: EventType) -> int:
    return _EVENT_TYPES[event_type]


def event_type_name(value: int) -> str:
    found = _EVENT_TYPE_NAMES.get(value)
    return found.value if found else "UNSPECIFIED"


# Worker registrations spell the checkpoint format as LoadedModel.source_format does.
_FORMATS = {"native": pb.CHECKPOINT_FORMAT_NATIVE, "microsoft": pb.CHECKPOINT_FORMAT_MICROSOFT,
            "remote": pb.CHECKPOINT_FORMAT_REMOTE_CODE, "yolo": pb.CHECKPOINT_FORMAT_YOLO,
            "noop": pb.CHECKPOINT_FORMAT_NONE}


def checkpoint_format_to_proto(name: str) -> int:
    """A registration's source_format -> CheckpointFormat (UNSPECIFIED for a worker that did not say)."""
    return _FORMATS.get(name, pb.CHECKPOINT_FORMAT_UNSPECIFIED)
