"""Array bytes arrive bit-exact through both transfer paths (shared-memory segments between
processes of one machine, proto.shm; the gRPC stream otherwise), hosts accept only segments
that are what they claim to be, and a SIGKILLed client leaves no shared memory behind."""

from __future__ import annotations

import dataclasses
import gc
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import grpc
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from proto import bulk as _bulk
from proto import cma as _cma
from proto import pathways_pb2 as pb
from proto import shm as _shm
from proto import same_host as _same_host
from proto import wire as _wire
from proto.errors import FailedPreconditionError, InvalidArgumentError
from runtime.client.array import RemoteArray, put_arrays


#: The bulk channel's puts and reads ("put", "fetch") in the current test (the `path` fixture).
BULK_USED: list[str] = []


#: Reads from and writes into another process's memory (proto.cma) in the current test.
MOVED: list[str] = []


@pytest.fixture(params=["process-memory", "shared-memory", "stream", "bulk"])
def path(request, monkeypatch):
    """The transfer path under test (on this machine by address, or through shared-memory
    segments; gRPC streams, or the bulk channel for every size); yields the sizes of the segments
    taken meanwhile."""
    local = request.param in ("process-memory", "shared-memory")
    monkeypatch.setenv("PATHWAYS_SHARED_MEMORY", "1" if local else "0")
    monkeypatch.setenv("PATHWAYS_PROCESS_MEMORY_READS",
                       "1" if request.param == "process-memory" else "0")
    MOVED.clear()
    for name in ("read", "write_regions"):
        real_move = getattr(_cma, name)
        monkeypatch.setattr(_cma, name, lambda *a, real_move=real_move, name=name, **k: (
            MOVED.append(name), real_move(*a, **k))[1])
    monkeypatch.setattr(_bulk, "SETTINGS", dataclasses.replace(
        _bulk.SETTINGS, bulk_channel=int(request.param == "bulk"), bulk_min_bytes=0))
    BULK_USED.clear()
    for name in ("put", "fetch"):
        real_bulk = getattr(_bulk, name)
        monkeypatch.setattr(_bulk, name, lambda *a, real_bulk=real_bulk, name=name, **k: (
            BULK_USED.append(name), real_bulk(*a, **k))[1])
    taken: list[int] = []
    real = _shm.POOL.take
    monkeypatch.setattr(_shm.POOL, "take", lambda nbytes: taken.append(nbytes) or real(nbytes))
    return request.param, taken


def _special_floats() -> np.ndarray:
    bits = np.array([0x7FC00001, 0xFFC12345, 0x80000000, 0x00000001, 0x7F800000, 0x3F800001,
                     0x7F7FFFFF], np.uint32)  # NaN payloads, -0, a denormal, inf, max
    return bits.view(np.float32)


CASES = {
    "odd-float32": (lambda: np.random.default_rng(1).standard_normal(1001).astype(np.float32), P()),
    "special-floats": (_special_floats, P()),
    "odd-int8-3d": (lambda: np.arange(3 * 5 * 7, dtype=np.int8).reshape(3, 5, 7), P()),
    "bfloat16": (lambda: np.linspace(-3, 3, 13).astype(ml_dtypes.bfloat16), P()),
    "scalar": (lambda: np.array(3.5, np.float32), P()),
    "non-contiguous": (lambda: np.arange(64, dtype=np.float32).reshape(8, 8)[:, ::2], P("x")),
    "transposed": (lambda: np.arange(6 * 4, dtype=np.int32).reshape(6, 4).T, P(None, "x")),
    "big-endian-float32": (lambda: np.arange(12, dtype=">f4").reshape(4, 3) / 7, P("x")),
    "big-endian-int32": (lambda: (np.arange(10, dtype=">i4") - 5) * 1000003, P("x")),
    "empty": (lambda: np.zeros((0,), np.float32), P()),
    "empty-2d": (lambda: np.zeros((4, 0), np.int32), P("x")),
    "sharded-columns": (lambda: np.arange(5 * 6, dtype=np.float32).reshape(5, 6) ** 1.5,
                        P(None, "x")),
}


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


