"""Structured hostile requests of every RPC type: real protobuf messages (valid wire encoding)
whose fields hold extreme values: huge, negative and NaN numbers; unknown and foreign ids;
repeated fields of a million entries; strings at and past the limits; stream headers that lie.

Each gets a canonical refusal (never UNKNOWN, INTERNAL or UNAVAILABLE), and afterwards a
bystander's arrays are intact, its new work is correct, the cluster's status answers and every
host is alive. tests/test_fuzz.py sends random ones; these aim at the limits (proto.limits)."""

from __future__ import annotations

import math

import grpc
import pytest

from proto import pathways_pb2 as pb
from proto import rpc as _rpc
from runtime.worker import dataplane as _dataplane
from proto import wire as _wire

MILLION = 1_000_000
NEAR_LIMIT = _wire.MAX_MESSAGE_BYTES - (64 << 10)  # a string that leaves room for the rest
#: Codes a server may refuse hostile input with.
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.DEADLINE_EXCEEDED}


def repeated(number: int, item: bytes, count: int) -> bytes:
    """The wire bytes of a repeated message field `number` holding `count` copies of `item` (a
    serialized message): built by concatenation, in a blink even for a million entries."""
    return _field(number, item) * count


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def packed(number: int, value: int, count: int) -> bytes:
    """A packed repeated varint field (uint64, int32, int64) of `count` copies of `value`."""
    return _field(number, _varint(value) * count)


