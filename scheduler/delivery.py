"""Delivery of an island's order to one host, and the host's progress back to the scheduler.

Each host of an island has a `HostLink` with two threads: a sender that batches the instructions
queued for the host into Dispatch RPCs (a burst of calls costs one round trip per batch, not per
call), and a watcher on the host's WatchProgress stream, which reports how far the host has
executed the order and how long each execution took. The gang scheduler uses that feedback to keep
only a short window of work ordered ahead of the hosts, and to charge clients for device time.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol

import grpc

from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from proto.config import SchedulerConfig

log = logging.getLogger(__name__)


class LinkEvents(Protocol):
    """What a HostLink reports to (its island's scheduler), and what it needs to know of it."""

    island: int
    controller_id: str  # sent with every Dispatch: a host drops state of another controller
    epoch: int  # of the island's order (restarts)
    # The link's settings (dispatch_timeout_s: one Dispatch RPC's deadline; max_batch and
    # max_batch_bytes: most instructions and bytes per Dispatch, though a larger instruction
    # travels alone; progress_interval_s: least time between two progress reports, those in
    # between coalesced; watch_retry_s: pause before re-opening a broken progress stream).
    config: SchedulerConfig

    def open_channel(self, address: str) -> grpc.Channel:
        """A channel to the host, with the cluster's credentials."""

    def on_progress(self, host: int, executed: int, received: int = 0,
                    completed: Sequence[pb.CompletedExecution] = (), hang: str = "",
                    arrived: Sequence[int] = ()) -> None:
        """The host has received and executed the order this far (see GangScheduler)."""

    def on_link_lost(self, host: int, reason: str) -> None:
        """The host cannot be reached (a dispatch failed, its progress stream broke): reported
        once per link, after the link has marked itself `failed` and dropped its queue."""


def in_order(*runs: Sequence[pb.Instruction]) -> list[pb.Instruction]:
    """Runs of instructions, each in sequence order, merged into one in order without repeats."""
    merged: list[pb.Instruction] = []
    for ins in heapq.merge(*runs, key=lambda ins: ins.sequence):
        if not merged or ins.sequence != merged[-1].sequence:
            merged.append(ins)
    return merged


class HostLink:
    """The ordered delivery of an island's instructions to one host, and its progress reports.

    The scheduler hands it instructions (`send`) and reads `acked`, `executed` (which it updates
    from the reports) and `failed`; the link's queue and threads are guarded by its own lock, and
    it reports through `events` (LinkEvents) only, never touching the scheduler's state."""

    def __init__(self, events: LinkEvents, host: int, address: str) -> None:
        self.events, self.host, self.address = events, host, address
        self.island = events.island
        self.config = events.config
        self.channel = events.open_channel(address)
        self.stub = pb_grpc.WorkerStub(self.channel)
        self.queue: collections.deque[pb.Instruction] = collections.deque()
        # The batch of the Dispatch under way: kept until its reply says the host has it, so a
        # link replacing this one can resend it (unacknowledged).
        self._in_flight: list[pb.Instruction] = []
        self.acked = 0  # highest sequence the host has received
        self.executed = 0  # highest sequence the host has executed
        self.failed: str = ""
        self.closed = False
        self._cond = threading.Condition()
        self._watch_call = None
        self._sender = threading.Thread(target=self._send_loop, daemon=True,
                                        name=f"dispatch-{self.island}.{host}")
        self._watcher = threading.Thread(target=self._watch_loop, daemon=True,
                                         name=f"progress-{self.island}.{host}")
        self._sender.start()
        self._watcher.start()

    def send(self, ops: Sequence[pb.Instruction]) -> None:
        """Queues instructions for the host, in order (dropped once the link has failed)."""
        with self._cond:
            if not self.failed:
                self.queue.extend(ops)
                self._cond.notify_all()

    def pending(self) -> int:
        """Instructions queued for the host and not dispatched yet."""
        with self._cond:
            return len(self.queue)

    def unacknowledged(self) -> list[pb.Instruction]:
        """What was handed to this link and the host has not acknowledged receiving, in order:
        the batch of a Dispatch whose reply has not come, then the queue. A link that replaces
        this one for the same host sends these again (scheduler.gang's set_host), so nothing is
        lost; the host skips what it already holds (runtime.worker.intake)."""
        with self._cond:
            return [ins for ins in itertools.chain(self._in_flight, self.queue)
                    if ins.sequence > self.acked]

    def _send_loop(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self.queue and not self.closed:
                    cond.wait()
                if self.closed:
                    return
                batch, size = [], 0
                while self.queue and len(batch) < self.config.max_batch:
                    # A large instruction (a load, up to proto.limits' bound) travels alone
                    # rather than push a batch past the message limit.
                    ins_size = self.queue[0].ByteSize()
                    if batch and size + ins_size > self.config.max_batch_bytes:
                        break
                    batch.append(self.queue.popleft())
                    size += ins_size
                self._in_flight = batch
            request = pb.DispatchRequest(controller_id=self.events.controller_id,
                                         epoch=self.events.epoch, instructions=batch)
            try:
                reply = self.stub.Dispatch(request, timeout=self.config.dispatch_timeout_s)
            except (grpc.RpcError, ValueError) as err:  # ValueError: channel closed meanwhile
                if self.closed:
                    return
                reason = (f"dispatch failed: {err.code().name}: {err.details()}"
                          if isinstance(err, grpc.RpcError) else "dispatch channel closed")
                self._lost(reason)
                return
            with cond:
                self._in_flight = []
            self.events.on_progress(self.host, reply.executed, reply.received)

    def _watch_loop(self) -> None:
        request = pb.WatchProgressRequest(min_interval_s=self.config.progress_interval_s)
        opened = False
        while not self.closed:
            try:
                self._watch_call = self.stub.WatchProgress(request)
                for reply in self._watch_call:
                    opened = True
                    self.events.on_progress(self.host, reply.executed, reply.received,
                                            reply.completed, reply.hang, reply.arrived)
            except grpc.RpcError as err:
                if self.closed or err.code() == grpc.StatusCode.CANCELLED:
                    return
                if opened and err.code() == grpc.StatusCode.UNAVAILABLE:
                    # The connection broke (the host's process is gone): the island learns at
                    # once, busy or idle, rather than at the next heartbeat or dispatch.
                    self._lost(f"progress stream lost: {err.details()}")
                    return
                log.debug("progress stream of host %d.%d: %s", self.island, self.host,
                          err.code().name)
            except ValueError:  # the channel was closed
                return
            with self._cond:
                if not self.closed:
                    self._cond.wait(self.config.watch_retry_s)

    def _lost(self, reason: str) -> None:
        """Marks the link failed (once) and reports it: the one path of a lost link."""
        with self._cond:
            if self.failed:
                return
            self.failed = reason
            self.queue.clear()
            self._cond.notify_all()
        self.events.on_link_lost(self.host, reason)

    def close(self) -> None:
        """Stops both threads."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        call = self._watch_call
        if call is not None:
            call.cancel()
        self.channel.close()

    def join(self, timeout: float) -> None:
        """Waits (up to `timeout` seconds) for both threads to end, after close()."""
        deadline = time.monotonic() + timeout
        for thread in (self._sender, self._watcher):
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
