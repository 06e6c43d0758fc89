"""A host's end of the bulk channel (proto.bulk): a TCP listener on the address of its gRPC
server, and the tickets of the transfers its gRPC calls opened.

A put (DataPlane.put) registers one ticket per shard with the memory the shard's bytes go into
(`Incoming`); a bulk read (DataPlane.get) draws one per shard with the shard's device buffer to
send from (`serve_read`). A connection presents its ticket first; the listener's thread for that
connection then moves the bytes itself, straight between the socket and the buffer, and tells the
waiting call how it went. A ticket is used once: the listener forgets it when a connection
presents it (a second connection with it is closed at once), and the call that drew it fails with
DEADLINE_EXCEEDED when no connection presents it within TransferConfig.bulk_ticket_s. A connection
whose ticket the host does not hold yet (a put's connection may come before the PutArray call's
headers) waits for it up to bulk_header_s, then is closed. A failed transfer cancels its tickets
and ends their connections before its call returns, so no thread writes into a buffer afterwards;
the array is stored only once every shard arrived.
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from proto import bulk as _bulk
from proto import pathways_pb2 as pb
from proto import shm as _shm
from proto import wire as _wire
from proto.config import TransferConfig
from proto.errors import DeadlineExceededError, InvalidArgumentError, PathwaysError

log = logging.getLogger(__name__)


class _Slot:
    """One ticket: the buffer its connection fills (`incoming`) or is sent, and the outcome."""

    def __init__(self, ticket: bytes, view: memoryview, incoming: bool, present_by: float,
                 deadline: float, what: str) -> None:
        self.ticket, self.view, self.incoming = ticket, view, incoming
        self.present_by, self.deadline, self.what = present_by, deadline, what
        self.sock: socket.socket | None = None  # the connection that presented the ticket
        self.done = threading.Event()  # the bytes moved, or the transfer failed
        self.served = threading.Event()  # no thread touches `view` any more
        self.error: Exception | None = None

    def finish(self, error: Exception | None = None) -> None:
        if self.error is None and not self.done.is_set():
            self.error = error
        self.done.set()


class BulkListener:
    """The bulk channel of one host, on `host` (its gRPC bind address); `port` is advertised in
    HostInfo.data_port. `stop` closes it (a ServerGroup member)."""

    def __init__(self, host: str, config: TransferConfig = _bulk.SETTINGS) -> None:
        self.config = config
        self._sock = socket.socket(_bulk.family(host))
        try:  # buffer sizes set before listen() reach the accepted connections' handshakes
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _bulk.tune(self._sock, config.bulk_socket_buffer_bytes)
            self._sock.bind((host.strip("[]"), 0))
            self._sock.listen(128)
        except BaseException:
            self._sock.close()
            raise
        self.port = self._sock.getsockname()[1]
        self._cond = threading.Condition()
        self._live: list[_Slot] = []
        self._spent: list[tuple[bytes, float]] = []  # (ticket, when it would have expired)
        self._connections = 0
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, name=f"bulk-{self.port}", daemon=True).start()

    # --- the calls' side ---------------------------------------------------------------------

    def _register(self, ticket: bytes, view: memoryview, incoming: bool, deadline: float,
                  what: str) -> _Slot:
        if self._stopped.is_set():
            raise DeadlineExceededError("the host's bulk channel is closed")
        slot = _Slot(ticket, view, incoming,
                     min(deadline, time.monotonic() + self.config.bulk_ticket_s), deadline, what)
        with self._cond:
            self._live.append(slot)
            self._cond.notify_all()
        return slot

    def incoming(self, deadline: float, what: str) -> Incoming:
        return Incoming(self, deadline, what)

    def cancel(self, slots: Sequence[_Slot], error: Exception) -> None:
        """Fails `slots` not yet done and ends their connections; returns once no thread of
        theirs touches their buffers."""
        with self._cond:
            for slot in slots:
                if slot in self._live:
                    self._live.remove(slot)
                    slot.served.set()  # never presented: no thread has it
                slot.finish(error)
                if slot.sock is not None:
                    _bulk.abort(slot.sock)
        for slot in slots:
            if not slot.served.wait(10.0):
                log.warning("%s: a bulk connection did not stop in time", slot.what)

    def wait(self, slots: Sequence[_Slot], deadline: float,
             active: Callable[[], bool] = lambda: True) -> None:
        """Waits until every slot's bytes moved; raises the first failure, or a deadline error
        (no connection presented a ticket in time, the bytes were late, the caller left)."""
        for slot in slots:
            while not slot.done.wait(min(0.5, max(0.0, deadline - time.monotonic()))):
                now = time.monotonic()
                if slot.sock is None and now > slot.present_by:
                    raise DeadlineExceededError(f"{slot.what}: no connection presented its "
                                                f"ticket to the bulk channel in time")
                if now >= deadline:
                    raise DeadlineExceededError(f"{slot.what}: the bytes did not arrive by the "
                                                f"deadline")
                if not active():
                    raise DeadlineExceededError(f"{slot.what}: the caller left")
            if slot.error is not None:
                raise slot.error

    def serve_read(self, array_id: int, shards: Sequence[tuple], deadline: float,
                   active: Callable[[], bool]) -> Iterator[pb.ArrayChunk]:
        """A bulk read's reply: a header with a fresh ticket per shard ((index, data) pairs),
        then, once every shard was sent to the connection presenting its ticket, the end."""
        slots, headers = [], []
        try:
            for index, data in shards:
                view = _bulk.raw_bytes(np.asarray(data))
                ticket = _bulk.new_ticket()
                slots.append(self._register(ticket, view, False, deadline,
                                            f"a bulk read of array {array_id}, shard {index}"))
                headers.append(pb.ArrayChunk(shard=pb.ShardHeader(
                    index=_wire.index_to_proto(index), nbytes=len(view), bulk_ticket=ticket)))
            yield from headers
            self.wait(slots, deadline, active)
        except BaseException as exc:
            self.cancel(slots, exc if isinstance(exc, Exception) else
                        DeadlineExceededError("the read ended"))
            raise

    def stop(self, grace: float | None = None) -> threading.Event:
        """Closes the listener and fails the transfers still open (ServerGroup's stop)."""
        self._stopped.set()
        try:
            self._sock.close()
        except OSError:
            pass
        with self._cond:
            live, self._live = list(self._live), []
        self.cancel(live, DeadlineExceededError("the host's bulk channel closed"))
        return self._stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return not self._stopped.wait(timeout)

    # --- the connections' side ---------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stopped.is_set():
                    return
                time.sleep(0.05)  # out of descriptors for a moment
                continue
            with self._cond:
                full = self._connections >= self.config.bulk_max_connections
                if not full:
                    self._connections += 1
            if full:
                log.warning("bulk channel %d: %d connections open, one more closed", self.port,
                            self._connections)
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="bulk-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        slot = None
        try:
            _bulk.tune(conn, self.config.bulk_socket_buffer_bytes)
            head = bytearray(_bulk.HEADER.size)
            wait_until = time.monotonic() + self.config.bulk_header_s
            _bulk.recv_exact(conn, memoryview(head), wait_until, "a bulk connection's header")
            magic, ticket, nbytes = _bulk.HEADER.unpack(head)
            if magic != _bulk.MAGIC:
                log.warning("bulk channel %d: a connection without the magic closed", self.port)
                return
            slot = self._claim(ticket, conn, wait_until)
            if slot is None:
                return
            if nbytes != len(slot.view):
                slot.finish(InvalidArgumentError(
                    f"{slot.what}: the connection announced {nbytes} bytes, the shard has "
                    f"{len(slot.view)}"))
                return
            if slot.incoming:
                _bulk.recv_exact(conn, slot.view, slot.deadline, slot.what)
            else:
                _bulk.send_exact(conn, slot.view, slot.deadline, slot.what)
            slot.finish()
        except PathwaysError as exc:
            if slot is not None:
                slot.finish(exc)
            else:
                log.info("bulk channel %d: %s", self.port, exc)
        except Exception as exc:  # noqa: BLE001 - the connection's end, never the listener's
            log.warning("bulk channel %d: a connection failed: %s", self.port, exc)
            if slot is not None:
                slot.finish(PathwaysError(f"{slot.what}: {exc}"))
        finally:
            conn.close()
            if slot is not None:
                slot.view = memoryview(b"")  # the buffer is the call's again
                slot.served.set()
            with self._cond:
                self._connections -= 1

    def _claim(self, ticket: bytes, conn: socket.socket, wait_until: float) -> _Slot | None:
        """The slot whose ticket `conn` presented (now spent), waiting up to `wait_until` for a
        ticket not registered yet; None (the connection is closed) for a ticket that is unknown,
        already used or expired."""
        with self._cond:
            while True:
                now = time.monotonic()
                self._spent = [(t, until) for t, until in self._spent if until > now]
                for slot in self._live:
                    if hmac.compare_digest(slot.ticket, ticket):
                        self._live.remove(slot)
                        self._spent.append((ticket, slot.present_by))
                        if now > slot.present_by:
                            slot.served.set()
                            slot.finish(DeadlineExceededError(
                                f"{slot.what}: its ticket was presented after it expired"))
                            return None
                        slot.sock = conn
                        return slot
                if any(hmac.compare_digest(t, ticket) for t, _ in self._spent):
                    log.warning("bulk channel %d: a used ticket presented again: closed",
                                self.port)
                    return None
                if now >= wait_until or self._stopped.is_set():
                    log.warning("bulk channel %d: a connection presented an unknown ticket: "
                                "closed", self.port)
                    return None
                self._cond.wait(wait_until - now)


class Incoming:
    """The shards of one put arriving over the bulk channel: `expect` registers a shard's ticket
    and gives the buffer its bytes land in (the memory its device buffer then aliases); `wait`
    returns once all arrived. Leaving the `with` block cancels whatever did not arrive."""

    def __init__(self, listener: BulkListener, deadline: float, what: str) -> None:
        self.listener, self.deadline, self.what = listener, deadline, what
        self.slots: list[_Slot] = []

    def expect(self, ticket: bytes, nbytes: int) -> np.ndarray:
        if len(ticket) != _bulk.TICKET_BYTES:
            raise InvalidArgumentError(f"{self.what}: a bulk ticket has {len(ticket)} bytes, "
                                       f"not {_bulk.TICKET_BYTES}")
        buffer = _shm.HOST_BUFFERS.empty((nbytes,), np.uint8)  # a device buffer may alias it
        self.slots.append(self.listener._register(
            ticket, memoryview(buffer), True, self.deadline,
            f"{self.what}, shard {len(self.slots)}"))
        return buffer

    def wait(self) -> None:
        self.listener.wait(self.slots, self.deadline)

    def __enter__(self) -> Incoming:
        return self

    def __exit__(self, *exc) -> None:
        if any(not s.done.is_set() or s.error is not None for s in self.slots):
            self.listener.cancel(self.slots, DeadlineExceededError(f"{self.what}: cancelled"))
