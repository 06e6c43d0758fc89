"""A put over the stream of a sharded array: one stream per shard, all at once (ArrayChunk.parts,
runtime.worker.put_parts), bit-exact; and a host refuses parts that do not add up to the array,
keeping it announced for a put that does."""

from __future__ import annotations

import dataclasses
import threading
import time

import grpc
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from proto import bulk as _bulk
from proto import pathways_pb2 as pb
from proto import transfer as _transfer
from proto import wire as _wire
from runtime.worker import put_parts as _put_parts


@pytest.fixture
def streams_only(monkeypatch):
    """The gRPC stream path (no bulk channel), counting the streams hosts take as parts of a
    put."""
    monkeypatch.setenv("PATHWAYS_SHARED_MEMORY", "0")
    monkeypatch.setattr(_bulk, "SETTINGS", dataclasses.replace(_bulk.SETTINGS, bulk_channel=0))
    parts: list[int] = []
    real = _put_parts.PutParts.put

    def counting(self, first, chunks, timeout):
        parts.append(first.parts)
        return real(self, first, chunks, timeout)

    monkeypatch.setattr(_put_parts.PutParts, "put", counting)
    return parts


def test_a_sharded_put_and_copy_stream_one_shard_per_stream_bit_exact(client, streams_only):
    x = np.random.default_rng(3).standard_normal((1024, 1031)).astype(np.float32)  # ~4 MiB
    s0, s1 = client.slice({"x": 4}, island=0), client.slice({"x": 2}, island=1)
    put = client.put(x, s0, P("x"))
    assert put.fetch().tobytes() == x.tobytes()
    assert streams_only == [4] * 4  # the put: four streams of one shard each
    moved = put.to(s1)
    assert moved.fetch().tobytes() == x.tobytes()
    assert streams_only[4:] == [2, 2]  # the host-to-host copy: two streams, one per shard


def _announce(client, s, shape) -> pb.ArraySpec:
    spec = pb.ArraySpec(array_id=client._new_id(), dtype="float32", shape=shape,
                        sharding=_wire.spec_to_proto(s.slice_id, P("x")))
    client.call("RegisterArrays", pb.RegisterArraysRequest(session_id=client.session_id,
                                                          arrays=[spec]))
    return spec


def _shards(x: np.ndarray, parts: int):
    rows = x.shape[0] // parts
    return [(((i * rows, (i + 1) * rows), (0, x.shape[1])), [i], x[i * rows:(i + 1) * rows])
            for i in range(parts)]


def test_parts_that_do_not_add_up_are_refused_and_the_array_may_be_put_again(cluster, client):
    s = client.slice({"x": 2}, island=0)
    x = np.arange(2 * 1024 * 1024, dtype=np.float32).reshape(2048, 1024)
    spec = _announce(client, s, x.shape)
    stub = client.worker_stub(s.info.host_addresses[0])
    first, second = _shards(x, 2)

    def stream(shards, parts, put, timeout=120):
        return stub.PutArray.future(_wire.iter_chunks(spec, shards, parts, put=put),
                                    timeout=timeout)

    # One of two parts never comes: the put fails at its deadline, nothing is stored.
    with pytest.raises(grpc.RpcError) as info:
        stream([first], 2, put=1, timeout=3).result()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The same shard twice: refused, by both streams, long before their deadlines.
    calls = [stream([first], 2, put=2), stream([first], 2, put=2)]
    for call in calls:
        with pytest.raises(grpc.RpcError) as info:
            call.result()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    # Streams that disagree on the number of parts: refused.
    calls = [stream([first], 2, put=3), stream([second], 3, put=3)]
    for call in calls:
        with pytest.raises(grpc.RpcError):
            call.result()
    # Two puts of one part each: they add up, but are not one put; neither stores the array.
    calls = [stream([first], 2, put=5, timeout=3), stream([second], 2, put=6, timeout=3)]
    for call in calls:
        with pytest.raises(grpc.RpcError) as info:
            call.result()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
    assert not cluster.workers[0].store.ready(spec.array_id)
    # Still announced and empty: a put that adds up stores it.
    calls = [stream([first], 2, put=4), stream([second], 2, put=4)]
    assert sum(call.result(timeout=30).nbytes for call in calls) == x.nbytes
    stored = cluster.workers[0].store.get(spec.array_id, 10)
    assert np.asarray(stored).tobytes() == x.tobytes()


def test_a_put_after_a_failed_one_does_not_join_it(cluster, client, monkeypatch):
    """The failed put's streams may still be finishing on the host when the client, past its
    deadline, puts again: the new streams start a put of their own, not join the failed one."""
    s = client.slice({"x": 2}, island=0)
    x = np.arange(2 * 1024 * 1024, dtype=np.float32).reshape(2048, 1024)
    spec = _announce(client, s, x.shape)
    stub = client.worker_stub(s.info.host_addresses[0])
    first, second = _shards(x, 2)
    real, finishing = _put_parts.PutParts._finish, threading.Event()

    def late_finish(self, array_id, record, deadline):
        finishing.set()
        time.sleep(2)  # the failed put's record outlives its deadline a while
        real(self, array_id, record, deadline)

    monkeypatch.setattr(_put_parts.PutParts, "_finish", late_finish)
    with pytest.raises(grpc.RpcError) as info:
        stub.PutArray(_wire.iter_chunks(spec, [first], 2, put=1), timeout=3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert finishing.wait(30)
    monkeypatch.setattr(_put_parts.PutParts, "_finish", real)
    calls = [stub.PutArray.future(_wire.iter_chunks(spec, [shard], 2, put=2), timeout=120)
             for shard in (first, second)]
    assert sum(call.result(timeout=120).nbytes for call in calls) == x.nbytes
    stored = cluster.workers[0].store.get(spec.array_id, 10)
    assert np.asarray(stored).tobytes() == x.tobytes()


def test_a_host_that_takes_one_stream_gets_one():
    class OneStreamHost:
        def __init__(self):
            self.calls = []

        def PutArray(self, chunks, timeout):
            chunks = list(chunks)
            self.calls.append(chunks[0].parts)
            if chunks[0].parts > 1:
                raise _OneStreamError()
            return pb.PutArrayReply(nbytes=sum(len(c.data) for c in chunks))

    class _OneStreamError(Exception):
        def __str__(self):
            return _transfer.ONE_STREAM_ONLY

    x = np.zeros((1024, 2048), np.float32)
    host = OneStreamHost()
    spec = pb.ArraySpec(array_id=1, dtype="float32", shape=x.shape)
    _transfer.stream_put(host, spec, _shards(x, 2), timeout=10)
    assert host.calls == [2, 2, 0]
    _transfer.stream_put(host, spec, _shards(x, 2), timeout=10)  # remembered
    assert host.calls == [2, 2, 0, 0]
