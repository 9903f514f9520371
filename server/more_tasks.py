"""JobSpec.more_tasks: further tasks on a job's image, each a job of its own, all checked before any is queued."""

from __future__ import annotations

from typing import Awaitable, Callable

from florence2_serve.v1 import florence2_pb2 as pb

from . import validation
from .errors import ServiceError, invalid

# The most further tasks one Submit may ask for on its image.
MAX_MORE_TASKS = 8
_TASK_FIELDS = ("task", "text", "region")


def more_task_request_id(request_id: str, index: int) -> str:
    """The request_id of the job of more_tasks[index] ("" when the job has none): retries find it."""
    return f"{request_id}.t{index + 1}" if request_id else ""


async def more_task_specs(spec: pb.JobSpec, check: Callable[..., Awaitable[tuple]]
                          ) -> list[tuple[pb.JobSpec, validation.CheckedSpec]]:
    """(JobSpec, CheckedSpec) of each of `spec.more_tasks`: this job's spec with the task, text and region
    replaced, passed through `check(spec, image_checked=True)` -> (CheckedSpec, ...), so that it is queued
    without being checked again; a refusal names its field as job.more_tasks[i].*."""
    if not spec.more_tasks:
        return []
    if len(spec.more_tasks) > MAX_MORE_TASKS:
        raise invalid("job.more_tasks", f"at most {MAX_MORE_TASKS} more tasks per job, got {len(spec.more_tasks)}")
    if len(spec.request_id) > validation.MAX_REQUEST_ID - 3:
        raise invalid("job.request_id", f"with more_tasks, request_id may have at most "
                                        f"{validation.MAX_REQUEST_ID - 3} characters (each task's job adds '.tN')")
    specs = []
    for index, extra in enumerate(spec.more_tasks):
        sibling = pb.JobSpec()
        sibling.CopyFrom(spec)
        sibling.ClearField("more_tasks")
        sibling.task, sibling.text = extra.task, extra.text
        if extra.HasField("region"):
            sibling.region.CopyFrom(extra.region)
        else:
            sibling.ClearField("region")
        sibling.request_id = more_task_request_id(spec.request_id, index)
        try:
            checked, _ = await check(sibling, image_checked=True)
        except ServiceError as exc:
            exc.violations = [(_field_of(name, index), text) for name, text in exc.violations]
            raise
        specs.append((sibling, checked))
    return specs


def _field_of(name: str, index: int) -> str:
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "job" and parts[1] in _TASK_FIELDS:
        return name.replace("job.", f"job.more_tasks[{index}].", 1)
    return name
