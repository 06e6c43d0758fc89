"""`pathways status --json`: a controller's status as complete JSON.

protobuf's own JSON form drops every field holding its zero value (island 0 has no "island" key,
device 0 of host 0 is `{}`) and writes 64-bit integers as strings. Tools reading the status should
not have to know either rule, so here every field of every message is present, integers of any
width are JSON numbers, floats are numbers (null for NaN and infinities, which JSON lacks), enums
their names, bytes base64 text. The keys are the proto field names (proto/pathways.proto,
`GetStatusReply` and the messages it holds); the README lists them.
"""

from __future__ import annotations

import base64
import math
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message


def message_to_json(message: Message) -> dict[str, Any]:
    """Every field of `message` (zero values included), keyed by its proto name, in proto order."""
    return {field.name: _field(field, getattr(message, field.name))
            for field in message.DESCRIPTOR.fields}


def _field(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        return {str(k): _scalar(value_field, v) for k, v in value.items()}
    if _is_repeated(field):
        return [_scalar(field, v) for v in value]
    return _scalar(field, value)


def _is_repeated(field: FieldDescriptor) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.28; `label` is deprecated
    if repeated is not None:
        return bool(repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED


def _scalar(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_to_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        named = field.enum_type.values_by_number.get(value)
        return named.name if named is not None else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
