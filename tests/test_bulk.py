"""The bulk channel (proto.bulk, runtime.worker.bulk): array bytes over plain TCP behind tickets
drawn on the gRPC control plane. A connection must present a live ticket of its host and the
shard's exact byte count; anything else is closed, the transfer's call says what went wrong and
the host goes on serving. A peer that goes away or stalls mid-transfer fails it by its deadline,
and no half-written array is ever stored. (Bit-exact round trips over the channel: test_transfer's
`bulk` path.)"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from certs import needs_openssl, self_signed
from proto import bulk as _bulk
from proto import pathways_pb2 as pb
from proto import wire as _wire
from proto.config import TransferConfig
from proto.errors import (DeadlineExceededError, HostLostError, InvalidArgumentError,
                          PathwaysError)
from runtime.worker.bulk import BulkListener


@pytest.fixture
def listener():
    config = dataclasses.replace(TransferConfig(), bulk_header_s=1.5, bulk_ticket_s=3.0)
    running = BulkListener("127.0.0.1", config)
    yield running
    running.stop()


def _present(port: int, ticket: bytes, nbytes: int, magic: bytes = _bulk.MAGIC) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(_bulk.HEADER.pack(magic, ticket, nbytes))
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the host closed `sock` within `seconds` (without sending anything)."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    finally:
        sock.close()


def _expect(listener: BulkListener, nbytes: int, deadline_s: float = 5.0):
    incoming = listener.incoming(time.monotonic() + deadline_s, "a test put")
    ticket = _bulk.new_ticket()
    return incoming, ticket, incoming.expect(ticket, nbytes)


def test_a_valid_ticket_moves_the_bytes_into_the_buffer(listener):
    data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8)
    incoming, ticket, buffer = _expect(listener, data.nbytes)
    with incoming:
        sock = _present(listener.port, ticket, data.nbytes)
        sock.sendall(memoryview(data))
        incoming.wait()
        sock.close()
    assert buffer.tobytes() == data.tobytes()


def test_a_wrong_ticket_is_closed_and_the_listener_keeps_serving(listener):
    incoming, ticket, buffer = _expect(listener, 16)
    with incoming:
        wrong = bytes(b ^ 1 for b in ticket)  # one bit off
        assert _closed_within(_present(listener.port, wrong, 16), 6.0)
        assert _closed_within(_present(listener.port, ticket, 16, magic=b"HTTP"), 3.0)
        sock = _present(listener.port, ticket, 16)  # the real one still works
        sock.sendall(b"x" * 16)
        incoming.wait()
        sock.close()
    assert buffer.tobytes() == b"x" * 16


def test_a_used_ticket_is_refused_at_once(listener):
    incoming, ticket, _ = _expect(listener, 4)
    with incoming:
        sock = _present(listener.port, ticket, 4)
        sock.sendall(b"abcd")
        incoming.wait()
        sock.close()
    started = time.monotonic()
    assert _closed_within(_present(listener.port, ticket, 4), 3.0)
    assert time.monotonic() - started < 1.0  # known as used: no bulk_header_s wait for it


@pytest.mark.parametrize("announced", [99, 101, 0])
def test_a_wrong_byte_count_fails_the_transfer(listener, announced):
    incoming, ticket, _ = _expect(listener, 100)
    with pytest.raises(InvalidArgumentError, match=f"announced {announced} bytes, the shard "
                                                   f"has 100"):
        with incoming:
            sock = _present(listener.port, ticket, announced)
            assert _closed_within(sock, 3.0)
            incoming.wait()


def test_an_expired_ticket_is_refused(listener):
    config = dataclasses.replace(listener.config, bulk_ticket_s=0.2)
    short = BulkListener("127.0.0.1", config)
    try:
        incoming, ticket, _ = _expect(short, 8)
        with pytest.raises(DeadlineExceededError, match="expired|presented its ticket"):
            with incoming:
                time.sleep(0.4)
                assert _closed_within(_present(short.port, ticket, 8), 3.0)
                incoming.wait()
    finally:
        short.stop()


def test_no_connection_fails_by_the_ticket_lifetime(listener):
    incoming, _, _ = _expect(listener, 8, deadline_s=30.0)
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError, match="no connection presented its ticket"):
        with incoming:
            incoming.wait()
    assert time.monotonic() - started < 15.0  # bulk_ticket_s (3 s), not the call's 30 s


def test_a_peer_closing_mid_transfer_fails_it(listener):
    incoming, ticket, _ = _expect(listener, 1 << 20)
    with pytest.raises(HostLostError, match="closed the connection after 1000 of 1048576"):
        with incoming:
            sock = _present(listener.port, ticket, 1 << 20)
            sock.sendall(b"y" * 1000)
            time.sleep(0.1)
            sock.close()
            incoming.wait()


def test_a_stalled_peer_fails_by_the_deadline_and_is_cut_off(listener):
    incoming, ticket, buffer = _expect(listener, 1 << 20, deadline_s=1.0)
    sock = _present(listener.port, ticket, 1 << 20)
    sock.sendall(b"z" * 1000)
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        with incoming:
            incoming.wait()
    assert time.monotonic() - started < 4.0
    assert incoming.slots[0].served.is_set()  # nothing writes into the buffer any more
    assert _closed_within(sock, 3.0)


def test_the_client_side_read_fails_cleanly_when_the_host_goes_away():
    """proto.bulk.fetch against a host whose connection dies after part of a shard."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def half_host() -> None:
        conn, _ = server.accept()
        conn.recv(_bulk.HEADER.size)
        conn.sendall(b"\0" * 1000)
        conn.close()

    threading.Thread(target=half_host, daemon=True).start()
    ticket = _bulk.new_ticket()
    header = pb.ArrayChunk(shard=pb.ShardHeader(index=_wire.index_to_proto(((0, 1024),)),
                                                nbytes=4096, bulk_ticket=ticket))

    class Call(list):
        def cancel(self):
            pass

    class Stub:
        def GetArray(self, request, timeout):
            assert request.bulk
            return Call([header])

    target = np.zeros(1024, np.float32)
    started = time.monotonic()
    with pytest.raises(HostLostError, match="closed the connection after 1000 of 4096"):
        _bulk.fetch(Stub(), f"127.0.0.1:{port}", port, pb.GetArrayRequest(array_id=7), target,
                    timeout=5.0)
    assert time.monotonic() - started < 5.0
    server.close()


