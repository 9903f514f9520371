"""Submit's checks, in the order AIP-155 and a bounded front end need them. Each raises ServiceError.

1. identifiers (`check_request_id`, `check_job_id`): bounded formats, checked before any lookup;
2. the request itself (`check_spec`): every field's bound that does not depend on the model;
3. the model (`check_for_model`): the task is served, token limits hold (text counted in tokens);
4. the image (front end's ImageGate): size, format, pixels, decodability, region inside it.
Messages quote user input only as a short prefix (common/errors.quote).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import grpc

from florence2_serve.common import redis_layout as layout
from florence2_serve.common.errors import Reason, quote
from florence2_serve.common.generation import MAX_NEW_TOKENS, GenerationError, GenerationSettings
from florence2_serve.common.model_arg import MAX_MODEL_NAME
from florence2_serve.common.proto_enums import task_from_proto
from florence2_serve.common.tasks import SPECS, Input, Task, validate_inputs
from florence2_serve.v1 import florence2_pb2 as pb

from .capabilities import ModelCapabilities
from .errors import ServiceError, invalid

MAX_REQUEST_ID = 128
REQUEST_ID = re.compile(rf"[A-Za-z0-9._~:-]{{1,{MAX_REQUEST_ID}}}")
JOB_ID = re.compile(r"[0-9a-f]{32}")
MODEL_NAME = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_MODEL_NAME}}}")
# Text longer than this is refused before it is tokenized (no model takes a tenth of it).
MAX_TEXT_BYTES = 64 * 1024
# Region coordinates: finite, and no image is larger than this on a side.
MAX_COORDINATE = 1_000_000
# A job's own timeout (JobSpec.timeout) is at most a week.
MAX_TIMEOUT_S = 7 * 24 * 3600


def check_request_id(request_id: str, field: str = "job.request_id") -> None:
    if request_id and not REQUEST_ID.fullmatch(request_id):
        raise invalid(field, f"request_id {quote(request_id)} must be 1 to {MAX_REQUEST_ID} characters of "
                             "A-Z a-z 0-9 . _ ~ : - (a UUID fits)")


def check_job_id(job_id: str, field: str = "job_id") -> None:
    if not job_id:
        raise invalid(field, "job_id is required")
    if not JOB_ID.fullmatch(job_id):
        raise invalid(field, f"job_id {quote(job_id)} is not a job id (32 lowercase hex digits, as Submit returns)")


def check_model_name(model: str) -> None:
    if not model:
        raise invalid("job.model", "model is required (see ListModels)")
    if not MODEL_NAME.fullmatch(model):
        raise invalid("job.model", f"model {quote(model)} is not a model name (1 to {MAX_MODEL_NAME} characters "
                                   "of A-Z a-z 0-9 . _ -; see ListModels)")


@dataclass(frozen=True)
class CheckedSpec:
    task: Task
    generation: dict  # only the options the client set
    settings: GenerationSettings
    region: list[float] | None
    timeout_s: float | None
    detection: dict = field(default_factory=dict)  # only the detector options the client set


MAX_DETECTIONS = 1000


def _detection(spec: pb.JobSpec, task: Task) -> dict:
    """The DETECT task's confidence / IoU / box limit, checked; {} when none is set."""
    if not spec.HasField("detection"):
        return {}
    options = spec.detection
    values = {}
    if options.HasField("confidence"):
        if not 0.0 <= options.confidence <= 1.0:  # also false for NaN
            raise invalid("job.detection.confidence", "confidence must be between 0 and 1")
        values["confidence"] = round(options.confidence, 6)
    if options.HasField("iou"):
        if not 0.0 < options.iou <= 1.0:
            raise invalid("job.detection.iou", "iou must be above 0 and at most 1")
        values["iou"] = round(options.iou, 6)
    if options.max_detections:
        if not 1 <= options.max_detections <= MAX_DETECTIONS:
            raise invalid("job.detection.max_detections",
                          f"max_detections must be 0 (the default) or 1 to {MAX_DETECTIONS}")
        values["max_detections"] = options.max_detections
    if values and task is not Task.DETECT:
        raise invalid("job.detection", f"detection options apply to the DETECT task (YOLO workers), not {task.name}")
    return values


def _generation(options: pb.GenerationOptions) -> dict:
    values = {
        "num_beams": options.num_beams, "max_new_tokens": options.max_new_tokens,
        "min_new_tokens": options.min_new_tokens, "repetition_penalty": options.repetition_penalty,
    }
    return {key: value for key, value in values.items() if value}


