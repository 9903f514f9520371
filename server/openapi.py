"""/v1/openapi.json: an OpenAPI 3.1 document made from the proto itself (its google.api.http rules and
message descriptors), so the HTTP description cannot drift from the contract.

Schemas follow protobuf's canonical JSON mapping: json names, enums by name, 64-bit integers as strings,
bytes as base64, Duration as "1.5s", Timestamp as RFC 3339.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor

from florence2_serve.v1 import florence2_pb2 as pb

STATUS = "google.rpc.Status"
TYPE = FieldDescriptor
INT64 = {TYPE.TYPE_INT64, TYPE.TYPE_UINT64, TYPE.TYPE_SINT64, TYPE.TYPE_FIXED64, TYPE.TYPE_SFIXED64}
FORM_FIELDS = {
    "model": {"type": "string"}, "task": {"type": "string", "description": "TASK_TYPE_OD, or short: OD"},
    "text": {"type": "string"}, "region": {"type": "string", "description": "x1,y1,x2,y2 in image pixels"},
    "num_beams": {"type": "integer"}, "max_new_tokens": {"type": "integer"}, "min_new_tokens": {"type": "integer"},
    "repetition_penalty": {"type": "number"}, "request_id": {"type": "string"}, "priority": {"type": "integer"},
    "timeout": {"type": "string", "description": "seconds, e.g. 30 or 30s"},
    "cancel_on_disconnect": {"type": "boolean"},
    "more_tasks": {"type": "string", "description": "JSON array of TaskRequest"},
    "job": {"type": "string", "description": "the JobSpec as JSON (the other parts override its fields)"},
}
SSE = ("Server-Sent Events: one per JobEvent, `id:` its event id (send it back as Last-Event-ID to resume), "
       "`data:` this message as JSON; `: keep-alive` comments while the job is quiet; `event: error` with a "
       "google.rpc.Status if the stream fails after it started. The stream closes when the job ends.")


def _field_schema(field: FieldDescriptor, messages: dict) -> dict:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value = field.message_type.fields_by_name["value"]
        return {"type": "object", "additionalProperties": _single(value, messages)}
    single = _single(field, messages)
    if field.is_repeated:
        return {"type": "array", "items": single}
    return single


def _single(field: FieldDescriptor, messages: dict) -> dict:
    if field.enum_type is not None:
        return {"type": "string", "enum": [value.name for value in field.enum_type.values]}
    if field.message_type is not None:
        name = field.message_type.full_name
        if name == "google.protobuf.Duration":
            return {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$", "examples": ["30s"]}
        if name == "google.protobuf.Timestamp":
            return {"type": "string", "format": "date-time"}
        _collect(field.message_type, messages)
        return {"$ref": f"#/components/schemas/{name}"}
    if field.type in INT64:
        return {"type": "string", "format": "int64"}
    if field.type == TYPE.TYPE_BYTES:
        return {"type": "string", "contentEncoding": "base64"}
    if field.type == TYPE.TYPE_BOOL:
        return {"type": "boolean"}
    if field.type == TYPE.TYPE_STRING:
        return {"type": "string"}
    if field.type in (TYPE.TYPE_FLOAT, TYPE.TYPE_DOUBLE):
        return {"type": "number"}
    return {"type": "integer", "format": "int32"}


def _collect(descriptor, messages: dict, without: tuple[str, ...] = ()) -> str:
    """Add `descriptor`'s schema (and those it refers to) to `messages`; its name."""
    name = descriptor.full_name + ("Body" if without else "")
    if name in messages:
        return name
    messages[name] = {}  # taken before recursing: messages may refer to themselves
    properties = {field.json_name: _field_schema(field, messages) for field in descriptor.fields
                  if field.name not in without}
    messages[name] = {"type": "object", "properties": properties, "additionalProperties": False}
    return name


def _status_schema() -> dict:
    return {"type": "object", "description": "google.rpc.Status: the gRPC code, a message for people, and details "
                                            "(google.rpc.ErrorInfo with the stable reason; BadRequest; RetryInfo)",
            "properties": {"code": {"type": "integer"}, "message": {"type": "string"},
                           "details": {"type": "array", "items": {"type": "object",
                                                                   "properties": {"@type": {"type": "string"}},
                                                                   "required": ["@type"]}}},
            "required": ["code", "message"]}


def _error_responses() -> dict:
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{STATUS}"}}}
    return {"default": {"description": "An error: the HTTP status of its gRPC code (400, 401, 404, 409, 429, "
                                       "503, ...), the google.rpc.Status as JSON", "content": content}}


def _operation(binding, messages: dict, count: int) -> dict:
    method = binding.method
    request = method.input_type
    operation = {"operationId": method.name if count == 0 else f"{method.name}{count + 1}",
                 "summary": f"florence2.v1.Florence2Service/{method.name}", "tags": ["Florence2Service"]}
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in binding.path_fields]
    if binding.verb == "get":
        for field in request.fields:
            if field.name not in binding.path_fields:
                parameters.append({"name": field.name, "in": "query", "required": False,
                                   "schema": _field_schema(field, messages)})
    if method.name == "Watch":
        parameters.append({"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"},
                           "description": "Resume after this event id (an EventSource sends it when it reconnects)"})
    if parameters:
        operation["parameters"] = parameters
    if binding.body == "job":
        spec = _collect(request.fields_by_name["job"].message_type, messages)
        form = {"type": "object", "properties": {"image": {"type": "string", "contentMediaType": "image/*"},
                                                 **FORM_FIELDS}}
        operation["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{spec}"}},
            "multipart/form-data": {"schema": form}}}
    elif binding.body == "*":
        body = _collect(request, messages, without=tuple(binding.path_fields))
        operation["requestBody"] = {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}}}
    reply = _collect(method.output_type, messages)
    if method.server_streaming:
        ok = {"description": f"{SSE} Each data line is a {method.output_type.full_name}.",
              "content": {"text/event-stream": {"schema": {"type": "string"}}}}
    else:
        ok = {"description": method.output_type.full_name,
              "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{reply}"}}}}
    operation["responses"] = {"200": ok, **_error_responses()}
    return operation


def document(bindings) -> dict:
    messages: dict = {STATUS: _status_schema()}
    paths: dict = {}
    seen: dict = {}
    for binding in bindings:
        count = seen.get(binding.method.name, 0)
        seen[binding.method.name] = count + 1
        paths.setdefault(binding.template, {})[binding.verb] = _operation(binding, messages, count)
    plain = {"description": "SERVING", "content": {"application/json": {"schema": {
        "type": "object", "properties": {"status": {"type": "string"}}}}}}
    paths["/healthz"] = {"get": {"operationId": "Healthz", "summary": "The front end process serves",
                                 "security": [], "responses": {"200": plain}}}
    paths["/readyz"] = {"get": {
        "operationId": "Readyz", "summary": "Redis answers; with ?model=, the model has a live worker",
        "security": [],
        "parameters": [{"name": "model", "in": "query", "required": False, "schema": {"type": "string"}}],
        "responses": {"200": plain, **_error_responses()}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "florence2-serve", "version": pb.DESCRIPTOR.package,
                 "description": "Florence-2 and YOLOv8 inference behind a Redis job queue: the HTTP/JSON mapping of "
                                "the florence2.v1 gRPC service (protos/florence2/v1/florence2.proto)."},
        "paths": paths,
        "components": {"schemas": dict(sorted(messages.items())),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "When the front end runs with --token"}}},
        "security": [{"bearer": []}, {}],
    }