class Attack:
    """An attacker session with a slice of its own, and the bystander's ids to aim at."""

    def __init__(self, cluster, bystander) -> None:
        self.client = cluster.client("hostile")
        self.slice = self.client.slice({"d": 1}, island=0)
        self.sid = self.client.session_id
        self.victim = bystander
        self.worker = self.client.worker_stub(self.slice.info.host_addresses[0])
        self.controller_channel = _rpc.open_channel(cluster.address, cluster.credentials,
                                                     self.client._call_metadata)
        self.worker_channel = _rpc.open_channel(self.slice.info.host_addresses[0],
                                                 cluster.credentials, self.client._call_metadata)

    def spec(self, **fields) -> pb.ArraySpec:
        fields.setdefault("array_id", self.client._new_id())
        fields.setdefault("dtype", "float32")
        fields.setdefault("shape", [4])
        fields.setdefault("sharding", pb.Sharding(slice_id=self.slice.slice_id))
        return pb.ArraySpec(**fields)

    def controller_requests(self) -> list[tuple[str, bytes]]:
        sid, victim = self.sid, self.victim
        own = pb.Sharding(slice_id=self.slice.slice_id).SerializeToString()
        session = pb.DeleteArraysRequest(session_id=sid).SerializeToString()  # field 1 only
        cases = [
            ("Connect", pb.ConnectRequest(client_name="n" * NEAR_LIMIT)),
            ("Connect", pb.ConnectRequest(client_name="é" * 257)),
            *[("Connect", pb.ConnectRequest(client_name="w", weight=w))
              for w in (math.nan, math.inf, -math.inf, -1.0, -1e-300)],
            ("Disconnect", pb.DisconnectRequest(session_id=victim.client.session_id)),
            ("Disconnect", pb.DisconnectRequest(session_id=2**64 - 1)),
            ("RegisterHost", pb.RegisterHostRequest(host=pb.HostInfo(
                island=-1, host=2**31 - 1, address="a" * NEAR_LIMIT, num_devices=-5))),
            ("UnregisterHost", pb.UnregisterHostRequest(island=0, host=0, address="x")),
            ("CreateSlice", pb.CreateSliceRequest(session_id=sid, mesh_shape=[2**31 - 1] * 8,
                                                  axis_names=list("abcdefgh"))),
            ("CreateSlice", pb.CreateSliceRequest(session_id=sid, mesh_shape=[-1],
                                                  axis_names=["x"])),
            ("CreateSlice", pb.CreateSliceRequest(session_id=sid, mesh_shape=[1],
                                                  axis_names=["x" * NEAR_LIMIT])),
            ("CreateSlice", pb.CreateSliceRequest(session_id=sid, mesh_shape=[1],
                                                  axis_names=["x"], island=-2**31)),
            ("CreateSlice", pb.CreateSliceRequest(session_id=sid, mesh_shape=[1],
                                                  axis_names=["x"], island=2**31 - 1)),
            ("ReleaseSlice", pb.ReleaseSliceRequest(session_id=sid,
                                                    slice_id=victim.slice.slice_id)),
            ("ReleaseSlice", pb.ReleaseSliceRequest(session_id=sid, slice_id=2**64 - 1)),
            ("LoadExecutable", pb.LoadExecutableRequest(
                session_id=sid, slice_id=self.slice.slice_id, serialized=bytes(15 << 20),
                name="f")),
            ("LoadExecutable", pb.LoadExecutableRequest(
                session_id=sid, slice_id=victim.slice.slice_id, serialized=b"x", name="f")),
            ("LoadExecutable", pb.LoadExecutableRequest(
                session_id=sid, slice_id=self.slice.slice_id, serialized=b"x",
                name="f" * NEAR_LIMIT)),
            ("LoadExecutable", pb.LoadExecutableRequest(
                session_id=sid, slice_id=self.slice.slice_id, serialized=b"x", name="f",
                inputs=[pb.ValueSpec(dtype="float32", shape=[-1, 2**62])],
                donated=[-1, 2**31 - 1])),
            ("RegisterArrays", pb.RegisterArraysRequest(session_id=sid, arrays=[
                self.spec(shape=[2**62]), self.spec(shape=[-1]), self.spec(dtype="q" * 5000)])),
            ("RegisterArrays", pb.RegisterArraysRequest(session_id=sid, arrays=[
                self.spec(array_id=victim.x.id)])),
            ("RegisterArrays", pb.RegisterArraysRequest(session_id=sid, arrays=[
                self.spec(shape=[4] * 33)])),
            ("RegisterArrays", pb.RegisterArraysRequest(session_id=sid, arrays=[self.spec(
                shape=[4], sharding=pb.Sharding(slice_id=victim.slice.slice_id))])),
            ("Execute", pb.ExecuteRequest(session_id=sid, commands=[
                pb.Command(call=pb.Call(executable_id=victim.f.lower(victim.x).executable_id,
                                        inputs=[victim.x.id], outputs=[self.client._new_id()])),
                pb.Command(transfer=pb.TransferCommand(source=victim.x.id,
                                                       destination=self.client._new_id(),
                                                       sharding=pb.Sharding(slice_id=2**63))),
                pb.Command(run=pb.RunProgramCommand(program_id=2**64 - 1)),
                pb.Command(delete=pb.DeleteCommand(array_ids=[victim.x.id, victim.y.id]))])),
            ("RegisterProgram", pb.RegisterProgramRequest(
                session_id=sid, name="p", nodes=[pb.ProgramNode(call=pb.ProgramCall(
                    executable_id=2**64 - 1, inputs=[-5, 2**31 - 1]))], outputs=[-1])),
            ("DeleteArrays", pb.DeleteArraysRequest(session_id=sid,
                                                    array_ids=[victim.x.id, 2**64 - 1])),
        ]
        raw = [(m, r.SerializeToString()) for m, r in cases]
        load = pb.LoadExecutableRequest(session_id=sid, slice_id=self.slice.slice_id,
                                        serialized=b"x", name="f").SerializeToString()
        some_id = 2**41 + 1
        raw += [  # a million entries in one repeated field
            ("CreateSlice", session + packed(2, 1, MILLION)),
            ("LoadExecutable", load + repeated(
                4, pb.ValueSpec(dtype="float32").SerializeToString(), MILLION)),
            ("LoadExecutable", load + _field(4, _field(1, b"f") + packed(2, 1, MILLION))),
            ("RegisterArrays", session + repeated(2, pb.ArraySpec(array_id=1).SerializeToString(),
                                                  MILLION)),
            ("RegisterArrays", session + repeated(2, pb.ArraySpec(
                array_id=1, dtype="float32", sharding=pb.Sharding(
                    slice_id=self.slice.slice_id, dims=[pb.DimSharding(axes=["d"])] * 200)
            ).SerializeToString(), 1) + repeated(2, self.spec().SerializeToString(), 1)),
            ("Execute", session + repeated(2, b"", MILLION)),
            ("Execute", session + _field(2, _field(1, packed(2, some_id, MILLION)))),  # a call
            ("Execute", session + _field(2, _field(4, packed(1, some_id, MILLION)))),  # a delete
            ("RegisterProgram", session + repeated(3, pb.ProgramNode(
                call=pb.ProgramCall(executable_id=1)).SerializeToString(), MILLION)),
            ("RegisterProgram", session + packed(4, 0, MILLION)),
            ("RegisterProgram", session + repeated(2, pb.ValueSpec(
                dtype="float32", sharding=pb.Sharding.FromString(own)).SerializeToString(),
                MILLION)),
            ("DeleteArrays", session + packed(2, some_id, MILLION)),
        ]
        assert all(len(r) < _wire.MAX_MESSAGE_BYTES for _, r in raw)
        return raw

    def worker_requests(self) -> list[tuple[str, bytes, bool]]:
        """(method, request bytes or a list of stream messages, streamed)."""
        victim = self.victim
        declared = self.spec()
        self.client.controller_stub.RegisterArrays(pb.RegisterArraysRequest(session_id=self.sid,
                                                                  arrays=[declared]), timeout=30)

        def header(start, stop, nbytes, positions=(0,), shared=""):
            return pb.ShardHeader(index=pb.ShardIndex(start=start, stop=stop), nbytes=nbytes,
                                  mesh_positions=positions, shared_file=shared)

        streams = [
            [pb.ArrayChunk(spec=declared, shard=header([0], [4], 10**12), data=bytes(16))],
            [pb.ArrayChunk(spec=declared, shard=header([0], [2**40], 4 * 2**40))],
            [pb.ArrayChunk(spec=declared, shard=header([-4], [4], 32))],
            [pb.ArrayChunk(spec=declared, shard=header([0], [4], 16, [0] * 100_000))],
            [pb.ArrayChunk(spec=declared, shard=header([0], [4], 16, [], "../../etc/passwd"))],
            [pb.ArrayChunk(spec=declared, shard=header([0], [4], 16), data=bytes(64))],
            [pb.ArrayChunk(spec=declared, shard=header([0], [4], 16), data=bytes(8))],
            [pb.ArrayChunk(data=bytes(16))],
            [pb.ArrayChunk(spec=self.spec(shape=[2**40]))],  # never announced
            [pb.ArrayChunk(spec=pb.ArraySpec(array_id=victim.x.id, dtype="float32", shape=[16],
                                             sharding=pb.Sharding(
                                                 slice_id=victim.slice.slice_id)))],
            [pb.ArrayChunk(spec=declared, error="e" * NEAR_LIMIT)],
            [],
        ]
        cases = [("PutArray", [c.SerializeToString() for c in s], True) for s in streams]
        cases += [
            ("GetArray", pb.GetArrayRequest(array_id=declared.array_id,
                                            timeout_s=t).SerializeToString(), False)
            for t in (math.nan, math.inf, -1.0)]
        cases += [
            ("GetArray", pb.GetArrayRequest(array_id=victim.x.id,
                                            timeout_s=1).SerializeToString(), False),
            ("GetArray", pb.GetArrayRequest(array_id=declared.array_id, timeout_s=0.2,
                                            after_sequence=2**63 - 1).SerializeToString(), False),
            ("GetArray", pb.GetArrayRequest(array_id=declared.array_id,
                                            timeout_s=0.2).SerializeToString()
             + repeated(2, pb.ShardIndex(start=[0], stop=[4]).SerializeToString(), MILLION),
             False),
            ("GetTimeline", pb.GetTimelineRequest(since=math.nan).SerializeToString(), False),
            ("WatchProgress", pb.WatchProgressRequest(min_interval_s=-1).SerializeToString(),
             False),
            ("Dispatch", pb.DispatchRequest(controller_id="forged").SerializeToString()
             + repeated(2, pb.Instruction(sequence=1).SerializeToString(), MILLION), False),
        ]
        return cases

    def close(self) -> None:
        self.controller_channel.close()
        self.worker_channel.close()
        self.client.close()


