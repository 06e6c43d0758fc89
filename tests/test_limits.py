"""Requests at and past the runtime's limits (proto.limits, runtime.controller.placement): what is
accepted still fits everything derived from it, what is not gets INVALID_ARGUMENT or
RESOURCE_EXHAUSTED naming the field and the bound, numbers must be finite and non-negative, and
arrays must fit their devices. After each hostile request a bystander's work and the cluster's
status are unaffected."""

from __future__ import annotations

import math
import threading

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proto import pathways_pb2 as pb
from proto import limits as _limits
from proto import wire as _wire
from proto.errors import InvalidArgumentError, ResourceExhaustedError

LIMITS = _limits.DEFAULT


@pytest.fixture
def attacker(cluster):
    client = cluster.client("attacker")
    yield client
    client.close()


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def _spec(slice_id: int, shape, dtype: str = "float32", array_id: int = 0, dims=()) -> pb.ArraySpec:
    return pb.ArraySpec(array_id=array_id, dtype=dtype, shape=shape,
                        sharding=pb.Sharding(slice_id=slice_id,
                                             dims=[pb.DimSharding(axes=a) for a in dims]))


def _exported(shape=(4,)) -> bytes:
    fn = jax.jit(lambda v: (v + 1,))
    return bytes(jax.export.export(fn)(jax.ShapeDtypeStruct(shape, jnp.float32)).serialize())


def _load(attacker, s, serialized: bytes, name: str = "f", shape=(4,)) -> pb.LoadExecutableRequest:
    value = pb.ValueSpec(dtype="float32", shape=shape, sharding=pb.Sharding(slice_id=s.slice_id))
    return pb.LoadExecutableRequest(session_id=attacker.session_id, slice_id=s.slice_id,
                                    serialized=serialized, name=name, inputs=[value],
                                    outputs=[value])


# -- 1. every field bounded, so whatever is accepted fits what is derived from it ----------------


