"""One JSON convention for every output of the client and the CLI.

Enum values by their short names (`OD`, `SUCCEEDED`, `DONE`, `FLORENCE2`: no proto prefixes), every
field present even at its zero value, field names as in the proto, float32 coordinates and scores at
their 7 significant digits (34.24, not 34.2400016784668); `raw_text` beside the cleaned `text`.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

_PREFIXES = ("TASK_TYPE_", "JOB_STATE_", "EVENT_TYPE_", "MODEL_KIND_", "CHECKPOINT_FORMAT_")


def _short(value):
    if isinstance(value, str):
        for prefix in _PREFIXES:
            if value.startswith(prefix):
                return value[len(prefix):]
        return value
    if isinstance(value, list):
        return [_short(item) for item in value]
    if isinstance(value, dict):
        return {key: _short(item) for key, item in value.items()}
    return value


_ENUM_FIELDS = {"task", "tasks", "state", "type", "kind", "source_format"}


def _shorten_enums(data):
    if isinstance(data, dict):
        return {key: (_short(value) if key in _ENUM_FIELDS else _shorten_enums(value)) for key, value in data.items()}
    if isinstance(data, list):
        return [_shorten_enums(item) for item in data]
    return data


_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


def _float32(value):
    """A float32 as the decimal it stands for (34.2400016784668 -> 34.24): its 7 significant digits."""
    return float(f"{value:.7g}") if isinstance(value, float) else value


def _numbers(descriptor, data: dict) -> dict:
    """64-bit integers as numbers (proto3 JSON writes them as strings; a person reading counts wants numbers),
    and 32-bit floats (coordinates, scores) without float32's trailing noise."""
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.type in _INT64:
            data[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif field.type == FieldDescriptor.TYPE_FLOAT:
            data[field.name] = [_float32(v) for v in value] if isinstance(value, list) else _float32(value)
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, dict):
                    _numbers(field.message_type, item)
    return data


def to_json(message: Message) -> dict:
    """A proto message as plain JSON-ready data, by this module's convention."""
    data = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return _shorten_enums(_numbers(message.DESCRIPTOR, data))