# --- against a running cluster -----------------------------------------------------------------


@pytest.fixture
def bulk_everything(monkeypatch):
    monkeypatch.setenv("PATHWAYS_SHARED_MEMORY", "0")
    monkeypatch.setattr(_bulk, "SETTINGS", dataclasses.replace(_bulk.SETTINGS, bulk_channel=1,
                                                               bulk_min_bytes=0))


def test_hosts_advertise_a_data_port(client):
    s = client.slice({"x": 2}, island=0)
    for address in s.info.host_addresses:
        reply = client.worker_stub(address).Ping(pb.PingRequest(), timeout=10)
        assert reply.host.data_port > 0
        assert _closed_within(_present(reply.host.data_port, b"\0" * 16, 0, magic=b"GET "), 3.0)


def test_a_lying_byte_count_fails_the_put_and_the_host_keeps_serving(client, bulk_everything,
                                                                     monkeypatch):
    s = client.slice({"x": 2}, island=0)
    x = np.arange(4096, dtype=np.float32)
    real = _bulk.HEADER

    class Lying:
        size, unpack = real.size, real.unpack

        @staticmethod
        def pack(magic, ticket, nbytes):
            return real.pack(magic, ticket, nbytes + 4)

    monkeypatch.setattr(_bulk, "HEADER", Lying)
    with pytest.raises(PathwaysError, match="announced 8196 bytes, the shard has 8192"):
        client.put(x, s, P("x"))
    monkeypatch.setattr(_bulk, "HEADER", real)
    assert np.array_equal(client.put(x, s, P("x")).fetch(), x)


