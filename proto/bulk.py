"""The bulk channel: array bytes over plain TCP, gRPC carrying only the control of each transfer.

A Python gRPC server moves bulk bytes at a fraction of what a socket does (every message is
framed, copied and handed between threads), so the transfers that cannot go through shared
memory (proto.shm: another machine, PATHWAYS_SHARED_MEMORY=0) send their bytes here, the way large
systems pair an RPC control plane with a raw data plane. Each host listens on a TCP port of its own
(runtime.worker.bulk, on the address of its gRPC server; HostInfo.data_port, which a peer learns
with a Ping and keeps). A transfer is opened over the host's authenticated gRPC service:

- a put or a copy (bytes to a host): the sender draws a ticket per shard (TICKET_BYTES random
  bytes) and sends the shards' headers, each naming its ticket (ShardHeader.bulk_ticket), as the
  PutArray stream; meanwhile it opens one connection per shard to the host's port, presents the
  ticket and sends the shard's bytes. The host receives them straight into the memory its device
  buffers then alias, and PutArray answers once the array is stored (or with what went wrong);
- a fetch (bytes from a host): the reader asks GetArray with `bulk`; the host answers one header
  per shard with a ticket it drew, the reader connects once per shard, presents the ticket and
  receives the bytes straight into their region of the result; the reply stream ends once the host
  has sent them all.

On a connection: HEADER (magic, ticket, the byte count the peer means to move), then exactly that
many raw row-major bytes in the sender's (native, little-endian) byte order. Nothing else is on
the wire; no Python object is ever decoded from it. A ticket is good for one connection until its
deadline; the host closes any connection presenting a ticket it does not hold, one already used
or expired, or the wrong byte count, and the transfer's gRPC call reports it. Transfers smaller
than TransferConfig.bulk_min_bytes, and hosts that advertise no port (simulated ones), stream over
gRPC as before (proto.transfer); so do all transfers of a cluster with TLS, whose hosts open no
bulk channel (its bytes are not encrypted).
"""

from __future__ import annotations

import logging
import math
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from proto import pathways_pb2 as pb
from proto import wire as _wire
from proto.config import TransferConfig, from_env
from proto.errors import DeadlineExceededError, HostLostError, InvalidArgumentError

log = logging.getLogger(__name__)

SETTINGS = from_env(TransferConfig)
MAGIC = b"PWB1"
TICKET_BYTES = 16
#: What a connection starts with: magic, ticket, byte count (network order).
HEADER = struct.Struct("!4s16sQ")


def new_ticket() -> bytes:
    return secrets.token_bytes(TICKET_BYTES)


def tune(sock: socket.socket, buffer_bytes: int = SETTINGS.bulk_socket_buffer_bytes) -> None:
    """Large kernel buffers and no Nagle delay on a bulk connection."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, buffer_bytes)
        except OSError:  # capped by the kernel: its largest is fine
            pass


def raw_bytes(data: np.ndarray) -> memoryview:
    """`data`'s bytes, row-major, as a flat byte view (a copy only when it is not contiguous)."""
    return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))


def recv_exact(sock: socket.socket, view: memoryview, deadline: float, what: str) -> None:
    """Fills `view` from `sock` by `deadline` (time.monotonic), or raises naming `what`."""
    got, total = 0, len(view)
    while got < total:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceededError(f"{what}: {got} of {total} bytes arrived in time")
        sock.settimeout(left)
        try:
            n = sock.recv_into(view[got:])
        except TimeoutError:
            continue
        except OSError as exc:
            raise HostLostError(f"{what}: the connection failed after {got} of {total} bytes "
                                f"({exc})") from None
        if n == 0:
            raise HostLostError(f"{what}: the peer closed the connection after {got} of "
                                f"{total} bytes")
        got += n


