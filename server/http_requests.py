"""HTTP request bodies as the service's protobuf messages, within the front end's limits.

JSON bodies follow protobuf's canonical JSON mapping (json names or field names, enums by name, bytes
as base64); a task may also be given short (`OD`, `<OD>`). Submit and Run also take
multipart/form-data: the image as a file part named `image`, the other JobSpec fields as form fields
(`model`, `task`, `text`, `region=x1,y1,x2,y2`, `num_beams`, `max_new_tokens`, `min_new_tokens`,
`repetition_penalty`, `confidence`, `iou`, `max_detections`, `request_id`, `priority`, `timeout` (seconds or
`30s`), `cancel_on_disconnect`, `more_tasks` as JSON), or a `job` part holding the JobSpec as JSON.

A body is refused by its Content-Length before it is read when that is over the limit, and otherwise
while it streams, at the first byte past it; a body that arrives slower than the read limit allows is
cut off. The job is queued only once its body has fully arrived, so a slow upload never holds a worker.
"""

from __future__ import annotations

import asyncio
import json
import math
import re

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from florence2_serve.common.errors import Reason, quote
from florence2_serve.v1 import florence2_pb2 as pb

from .errors import ServiceError, invalid

MiB = 1024 * 1024
FORM_FIELD_BYTES = 64 * 1024  # any multipart part but the image
CHUNK = 64 * 1024
GENERATION_FIELDS = {"num_beams", "max_new_tokens", "min_new_tokens", "repetition_penalty"}
DETECTION_FIELDS = {"confidence", "iou", "max_detections"}
TASK_NAMES = set(pb.TaskType.keys())
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class BodyLimits:
    """What one request body may hold, from the front end's image limit."""

    def __init__(self, max_image_bytes: int, read_timeout_s: float):
        self.max_image_bytes = max_image_bytes
        # base64 of the largest image plus room for everything else in the JobSpec
        self.json_bytes = 4 * math.ceil(max_image_bytes / 3) + MiB
        self.form_bytes = max_image_bytes + MiB
        self.read_timeout_s = read_timeout_s


def too_large(size_text: str, limit: int, what: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.IMAGE_TOO_LARGE,
                        f"{what} is {size_text}, over the limit of {limit} bytes",
                        violations=[("job.image", "over the byte limit")], metadata={"limit_bytes": limit})


def too_slow(timeout_s: float) -> ServiceError:
    return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, Reason.UPLOAD_TOO_SLOW,
                        f"the request body did not arrive within {timeout_s:g} s; nothing was queued")


def _check_length(request, limit: int, what: str) -> None:
    length = request.content_length
    if length is not None and length > limit:
        raise too_large(f"{length} bytes", limit, what)


async def _within(reading, limits: BodyLimits):
    try:
        return await asyncio.wait_for(reading, limits.read_timeout_s)
    except asyncio.TimeoutError:
        raise too_slow(limits.read_timeout_s) from None


async def _read_limited(stream, limit: int, what: str) -> bytes:
    """At most `limit` bytes from an aiohttp stream (a StreamReader or a multipart part)."""
    chunks, size = [], 0
    while True:
        chunk = await (stream.read_chunk(CHUNK) if hasattr(stream, "read_chunk") else stream.read(CHUNK))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise too_large(f"over {limit} bytes", limit, what)
        chunks.append(chunk)


async def json_body(request, limits: BodyLimits) -> dict:
    """The request's JSON object ({} for an empty body)."""
    _check_length(request, limits.json_bytes, "the request body")
    raw = await _within(_read_limited(request.content, limits.json_bytes, "the request body"), limits)
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _malformed("the request body is not JSON") from None
    if not isinstance(data, dict):
        raise _malformed("the request body must be a JSON object")
    return data


async def form_job(request, limits: BodyLimits) -> pb.JobSpec:
    """A JobSpec from multipart/form-data: the image part, a `job` JSON part, and per-field parts."""
    _check_length(request, limits.form_bytes, "the upload")
    data, image = await _within(_read_form(request, limits), limits)
    spec = job_from_json(data)
    if image is not None:
        spec.image = image
    return spec


async def _read_form(request, limits: BodyLimits) -> tuple[dict, bytes | None]:
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError, KeyError):
        raise _malformed("the multipart/form-data body has no valid boundary") from None
    data: dict = {}
    fields: list[tuple[str, str]] = []
    image = None
    while True:
        try:
            part = await reader.next()
        except ValueError:
            raise _malformed("the multipart/form-data body is malformed") from None
        if part is None:
            break
        name = _part_name(part)
        if name == "image":
            if image is not None:
                raise invalid("job.image", "give one image part")
            image = await _read_limited(part, limits.max_image_bytes, "the image")
            continue
        raw = await _read_limited(part, FORM_FIELD_BYTES, f"form field {quote(name)}")
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise invalid(f"job.{name}", "not UTF-8 text") from None
        if name == "job":
            try:
                loaded = json.loads(text)
            except ValueError:
                raise invalid("job", "the job part is not JSON", Reason.MALFORMED_REQUEST) from None
            if not isinstance(loaded, dict):
                raise invalid("job", "the job part must be a JSON object", Reason.MALFORMED_REQUEST)
            data.update(loaded)
        else:
            fields.append((name, text))
    for name, text in fields:  # the per-field parts override the job part
        _set_form_field(data, name, text)
    return data, image


