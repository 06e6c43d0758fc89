"""ArrayChunk messages whose array bytes protobuf never copies.

Streamed array data (PutArray's requests, GetArray's replies) spends most of its time in copies:
building an ArrayChunk copies the data into the message, serializing copies it again, and the
receiver's parser copies it once more into a new bytes object. The bytes on the wire here are the
same: ArrayChunk's ordinary protobuf encoding, which any protobuf parser reads, and any sender's
encoding is read here. Only the work differs:

- `encode` serializes the fields other than `data` with protobuf and joins them, the data field's
  tag and length, and the data (a view of the sender's array) into the one bytes object gRPC
  sends: one copy of the data instead of two.
- `decode` walks the message's top-level fields, hands the data field on as a view of the
  received bytes (no copy) and parses the rest with protobuf. A malformed message raises
  InvalidArgumentError naming what is wrong (the server's guard answers INVALID_ARGUMENT with it).

`FramedWorkerStub` calls PutArray and GetArray through these; `add_worker_servicer` registers a
Worker servicer whose PutArray reads its requests and whose GetArray writes its replies so.
"""

from __future__ import annotations

from typing import Any

import grpc

from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from proto.errors import InvalidArgumentError

_DATA_FIELD = pb.ArrayChunk.DESCRIPTOR.fields_by_name["data"].number
_LENGTH_DELIMITED = 2
_DATA_TAG = bytes([(_DATA_FIELD << 3) | _LENGTH_DELIMITED])
_SERVICE = "pathways.Worker"


class DataChunk:
    """An ArrayChunk as its fields other than data (`header`, a pb.ArrayChunk) and its `data`
    (any contiguous byte buffer: a view of the sender's array, or of the received message).
    Reads like the message it stands for: `chunk.spec`, `chunk.HasField("shard")`, ...
    are the header's."""

    __slots__ = ("header", "data")

    def __init__(self, header: pb.ArrayChunk, data: Any = b"") -> None:
        self.header = header
        self.data = data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.header, name)

    def __repr__(self) -> str:
        return f"DataChunk({self.header!r}, {len(self.data)} bytes)"


def encode(message: DataChunk | pb.ArrayChunk) -> bytes:
    """The protobuf encoding of an ArrayChunk (a DataChunk's data copied once, into the result)."""
    if not isinstance(message, DataChunk):
        return message.SerializeToString()
    head = message.header.SerializeToString()
    data = memoryview(message.data)
    if not data.nbytes:
        return head
    if not data.c_contiguous:
        raise ValueError("a chunk's data must be contiguous")
    return b"".join((head, _DATA_TAG, _varint(data.nbytes), data.cast("B")))


def decode(raw: bytes) -> DataChunk:
    """The ArrayChunk encoded in `raw`: its data a view of `raw`. InvalidArgumentError, naming
    the fault, for bytes that are not an ArrayChunk."""
    view = memoryview(raw)
    end = len(view)
    pos = 0
    data_at = data_start = data_stop = -1
    while pos < end:
        field_at = pos
        key, pos = _read_varint(view, pos, "a field's key")
        field, kind = key >> 3, key & 7
        if field == 0:
            raise InvalidArgumentError(f"array chunk: field number 0 at byte {field_at}")
        if kind == 0:
            _, pos = _read_varint(view, pos, f"field {field}")
        elif kind == _LENGTH_DELIMITED:
            length, pos = _read_varint(view, pos, f"the length of field {field}")
            if length > end - pos:
                raise InvalidArgumentError(f"array chunk: field {field} says {length} bytes, "
                                           f"{end - pos} follow")
            if field == _DATA_FIELD:
                if data_at >= 0:
                    raise InvalidArgumentError("array chunk: two data fields")
                data_at, data_start, data_stop = field_at, pos, pos + length
            pos += length
        elif kind in (1, 5):
            pos += 8 if kind == 1 else 4
            if pos > end:
                raise InvalidArgumentError(f"array chunk: field {field} is cut short")
        else:
            raise InvalidArgumentError(f"array chunk: field {field} has wire type {kind}")
    if data_at < 0:
        return DataChunk(_parse_header(view), b"")
    rest = view[data_stop:] if data_at == 0 else bytes(view[:data_at]) + bytes(view[data_stop:])
    return DataChunk(_parse_header(rest), view[data_start:data_stop])


def _parse_header(raw) -> pb.ArrayChunk:
    try:
        return pb.ArrayChunk.FromString(raw)
    except Exception as exc:  # protobuf's DecodeError
        raise InvalidArgumentError(f"array chunk: fields other than data do not parse "
                                   f"({exc})") from None


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(view: memoryview, pos: int, what: str) -> tuple[int, int]:
    value = shift = 0
    for i in range(pos, min(pos + 10, len(view))):
        byte = view[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    raise InvalidArgumentError(f"array chunk: {what} at byte {pos} is cut short or too long")


class FramedWorkerStub(pb_grpc.WorkerStub):
    """A Worker stub whose PutArray takes DataChunks (or ArrayChunks) and whose GetArray yields
    DataChunks; the other methods are the generated stub's."""

    def __init__(self, channel: grpc.Channel) -> None:
        super().__init__(channel)
        self.PutArray = channel.stream_unary(
            f"/{_SERVICE}/PutArray", request_serializer=encode,
            response_deserializer=pb.PutArrayReply.FromString, _registered_method=True)
        self.GetArray = channel.unary_stream(
            f"/{_SERVICE}/GetArray", request_serializer=pb.GetArrayRequest.SerializeToString,
            response_deserializer=decode, _registered_method=True)


class _Handlers:
    """Stands in for a server to collect the generated code's method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, _handlers) -> None:
        pass

    def add_registered_method_handlers(self, _service: str, handlers) -> None:
        self.handlers = dict(handlers)


def add_worker_servicer(servicer: pb_grpc.WorkerServicer, server: grpc.Server) -> None:
    """pb_grpc.add_WorkerServicer_to_server, with PutArray's requests decoded and GetArray's
    replies encoded by this module (the servicer's GetArray may yield DataChunks)."""
    collected = _Handlers()
    pb_grpc.add_WorkerServicer_to_server(servicer, collected)
    handlers = collected.handlers
    if "PutArray" not in handlers or "GetArray" not in handlers:
        raise RuntimeError("proto/pathways_pb2_grpc.py registers no method handlers: regenerate "
                           "it (python -m proto.regenerate) with grpcio-tools >= 1.85")
    handlers["PutArray"] = handlers["PutArray"]._replace(request_deserializer=decode)
    handlers["GetArray"] = handlers["GetArray"]._replace(response_serializer=encode)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    server.add_registered_method_handlers(_SERVICE, handlers)