def check_spec(spec: pb.JobSpec, max_image_bytes: int) -> CheckedSpec:
    """Every bound of the request that holds whatever the model."""
    check_model_name(spec.model)
    check_request_id(spec.request_id)
    try:
        task = task_from_proto(spec.task)
    except ValueError as exc:
        raise invalid("job.task", str(exc)) from None
    if len(spec.text.encode("utf-8")) > MAX_TEXT_BYTES:
        raise invalid("job.text", f"text is {len(spec.text.encode('utf-8'))} bytes, over the limit of "
                                  f"{MAX_TEXT_BYTES} bytes", Reason.TOKEN_LIMIT)
    region = None
    if spec.HasField("region"):
        region = [spec.region.x1, spec.region.y1, spec.region.x2, spec.region.y2]
        if not all(abs(v) <= MAX_COORDINATE for v in region):  # also false for NaN
            raise invalid("job.region", "region coordinates must be finite pixel positions",
                          Reason.REGION_OUT_OF_BOUNDS)
    try:
        validate_inputs(task, spec.text, tuple(region) if region else None)
    except ValueError as exc:
        field = "job.region" if "region" in str(exc) else "job.text"
        raise invalid(field, str(exc)) from None
    generation = _generation(spec.generation)
    try:
        settings = GenerationSettings.from_options(generation)
    except GenerationError as exc:
        over = exc.field == "max_new_tokens" and spec.generation.max_new_tokens > MAX_NEW_TOKENS
        raise invalid(f"job.generation.{exc.field}", str(exc),
                      Reason.TOKEN_LIMIT if over else Reason.INVALID_FIELD) from None
    try:
        layout.check_priority(spec.priority)
    except ValueError as exc:
        raise invalid("job.priority", str(exc)) from None
    timeout_s = _timeout_s(spec) if spec.HasField("timeout") else None
    if not spec.image:
        raise invalid("job.image", "image is required (the encoded bytes of a JPEG, PNG, WebP, BMP, GIF or TIFF)",
                      Reason.IMAGE_UNREADABLE)
    if len(spec.image) > max_image_bytes:
        raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.IMAGE_TOO_LARGE,
                           f"image is {len(spec.image)} bytes, over the limit of {max_image_bytes} bytes",
                           violations=[("job.image", "over the byte limit")],
                           metadata={"limit_bytes": max_image_bytes})
    if SPECS[task].input is not Input.REGION:
        region = None
    return CheckedSpec(task, generation, settings, region, timeout_s, _detection(spec, task))


def check_for_model(spec: pb.JobSpec, checked: CheckedSpec, model: ModelCapabilities) -> None:
    """The model serves the task and its limits hold (text tokens are checked by the caller: async)."""
    if checked.task not in model.tasks:
        served = ", ".join(sorted(task.name for task in model.tasks)) or "none"
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, Reason.TASK_NOT_SUPPORTED,
                           f"model {spec.model!r} does not serve task {checked.task.name}; it serves: {served}",
                           violations=[("job.task", "not served by this model")],
                           metadata={"model": spec.model, "task": checked.task.name})
    limit = model.max_new_tokens
    requested = checked.settings.max_new_tokens
    if limit and requested > limit:
        raise invalid("job.generation.max_new_tokens",
                      f"max_new_tokens {requested} exceeds the limit of model {spec.model!r} ({limit})",
                      Reason.TOKEN_LIMIT, limit=limit)


def check_text_tokens(spec: pb.JobSpec, tokens: int, model: ModelCapabilities) -> None:
    limit = model.max_text_tokens
    if limit and tokens > limit:
        raise invalid("job.text", f"text is {tokens} tokens, over the limit of model {spec.model!r} ({limit})",
                      Reason.TOKEN_LIMIT, limit=limit)


def _timeout_s(spec: pb.JobSpec) -> float:
    """JobSpec.timeout in seconds: a valid Duration (nanos within a second, the same sign as seconds),
    positive and at most MAX_TIMEOUT_S."""
    seconds, nanos = spec.timeout.seconds, spec.timeout.nanos
    if abs(nanos) > 999_999_999 or (seconds and nanos and (seconds > 0) != (nanos > 0)):
        raise invalid("job.timeout", f"timeout is not a valid Duration (seconds {seconds}, nanos {nanos}: nanos "
                                     "must lie within ±999,999,999 and share the sign of seconds)")
    timeout_s = seconds + nanos / 1e9
    if timeout_s <= 0:
        raise invalid("job.timeout", f"timeout must be positive, got {timeout_s:g} s")
    if timeout_s > MAX_TIMEOUT_S:
        raise invalid("job.timeout", f"timeout {timeout_s:g} s is over the limit of {MAX_TIMEOUT_S} s (7 days)")
    return timeout_s