_PLAIN_NAME = re.compile(r';\s*name="([^"\\]*)"')


def _part_name(part) -> str:
    """A part's form name. aiohttp's `part.name` re-parses the header in full (about a tenth of an HTTP job's
    front-end CPU); a plain quoted name is read here, anything else left to it."""
    header = part.headers.get("Content-Disposition", "")
    plain = _PLAIN_NAME.search(header)
    return plain.group(1) if plain and "*=" not in header else (part.name or "")


def _set_form_field(data: dict, name: str, text: str) -> None:
    key = _proto_name(name)
    if key in GENERATION_FIELDS or key.startswith("generation."):
        data.setdefault("generation", {})[key.removeprefix("generation.")] = text
    elif key in DETECTION_FIELDS or key.startswith("detection."):
        data.setdefault("detection", {})[key.removeprefix("detection.")] = text
    elif key == "region":
        parts = [p for p in text.replace(" ", ",").split(",") if p]
        if len(parts) != 4:
            raise invalid("job.region", "give the region as x1,y1,x2,y2")
        data["region"] = dict(zip(("x1", "y1", "x2", "y2"), parts))
    elif key.startswith("region."):
        data.setdefault("region", {})[key.removeprefix("region.")] = text
    elif key == "timeout":
        data["timeout"] = text if text.endswith("s") else f"{text}s"
    elif key == "cancel_on_disconnect":
        if text.lower() not in TRUE + FALSE:
            raise invalid("job.cancel_on_disconnect", "give true or false")
        data[key] = text.lower() in TRUE
    elif key == "more_tasks":
        try:
            data[key] = json.loads(text)
        except ValueError:
            raise invalid("job.more_tasks", "give more_tasks as a JSON array of TaskRequest objects") from None
    elif key in pb.JobSpec.DESCRIPTOR.fields_by_name and key != "image":
        data[key] = text
    else:
        raise invalid(f"job.{name}", f"no JobSpec field is called {quote(name)}")


def _proto_name(name: str) -> str:
    """camelCase or snake_case, dotted or not, as the proto's field names."""
    out = []
    for segment in name.split("."):
        out.append("".join(f"_{c.lower()}" if c.isupper() else c for c in segment))
    return ".".join(out)


def _short_task(value):
    """`OD`, `<OD>`, `od` -> TASK_TYPE_OD; anything else unchanged (the parser judges it)."""
    if isinstance(value, str) and not value.startswith("TASK_TYPE_"):
        candidate = "TASK_TYPE_" + value.strip().strip("<>").upper()
        if candidate in TASK_NAMES:
            return candidate
    return value


def job_from_json(data: dict) -> pb.JobSpec:
    """A JobSpec from its JSON form; a field that does not parse is named in the error."""
    data = dict(data)
    if "task" in data:
        data["task"] = _short_task(data["task"])
    image = data.get("image")
    if isinstance(image, str) and not _is_base64(image):  # protobuf's own parser would skip what it cannot read
        raise invalid("job.image", "image must be base64 (standard or URL-safe alphabet)", Reason.MALFORMED_REQUEST)
    for key in ("moreTasks", "more_tasks"):
        if isinstance(data.get(key), list):
            data[key] = [dict(item, task=_short_task(item["task"])) if isinstance(item, dict) and "task" in item
                         else item for item in data[key]]
    return parse_message(data, pb.JobSpec(), "job")


def _is_base64(text: str) -> bool:
    compact = "".join(text.split())
    if re.fullmatch(r"[A-Za-z0-9+/_-]*={0,2}", compact) is None or len(compact.rstrip("=")) % 4 == 1:
        return False
    return True


def parse_message(data: dict, message, prefix: str):
    """`message` filled from its JSON form; INVALID_ARGUMENT naming the first field that does not parse."""
    try:
        return json_format.ParseDict(data, message)
    except json_format.ParseError:
        pass
    fields = message.DESCRIPTOR.fields_by_name
    for key, value in data.items():
        field = fields.get(key) or next((f for f in fields.values() if f.json_name == key), None)
        path = f"{prefix}.{key}" if prefix else key
        if field is None:
            raise invalid(path, f"{message.DESCRIPTOR.full_name} has no field {quote(key)}",
                          Reason.MALFORMED_REQUEST)
        try:
            json_format.ParseDict({key: value}, type(message)())
        except json_format.ParseError:
            raise invalid(path, f"not a valid {_type_name(field)} in protobuf's JSON mapping",
                          Reason.MALFORMED_REQUEST) from None
    raise _malformed(f"the request is not a valid {message.DESCRIPTOR.full_name}")


def _type_name(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        return field.message_type.full_name
    if field.enum_type is not None:
        return f"{field.enum_type.full_name} name"
    names = {FieldDescriptor.TYPE_BYTES: "base64 string", FieldDescriptor.TYPE_STRING: "string",
             FieldDescriptor.TYPE_BOOL: "boolean", FieldDescriptor.TYPE_FLOAT: "number",
             FieldDescriptor.TYPE_DOUBLE: "number"}
    kind = names.get(field.type, "integer")
    return f"list of {kind}s" if field.is_repeated else kind


def _malformed(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, Reason.MALFORMED_REQUEST, message)
