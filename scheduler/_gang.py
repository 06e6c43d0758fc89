"""Gang scheduling: one total order of work per island, delivered identically to each of its hosts.

Every instruction for an island, from every client, gets the next sequence number under one lock and
is queued for every host of the island; each host executes strictly in sequence order. So all hosts
run the island's SPMD computations in the same order, and their collectives meet, whatever the
interleaving of clients. A sender thread per host batches queued instructions into Dispatch RPCs,
so a burst of calls costs one round trip per batch rather than per call.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence

import grpc

from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from runtime._errors import DeadlineExceededError, HostLostError, ResourceExhaustedError
from runtime._wire import GRPC_OPTIONS

log = logging.getLogger(__name__)

#: Deadline of one Dispatch RPC.
DISPATCH_TIMEOUT_S = 10.0
#: Most instructions, and about the most bytes, per Dispatch RPC.
MAX_BATCH = 1024
MAX_BATCH_BYTES = 8 << 20


class _HostLink:
    """The ordered delivery of an island's instructions to one host."""

    def __init__(self, scheduler: "GangScheduler", host: int, address: str) -> None:
        self.scheduler, self.host, self.address = scheduler, host, address
        self.channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        self.stub = pb_grpc.WorkerStub(self.channel)
        self.queue: collections.deque[pb.Instruction] = collections.deque()
        self.acked = 0
        self.executed = 0
        self.failed: str = ""
        self.thread = threading.Thread(target=self._send_loop, daemon=True,
                                       name=f"dispatch-{scheduler.island}.{host}")
        self.thread.start()

    def _send_loop(self) -> None:
        cond = self.scheduler.cond
        while True:
            with cond:
                while not self.queue and not self.scheduler.closed:
                    cond.wait()
                if self.scheduler.closed:
                    return
                batch, size = [], 0
                while self.queue and len(batch) < MAX_BATCH and size < MAX_BATCH_BYTES:
                    ins = self.queue.popleft()
                    batch.append(ins)
                    size += ins.ByteSize()
            request = pb.DispatchRequest(controller_id=self.scheduler.controller_id,
                                         instructions=batch)
            try:
                reply = self.stub.Dispatch(request, timeout=DISPATCH_TIMEOUT_S)
            except grpc.RpcError as err:
                reason = f"dispatch failed: {err.code().name}: {err.details()}"
                with cond:
                    self.failed = reason
                    self.queue.clear()
                    cond.notify_all()
                self.scheduler.on_host_failure(self.scheduler.island, self.host, reason)
                return
            self.scheduler.note_progress(self.host, reply.executed, reply.received)

    def close(self) -> None:
        self.channel.close()


class GangScheduler:
    """The total order of one island. Thread-safe; `submit` never blocks on the hosts."""

    def __init__(self, island: int, controller_id: str,
                 on_host_failure: Callable[[int, int, str], None]) -> None:
        self.island, self.controller_id = island, controller_id
        self.on_host_failure = on_host_failure
        self.cond = threading.Condition()
        self.closed = False
        self._links: dict[int, _HostLink] = {}
        self._sequence = 0
        self._history: list[pb.Instruction] = []  # replayed to a host that (re)joins

    def set_host(self, host: int, address: str) -> None:
        """Connects a host; a host that joins late receives the island's order so far."""
        with self.cond:
            old = self._links.pop(host, None)
            link = _HostLink(self, host, address)
            link.queue.extend(self._history)
            self._links[host] = link
            self.cond.notify_all()
        if old is not None:
            old.close()

    def submit(self, ops: Sequence[pb.Instruction]) -> list[int]:
        """Gives each op the next sequence number and queues it for every host; returns them.

        Returns once the ops are ordered, before any host has received them. Raises HostLostError
        if a host of the island has failed.
        """
        with self.cond:
            self._raise_if_failed()
            for op in ops:
                self._sequence += 1
                op.sequence = self._sequence
                if op.WhichOneof("op") in ("define_slice", "load"):
                    self._history.append(op)
                for link in self._links.values():
                    link.queue.append(op)
            self.cond.notify_all()
            return [op.sequence for op in ops]

    @property
    def sequence(self) -> int:
        """The last sequence number given out."""
        with self.cond:
            return self._sequence

    def flush(self, timeout: float) -> None:
        """Waits until every host has received everything submitted so far."""
        deadline = time.monotonic() + timeout
        with self.cond:
            target = self._sequence
            while True:
                self._raise_if_failed()
                if all(link.acked >= target for link in self._links.values()):
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    slow = [h for h, link in self._links.items() if link.acked < target]
                    raise DeadlineExceededError(
                        f"island {self.island}: hosts {slow} did not receive instructions "
                        f"up to #{target} within {timeout:.1f} s")
                self.cond.wait(left)

    def note_progress(self, host: int, executed: int, received: int = 0) -> None:
        """Records how far a host has received and executed the order (from acks and pings)."""
        with self.cond:
            link = self._links.get(host)
            if link is not None:
                link.acked = max(link.acked, received)
                link.executed = max(link.executed, executed)
                self.cond.notify_all()

    def wait_backlog(self, limit: int, timeout: float) -> None:
        """Waits while the slowest host is more than `limit` instructions behind the order, so a
        client that outruns its island waits instead of filling the hosts' memory."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self._links and self._sequence - min(
                    link.executed for link in self._links.values()) > limit:
                self._raise_if_failed()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ResourceExhaustedError(
                        f"island {self.island} is more than {limit} instructions behind after "
                        f"{timeout:.0f} s")
                self.cond.wait(min(left, 0.1))

    def queue_depth(self) -> dict[int, int]:
        """Instructions not yet sent, per host."""
        with self.cond:
            return {h: len(link.queue) for h, link in self._links.items()}

    def _raise_if_failed(self) -> None:
        for host, link in self._links.items():
            if link.failed:
                raise HostLostError(f"island {self.island}: host {self.island}.{host} "
                                    f"({link.address}) was lost: {link.failed}")

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
            links = list(self._links.values())
        for link in links:
            link.close()
