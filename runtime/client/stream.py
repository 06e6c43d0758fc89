"""A client's ordered command stream to the controller: asynchronous, batched, never a round trip
per call.

Calls, transfers, program runs and deletes are queued in the order the client makes them; one
sender thread ships everything queued so far in one Execute RPC, while the next batch accumulates.
The controller answers per command: the sequence numbers of its outputs on their islands (which
reads wait for), or why it was rejected (which reads of its outputs raise).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc

from proto import pathways_pb2 as pb
from proto.errors import (ControllerUnavailableError, DeadlineExceededError, PathwaysError,
                          error_from_name, translate_rpc_error)

if TYPE_CHECKING:
    from runtime.client.array import RemoteArray
    from runtime.client.client import Client


class Ticket:
    """The outcome of one command, known once the controller has ordered or rejected it;
    `answered_at` is when the answer came (time.time(), for dispatch latency measurements)."""

    __slots__ = ("done", "error", "answered_at")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: PathwaysError | None = None
        self.answered_at = 0.0

    def wait(self, timeout: float) -> None:
        """Waits for the controller's answer; raises the command's rejection, if any."""
        if not self.done.wait(timeout):
            raise DeadlineExceededError(f"the controller did not order the command within "
                                        f"{timeout:.1f} s")
        if self.error is not None:
            raise self.error


class CommandStream:
    """The ordered, batched command queue of one client session: at most the client's
    `config.stream_batch` commands per Execute RPC, and `submit` blocks (back-pressure) while
    `config.stream_pending` are queued or unacknowledged."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._max_batch = client.config.stream_batch
        self._max_pending = client.config.stream_pending
        self._poll_s = client.config.stream_poll_s
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[pb.Command, Ticket, Sequence[RemoteArray]]] = (
            collections.deque())
        self._dropped: collections.deque[int] = collections.deque()  # appended from __del__
        self._in_flight = 0
        self.batches = 0  # Execute RPCs sent
        self._unreported: list[PathwaysError] = []
        self._closed = False
        self._thread = threading.Thread(target=self._send_loop, daemon=True, name="commands")
        self._thread.start()

    def submit(self, command: pb.Command, outputs: Sequence[RemoteArray] = ()) -> Ticket:
        """Queues a command; its outputs learn their sequence numbers when it is ordered."""
        ticket = Ticket()
        for out in outputs:
            out._ticket = ticket
        deadline = time.monotonic() + self._client.timeout_s
        with self._cond:
            while len(self._queue) + self._in_flight >= self._max_pending:
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    raise DeadlineExceededError("the controller is not keeping up: "
                                                f"{self._max_pending} commands pending")
            self._queue.append((command, ticket, outputs))
            self._cond.notify_all()
        return ticket

    def drop(self, array_id: int, *, wake: bool = False) -> None:
        """Frees an array after everything queued so far. Without `wake` (from `__del__`, where
        taking a lock could deadlock) the sender finds it within `stream_poll_s`; with it (an
        explicit delete) the sender sends it at once: the array's memory on its hosts (shared
        memory a next put takes warm, proto.shm) comes back that much sooner."""
        self._dropped.append(array_id)
        if wake:
            with self._cond:
                self._cond.notify_all()

    def sync(self, timeout: float) -> None:
        """Waits until every queued command is ordered; raises the first rejection since the last
        sync (the error is also raised by reads of the rejected command's outputs)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._dropped:
                self._cond.notify_all()
            while self._queue or self._in_flight or self._dropped:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineExceededError(f"commands not ordered within {timeout:.1f} s")
                self._cond.wait(left)
            errors, self._unreported = self._unreported, []
        if errors:
            raise errors[0]

    def _take(self) -> list[tuple[pb.Command, Ticket, Sequence[RemoteArray]]]:
        """The next batch; dropped ids are drained under the lock that orders the queue, so a
        delete always follows the commands that read its array."""
        with self._cond:
            while not (self._queue or self._dropped or self._closed):
                self._cond.wait(self._poll_s)
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), self._max_batch))]
            dropped = [self._dropped.popleft() for _ in range(len(self._dropped))]
            if dropped:
                batch.append((pb.Command(delete=pb.DeleteCommand(array_ids=dropped)), Ticket(), ()))
            self._in_flight = len(batch)
            return batch

    def _send_loop(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return  # closed and drained
            request = pb.ExecuteRequest(session_id=self._client.session_id,
                                        commands=[command for command, _, _ in batch])
            self.batches += 1
            try:
                reply = self._client.controller_stub.Execute(request, timeout=self._client.timeout_s)
                results = list(reply.results)
            except grpc.RpcError as err:
                error = translate_rpc_error(err, f"controller {self._client.address}", "Execute",
                                            ControllerUnavailableError)
                results = [error] * len(batch)
            errors = []
            answered = time.time()
            for (_, ticket, outputs), result in zip(batch, results):
                ticket.answered_at = answered
                if isinstance(result, PathwaysError):
                    ticket.error = result
                elif result.error:
                    ticket.error = error_from_name(result.error, result.message)
                else:
                    for out, sequence in zip(outputs, result.sequence):
                        out.sequence = sequence
                if ticket.error is not None:
                    errors.append(ticket.error)
                ticket.done.set()
            with self._cond:
                self._unreported.extend(errors)
                self._in_flight = 0
                self._cond.notify_all()

    def close(self, timeout: float = 5.0) -> None:
        """Ships what is queued, then stops the sender thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