def send_exact(sock: socket.socket, view: memoryview, deadline: float, what: str) -> None:
    """Sends all of `view` on `sock` by `deadline`, or raises naming `what`."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceededError(f"{what}: no time left to send {len(view)} bytes")
    sock.settimeout(left)
    try:
        sock.sendall(view)  # the timeout bounds the whole call
    except TimeoutError:
        raise DeadlineExceededError(f"{what}: {len(view)} bytes not sent in time") from None
    except OSError as exc:
        raise HostLostError(f"{what}: the connection failed while sending ({exc})") from None


def abort(sock: socket.socket) -> None:
    """Ends a connection at once: a thread blocked on it returns."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def host_of(address: str) -> str:
    return address.rsplit(":", 1)[0].strip("[]")


def family(host: str) -> socket.AddressFamily:
    """The socket family of a host name or literal address (IPv6 literals hold a colon)."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def connect(address: str, port: int, deadline: float) -> socket.socket:
    """A tuned connection to `port` on the host of the gRPC `address`."""
    host = host_of(address)
    sock = socket.socket(family(host), socket.SOCK_STREAM)
    try:
        tune(sock)  # before connecting: the handshake sizes the window from it
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


#: Hosts' bulk ports by gRPC address, learned with a Ping (0: the host has none).
_PORTS: dict[str, int] = {}
_PORTS_LOCK = threading.Lock()


def data_port(stub, address: str, timeout: float) -> int:
    """The bulk port of the host at `address` (0: none, or the channel is switched off)."""
    if not SETTINGS.bulk_channel or not address:
        return 0
    with _PORTS_LOCK:
        port = _PORTS.get(address)
    if port is None:
        try:
            port = stub.Ping(pb.PingRequest(), timeout=min(timeout, 10.0)).host.data_port
        except Exception as exc:  # noqa: BLE001 - the transfer's own call will say what is wrong
            log.info("no bulk port of host %s (%s): streaming", address, exc)
            return 0
        with _PORTS_LOCK:
            _PORTS[address] = port
    return port


def forget(address: str) -> None:
    """The host at `address` refused a connection (restarted?): ask its port again next time."""
    with _PORTS_LOCK:
        _PORTS.pop(address, None)


class Unreachable(Exception):
    """A connection to a host's bulk port could not be opened (nothing was sent): stream."""


def moved(stub, address: str, nbytes: int, timeout: float, move: Callable[[int], None]) -> bool:
    """Whether `move(port)` (`put` or `fetch`) carried a transfer of `nbytes` over the bulk
    channel of the host at `address`. False, nothing sent, where the gRPC stream must carry it:
    fewer than bulk_min_bytes (0: nothing to connect for), a host without a port, a port that
    refuses connections."""
    if not nbytes or nbytes < SETTINGS.bulk_min_bytes:
        return False
    port = data_port(stub, address, timeout)
    if not port:
        return False
    try:
        move(port)
    except Unreachable as exc:
        log.info("bulk channel unreachable (%s): streaming", exc)
        return False
    return True