@pytest.fixture
def attack(cluster, bystander, monkeypatch):
    monkeypatch.setattr(_dataplane, "ANNOUNCE_TIMEOUT_S", 0.5)
    a = Attack(cluster, bystander)
    yield a
    a.close()


def _code(call) -> tuple[grpc.StatusCode, object]:
    try:
        result = call()
        if hasattr(result, "__next__"):
            for _ in result:
                pass
        return grpc.StatusCode.OK, result
    except grpc.RpcError as err:
        return err.code(), None


def test_every_controller_rpc_refuses_extreme_requests(cluster, bystander, attack):
    bad = []
    for method, raw in attack.controller_requests():
        call = attack.controller_channel.unary_unary(f"/pathways.Controller/{method}")
        code, reply = _code(lambda: call(raw, timeout=60))
        if method == "Execute" and code == grpc.StatusCode.OK:  # judged command by command
            # (the last, a delete of ids the session does not own, is a no-op by design: the
            # bystander's check below shows its arrays are still there)
            results = pb.ExecuteReply.FromString(reply).results[:-1]
            refused = {next(c for c in grpc.StatusCode if c.value[0] == r.code)
                       for r in results}
            if not results or any(not r.error for r in results) or not refused <= REFUSALS:
                bad.append(f"Execute: {results}")
        elif code not in REFUSALS:
            bad.append(f"{method} ({len(raw)} bytes): {code.name}")
    assert not bad, "\n".join(bad)
    bystander.check()
    assert cluster.controller.status_report.status().sessions >= 2


def test_every_worker_rpc_refuses_extreme_requests(cluster, bystander, attack):
    bad = []
    channel = attack.worker_channel
    for method, raw, streamed in attack.worker_requests():
        path = f"/pathways.Worker/{method}"
        if streamed:
            call = lambda: channel.stream_unary(path)(iter(raw), timeout=30)  # noqa: E731
        elif method in ("GetArray", "WatchProgress"):
            call = lambda: channel.unary_stream(path)(raw, timeout=30)  # noqa: E731
        else:
            call = lambda: channel.unary_unary(path)(raw, timeout=30)  # noqa: E731
        code, _ = _code(call)
        if code not in REFUSALS:
            bad.append(f"{method} ({len(raw)} parts/bytes): {code.name}")
    assert not bad, "\n".join(bad)
    bystander.check()
