"""Gang scheduling: one total order of work per island, delivered identically to each of its hosts.

Every instruction for an island, from every client, gets the next sequence number under one lock and
is queued for every host of the island; each host executes strictly in sequence order. So all hosts
run the island's SPMD computations in the same order, and their collectives meet, whatever the
interleaving of clients.

In front of the order sit per-client queues (`Tenant`s): a client's instructions wait there, in the
client's own order, until a scheduling policy (FIFO or proportional share, scheduler.policy)
gives them their place. Only a short window of device work (`window_s` of estimated execution
time, or four trips of the order to the island's last host where that takes longer) is ordered
ahead of the slowest host, so the policy decides close to when work runs, and a client submitting
as fast as it can waits for its turn instead of flooding the hosts. Hosts report
each execution's duration (scheduler.delivery), which refines the estimates and charges each
client its measured device time. Instructions that cost no device time (array declarations,
deletes, sends, loads) are ordered as soon as they reach the head of their queue.

An instruction enters the order only once its inputs exist or are produced by something already
ordered (scheduler.readiness): a computation on a put that has not arrived waits at the head of
its client's queue, and other clients go ahead, instead of stopping the island's executor. It
fails (its request gets DeadlineExceededError) if its inputs have not come by its request's
deadline, or within `input_wait_s`.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence

import grpc

from proto import pathways_pb2 as pb
from proto import rpc as _rpc
from proto.bounded import Latest
from proto.errors import DeadlineExceededError, FailedPreconditionError, PathwaysError
from proto.instructions import kind_of
from proto.config import SchedulerConfig, from_env
from scheduler.coalesce import ProgressCoalescer
from scheduler import fanout
from scheduler.delivery import HostLink, in_order
from scheduler.latency import StageLatency
from scheduler.policy import SchedulingPolicy, Tenant, check_weight, make_policy
from scheduler.progress import Progress
from scheduler.readiness import Readiness
from scheduler.relaylog import RelayLog
from scheduler.tickets import OrderTicket, Queued

log = logging.getLogger(__name__)


class GangScheduler(Progress):
    """The total order of one island and the client queues in front of it. Thread-safe; neither
    `submit` nor `enqueue` waits for the hosts."""

    def __init__(self, island: int, controller_id: str,
                 on_host_failure: Callable[[int, int, str], None], *,
                 policy: str | SchedulingPolicy = "fifo", window_s: float | None = None,
                 link_factory: Callable[[GangScheduler, int, str], HostLink] = HostLink,
                 epoch: int = 0, open_channel: Callable[[str], grpc.aio.Channel] | None = None,
                 channel_metadata: Sequence[tuple[str, str]] = (),
                 readiness: Readiness | None = None,
                 config: SchedulerConfig | None = None) -> None:
        """`link_factory(scheduler, host, address)` connects a host (tests pass a fake);
        `open_channel(address)` opens the asyncio channel of a real link (with the cluster's TLS;
        on the link loop) and `channel_metadata` goes with its calls (the cluster's tokens);
        `epoch` numbers the island's incarnations under this controller (hosts reset when it
        changes: the island was restarted); `readiness` is the registry of arrays that do not
        exist yet (shared by a controller's islands: a copy between islands is ready once its
        send is ordered on the source's). `config` is every setting of the scheduler and its
        links, whole (default: SchedulerConfig as this process's environment sets it);
        `window_s`, when given, overrides its field of that name."""
        self.config = from_env(SchedulerConfig) if config is None else config
        window_s = self.config.window_s if window_s is None else window_s
        self.island, self.controller_id = island, controller_id
        self.epoch = epoch
        self.open_channel = open_channel or _rpc.open_aio_channel
        self.channel_metadata = tuple(channel_metadata)
        self.reports = ProgressCoalescer(self.note_reports)  # the links' reports, per loop turn
        self._link_factory = link_factory
        self.on_host_failure = on_host_failure
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.window_s = window_s
        self.cond = threading.Condition()
        self.closed = False
        self._links: dict[int, HostLink] = {}
        self._direct: list[HostLink] = []  # those not relayed: the relay log has it for those
        self.relay_log = RelayLog()
        self._incarnations: dict[int, str] = {}  # each host's process, as it registered
        self._sequence = 0
        self._history: list[pb.Instruction] = []  # replayed to a host that (re)joins
        self._tenants: dict[int, Tenant] = {}
        self._arrivals = itertools.count()
        # Ordered executions not yet executed by every host: (sequence, estimate).
        self._inflight: collections.deque[tuple[int, float]] = collections.deque()
        self._outstanding_s = 0.0
        # The latest times from ordered to received by the island's last host.
        self._trips: collections.deque[float] = collections.deque(
            maxlen=self.config.window_trip_samples)
        self._trip_s = 0.0  # their median
        self._unmeasured: Latest[int, tuple[Tenant, int, float]] = Latest(
            self.config.max_unmeasured)
        self._costs: dict[int, float] = {}  # executable id -> estimated seconds
        self._executed = 0  # highest sequence every host has executed
        self._slowest = 0  # what the slowest host has executed, as last computed
        self._progress_at = time.monotonic()
        self._failure: PathwaysError | None = None
        self.latency = StageLatency(self.config.latency_window_s)
        self.readiness = readiness or Readiness()
        self.input_wait_s = self.config.input_wait_s
        self._wake = threading.Event()  # some array became ready: admit what waited for it
        self.readiness.subscribe(self._wake.set)
        self._stopped = threading.Event()
        self._pump = threading.Thread(target=self._pump_loop, daemon=True,
                                      name=f"gang-{island}")
        self._pump.start()

    # -- hosts ------------------------------------------------------------------------------------

    def set_host(self, host: int, address: str, incarnation: str = "") -> None:
        """Connects a host; a host that joins late receives the island's order so far. A host that
        re-registers clears the island's failure (its order starts afresh on the host). A live
        host that registers again (it heard from no controller for a while) loses nothing: its
        new link also sends, in order, what the old one held that the host had not acknowledged
        (resends of what it holds it skips)."""
        with self.cond:
            old = self._links.pop(host, None)
            resend: list[pb.Instruction] = []
            if old is not None:
                old.close()  # first: its sender hands nothing more to the host
                resend = old.unacknowledged()
            link = self._link_factory(self, host, address)
            link.send(in_order(self._history, resend))
            self._links[host] = link
            self._incarnations[host] = incarnation
            self._route()
            self._failure = None
            self._recompute_progress()
            self.cond.notify_all()

    def remove_host(self, host: int) -> None:
        """Disconnects a host that left the island."""
        with self.cond:
            link = self._links.pop(host, None)
            if link is not None:
                link.close()
                self._route()
            self._recompute_progress()
            self.cond.notify_all()

    def _route(self) -> None:
        """The island's fan-out tree over its links that are caught up (scheduler.fanout), and
        how often each host reports progress (`report_interval`; when idle, rarely in a tree)."""
        self._direct = fanout.apply(self._links, self.config.fanout,
                                    self.config.fanout_min_hosts, self.config.fanout_roots)
        idle = (self.config.progress_idle_tree_s if len(self._direct) < len(self._links)
                else self.config.progress_idle_s)  # the heartbeat reaches a tree's hosts
        for link in self._links.values():
            if hasattr(link, "report_interval_s"):  # a real link (tests pass fakes)
                link.report_interval_s, link.idle_interval_s = self.report_interval, idle

    # -- ordering ---------------------------------------------------------------------------------

    def submit(self, ops: Sequence[pb.Instruction]) -> list[int]:
        """Orders ops at once, ahead of queued client work, and queues them for every host;
        returns their sequence numbers. For instructions outside any client's stream (slice
        definitions). Raises the island's failure, e.g. HostLostError."""
        with self.cond:
            self._raise_if_failed()
            for op in ops:
                self._place(op)
            self._deliver(ops)
            return [op.sequence for op in ops]

    def enqueue(self, session_id: int, ops: Sequence[pb.Instruction], *, weight: float = 1.0,
                name: str = "") -> OrderTicket:
        """Queues a session's instructions behind its earlier ones; the policy orders them.

        Returns at once (ordering what the window allows in this call); `ticket.wait()` gives the
        sequence numbers. Raises the island's failure, e.g. HostLostError.
        """
        with self.cond:
            self._raise_if_failed()
            tenant = self._tenants.get(session_id)
            if tenant is None:
                tenant = self._tenants[session_id] = Tenant(session_id, name)
            tenant.weight, tenant.closing = check_weight(weight), False
            ticket = OrderTicket(self, tenant, len(ops))
            if not ops:
                return ticket
            idle = not tenant.queue
            now = time.monotonic()
            for i, op in enumerate(ops):
                kind = kind_of(op)
                if kind.executes:
                    op.execute.session_id = session_id
                tenant.queue.append(Queued(op, ticket, i, next(self._arrivals), kind.executes,
                                           kind.reads(op), now))
            if idle:
                self.policy.activate(tenant, [t for t in self._tenants.values()
                                              if t.queue and t is not tenant], time.monotonic())
            self._admit()
            return ticket

    def end_session(self, session_id: int) -> None:
        """Forgets a session once its queued work has been ordered. Its instructions still
        waiting for inputs that do not exist fail now: the puts they wait for would be refused
        (the session's arrays are deleted)."""
        with self.cond:
            tenant = self._tenants.get(session_id)
            if tenant is not None:
                tenant.closing = True
                kept: collections.deque[Queued] = collections.deque()
                for item in tenant.queue:
                    missing = self._blocking(item)
                    if missing is None:
                        kept.append(item)
                    else:
                        self._drop(item, FailedPreconditionError(
                            f"session {session_id} ended while its instruction waited for "
                            f"array {missing}"))
                tenant.queue = kept
                if not tenant.queue:
                    del self._tenants[session_id]
                self._admit()

    def _place(self, op: pb.Instruction) -> None:
        self._sequence += 1
        op.sequence = self._sequence
        if kind_of(op).replayed:
            self._history.append(op)

    def _forget_slice(self, slice_id: int) -> None:
        """Drops a released slice's definition and loads from the history replayed to joining
        hosts (they hold every executable's bytes)."""
        self._history = [op for op in self._history if kind_of(op).slice_of(op) != slice_id]

    def _deliver(self, ops: Sequence[pb.Instruction]) -> None:
        """To the direct links, and once to the relay log for the others: O(roots), not O(hosts)."""
        for link in self._direct:
            if not link.failed:
                link.send(ops)
        if len(self._direct) < len(self._links):
            self._relay(ops)

    def _blocking(self, item: Queued) -> int | None:
        """An input of `item` that does not exist yet and nothing ordered produces, or None."""
        return self.readiness.blocking(item.inputs) if item.inputs else None

    def _ready(self, tenant: Tenant) -> bool:
        """Whether the head of a (non-empty) tenant queue may be ordered now."""
        return self._blocking(tenant.queue[0]) is None

    def _fail_head(self, tenant: Tenant, error: PathwaysError) -> None:
        """Drops the head of a tenant's queue, which will never be ordered."""
        self._drop(tenant.queue.popleft(), error)
        if not tenant.queue:
            tenant.idle_since = time.monotonic()

    @staticmethod
    def _drop(item: Queued, error: PathwaysError) -> None:
        """Tells a dropped instruction's request why it got no place."""
        ticket = item.ticket
        ticket.failed[item.index] = error
        ticket.remaining -= 1
        if not ticket.remaining:
            ticket.done.set()

    def _input_error(self, item: Queued, why: str) -> PathwaysError:
        array_id = self._blocking(item)
        what = (f"execution of executable {item.op.execute.executable_id}" if item.executes
                else f"{item.op.WhichOneof('op')} of array {item.inputs[0]}")
        return DeadlineExceededError(
            f"island {self.island}: {what} waited {time.monotonic() - item.queued_at:.1f} s for "
            f"input array {array_id}, which does not exist yet (a put that did not complete, or "
            f"a copy whose source never came), {why}; it was not run")

    def _order_head(self, tenant: Tenant, batch: list[pb.Instruction]) -> None:
        """Gives the head of a tenant's queue the next place in the order."""
        item = tenant.queue.popleft()
        self._place(item.op)
        batch.append(item.op)
        tenant.ordered += 1
        on_ordered = _ON_ORDERED.get(item.op.WhichOneof("op"))
        if on_ordered is not None:
            on_ordered(self, item.op)
        if item.executes:  # charged its estimate now, corrected when the hosts measure it
            sequence, executable = item.op.sequence, item.op.execute.executable_id
            cost = max(self.config.min_cost_s, self._costs.get(executable, self.config.default_cost_s))
            self._inflight.append((sequence, cost))
            self._outstanding_s += cost
            self._unmeasured[sequence] = (tenant, executable, cost)
            self.latency.ordered(sequence, item.queued_at)
            self.policy.charge(tenant, cost)
        ticket = item.ticket
        ticket.sequences[item.index] = item.op.sequence
        ticket.remaining -= 1
        if not ticket.remaining:
            ticket.done.set()
        if not tenant.queue:
            tenant.idle_since = time.monotonic()
            if tenant.closing:
                self._tenants.pop(tenant.session_id, None)

    def _window_full(self) -> bool:
        ahead, config = len(self._inflight), self.config
        return ahead >= config.min_outstanding and (self._outstanding_s >= self.window
                                                    or ahead >= config.max_outstanding)

    def _admit(self) -> None:
        """Orders queued work while the window has room (called with the lock held)."""
        if self._failure is not None or self.closed or not self._tenants:
            return
        batch: list[pb.Instruction] = []
        refill = (len(self._inflight) < self.config.min_outstanding
                  or self._outstanding_s < self.window * self.config.refill_below)
        while True:
            for tenant in list(self._tenants.values()):
                while tenant.queue and not tenant.queue[0].executes and self._ready(tenant):
                    self._order_head(tenant, batch)
            backlogged = self._backlogged()
            if not refill or not backlogged or self._window_full():
                break
            self._order_head(self.policy.pick(backlogged), batch)
        if batch:
            self._deliver(batch)

    def _backlogged(self) -> list[Tenant]:
        """Tenants whose head may be ordered now."""
        return [t for t in self._tenants.values() if t.queue and self._ready(t)]

    def _force(self, ticket: OrderTicket, *, fail_blocked: bool = True) -> bool:
        """Orders the rest of a ticket's batch (and what precedes it in its queue) now; an
        instruction whose inputs do not exist yet fails instead (ordered, it would stop the
        island until they came), or, unless `fail_blocked`, stops it. Whether it ordered any."""
        with self.cond:
            if ticket.error is not None or not ticket.remaining:
                return False
            batch: list[pb.Instruction] = []
            tenant = ticket.tenant
            while ticket.remaining and tenant.queue:
                if self._ready(tenant):
                    self._order_head(tenant, batch)
                elif fail_blocked:
                    self._fail_head(tenant, self._input_error(tenant.queue[0],
                                                              "by its request's deadline"))
                else:
                    break
            if batch:
                log.warning("island %d: ordered %d instructions of session %d ahead of their "
                            "turn (the client's deadline is near)", self.island, len(batch),
                            tenant.session_id)
            self._deliver(batch)
            return bool(batch)

    def _expire(self, now: float) -> None:
        """Fails the heads of queues that waited longer than input_wait_s for their inputs (a
        request that went away no longer forces them)."""
        for tenant in list(self._tenants.values()):
            while (tenant.queue and now - tenant.queue[0].queued_at > self.input_wait_s
                   and not self._ready(tenant)):
                self._fail_head(tenant, self._input_error(
                    tenant.queue[0], f"longer than {self.input_wait_s:.0f} s"))
            if not tenant.queue and tenant.closing:
                self._tenants.pop(tenant.session_id, None)

    def _pump_loop(self) -> None:
        """Admits work whose inputs became ready; fails work whose inputs never came; orders
        past the window when the island has stalled (SchedulerConfig.stall_s)."""
        while not self._stopped.is_set():
            woken = self._wake.wait(0.1)
            self._wake.clear()
            with self.cond:
                if self._failure is not None or self.closed:
                    continue
                now = time.monotonic()
                self._expire(now)
                if woken:
                    self._admit()
                if not self._inflight:
                    continue
                stall = max(self.config.stall_s, 4 * self._inflight[0][1])
                backlogged = self._backlogged()
                if backlogged and now - self._progress_at > stall:
                    batch: list[pb.Instruction] = []
                    self._order_head(self.policy.pick(backlogged), batch)
                    self._deliver(batch)
                    self._progress_at = time.monotonic()

    # -- failures ---------------------------------------------------------------------------------

    def fail(self, error: PathwaysError) -> None:
        """Marks the island failed (a lost host, a hang): work queued for it, and every later
        submission until a host re-registers, fails with `error` at once. (A command that touches
        the island fails as a whole, as it does when the failure is known before it is planned.)"""
        with self.cond:
            if self._failure is None:
                self._fail(error)

    def _fail(self, error: PathwaysError) -> None:
        self._failure = error
        self.readiness.forget_island(self.island)
        for tenant in self._tenants.values():
            for item in tenant.queue:
                if item.ticket.error is None:
                    item.ticket.error = error
                    item.ticket.done.set()
            tenant.queue.clear()
        self.cond.notify_all()

    @property
    def failure(self) -> PathwaysError | None:
        """Why the island refuses work, or None."""
        with self.cond:
            if self._failure is None:
                failure = self._link_failure()
                if failure is not None:
                    self._fail(failure)
            return self._failure

    def _link_failure(self) -> PathwaysError | None:
        for host, link in self._links.items():
            if link.failed:
                return self._host_lost(host, link.failed)
        return None

    def _raise_if_failed(self) -> None:
        # A scheduler closed by its island's restart keeps the failure that caused it (a lost
        # host, named): a request that reached it during the restart gets that, not "closed".
        if self._failure is None and not self.closed:
            failure = self._link_failure()
            if failure is not None:
                self._fail(failure)
        if self._failure is not None:
            raise type(self._failure)(str(self._failure))
        if self.closed:
            raise FailedPreconditionError(f"island {self.island}'s scheduler is closed")

    # -- queries ----------------------------------------------------------------------------------

    @property
    def sequence(self) -> int:
        """The last sequence number given out."""
        with self.cond:
            return self._sequence

    def queue_depth(self) -> dict[int, int]:
        """Instructions ordered but not yet sent, per host."""
        with self.cond:
            return {h: link.pending() for h, link in self._links.items()}

    def status(self) -> pb.IslandStatus:
        """The order's position, the client queues and the failure, if any."""
        failure = self.failure
        with self.cond:
            return pb.IslandStatus(
                island=self.island, sequence=self._sequence, policy=self.policy.name,
                failure=str(failure) if failure else "", outstanding_s=self._outstanding_s,
                latency=self.latency.percentiles(),
                tenants=[pb.TenantStatus(session_id=t.session_id, client_name=t.name,
                                         weight=t.weight, queued=len(t.queue), ordered=t.ordered,
                                         device_seconds=t.device_seconds)
                         for t in sorted(self._tenants.values(), key=lambda t: t.session_id)])

    def close(self, timeout: float = 5.0) -> None:
        """Stops ordering and delivery; returns once the island's threads have ended (or after
        `timeout` seconds): a daemon thread still inside gRPC at interpreter exit can abort it."""
        self._stopped.set()
        self._wake.set()
        self.readiness.unsubscribe(self._wake.set)
        with self.cond:
            self.closed = True
            links = list(self._links.values())
            for link in links:
                link.close()
            if self._failure is None:  # an island that failed keeps its reason
                self._fail(FailedPreconditionError(f"island {self.island}'s scheduler is closed"))
            self.cond.notify_all()
        deadline = time.monotonic() + timeout
        if self._pump is not threading.current_thread():
            self._pump.join(timeout)
        for link in links:
            link.join(max(0.0, deadline - time.monotonic()))


#: What ordering an instruction means for the scheduler's own bookkeeping, per kind.
_ON_ORDERED = {
    # The copy is on its way: what reads it may be ordered.
    "send": lambda gang, op: gang.readiness.sent(op.send.destination.array_id),
    # Nothing ordered reads these any more.
    "delete": lambda gang, op: gang.readiness.forget(op.delete.array_ids),
    # A host joining later needs neither the slice's mesh nor its programs.
    "release_slice": lambda gang, op: gang._forget_slice(op.release_slice.slice_id),
}
