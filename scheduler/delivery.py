"""Delivery of an island's order to one host, and the host's progress back to the scheduler.

Each host of an island has a `HostLink`: two coroutines on the process's one link loop
(scheduler.link_loop, grpc.aio), not threads of its own. A sender batches the instructions queued
for the host into Dispatch RPCs (a burst of calls costs one round trip per batch, not per call);
a watcher reads the host's WatchProgress stream, which reports how far the host has executed the
order and how long each execution took. The reports of an island's links are coalesced per loop
turn (scheduler.coalesce) before the gang scheduler sees them; it uses them to keep only a short
window of work ordered ahead of the hosts, and to charge clients for device time. A link also
answers the controller's heartbeat (`ping`): from what it heard from the host lately (a Dispatch
reply, a progress report: an idle host reports every `progress_idle_s`, so it costs no Ping), or
with a Ping RPC of its own. The hosts of an island whose order goes through a fan-out tree
report only every `progress_idle_tree_s` when idle: the heartbeat reaches them with an empty
Dispatch to each root instead (`keep_alive`), passed down the tree, each host's place coming
back with the root's later replies (one call per island rather than a report per host).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import heapq
import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol

import grpc

from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from proto.config import SchedulerConfig
from scheduler.coalesce import HostReport, ProgressCoalescer
from scheduler.link_loop import LinkLoop
from scheduler.relaylog import RelayLog

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
    # The island's progress reports, coalesced per loop turn (scheduler.coalesce).
    reports: ProgressCoalescer
    # Metadata of every call to a host (the cluster's credentials).
    channel_metadata: Sequence[tuple[str, str]]

    def open_channel(self, address: str) -> grpc.aio.Channel:
        """An asyncio channel to the host (called on the link loop), with the cluster's TLS."""

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

    The scheduler hands it instructions (`send`, from any thread, never waiting) and reads
    `acked`, `executed` (which it updates from the reports) and `failed`; the link's queue is
    guarded by its own lock, and it reports through `events` (LinkEvents) only, never touching
    the scheduler's state."""

    def __init__(self, events: LinkEvents, host: int, address: str,
                 loop: LinkLoop | None = None) -> None:
        self.events, self.host, self.address = events, host, address
        self.island = events.island
        self.config = events.config
        self.loop = loop or LinkLoop.shared()
        self._metadata = tuple(getattr(events, "channel_metadata", ()))
        self.queue: collections.deque[pb.Instruction] = collections.deque()
        # Reached through another host (scheduler.fanout): what the island sends meanwhile is
        # the tree's to bring, kept in the island's relay log (its scheduler's; a link of its
        # own otherwise) and not dispatched, until the host acknowledges it. The tree owes
        # the host what came after `_floor`: what came before, it got directly.
        self.relayed = False
        shared = getattr(events, "relay_log", None)
        self._log: RelayLog = RelayLog() if shared is None else shared
        self._floor = 0
        self.forward: list[pb.ForwardTarget] = []  # the subtrees a Dispatch of this link reaches
        # The batch of the Dispatch under way: kept until its reply says the host has it, so a
        # link replacing this one can resend it (unacknowledged).
        self._in_flight: list[pb.Instruction] = []
        self.acked = 0  # highest sequence the host has received
        self.executed = 0  # highest sequence the host has executed
        self.failed: str = ""
        self.closed = False
        # time.monotonic() of the host's last Dispatch reply or progress report: a contact both
        # sides count as a heartbeat (the host counts the call, or the report taken:
        # runtime.worker.membership).
        self.heard_at = 0.0
        # Least time between two of the host's progress reports (its island's scheduler sets
        # it); a change re-opens the stream at the host's next report.
        self.report_interval_s = self.config.progress_interval_s
        # Most time between two reports of the host while idle (its island's scheduler sets it:
        # longer in a fan-out tree), and that of the stream now open (0: none yet).
        self.idle_interval_s = self.config.progress_idle_s
        self._stream_idle_s = 0.0
        self._keepalive = False  # the heartbeat asked for an empty Dispatch (keep_alive)
        self._dispatched_at = 0.0  # time.monotonic() of the last Dispatch reply
        self._lock = threading.Lock()
        self._woken = False  # a wake-up of the sender is on its way to the loop
        self._wake: asyncio.Event | None = None
        self._stub: pb_grpc.WorkerStub | None = None
        self._done = self.loop.submit(self._run())

    def send(self, ops: Sequence[pb.Instruction]) -> None:
        """Queues instructions for the host, in order (dropped once the link has failed). A
        relayed host's go to the relay log, which the island's scheduler fills once for all its
        relayed hosts (it sends to its direct links only): with a scheduler's shared log,
        what goes there is owed to each of them."""
        with self._lock:
            if self.failed or self.closed:
                return
            if self.relayed:
                self._log.append(ops)
                return
        self._queue_direct(ops)

    def _queue_direct(self, ops: Sequence[pb.Instruction]) -> None:
        """Queues instructions for this link's own Dispatch and wakes its sender (once per
        burst: the wake-up is one call onto the loop however many sends came meanwhile)."""
        with self._lock:
            self.queue.extend(ops)
            if self._woken:
                return
            self._woken = True
        self.loop.call(self._wake_sender)

    def keep_alive(self, delay: float = 0.0, quiet_s: float = 0.0) -> None:
        """The heartbeat's contact with a host that reports rarely when idle: an empty Dispatch,
        `delay` seconds from now (on the loop), passed down this link's subtrees, so one call
        reaches every host of a fan-out tree; each host counts it as the controller's contact,
        and where the hosts below stand comes back with this link's later replies. None if a
        Dispatch was answered within the last `quiet_s` by then, or a batch goes meanwhile
        (either counts the same: a busy island needs none). For a root of a tree, and for a
        host whose stream reports only every `progress_idle_tree_s` (until it re-opens with a
        shorter interval); nothing for a relayed host (its root's call reaches it) or another."""
        with self._lock:
            reports_often = self._stream_idle_s <= self.config.progress_idle_s
            if self.relayed or self.failed or self.closed or (not self.forward
                                                              and reports_often):
                return
        if delay > 0:
            self.loop.call_later(delay, self._ask_keepalive, quiet_s)
        else:
            self.loop.call(self._ask_keepalive, quiet_s)

    def _ask_keepalive(self, quiet_s: float) -> None:
        if time.monotonic() - self._dispatched_at < quiet_s:
            return
        with self._lock:
            self._keepalive = True
        self._wake_sender()

    def idle(self) -> bool:
        """Whether nothing handed to this link directly waits for the host's acknowledgement."""
        with self._lock:
            return not self.queue and not self._in_flight

    def route(self, forward: list[pb.ForwardTarget] | None) -> None:
        """How the island's order reaches this host from now on (scheduler.fanout): by this
        link's Dispatch, which forwards to `forward`'s subtrees; or (None) through another host.
        What the tree was to bring the host and it has not acknowledged comes directly (the old
        tree may never bring it: its parent may have been taken out of the tree before passing
        it on, and its new parent may have passed it on before the host was below it)."""
        with self._lock:
            catch_up = self._take_relayed() if self.relayed else []
            self._floor = self._log.last  # the tree owes the host only what comes from now on
            self.relayed = forward is None
            self.forward = [] if forward is None else list(forward)
        if catch_up:
            self._queue_direct(catch_up)

    def relay_position(self) -> int | None:
        """The sequence up to which the tree owes a relayed host nothing more (what it
        acknowledged, or got directly); None when the host is not relayed. A failed link's
        host is still owed the rest (its `unacknowledged` is resent if it registers again)."""
        with self._lock:
            return self._owed_after() if self.relayed else None

    def _owed_after(self) -> int:
        """The sequence after which what the relay log holds is owed to the host (lock held)."""
        return max(self.acked, self._floor)

    def _owed(self) -> list[pb.Instruction]:
        """What the tree was to bring the host and it has not acknowledged (lock held)."""
        return self._log.after(self._owed_after()) if self.relayed else []

    def _take_relayed(self) -> list[pb.Instruction]:
        """`_owed`, which the host is from now on to get directly (lock held)."""
        taken = self._owed()
        if taken:
            self._floor = taken[-1].sequence
        return taken

    def check_relayed(self) -> None:
        """Sends directly what the tree was to bring the host and it has not acknowledged within
        `relay_timeout_s`: whatever went wrong on the way (a change of the tree mid-batch), the
        host gets it late, never never. Called with each heartbeat."""
        with self._lock:
            if not self.relayed:
                return
            since = self._log.waiting_since(self._owed_after())
            if since is None or time.monotonic() - since < self.config.relay_timeout_s:
                return
            catch_up = self._take_relayed()
        log.warning("host %d.%d: %d instructions from #%d did not come through the fan-out "
                    "tree within %.1f s; sending them directly", self.island, self.host,
                    len(catch_up), catch_up[0].sequence, self.config.relay_timeout_s)
        self._queue_direct(catch_up)

    def _wake_sender(self) -> None:
        with self._lock:
            self._woken = False
        if self._wake is not None:
            self._wake.set()

    def pending(self) -> int:
        """Instructions queued for the host and not dispatched yet."""
        with self._lock:
            owed = self._log.count_after(self._owed_after()) if self.relayed else 0
            return len(self.queue) + owed

    def unacknowledged(self) -> list[pb.Instruction]:
        """What was handed to this link and the host has not acknowledged receiving, in order:
        the batch of a Dispatch whose reply has not come, then the queue. A link that replaces
        this one for the same host sends these again (scheduler.gang's set_host), so nothing is
        lost; the host skips what it already holds (runtime.worker.intake)."""
        with self._lock:
            return [ins for ins in in_order(self._in_flight, self.queue, self._owed())
                    if ins.sequence > self.acked]

    def ping(self, timeout: float, fresh_s: float = 0.0) -> concurrent.futures.Future:
        """The host's answer to a heartbeat, as a future of a PingReply (or of the RPC's error):
        a Ping RPC on the loop; or, when the host was heard from (a Dispatch reply, a progress
        report) within `fresh_s` plus its idle report interval, what it said (no call: a host
        pays no heartbeat while it gets work or reports, and counts either as the controller's
        contact). The heartbeat checks what the tree was to bring the host first
        (`check_relayed`, through scheduler.progress's heard_lately)."""
        if self.heard_lately(fresh_s):
            answered: concurrent.futures.Future = concurrent.futures.Future()
            answered.set_result(pb.PingReply(executed=self.executed))
            return answered
        return self.loop.submit(self._ping(timeout))

    def heard_lately(self, fresh_s: float, now: float | None = None) -> bool:
        """Whether the host was heard from (a Dispatch reply, a progress report) within
        `fresh_s` (0: never) plus its idle report interval before `now` (time.monotonic(),
        by default the present): then it needs no Ping."""
        now = time.monotonic() if now is None else now
        return bool(fresh_s) and now - self.heard_at < fresh_s + self.config.progress_idle_s

    async def _ping(self, timeout: float) -> pb.PingReply:
        deadline = time.monotonic() + timeout
        while self._stub is None and time.monotonic() < deadline:  # the link is just starting
            await asyncio.sleep(0.01)
        if self._stub is None or self.closed:
            raise ValueError("the link is closed")
        try:
            return await self._stub.Ping(pb.PingRequest(), timeout=timeout,
                                         metadata=self._metadata)
        except (grpc.aio.UsageError, asyncio.CancelledError):
            # The link closed its channel meanwhile (the host registered again): a closed
            # channel cancels the calls on it.
            raise ValueError("the link is closed") from None

    # -- on the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        self._wake = asyncio.Event()
        channel = self.events.open_channel(self.address)
        self._stub = pb_grpc.WorkerStub(channel)
        watcher = asyncio.ensure_future(self._watch_loop())
        try:
            await self._send_loop()  # until the link is closed or lost
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await channel.close()

    def _next_batch(self) -> tuple[list[pb.Instruction], list[pb.ForwardTarget], bool]:
        """The next Dispatch's batch, the subtrees it goes to, and whether the heartbeat asked
        for a Dispatch (`keep_alive`: any batch answers it)."""
        with self._lock:
            batch, size = [], 0
            while self.queue and len(batch) < self.config.max_batch:
                # A large instruction (a load, up to proto.limits' bound) travels alone rather
                # than push a batch past the message limit.
                ins_size = self.queue[0].ByteSize()
                if batch and size + ins_size > self.config.max_batch_bytes:
                    break
                batch.append(self.queue.popleft())
                size += ins_size
            self._in_flight = batch
            keepalive, self._keepalive = self._keepalive, False
            return batch, self.forward, keepalive

    async def _send_loop(self) -> None:
        while not self.closed and not self.failed:
            batch, forward, keepalive = self._next_batch()
            if not batch and not keepalive:
                self._wake.clear()
                # Only this link's own queue keeps it going (`idle`: no batch is in flight
                # here): what the tree is to bring the host (in `pending`) is not the sender's
                # to send, and looping on it would spin the loop.
                if not self.idle() or self.closed or self.failed:
                    continue
                await self._wake.wait()
                continue
            request = pb.DispatchRequest(controller_id=self.events.controller_id,
                                         epoch=self.events.epoch, instructions=batch,
                                         forward=forward)
            try:
                reply = await self._stub.Dispatch(request, timeout=self.config.dispatch_timeout_s,
                                                  metadata=self._metadata)
            except grpc.RpcError as err:
                if not self.closed:
                    self._lost(f"dispatch failed: {err.code().name}: {err.details()}")
                return
            with self._lock:
                self._in_flight = []
            self.heard_at = self._dispatched_at = time.monotonic()
            self._report(HostReport(self.host, reply.executed, reply.received))
            for position in reply.forwarded:
                self._forwarded(position)

    def _forwarded(self, position: pb.HostPosition) -> None:
        """A host below this one in the fan-out tree: where it stands, or that it was lost."""
        if not position.error:
            self._report(HostReport(position.host, position.executed, position.received,
                                    contacted=True))
        elif not position.error.startswith("not reached"):  # its own call failed
            self.events.on_link_lost(position.host, f"not reached through the fan-out tree "
                                                    f"from host {self.island}.{self.host}: "
                                                    f"{position.error}")

    async def _watch_loop(self) -> None:
        opened = False
        while not self.closed:
            interval, idle = self.report_interval_s, self.idle_interval_s
            request = pb.WatchProgressRequest(min_interval_s=interval, idle_interval_s=idle)
            reopen = False  # at once, with the island's new report intervals
            try:
                call = self._stub.WatchProgress(request, metadata=self._metadata)
                async for reply in call:
                    opened = True
                    self.heard_at = time.monotonic()
                    self._report(HostReport(self.host, reply.executed, reply.received,
                                            list(reply.completed), reply.hang,
                                            list(reply.arrived)))
                    self._stream_idle_s = idle
                    if (self.report_interval_s, self.idle_interval_s) != (interval, idle):
                        # The island grew or shrank, or its fan-out tree came or went.
                        call.cancel()
                        reopen = True
                        break
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
            if not reopen:
                await asyncio.sleep(self.config.watch_retry_s)

    def _report(self, report: HostReport) -> None:
        if not self.closed:
            self.events.reports.add(report)

    def _lost(self, reason: str) -> None:
        """Marks the link failed (once) and reports it: the one path of a lost link."""
        with self._lock:
            if self.failed:
                return
            self.failed = reason
            self.queue.clear()
        self._wake.set()  # the sender ends
        self.events.on_link_lost(self.host, reason)

    # -- ending -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Stops the link's coroutines (returns at once; `join` waits for them)."""
        with self._lock:
            self.closed = True
        self.loop.call(self._wake_sender)

    def join(self, timeout: float) -> None:
        """Waits (up to `timeout` seconds) for the link's coroutines to end, after close()."""
        if self.loop.on_loop():
            return
        concurrent.futures.wait([self._done], timeout=max(0.0, timeout))