@pytest.mark.parametrize("case", list(CASES))
def test_put_fetch_and_island_copy_are_bit_exact(client, path, case):
    name, taken = path
    make, spec = CASES[case]
    x = make()
    want = np.asarray(x, x.dtype.newbyteorder("="))  # the runtime holds native byte order
    s0, s1 = client.slice({"x": 2}, island=0), client.slice({"x": 2}, island=1)
    put = client.put(x, s0, spec)
    got = put.fetch()
    assert got.dtype == want.dtype and got.shape == want.shape and _bits(got) == _bits(want)
    moved = put.to(s1)
    again = moved.fetch()
    assert again.shape == want.shape and _bits(again) == _bits(want)
    if name == "bulk" and want.nbytes:  # the put, the copy and both fetches: over TCP
        assert BULK_USED.count("put") >= 2 and BULK_USED.count("fetch") >= 2
    else:
        assert BULK_USED == []
    if name == "process-memory" and want.nbytes:
        # The put, the fetches and the copy by address where each shard lies in one piece (the
        # copy's source shards always do: device buffers); through a segment otherwise.
        rows = spec in (P(), P("x"))  # shards of whole rows
        put_direct = rows and (x.flags.c_contiguous or not x.dtype.isnative)
        assert MOVED.count("read") >= 1 + put_direct
        assert MOVED.count("write_regions") >= (2 if rows else 0)
        segments = (not put_direct) + 2 * (not rows)
        assert len(taken) >= segments and set(taken) <= {want.nbytes}
        assert segments or taken == []
    elif name != "shared-memory" or want.nbytes == 0:
        assert taken == [] and MOVED == []  # nothing went through shared memory
    else:  # the put, the fetches and the host-to-host copy each went through a segment
        assert len(taken) >= 4 and set(taken) == {want.nbytes} and MOVED == []


def test_a_fetched_array_is_writable_and_outlives_the_client(cluster, path):
    client = cluster.client("short-lived")
    s = client.slice({"x": 2}, island=0)
    x = np.arange(1 << 16, dtype=np.float32)
    got = client.put(x, s, P("x")).fetch()
    client.close()
    got[0] = -1  # the result is the caller's: writable, and valid after the session ends
    assert got[0] == -1 and np.array_equal(got[1:], x[1:])


def test_a_segment_is_reused_only_after_its_views_are_gone():
    pool = _shm.SegmentPool(max_bytes=1 << 20)
    first = pool.take(4096)
    view = first.array(np.dtype(np.uint8), (4096,))
    view[:] = 7
    first.release_with_views()
    other = pool.take(4096)  # the first is still viewed: a new file
    assert other.reference != first.reference
    del view
    other.discard()
    again = pool.take(4096)  # the first one's view is gone: its file comes back
    assert again.reference == first.reference
    again.discard()
    pool.clear()


def _peer_reference(fd: int, name: str) -> str:
    return f"{os.getpid()}/{fd}/{name}"


def test_open_segment_accepts_only_what_a_segment_reference_names():
    pool = _shm.SegmentPool(max_bytes=0)
    segment = pool.take(64)
    try:
        segment.array(np.dtype(np.uint8), (64,))[:] = np.arange(64, dtype=np.uint8)
        mapping = _shm.open_segment(segment.reference, 64)
        assert bytes(mapping[:4]) == bytes([0, 1, 2, 3])
        mapping.close()
        with pytest.raises(InvalidArgumentError, match="holds 64 bytes"):
            _shm.open_segment(segment.reference, 65)
        pid, fd, name = segment.reference.split("/")
        for bad in ("/etc/passwd", f"{pid}/{fd}", f"{pid}/{fd}/other-{name[9:]}",
                    f"0/{fd}/{name}", f"{pid}/{fd}/{name}/.."):
            with pytest.raises(InvalidArgumentError, match="not a runtime segment reference"):
                _shm.open_segment(bad, 64)
        with tempfile.TemporaryFile() as f:  # a regular file that is not a segment
            f.write(b"\0" * 64)
            f.flush()
            # Refused, as "unreachable": what a peer in another PID namespace would cause too.
            for forged in (f"{pid}/{fd}/pathways-{'0' * 32}", _peer_reference(f.fileno(), name),
                           f"999999999/{fd}/{name}"):
                with pytest.raises(FailedPreconditionError) as info:
                    _shm.open_segment(forged, 64)
                assert _shm.is_unreachable(info.value)
    finally:
        segment.discard()


def _announce(client, s, x: np.ndarray) -> tuple[pb.ArraySpec, int]:
    spec = pb.ArraySpec(array_id=client._new_id(), dtype=_wire.dtype_name(x.dtype),
                        shape=x.shape, sharding=_wire.spec_to_proto(s.slice_id, P()))
    reply = client.call("RegisterArrays", pb.RegisterArraysRequest(session_id=client.session_id,
                                                                  arrays=[spec]))
    return spec, reply.sequence[0]


