"""Transfers by address between processes of one machine (proto.cma): bytes read from and written
into another process's memory, only the memory of the process that asked, and clear errors for
anything else."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import grpc
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from proto import cma as _cma
from proto import pathways_pb2 as pb
from proto import shm as _shm
from proto import wire as _wire
from proto.errors import FailedPreconditionError, InvalidArgumentError
from runtime.client.array import RemoteArray, put_arrays
from test_transfer import _announce

pytestmark = pytest.mark.skipif(not _cma.available(), reason="no cross-memory attach here")

#: A peer process: an array of known bytes, its identity and the array's address on stdout; then
#: waits for a line, and prints the array's bytes as they are then (after the test wrote them).
_PEER = textwrap.dedent("""
    import sys
    import numpy as np
    from proto import cma
    a = np.arange(1 << 16, dtype=np.float32).reshape(256, 256)
    print(cma.identity(), a.ctypes.data, flush=True)
    sys.stdin.readline()
    print(float(a[:8].sum()), float(a[8:].sum()), flush=True)
""")


@pytest.fixture
def peer():
    proc = subprocess.Popen([sys.executable, "-c", _PEER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        reference, address = proc.stdout.readline().split()
        yield proc, reference, int(address)
    finally:
        proc.kill()
        proc.wait(30)


def test_bytes_are_read_from_and_written_into_the_peer_that_named_them(peer):
    proc, reference, address = peer
    assert _cma.holder(reference) == proc.pid
    want = np.arange(1 << 16, dtype=np.float32).reshape(256, 256)
    got = np.empty_like(want)
    _cma.read(reference, address, got)  # one call, and several threads' worth
    assert np.array_equal(got, want)
    rows = np.empty((3, 256), np.float32)
    _cma.read(reference, address + 5 * 256 * 4, rows)
    assert np.array_equal(rows, want[5:8])
    # Rows 0-7 written to zeros; their headers say where they went.
    headers = _cma.write_regions(reference, address, want.shape, want.dtype,
                                 [(((0, 8), (0, 256)), np.zeros((8, 256), np.float32))])
    assert [h.shard.process_address for h in headers] == [address]
    assert headers[0].shard.process_segment == reference and headers[0].shard.nbytes == 8 * 1024
    proc.stdin.write("\n")
    proc.stdin.flush()
    first, rest = map(float, proc.stdout.readline().split())
    assert first == 0.0 and rest == float(want[8:].sum())


def test_what_cannot_be_reached_is_refused_with_a_clear_error(peer):
    proc, reference, address = peer
    target = np.empty(16, np.float32)
    with pytest.raises(InvalidArgumentError, match="cannot be reached"):
        _cma.read(reference, 4096, target)  # nothing is mapped there
    with pytest.raises(InvalidArgumentError, match="not contiguous"):
        _cma.write_regions(reference, address, (256, 256), np.float32,
                           [(((0, 256), (0, 8)), np.zeros((256, 8), np.float32))])
    with pytest.raises(ValueError, match="contiguous"):
        _cma.read(reference, address, np.empty((4, 4), np.float32)[:, ::2])
    pid, fd, name = reference.split("/")
    for forged in (f"{pid}/{fd}/pathways-{'0' * 32}", f"{os.getpid()}/{fd}/{name}"):
        with pytest.raises(FailedPreconditionError) as info:  # not the file it names
            _cma.read(forged, address, target)
        assert _cma.is_unreachable(info.value)
    with pytest.raises(InvalidArgumentError, match="not a runtime segment reference"):
        _cma.read(f"{pid}/{fd}", address, target)
    proc.kill()
    proc.wait(30)
    with pytest.raises(FailedPreconditionError) as info:  # the peer is gone
        _cma.read(reference, address, target)
    assert _cma.is_unreachable(info.value)


def test_a_host_refuses_addresses_it_cannot_read_and_serves_on(client, peer, monkeypatch):
    monkeypatch.setenv("PATHWAYS_SHARED_MEMORY", "1")
    monkeypatch.setenv("PATHWAYS_PROCESS_MEMORY_READS", "1")
    proc, reference, address = peer
    s = client.slice({"x": 1}, island=0)
    x = np.arange(16, dtype=np.float32)
    spec, sequence = _announce(client, s, x)
    stub = client.worker_stub(s.info.host_addresses[0])
    index = _wire.index_to_proto(((0, 16),))
    cases = (
        (_cma.identity(), 4096, grpc.StatusCode.INVALID_ARGUMENT),  # nothing mapped there
        ("1/2/pathways-" + "a" * 32 + "x", x.ctypes.data, grpc.StatusCode.INVALID_ARGUMENT),
        # Another process's memory, named with this process's word: not the file it names.
        (f"{os.getpid()}/{reference.split('/')[1]}/{reference.split('/')[2]}", address,
         grpc.StatusCode.FAILED_PRECONDITION),
    )
    for identity, where, code in cases:
        header = pb.ShardHeader(index=index, nbytes=x.nbytes, mesh_positions=[0],
                                process_address=where, process_segment=identity)
        with pytest.raises(grpc.RpcError) as info:
            stub.PutArray(iter([pb.ArrayChunk(spec=spec, shard=header)]), timeout=30)
        assert info.value.code() == code
    # Nothing was stored and the array may still be put, by address.
    put_arrays(client, [x], [spec], [s])
    handle = RemoteArray(client, spec.array_id, x.shape, x.dtype, P(), s, sequence)
    assert np.array_equal(handle.fetch(), x)
    # A read into memory that is not there is refused; the array stays readable.
    request = pb.GetArrayRequest(array_id=spec.array_id, timeout_s=30, process_address=4096,
                                 process_segment=_cma.identity())
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GetArray(request, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert np.array_equal(handle.fetch(), x)


def test_a_read_by_address_of_shards_cut_across_rows_is_refused(client, monkeypatch):
    monkeypatch.setenv("PATHWAYS_SHARED_MEMORY", "1")
    s = client.slice({"x": 2}, island=0)
    want = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    x = client.put(want, s, P(None, "x"))  # columns: no shard is one run of the array's bytes
    out = np.empty_like(want)
    request = pb.GetArrayRequest(array_id=x.id, timeout_s=30, process_address=out.ctypes.data,
                                 process_segment=_cma.identity())
    stub = client.worker_stub(s.info.host_addresses[0])
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GetArray(request, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not contiguous" in info.value.details()
    assert np.array_equal(x.fetch(), want)  # the client itself goes through a segment


def test_a_host_writes_a_fetch_only_into_the_process_that_asked(client, peer, monkeypatch):
    monkeypatch.setenv("PATHWAYS_SHARED_MEMORY", "1")
    proc, reference, address = peer
    s = client.slice({"x": 2}, island=0)
    x = client.put(np.ones((256, 256), np.float32), s, P("x"))
    stub = client.worker_stub(s.info.host_addresses[0])
    pid, fd, name = reference.split("/")
    request = pb.GetArrayRequest(array_id=x.id, timeout_s=30, process_address=address,
                                 process_segment=f"{os.getpid()}/{fd}/{name}")
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GetArray(request, timeout=30))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    proc.stdin.write("\n")
    proc.stdin.flush()
    first, _ = map(float, proc.stdout.readline().split())
    assert first == float(np.arange(8 * 256).sum())  # untouched
    assert np.array_equal(x.fetch(), np.ones((256, 256), np.float32))


def test_identity_is_one_segment_for_the_process_life():
    assert _cma.identity() == _cma.identity()
    assert _cma.holder(_cma.identity()) == os.getpid()
    local, size = _shm.open_peer_file(_cma.identity())
    os.close(local)
    assert size == 1


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # the child only writes and exits
def test_a_forked_child_names_an_identity_of_its_own():
    parent = _cma.identity()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its identity must name itself, not the parent
        try:
            os.write(write, _cma.identity().encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read()
    os.waitpid(pid, 0)
    assert child.startswith(f"{pid}/") and child != parent
    assert _cma.identity() == parent

