"""proto.chunk_codec: ArrayChunks encoded and decoded without protobuf copying their data, byte
for byte the protobuf encoding either way; malformed messages refused with INVALID_ARGUMENT naming
the fault, the host serving on."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from proto import chunk_codec as codec
from proto import pathways_pb2 as pb
from proto import rpc as _rpc
from proto import wire as _wire
from proto.errors import InvalidArgumentError

SPEC = pb.ArraySpec(array_id=7, dtype="float32", shape=[5, 3])
HEADER = pb.ShardHeader(index=_wire.index_to_proto(((0, 5), (0, 3))), nbytes=60,
                        mesh_positions=[0, 1])
# Data lengths around the varint boundaries of the length field, and an empty one.
SIZES = [0, 1, 3, 127, 128, 16383, 16384, (2 << 20) + 1]


def _data(n: int) -> bytes:
    return np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("n", SIZES)
def test_encode_writes_the_protobuf_encoding_any_parser_reads(n):
    data = _data(n)
    head = pb.ArrayChunk(spec=SPEC, shard=HEADER, parts=2, error="")
    parsed = pb.ArrayChunk.FromString(codec.encode(codec.DataChunk(head, memoryview(data))))
    assert parsed.data == data and parsed.spec == SPEC and parsed.shard == HEADER
    assert parsed.parts == 2


@pytest.mark.parametrize("n", SIZES)
def test_decode_reads_any_senders_encoding_with_data_as_a_view(n):
    data = _data(n)
    stock = pb.ArrayChunk(spec=SPEC, shard=HEADER, data=data, parts=3).SerializeToString()
    for raw in (stock, codec.encode(codec.DataChunk(pb.ArrayChunk(spec=SPEC, shard=HEADER,
                                                                  parts=3), data))):
        chunk = codec.decode(raw)
        assert bytes(chunk.data) == data and chunk.spec == SPEC and chunk.shard == HEADER
        assert chunk.parts == 3 and chunk.HasField("shard") and not chunk.error
        if n:
            assert isinstance(chunk.data, memoryview) and chunk.data.obj is raw  # no copy
    # Data ahead of the other fields (field order is free in protobuf).
    first = pb.ArrayChunk(data=data).SerializeToString() + pb.ArrayChunk(
        spec=SPEC).SerializeToString()
    chunk = codec.decode(first)
    assert bytes(chunk.data) == data and chunk.spec == SPEC


def test_decode_of_a_message_without_data():
    chunk = codec.decode(pb.ArrayChunk(spec=SPEC, error="lost").SerializeToString())
    assert chunk.error == "lost" and len(chunk.data) == 0 and not chunk.HasField("shard")
    assert len(codec.decode(b"").data) == 0


def test_encode_refuses_data_that_is_not_contiguous():
    strided = memoryview(np.arange(8, dtype=np.uint8)[::2])
    with pytest.raises(ValueError, match="contiguous"):
        codec.encode(codec.DataChunk(pb.ArrayChunk(), strided))


_GOOD = pb.ArrayChunk(spec=SPEC, data=b"abcd").SerializeToString()
BAD = {
    "length beyond the message": (_GOOD[:-1], "field 3 says 4 bytes, 3 follow"),
    "cut inside a length": (bytes([0x1A, 0x80]), "length of field 3 at byte 1 is cut short"),
    "cut inside a key": (bytes([0x80]), "key at byte 0 is cut short"),
    "two data fields": (_GOOD + bytes([0x1A, 1, 0x41]), "two data fields"),
    "group wire type": (bytes([(9 << 3) | 3]), "field 9 has wire type 3"),
    "field number 0": (bytes([0x02, 0]), "field number 0"),
    "fixed64 cut short": (bytes([(9 << 3) | 1, 1, 2]), "field 9 is cut short"),
    "header that does not parse": (bytes([0x0A, 2, 0xFF, 0xFF]) + bytes([0x1A, 1, 0x41]),
                                   "fields other than data do not parse"),
    "varint too long": (bytes([0x28] + [0xFF] * 11), "field 5 at byte 1 is cut short or too long"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_decode_refuses_malformed_messages_naming_the_fault(case):
    raw, reason = BAD[case]
    with pytest.raises(InvalidArgumentError, match=reason):
        codec.decode(raw)


def test_views_and_copies_assemble_the_same_bits():
    x = np.random.default_rng(5).standard_normal((1001, 3)).astype(np.float32)
    shards = [(((0, 1001), (0, 3)), [0], x)]
    for views in (False, True):
        chunks = [codec.decode(codec.encode(c))
                  for c in _wire.iter_chunks(_spec_of(x), shards, views=views)]
        _, got = _wire.assemble_chunks(chunks)
        assert got[0].data.tobytes() == x.tobytes()


def _spec_of(x: np.ndarray) -> pb.ArraySpec:
    return pb.ArraySpec(array_id=1, dtype="float32", shape=list(x.shape))


def test_a_host_refuses_a_malformed_chunk_with_invalid_argument_and_serves_on(client):
    s = client.slice({"x": 2}, island=0)
    address = s.info.host_addresses[0]
    channel = _rpc.open_channel(address, client.credentials, client._call_metadata)
    try:
        put_raw = channel.stream_unary("/pathways.Worker/PutArray",
                                       request_serializer=lambda raw: raw,
                                       response_deserializer=pb.PutArrayReply.FromString)
        for raw, reason in (BAD["length beyond the message"], BAD["two data fields"]):
            with pytest.raises(grpc.RpcError) as info:
                put_raw(iter([raw]), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert reason in info.value.details()
    finally:
        channel.close()
    x = np.arange(4096, dtype=np.float32)
    assert client.put(x, s, P("x")).fetch().tobytes() == x.tobytes()