def test_near_limit_executable_name_is_refused_and_the_island_lives_on(cluster, bystander,
                                                                      attacker):
    s = attacker.slice({"d": 1}, island=0)
    request = _load(attacker, s, _exported(), name="n" * (_wire.MAX_MESSAGE_BYTES - 4096))
    code, details = _code(lambda: attacker.controller_stub.LoadExecutable(request, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "executable name" in details
    bystander.check()


def test_an_accepted_executable_just_under_the_limit_reaches_its_hosts(cluster, bystander,
                                                                       attacker):
    """A module padded (trailing bytes are legal) to just under the request limit is accepted,
    forwarded in a load instruction of its own, compiled and run; one byte more is refused."""
    s = attacker.slice({"d": 1}, island=0)
    module = _exported()
    request = _load(attacker, s, module)
    request.serialized = module + bytes(LIMITS.executable_request_bytes - request.ByteSize() - 8)
    assert request.ByteSize() <= LIMITS.executable_request_bytes
    reply = attacker.controller_stub.LoadExecutable(request, timeout=60)
    x = attacker.put(np.zeros(4, np.float32), s)
    y = attacker._new_id()
    result = attacker.controller_stub.Execute(pb.ExecuteRequest(session_id=attacker.session_id, commands=[
        pb.Command(call=pb.Call(executable_id=reply.executable_id, inputs=[x.id], outputs=[y]))]),
        timeout=30).results[0]
    assert not result.error, result.message
    worker = attacker.worker_stub(s.info.host_addresses[0])
    chunks = worker.GetArray(pb.GetArrayRequest(array_id=y, timeout_s=60,
                                                after_sequence=result.sequence[0]), timeout=60)
    _, shards = _wire.assemble_chunks(chunks, np.dtype(np.float32))
    np.testing.assert_array_equal(shards[0].data, np.ones(4, np.float32))

    request.serialized += bytes(1 << 10)
    code, details = _code(lambda: attacker.controller_stub.LoadExecutable(request, timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "over the limit" in details
    bystander.check()


def test_near_limit_axis_names_are_refused_and_status_keeps_working(cluster, bystander,
                                                                    attacker):
    stub = attacker.controller_stub
    huge = pb.CreateSliceRequest(session_id=attacker.session_id, mesh_shape=[1],
                                 axis_names=["a" * (_wire.MAX_MESSAGE_BYTES - 4096)], island=0)
    code, details = _code(lambda: stub.CreateSlice(huge, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "axis name" in details
    # At the limits: 8 axes of 64 characters. Accepted, and every status still fits.
    names = [chr(ord("a") + i) * LIMITS.axis_name_chars for i in range(LIMITS.mesh_rank)]
    stub.CreateSlice(pb.CreateSliceRequest(session_id=attacker.session_id,
                                           mesh_shape=[1] * LIMITS.mesh_rank, axis_names=names,
                                           island=0), timeout=30)
    for request, what in ((pb.CreateSliceRequest(session_id=attacker.session_id,
                                                 mesh_shape=[1] * 9, axis_names=list("abcdefghi")),
                           "mesh shape"),
                          (pb.CreateSliceRequest(session_id=attacker.session_id, mesh_shape=[1],
                                                 axis_names=["x"], island=-7), "island")):
        code, details = _code(lambda: stub.CreateSlice(request, timeout=30))
        assert code in (grpc.StatusCode.INVALID_ARGUMENT,
                        grpc.StatusCode.RESOURCE_EXHAUSTED) and what in details, details
    bystander.check()


def test_a_session_holds_a_bounded_number_of_slices(cluster, bystander, attacker):
    for _ in range(LIMITS.slices_per_session):
        attacker.slice({"d": 1}, island=1)
    with pytest.raises(ResourceExhaustedError, match="slices, its limit"):
        attacker.slice({"d": 1}, island=1)
    mine = [x for x in attacker.status().slices if x.island == 1]
    assert len(mine) == LIMITS.slices_per_session
    bystander.check()


def test_long_client_names_are_refused(cluster):
    import runtime

    with pytest.raises(InvalidArgumentError, match="client name"):
        runtime.Client(cluster.address, name="n" * (LIMITS.name_chars + 1),
                       credentials=cluster.credentials)


# -- 2. linear, bounded work per request ------------------------------------------------------


def test_array_declarations_are_bounded_and_checked_in_linear_time(cluster, bystander, attacker):
    s = attacker.slice({"d": 1}, island=0)
    stub = attacker.controller_stub
    base = attacker._new_id() + 1

    def declare(n: int, duplicate: bool = False):
        ids = [base + i for i in range(n)]
        if duplicate:
            ids[-1] = ids[0]
        return pb.RegisterArraysRequest(session_id=attacker.session_id,
                                        arrays=[_spec(s.slice_id, [1], array_id=i) for i in ids])

    code, details = _code(lambda: stub.RegisterArrays(declare(12_000), timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "arrays: 12000 entries" in details
    code, details = _code(lambda: stub.RegisterArrays(
        declare(LIMITS.arrays_per_request, duplicate=True), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "declared twice" in details

    # The largest declaration allowed, while the bystander works: it does not wait for it.
    done = threading.Event()
    errors = []

    def big():
        try:
            reply = stub.RegisterArrays(declare(LIMITS.arrays_per_request), timeout=60)
            assert len(reply.sequence) == LIMITS.arrays_per_request
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=big)
    thread.start()
    bystander.check()
    thread.join(60)
    assert done.is_set() and not errors, errors
    bystander.check()


def test_a_million_ids_in_one_request_are_refused_at_the_door(cluster, bystander, attacker):
    stub = attacker.controller_stub
    ids = range(attacker._new_id(), attacker._new_id() + 1_000_000)
    code, details = _code(lambda: stub.DeleteArrays(pb.DeleteArraysRequest(
        session_id=attacker.session_id, array_ids=ids), timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "array ids" in details
    code, details = _code(lambda: stub.Execute(pb.ExecuteRequest(
        session_id=attacker.session_id, commands=[pb.Command(delete=pb.DeleteCommand(
            array_ids=ids))]), timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "array ids" in details
    code, _ = _code(lambda: stub.Execute(pb.ExecuteRequest(
        session_id=attacker.session_id, commands=[pb.Command()] * 100_000), timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    bystander.check()


# -- 3. numbers: finite and non-negative wherever they arrive -----------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
def test_bad_timeouts_intervals_and_weights_are_refused(cluster, bystander, attacker, value):
    s = attacker.slice({"d": 1}, island=0)
    pending = _spec(s.slice_id, [4], array_id=attacker._new_id())
    attacker.controller_stub.RegisterArrays(pb.RegisterArraysRequest(session_id=attacker.session_id,
                                                           arrays=[pending]), timeout=30)
    worker = attacker.worker_stub(s.info.host_addresses[0])
    calls = [
        lambda: list(worker.GetArray(pb.GetArrayRequest(array_id=pending.array_id,
                                                        timeout_s=value), timeout=10)),
        lambda: worker.GetTimeline(pb.GetTimelineRequest(since=value), timeout=10),
        lambda: attacker.controller_stub.Connect(pb.ConnectRequest(client_name="w", weight=value),
                                       timeout=10),
    ]
    for call in calls:
        code, details = _code(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "finite" in details, details
    bystander.check()


def test_a_host_refuses_a_nan_wait_whatever_reaches_it(cluster):
    worker = cluster.workers[0]
    with pytest.raises(InvalidArgumentError, match="finite"):
        worker.store.get(12345, math.nan)
    with pytest.raises(InvalidArgumentError, match="finite"):
        worker.wait_received(10**9, math.nan)


# -- 4. impossible shapes: refused at registration with their sizes ----------------------------


def test_arrays_that_cannot_fit_their_devices_are_refused_with_their_sizes(cluster, bystander,
                                                                            attacker):
    s = attacker.slice({"d": 2}, island=0)
    stub = attacker.controller_stub

    def register(shape, dtype="float32", dims=()):
        return lambda: stub.RegisterArrays(pb.RegisterArraysRequest(
            session_id=attacker.session_id,
            arrays=[_spec(s.slice_id, shape, dtype, attacker._new_id(), dims)]), timeout=30)

    code, details = _code(register([1_000_000, 1_000_000]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "4000000000000 bytes on each device" in details and "bytes each" in details
    code, details = _code(register([2**62], "int8"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and str(2**62) in details
    code, details = _code(register([2**61], "int8", dims=[["d"]]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and f"{2**60} bytes" in details
    # A computation whose output cannot fit: refused when it is loaded.
    huge = attacker.jit(lambda: jnp.zeros((1 << 20, 1 << 20), jnp.float32), s)
    with pytest.raises(ResourceExhaustedError, match="bytes on each device"):
        huge()
    bystander.check()


def test_what_a_session_holds_is_bounded(cluster, bystander, attacker, monkeypatch):
    """Arrays and executable bytes per session (shrunk here): past them RESOURCE_EXHAUSTED for
    that session alone."""
    import dataclasses

    small = dataclasses.replace(LIMITS, arrays_per_session=3, executable_bytes_per_session=4096)
    monkeypatch.setattr(cluster.controller, "limits", small)
    monkeypatch.setattr(cluster.controller.planner, "limits", small)
    monkeypatch.setattr(cluster.controller.catalog, "limits", small)
    s = attacker.slice({"d": 1}, island=0)
    attacker.put(np.zeros((3, 4), np.float32), s)
    attacker.put(np.zeros((2, 4), np.float32), s)
    with pytest.raises(ResourceExhaustedError, match="arrays, over its limit of 3"):
        attacker.put([np.zeros(4, np.float32)] * 2, s)
    request = _load(attacker, s, _exported() + bytes(8192))
    code, details = _code(lambda: attacker.controller_stub.LoadExecutable(request, timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "bytes of executables" in details
    monkeypatch.undo()
    bystander.check()