def test_a_host_refuses_segments_that_are_not_the_announced_array(client):
    s = client.slice({"x": 1}, island=0)
    x = np.arange(16, dtype=np.float32)
    spec, sequence = _announce(client, s, x)
    stub = client.worker_stub(s.info.host_addresses[0])
    index = _wire.index_to_proto(((0, 16),))
    too_big = _shm.POOL.take(x.nbytes * 2)
    try:
        for reference, nbytes in ((too_big.reference, x.nbytes),
                                  ("1/2/pathways-" + "a" * 32 + "x", x.nbytes)):
            header = pb.ShardHeader(index=index, nbytes=nbytes, mesh_positions=[0],
                                    shared_array=reference)
            with pytest.raises(grpc.RpcError) as info:
                stub.PutArray(iter([pb.ArrayChunk(spec=spec, shard=header)]), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        too_big.discard()
    # Nothing was stored and the array may still be put, through shared memory or not.
    put_arrays(client, [x], [spec], [s])
    handle = RemoteArray(client, spec.array_id, x.shape, x.dtype, P(), s, sequence)
    assert np.array_equal(handle.fetch(), x)


#: Ways a host of this machine can fail to reach the client's bytes: (PATHWAYS_PROCESS_MEMORY_READS,
#: the module and function refusing, the error it raises, the set the client marks the host in).
REFUSALS = {
    "segment": ("0", _shm, "open_segment", _shm.SEGMENT_UNREACHABLE, "UNREACHABLE"),  # PID ns
    "memory": ("1", _cma, "_move", _cma.MEMORY_UNREACHABLE, "NOT_READABLE"),  # user, Yama
}


@pytest.mark.parametrize("refusal", list(REFUSALS))
def test_a_host_that_cannot_reach_the_clients_bytes_gets_them_another_way(client, monkeypatch,
                                                                          refusal):
    reads, module, function, message, marked = REFUSALS[refusal]
    monkeypatch.setenv("PATHWAYS_SHARED_MEMORY", "1")
    monkeypatch.setenv("PATHWAYS_PROCESS_MEMORY_READS", reads)
    monkeypatch.setattr(_same_host, marked, set())
    refused = []

    def refuse(*args, **kwargs):
        refused.append(args)
        raise FailedPreconditionError(f"{message}: (test)")

    monkeypatch.setattr(module, function, refuse)
    s = client.slice({"x": 2}, island=0)
    x = np.arange(1000, dtype=np.float32).reshape(10, 100)
    assert np.array_equal(client.put(x, s, P("x")).fetch(), x)
    assert len(refused) == 1  # the put tried once; it and the fetch then went another way
    assert s.info.host_addresses[0] in getattr(_same_host, marked)


_KILLED_CLIENT = textwrap.dedent("""
    import os, sys
    import numpy as np
    import runtime
    from jax.sharding import PartitionSpec as P

    client = runtime.Client(sys.argv[1])
    s = client.slice({"x": 2}, island=0)
    x = np.ones(8 << 20, np.float32)  # 32 MiB
    first = True
    while True:  # until killed, mid-put or mid-fetch
        client.put(x, s, P("x")).fetch()
        if first:
            print("looping", flush=True)
            first = False
""")


def _runtime_memfds(pid: int | str) -> set[str]:
    """Names of the runtime's shared-memory files a process holds open or mapped."""
    names = set()
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            if "/memfd:pathways-" in line:
                names.add(line.split("/memfd:")[1].split()[0])
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/memfd:pathways-"):
            names.add(target[len("/memfd:"):].split()[0])
    return names


def test_a_sigkilled_client_leaves_no_shared_memory_behind(cluster, client):
    env = dict(os.environ, PATHWAYS_TOKEN=cluster.credentials.token, PATHWAYS_SHARED_MEMORY="1")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_CLIENT, cluster.address], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "looping"
        deadline = time.monotonic() + 60
        held: set[str] = set()
        while not held and time.monotonic() < deadline:  # its segments, seen from outside
            held = _runtime_memfds(proc.pid)
        assert held, "the client never held a shared-memory segment"
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    # Its segments had no name in /dev/shm; once the hosts (this process) are done with any
    # transfer it was in, nothing of them is left anywhere.
    assert not any(name in os.listdir("/dev/shm") for name in held)
    deadline = time.monotonic() + 30
    while _runtime_memfds("self") & held and time.monotonic() < deadline:
        # A host call the kill interrupted may leave a view of the mapping in garbage (an
        # exception's traceback) until the collector runs: what counts is what the runtime holds,
        # not when this process last collected.
        gc.collect()
        time.sleep(0.1)
    assert not _runtime_memfds("self") & held
    # The hosts serve on.
    s = client.slice({"x": 2}, island=0)
    x = np.arange(1 << 12, dtype=np.float32)
    assert np.array_equal(client.put(x, s, P("x")).fetch(), x)