class _Jobs:
    """Threads moving one connection's bytes each; `join` raises the first error."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []
        self.errors: list[BaseException] = []

    def start(self, sock: socket.socket, fn: Callable[[], None]) -> None:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - handed to join
                self.errors.append(exc)
            finally:
                sock.close()

        self.sockets.append(sock)
        thread = threading.Thread(target=run, name="bulk", daemon=True)
        self.threads.append(thread)
        thread.start()

    def join(self, deadline: float) -> None:
        for thread in self.threads:  # each bounded by its own socket deadline
            thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
        if self.errors:
            raise self.errors[0]

    def abort(self) -> None:
        for sock in self.sockets:
            abort(sock)
        for thread in self.threads:
            thread.join(5.0)


def _open(address: str, port: int, count: int, deadline: float) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sockets.append(connect(address, port, deadline))
    except OSError as exc:
        for sock in sockets:
            sock.close()
        forget(address)
        raise Unreachable(f"bulk port {port} of {address}: {exc}") from None
    return sockets


def put(stub, address: str, port: int, spec: pb.ArraySpec, shards: Sequence[tuple],
        timeout: float, part: tuple[int, int] = (0, 0)) -> None:
    """Puts a host's shards ((index, mesh positions, data) triples) of an array over its bulk
    channel, all shards at once on connections of their own; PutArray carries their headers
    (with `part` = (parts, put) when they are one part of a put several senders make:
    proto.transfer.stream_put) and answers once the host stored the array. Raises Unreachable
    (nothing sent) when the host's port cannot be reached."""
    deadline = time.monotonic() + timeout
    views = [raw_bytes(data) for _, _, data in shards]
    sockets = _open(address, port, len(shards), deadline)
    tickets = [new_ticket() for _ in shards]
    headers = []
    for (index, positions, _), view, ticket in zip(shards, views, tickets):
        chunk = pb.ArrayChunk(shard=pb.ShardHeader(
            index=_wire.index_to_proto(index), nbytes=len(view), mesh_positions=positions,
            bulk_ticket=ticket))
        if not headers:
            chunk.spec.CopyFrom(spec)
            _wire.mark_part(chunk, part)
        headers.append(chunk)
    jobs = _Jobs()
    for sock, view, ticket in zip(sockets, views, tickets):
        def send(sock=sock, view=view, ticket=ticket) -> None:
            what = f"a put of array {spec.array_id} to {address}"
            send_exact(sock, memoryview(HEADER.pack(MAGIC, ticket, len(view))), deadline, what)
            send_exact(sock, view, deadline, what)
        jobs.start(sock, send)
    try:
        stub.PutArray(iter(headers), timeout=timeout)
    except BaseException:
        jobs.abort()
        raise
    try:
        jobs.join(deadline)
    except Exception as exc:  # noqa: BLE001 - the host has the array: nothing is lost
        log.debug("a bulk sender of array %d ended with %s after the put", spec.array_id, exc)


def fetch(stub, address: str, port: int, request: pb.GetArrayRequest, target: np.ndarray,
          timeout: float) -> None:
    """Reads the requested shards of an array from a host's bulk channel into their regions of
    `target` (the whole array), all at once on connections of their own. Raises Unreachable
    (before anything was written) when the host's port cannot be reached."""
    deadline = time.monotonic() + timeout
    bulk = pb.GetArrayRequest()
    bulk.CopyFrom(request)
    bulk.bulk = True
    call = stub.GetArray(bulk, timeout=timeout)
    jobs = _Jobs()
    wanted = {_wire.index_from_proto(i) for i in request.shards}
    got: set = set()
    try:
        for chunk in call:
            if not chunk.HasField("shard") or len(chunk.shard.bulk_ticket) != TICKET_BYTES or (
                    len(chunk.data)):
                raise InvalidArgumentError(f"host {address} answered a bulk read of array "
                                           f"{request.array_id} with something else")
            index = _wire.index_from_proto(chunk.shard.index)
            if not _wire.index_inside(index, target.shape):
                raise InvalidArgumentError(f"host {address} sent shard {index}, outside the "
                                           f"array's shape {target.shape}")
            region = target[(*_wire.as_slices(index), ...)]
            nbytes = math.prod(region.shape) * target.itemsize
            if chunk.shard.nbytes != nbytes or index in got:
                raise InvalidArgumentError(f"host {address} sent a bad header for shard {index}")
            got.add(index)
            sock = _open(address, port, 1, deadline)[0]
            ticket = chunk.shard.bulk_ticket

            def receive(sock=sock, region=region, ticket=ticket, nbytes=nbytes) -> None:
                what = f"a read of array {request.array_id} from {address}"
                send_exact(sock, memoryview(HEADER.pack(MAGIC, ticket, nbytes)), deadline, what)
                # Straight into the result where its region is contiguous, else through a buffer.
                buffer = (region if region.flags.c_contiguous
                          else np.empty(region.shape, target.dtype))
                recv_exact(sock, memoryview(buffer.reshape(-1).view(np.uint8)), deadline, what)
                if buffer is not region:
                    region[...] = buffer
            jobs.start(sock, receive)
        if wanted and got != wanted:
            raise InvalidArgumentError(f"host {address} sent shards {sorted(got)} of "
                                       f"{sorted(wanted)}")
        jobs.join(deadline)
    except BaseException:
        call.cancel()
        jobs.abort()
        raise
