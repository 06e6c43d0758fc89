"""Hostile input: malformed, truncated, oversized and nonsensical requests to the controller and a
worker get canonical status codes (never INTERNAL or UNKNOWN), and both servers go on serving:
arrays stored before the barrage are intact and new computations give correct results."""

from __future__ import annotations

import collections
import random

import grpc
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from proto import pathways_pb2 as pb
from proto import rpc as _rpc
from proto import wire as _wire

#: Requests sent to each of the two servers.
REQUESTS_PER_SERVER = 5_000
#: Requests in flight at once.
WINDOW = 48
#: Codes a server may answer hostile input with.
ACCEPTABLE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.PERMISSION_DENIED,
              grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.ALREADY_EXISTS,
              grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
#: Methods left out of the barrage: a stream that never ends by design.
SKIP = {"WatchProgress"}

_INTS = [0, 1, 2, 3, 7, -1, -2, 2**31 - 1, -2**31, 2**62, -2**62, 2**63 - 1, -2**63]
_STRINGS = ["", "float32", "int32", "bfloat16", "bogus", "x", "data", "model", "\x00", "é" * 3,
            "a" * 2000, "127.0.0.1:1", "cpu"]


def _methods(service: str):
    desc = pb.DESCRIPTOR.services_by_name[service]
    for m in desc.methods:
        if m.name not in SKIP:
            yield m.name, getattr(pb, m.input_type.name), m.client_streaming, m.server_streaming


class Fuzzer:
    """Makes hostile requests: random bytes, truncated or bit-flipped valid messages, and well-formed
    messages whose fields hold hostile values mixed with ids that exist (so checks past parsing run)."""

    def __init__(self, seed: int, known_ints: list[int]) -> None:
        self.rng = random.Random(seed)
        self.known = known_ints

    def value(self, field):
        rng, t = self.rng, field.type
        F = field
        if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32, F.TYPE_ENUM):
            v = rng.choice(_INTS + self.known + [rng.randint(-5, 40)])
            return max(-2**31, min(2**31 - 1, v))
        if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
            return abs(rng.choice(_INTS + self.known)) % 2**32
        if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
            return max(-2**63, min(2**63 - 1, rng.choice(_INTS + self.known + [rng.randint(-5, 40)])))
        if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
            return abs(rng.choice(_INTS + self.known + self.known)) % 2**64
        if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
            return rng.choice([0.0, -1.0, 1e308, float("nan"), float("inf"), -float("inf"), 0.5,
                               3600.0, 1e-9])
        if t == F.TYPE_BOOL:
            return rng.random() < 0.5
        if t == F.TYPE_STRING:
            return rng.choice(_STRINGS)
        if t == F.TYPE_BYTES:
            return rng.randbytes(rng.choice([0, 1, 7, 64, 1000]))
        raise AssertionError(t)

    def fill(self, message, depth: int = 0) -> None:
        rng = self.rng
        for field in message.DESCRIPTOR.fields:
            if rng.random() < 0.35:
                continue
            repeated = field.is_repeated
            count = rng.choice([0, 1, 1, 2, 3, 5, 40]) if repeated else 1
            if field.type == field.TYPE_MESSAGE:
                if depth > 4:
                    continue
                for _ in range(count):
                    child = (getattr(message, field.name).add() if repeated
                             else getattr(message, field.name))
                    self.fill(child, depth + 1)
            elif repeated:
                getattr(message, field.name).extend(self.value(field) for _ in range(count))
            else:
                setattr(message, field.name, self.value(field))

    def request(self, cls) -> bytes:
        rng = self.rng
        kind = rng.random()
        if kind < 0.2:  # noise
            return rng.randbytes(rng.choice([1, 2, 5, 17, 100, 999]))
        message = cls()
        self.fill(message)
        raw = message.SerializeToString()
        if kind < 0.35 and raw:  # truncated
            return raw[:rng.randrange(len(raw))]
        if kind < 0.5 and raw:  # bit flips
            buf = bytearray(raw)
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
            return bytes(buf)
        return raw