_COPYING_CLIENT = textwrap.dedent("""
    import sys
    import numpy as np
    import runtime
    from jax.sharding import PartitionSpec as P

    client = runtime.Client(sys.argv[1], timeout_s=10)
    s0, s1 = client.slice({"x": 2}, island=0), client.slice({"x": 2}, island=1)
    x = client.put(np.ones(8 << 20, np.float32), s0, P("x"))
    print("copying", flush=True)
    while True:  # host to host, until the sending host dies
        try:
            x.to(s1).fetch(timeout=10)
        except Exception:
            pass
""")


@pytest.mark.slow
def test_a_sigkilled_host_leaves_no_shared_memory_behind():
    import runtime

    with runtime.ProcessCluster(islands=2, devices_per_host=2) as cluster:
        sender, receiver = cluster.procs
        env = dict(os.environ, PATHWAYS_TOKEN=cluster.credentials.token,
                   PATHWAYS_SHARED_MEMORY="1")
        proc = subprocess.Popen([sys.executable, "-c", _COPYING_CLIENT, cluster.address],
                                env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "copying"
            deadline = time.monotonic() + 60
            held: set[str] = set()
            while not held and time.monotonic() < deadline:
                held = _runtime_memfds(sender.pid)
            assert held, "the sending host never held a shared-memory segment"
            sender.send_signal(signal.SIGKILL)
            sender.wait(30)
            assert not any(name in os.listdir("/dev/shm") for name in held)
            deadline = time.monotonic() + 30
            while _runtime_memfds(receiver.pid) & held and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _runtime_memfds(receiver.pid) & held
            assert receiver.poll() is None  # the receiving host lives on
        finally:
            proc.kill()
            proc.wait(30)


def test_a_copy_streams_to_every_destination_host_at_once(monkeypatch):
    """A host copying an array to a slice over two hosts sends to both at once (each its own
    shards): neither host's stream waits for the other's; one that fails fails only its own."""
    import threading
    from types import SimpleNamespace

    from runtime.worker import transfers as _transfers

    both_in_flight = threading.Barrier(2, timeout=10)
    streamed = {}

    def stream_put(stub, dest, shards, timeout, address, part):
        streamed[address] = [index for index, _, _ in shards]
        both_in_flight.wait()  # BrokenBarrierError (the copy fails) if they come one by one
        if address == "b:2":
            raise RuntimeError("host b:2 refused it")

    monkeypatch.setattr(_transfers._transfer, "stream_put", stream_put)
    worker = SimpleNamespace(island=0, host=0, address="a:1", credentials=None, _foreign=set())
    transfers = _transfers.Transfers(worker)
    told = []
    monkeypatch.setattr(transfers, "_peer", lambda address: SimpleNamespace(
        PutArray=lambda chunks, timeout: told.append((address, list(chunks)[0].error))))
    info = pb.SliceInfo(slice_id=7, island=1, mesh_shape=[3], axis_names=["x"],
                        devices=[pb.SliceDevice(host=0), pb.SliceDevice(host=0),
                                 pb.SliceDevice(host=1)],
                        host_addresses=["b:1", "b:2"])
    spec = pb.ArraySpec(array_id=5, dtype="float32", shape=[6],
                        sharding=pb.Sharding(slice_id=7, dims=[pb.DimSharding(axes=["x"])]))
    try:
        transfers._stream(np.arange(6, dtype=np.float32),
                          pb.SendInstruction(array_id=4, destination=spec, destination_slice=info))
    finally:
        transfers.stop(5)
    assert streamed == {"b:1": [((0, 2),), ((2, 4),)], "b:2": [((4, 6),)]}
    assert len(told) == 1 and told[0][0] == "b:2" and "refused it" in told[0][1]