def test_a_sender_dying_mid_put_fails_it_and_stores_nothing(client, bulk_everything,
                                                            monkeypatch):
    s = client.slice({"x": 2}, island=0)
    x = np.arange(1 << 18, dtype=np.float32)
    real = _bulk.send_exact

    def dying(sock, view, deadline, what):
        if len(view) > _bulk.HEADER.size:  # half the shard, then the connection drops
            real(sock, view[:len(view) // 2], deadline, what)
            sock.close()
            raise HostLostError("the test's sender died")
        real(sock, view, deadline, what)

    def stored() -> int:
        return sum(client.worker_stub(a).Ping(pb.PingRequest(), timeout=10).stored_bytes
                   for a in s.info.host_addresses)

    before = stored()
    monkeypatch.setattr(_bulk, "send_exact", dying)
    started = time.monotonic()
    with pytest.raises(PathwaysError, match="closed the connection after 262144 of 524288"):
        client.put(x, s, P("x"))
    assert time.monotonic() - started < 30
    assert stored() <= before  # no byte of a half-written array stored on either host
    monkeypatch.setattr(_bulk, "send_exact", real)
    assert np.array_equal(client.put(x, s, P("x")).fetch(), x)


def test_a_sharded_array_moves_one_connection_per_shard(client, bulk_everything, monkeypatch):
    connections = []
    real = _bulk.connect
    monkeypatch.setattr(_bulk, "connect", lambda *a: connections.append(a[1]) or real(*a))
    s0, s1 = client.slice({"x": 4}, island=0), client.slice({"x": 2}, island=1)
    x = np.random.default_rng(5).standard_normal((512, 514)).astype(np.float32)
    put = client.put(x, s0, P("x"))
    assert len(connections) == 4  # the put: a connection per shard
    assert put.fetch().tobytes() == x.tobytes()
    assert len(connections) == 8  # the fetch: the same
    moved = put.to(s1, P(None, "x"))  # host to host, columns: non-contiguous regions
    assert moved.fetch().tobytes() == x.tobytes()


def test_a_host_without_a_data_port_gets_the_grpc_stream(client, bulk_everything, monkeypatch):
    s = client.slice({"x": 2}, island=0)
    used = []
    real = _bulk.put
    monkeypatch.setattr(_bulk, "put", lambda *a, **k: used.append(a) or real(*a, **k))
    for address in s.info.host_addresses:  # as a simulated host answers Ping: no port
        monkeypatch.setitem(_bulk._PORTS, address, 0)
    x = np.arange(1 << 16, dtype=np.float32)
    assert np.array_equal(client.put(x, s, P("x")).fetch(), x)
    assert used == []


def test_a_port_that_refuses_connections_falls_back_to_the_stream_and_is_asked_again(
        client, bulk_everything, monkeypatch):
    s = client.slice({"x": 2}, island=0)
    closed = socket.create_server(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()  # nothing listens there any more (a restarted host's old port)
    for address in s.info.host_addresses:
        monkeypatch.setitem(_bulk._PORTS, address, dead_port)
    x = np.arange(1 << 16, dtype=np.float32)
    put = client.put(x, s, P("x"))
    assert all(_bulk._PORTS.get(a) != dead_port for a in s.info.host_addresses)  # forgotten
    assert np.array_equal(put.fetch(), x)  # over the channel again, its port asked anew
    assert all(_bulk._PORTS.get(a, 0) > 0 for a in s.info.host_addresses)


def test_a_deleted_arrays_memory_goes_back_to_the_pool_without_a_garbage_collection(
        client, bulk_everything):
    """The next put of that size lands in warm memory (proto.buffers): jaxlib drops the
    references its freed buffers held only when asked, which the host's reaper does."""
    import gc

    from proto import shm as _shm

    s = client.slice({"x": 2}, island=0)
    x = np.ones((2, 3 << 20), np.float32)  # a 12 MiB shard per device: none of the pool's yet
    gc.disable()
    try:
        put = client.put(x, s, P("x"))
        idle = _shm.HOST_BUFFERS.idle_bytes
        put.delete()
        deadline = time.monotonic() + 10
        while _shm.HOST_BUFFERS.idle_bytes < idle + x.nbytes and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _shm.HOST_BUFFERS.idle_bytes >= idle + x.nbytes
    finally:
        gc.enable()


@needs_openssl
def test_a_host_with_tls_opens_no_bulk_channel(tmp_path):
    """Its array bytes stay inside the encrypted gRPC streams."""
    import jax

    from proto import auth as _auth
    from runtime.worker.servicer import create_worker_server
    from runtime.worker.worker import Worker

    key, cert = self_signed(tmp_path)
    credentials = _auth.Credentials(_auth.generate_token(), _auth.TLSConfig(cert=cert, key=key),
                                    _auth.generate_token())
    worker = Worker(9, 0, jax.devices()[:1], credentials=credentials)
    servers, _ = create_worker_server(worker, "127.0.0.1:0")
    try:
        assert worker.dataplane.bulk is None and worker.info().data_port == 0
    finally:
        servers.stop(None)
        worker.stop()