def _send(channel: grpc.Channel, service: str, fuzzer: Fuzzer, n: int) -> collections.Counter:
    """Sends `n` hostile requests to `service`'s methods, WINDOW at a time; counts the codes."""
    methods = list(_methods(service))
    codes: collections.Counter = collections.Counter()
    bad: list[str] = []

    def settle(kind, call, name):
        try:
            if kind == "stream":
                for _ in call:  # a few messages at most: the deadline is short
                    pass
            else:
                call.result()
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()
            if code not in ACCEPTABLE and len(bad) < 8:
                bad.append(f"{name}: {code.name} {err.details()}")
        codes[code] += 1

    pending = collections.deque()
    for i in range(n):
        name, cls, client_streaming, server_streaming = methods[i % len(methods)]
        path = f"/pathways.{service}/{name}"
        timeout = 2.0
        if client_streaming:
            requests = [fuzzer.request(cls) for _ in range(fuzzer.rng.choice([0, 1, 2, 3]))]
            kind = "future"
            call = channel.stream_unary(path).future(iter(requests), timeout=timeout)
        elif server_streaming:
            call = channel.unary_stream(path)(fuzzer.request(cls), timeout=timeout)
            kind = "stream"
        else:
            call = channel.unary_unary(path).future(fuzzer.request(cls), timeout=timeout)
            kind = "future"
        pending.append((kind, call, name))
        if len(pending) >= WINDOW:
            settle(*pending.popleft())
    while pending:
        settle(*pending.popleft())
    assert not bad, f"{service} answered hostile input badly:\n" + "\n".join(bad)
    return codes


@pytest.fixture
def cluster():
    """A cluster of its own: the barrage must not touch the session-wide one."""
    import runtime

    with runtime.LocalCluster(islands=2, devices_per_island=2) as c:
        yield c


def test_fuzz_controller_and_worker_keep_serving(cluster):
    """5,000 hostile requests to the controller and 5,000 to a worker; then the victim's arrays are
    intact and new work is correct."""
    victim = cluster.client("victim")
    s = victim.slice((2,), ("x",), island=0)
    data = np.arange(64, dtype=np.float32).reshape(8, 8)
    stored = victim.put(data, s, P("x"))
    double = victim.jit(lambda a: a * 2, s, in_specs=P("x"), out_specs=P("x"))
    twice = double(stored)
    np.testing.assert_array_equal(twice.fetch(), data * 2)

    attacker = cluster.client("attacker")
    known = [attacker.session_id, victim.session_id, s.slice_id, stored.id,
             twice.id, stored.id + 1, 0, 1]
    worker_address = s.info.host_addresses[0]
    # What a client of the cluster presents (the token, if the cluster has one; its session).
    metadata = attacker._call_metadata()
    credentials = cluster.credentials
    with _rpc.open_channel(cluster.address, credentials, metadata) as controller_channel, \
            _rpc.open_channel(worker_address, credentials, metadata) as worker_channel:
        codes = _send(controller_channel, "Controller", Fuzzer(1, known), REQUESTS_PER_SERVER)
        codes += _send(worker_channel, "Worker", Fuzzer(2, known), REQUESTS_PER_SERVER)
        # Oversized: past the servers' message limit.
        huge = b"\x1a" + b"\xff" * (_wire.MAX_MESSAGE_BYTES + 1024)
        for channel, path in ((controller_channel, "/pathways.Controller/LoadExecutable"),
                              (worker_channel, "/pathways.Worker/Dispatch")):
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary(path)(huge, timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sum(codes.values()) == 2 * REQUESTS_PER_SERVER
    assert codes[grpc.StatusCode.INVALID_ARGUMENT] > 1000, codes

    np.testing.assert_array_equal(stored.fetch(), data)
    np.testing.assert_array_equal(twice.fetch(), data * 2)
    np.testing.assert_array_equal(double(stored).fetch(), data * 2)
    other = victim.put(np.ones((4, 4), np.int32), victim.slice((2,), ("x",), island=1))
    np.testing.assert_array_equal(other.fetch(), np.ones((4, 4), np.int32))
    attacker.close()


def test_shard_header_outside_the_array_is_refused_before_allocating():
    from proto.errors import InvalidArgumentError

    spec = pb.ArraySpec(array_id=1, dtype="float32", shape=[4])
    for start, stop in (((0,), (2**40,)), ((-1,), (2,)), ((3,), (2,)), ((0, 0), (1, 1))):
        header = pb.ShardHeader(index=pb.ShardIndex(start=start, stop=stop),
                                nbytes=4 * (stop[0] - start[0]))
        with pytest.raises(InvalidArgumentError, match="outside"):
            _wire.assemble_chunks([pb.ArrayChunk(spec=spec, shard=header)])
