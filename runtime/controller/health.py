"""Hosts joining, leaving and lost: registration, the heartbeat, and the one path a lost host's
report takes (from the heartbeat, a host's link or a launcher, through `report_host_lost`) to fail
the work of its island and the transfers other islands expect from it. A component of Controller
(runtime.controller.controller)."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import grpc

from proto import auth as _auth
from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from proto import rpc as _rpc
from proto.config import SchedulerConfig
from proto.errors import HostLostError, InvalidArgumentError
from runtime.controller.defaults import (BUSY_HOST_TIMEOUT_S, HEARTBEAT_INTERVAL_S,
                                         HEARTBEAT_MISSES, MAX_INCOMING)
from runtime.controller.sessions import is_address
from scheduler.coalesce import HostReport
from scheduler.gang import GangScheduler
from scheduler.readiness import Readiness
from scheduler.resources import HostRecord, ResourceManager

log = logging.getLogger(__name__)


class Health:
    """Host membership and loss for a Controller: the hosts' registry (`resources`), the probe
    channel of each host and the heartbeat that pings them (unless not `heartbeat`), and each
    island's gang scheduler, made when its first host registers (in `schedulers`, shared with the
    controller's catalog, under the controller's `lock`): with `controller_id`, `policy`,
    `readiness`, `scheduler_config`, and `credentials` for the channels to its hosts.
    `forget_island(island, why)` drops the slices of an island restarted after a loss
    (runtime.controller.catalog)."""

    def __init__(self, lock: threading.RLock, resources: ResourceManager,
                 schedulers: dict[int, GangScheduler], *, controller_id: str, policy: str,
                 credentials: _auth.Credentials, readiness: Readiness,
                 scheduler_config: SchedulerConfig, forget_island: Callable[[int, str], None],
                 heartbeat: bool = True) -> None:
        self._lock = lock
        self.resources = resources
        self._schedulers = schedulers
        self.controller_id, self.policy = controller_id, policy
        self.credentials = credentials
        self.readiness = readiness
        # Without a heartbeat nothing reaches an idle fan-out tree's hosts but their own
        # reports: they report as often as the others (scheduler.delivery).
        self.scheduler_config = scheduler_config if heartbeat else dataclasses.replace(
            scheduler_config, progress_idle_tree_s=scheduler_config.progress_idle_s)
        self._forget_island = forget_island
        self._epochs: dict[int, int] = {}  # island -> restarts under this controller
        # source island -> (island, spec) of arrays other islands expect from it (report_host_lost)
        self._incoming: dict[int, collections.deque] = {}
        self._probes: dict[tuple[int, int], tuple[grpc.Channel, pb_grpc.WorkerStub]] = {}
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                           name="heartbeat") if heartbeat else None
        if self._heartbeat:
            self._heartbeat.start()

    def probes(self) -> dict[tuple[int, int], tuple[grpc.Channel, pb_grpc.WorkerStub]]:
        """(island, host) -> (channel, stub) of each registered host's control server (a copy;
        call with the lock held)."""
        return dict(self._probes)

    def close(self) -> None:
        """Stops the heartbeat and closes the probe channels; returns once the heartbeat thread
        has ended (a daemon thread still inside a gRPC call at interpreter exit can abort the
        process)."""
        self._stop.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=2 * HEARTBEAT_INTERVAL_S + 1)
        with self._lock:
            for channel, _ in self._probes.values():
                channel.close()

    def register_host(self, info: pb.HostInfo) -> None:
        """Adds a host (or replaces an earlier registration of its island and index).

        A host registering on an island that lost one restarts the island: its slices (and the
        arrays and executables on them) are dropped and its order starts afresh (a new epoch), so
        a restarted island starts empty. Sessions that used it get NotFoundError for them. A
        host whose process restarted unnoticed (it holds less of the order than it had
        acknowledged) is first declared lost, with that reason: its island restarts too."""
        if (info.island < 0 or info.host < 0 or info.num_devices <= 0
                or not is_address(info.address)
                or (info.control_address and not is_address(info.control_address))):
            raise InvalidArgumentError("host registration needs island >= 0, host >= 0, "
                                       "num_devices > 0 and addresses HOST:PORT")
        if info.island > 1 << 20 or info.host > 1 << 20 or info.num_devices > 1 << 20:
            raise InvalidArgumentError("host registration: island, host or device count too large")
        record = HostRecord(info.island, info.host, info.address, info.platform or "cpu",
                            info.num_devices, info.device_kind, info.backend or "local",
                            info.device_memory_bytes, info.distributed_hosts,
                            ray_node=info.ray_node)
        with self._lock:
            scheduler = self._schedulers.get(info.island)
            gap = "" if scheduler is None else scheduler.order_gap(info.host, info.received,
                                                                   info.incarnation)
            if gap:  # a restarted process: its island restarts too (below)
                self.report_host_lost(info.island, info.host, gap)
            if self.resources.lost_host(info.island) is not None:
                self._restart_island(info.island)
            self.resources.register_host(record)
            scheduler = self._schedulers.get(info.island)
            if scheduler is None:
                scheduler = GangScheduler(
                    info.island, self.controller_id, self.report_host_lost, policy=self.policy,
                    epoch=self._epochs.get(info.island, 0),
                    open_channel=lambda address: _rpc.open_aio_channel(address, self.credentials),
                    channel_metadata=_rpc.credential_metadata(self.credentials),
                    readiness=self.readiness,
                    config=self.scheduler_config)
                self._schedulers[info.island] = scheduler
            # Dispatch, progress and heartbeat go to the host's control server: client traffic on
            # its main server cannot make them late (runtime.worker.worker).
            control = info.control_address or info.address
            scheduler.set_host(info.host, control, info.incarnation)
            old = self._probes.pop((info.island, info.host), None)
            channel = _rpc.open_channel(control, self.credentials)
            self._probes[(info.island, info.host)] = (channel, pb_grpc.WorkerStub(channel))
        if old:
            old[0].close()
        log.info("registered %s", record.describe())

    def _restart_island(self, island: int) -> None:
        """Forgets everything on an island that lost a host (called under the lock, before a
        host registers on it again): its slices with their arrays and executables, its order."""
        scheduler = self._schedulers.pop(island, None)
        if scheduler is not None:
            scheduler.fail(HostLostError(f"island {island} was restarted"))
            scheduler.close(timeout=0)  # under the lock: its threads end on their own
        self._epochs[island] = self._epochs.get(island, 0) + 1
        lost = self.resources.lost_host(island)
        self._forget_island(island, f"island {island} restarted (epoch {self._epochs[island]})"
                            + (f" after {lost.describe()} was lost" if lost else ""))
        for host in self.resources.island_hosts(island):
            probe = self._probes.pop((island, host.host), None)
            if probe is not None:
                probe[0].close()
            self.resources.remove_host(island, host.host)
        log.warning("island %d restarted (epoch %d): its slices and arrays are gone", island,
                    self._epochs[island])

    def _heartbeat_loop(self) -> None:
        """Pings every host each HEARTBEAT_INTERVAL_S (`_heartbeat_round`)."""
        refused: dict[tuple[int, int], int] = {}
        last_answer: dict[tuple[int, int], float] = {}
        while not self._stop.wait(HEARTBEAT_INTERVAL_S):
            with self._lock:
                probes = dict(self._probes)
            self._heartbeat_round(probes, refused, last_answer)

    def _heartbeat_round(self, probes: dict, refused: dict[tuple[int, int], int],
                         last_answer: dict[tuple[int, int], float]) -> None:
        """Pings the hosts of `probes` ((island, host) -> (channel, stub)) all at once, but for
        those their island heard from lately (they count as answered), then reads the answers:
        a round takes one ping's deadline however many hosts are silent, so the others hear
        from the controller well within their silence limit
        (runtime.worker.membership). A host whose process is gone refuses the connection: it is
        declared lost after HEARTBEAT_MISSES refusals in a row (about a second). A host that
        answers late is busy, not gone (a long compile, a starved process): it is declared lost
        only after BUSY_HOST_TIMEOUT_S without any answer. `refused` and `last_answer` carry
        each host's record from one round to the next. The positions the answers carry reach
        each island's scheduler in one batch (one lock, one look for the slowest host)."""
        now = time.monotonic()
        calls = {}
        positions: dict[int, list[HostReport]] = collections.defaultdict(list)
        heard = {}
        schedulers = list(self._schedulers.items())
        for i, (island, scheduler) in enumerate(schedulers):
            # The hosts of its fan-out tree, through the tree, unless its work went through it
            # lately; the islands' calls spread over the interval (all at once, they held up
            # commands arriving meanwhile).
            scheduler.keep_alive(i * HEARTBEAT_INTERVAL_S / len(schedulers),
                                 HEARTBEAT_INTERVAL_S / 2)
            heard[island] = scheduler.heard_lately(HEARTBEAT_INTERVAL_S)
        # Those that answered a Dispatch or reported lately count as answered (in bulk: a
        # look at each of 1,024 hosts here was a fifth of the round).
        answered = {(island, host) for island, hosts in heard.items()
                    for host in hosts} & probes.keys()
        last_answer.update(dict.fromkeys(answered, now))
        refused.update(dict.fromkeys(answered, 0))
        for key in probes.keys() - answered:
            stub = probes[key][1]
            last_answer.setdefault(key, now)
            try:
                calls[key] = self.ping(key, stub)
            except ValueError as err:  # the channel was replaced or closed
                calls[key] = err
        for key, call in calls.items():
            try:
                if isinstance(call, ValueError):
                    raise call
                reply = call.result()
            except (grpc.RpcError, grpc.FutureCancelledError, ValueError,
                    concurrent.futures.CancelledError) as err:
                if self._stop.is_set():
                    return
                code = err.code() if isinstance(err, grpc.RpcError) else None
                # A closed channel or link is one the host's new registration replaced: no
                # refusal of the host's.
                refused[key] = refused.get(key, 0) + (
                    code is not None and code != grpc.StatusCode.DEADLINE_EXCEEDED)
                silent = now - last_answer[key]
                if refused[key] >= HEARTBEAT_MISSES or silent > BUSY_HOST_TIMEOUT_S:
                    reason = (f"unreachable ({code.name if code else 'closed'})"
                              if refused[key] >= HEARTBEAT_MISSES
                              else f"no answer for {silent:.0f} s")
                    self.report_host_lost(*key, reason)
                continue
            refused[key], last_answer[key] = 0, now
            positions[key[0]].append(HostReport(key[1], reply.executed))
        for island, reports in positions.items():
            scheduler = self._schedulers.get(island)
            if scheduler is not None:
                scheduler.note_reports(reports)

    def ping(self, key: tuple[int, int], stub, timeout: float = HEARTBEAT_INTERVAL_S,
              fresh_s: float = HEARTBEAT_INTERVAL_S):
        """A ping of a host (the heartbeat's, or the status's with `fresh_s` 0): through its
        island's link (on the link loop, no thread of its own; answered without a call when the
        host answered a Dispatch within `fresh_s`: scheduler.delivery), or on the probe's
        channel for a host without a link."""
        scheduler = self._schedulers.get(key[0])
        call = None if scheduler is None else scheduler.ping(key[1], timeout, fresh_s=fresh_s)
        return call if call is not None else stub.Ping.future(pb.PingRequest(), timeout=timeout)

    def report_host_lost(self, island: int, host: int, reason: str) -> None:
        """Declares a host lost (heartbeat, dispatch failure, or a supervisor such as Ray's):
        work on its island fails with HostLostError naming it; other islands go on (work of theirs
        waiting for an array from the lost island fails instead of waiting out its deadline)."""
        record = self.resources.mark_lost(island, host, reason)
        if record:
            log.warning("lost %s: %s", record.describe(), reason)
            self._fail_island(island, record, reason)
            threading.Thread(target=self._fail_incoming, args=(island, record.describe(), reason),
                             daemon=True, name=f"fail-incoming-{island}").start()

    def note_transfer(self, source_island: int, island: int, destination: pb.ArraySpec) -> None:
        """Remembers (boundedly) that `island` expects an array from `source_island`."""
        with self._lock:
            incoming = self._incoming.get(source_island)
            if incoming is None:
                incoming = self._incoming[source_island] = collections.deque(maxlen=MAX_INCOMING)
            incoming.append((island, destination))

    def _fail_incoming(self, lost_island: int, host: str, reason: str) -> None:
        """Fails, on the other islands, the arrays still expected from a lost island: their hosts
        would otherwise wait INPUT_TIMEOUT_S for them, holding their island's order (one execution
        at a time) hostage, other clients' work included."""
        with self._lock:
            incoming = list(self._incoming.pop(lost_island, ()))
            hosts = {i: [h.address for h in self.resources.island_hosts(i) if h.alive]
                     for i in {i for i, _ in incoming}}
        message = f"its source, {host} of island {lost_island}, was lost: {reason}"
        for island, spec in incoming:
            for address in hosts.get(island, ()):
                chunk = pb.ArrayChunk(spec=spec, error=message)
                try:
                    with _rpc.open_channel(address, self.credentials) as channel:
                        pb_grpc.WorkerStub(channel).PutArray(iter([chunk]), timeout=5.0)
                except grpc.RpcError:
                    pass  # that host is gone too; its own loss is reported separately

    def _fail_island(self, island: int, record: HostRecord, reason: str) -> None:
        """Work queued for an island whose host was lost fails now, not at its deadline."""
        scheduler = self._schedulers.get(island)
        if scheduler is not None:
            scheduler.fail(HostLostError(f"{record.describe()} of island {island} was lost: "
                                         f"{reason}"))

    def unregister_host(self, island: int, host: int, address: str = "") -> None:
        """A host leaves: the registry drops it (once no slice uses its island), its island takes
        no new slices, and work still queued for the island fails with HostLostError."""
        with self._lock:
            record = self.resources.remove_host(island, host, address)
            if record is None:
                return
            probe = self._probes.pop((island, host), None)
            scheduler = self._schedulers.get(island)
        log.info("%s left", record.describe())
        if probe:
            probe[0].close()
        if scheduler is not None:
            scheduler.remove_host(host)
            scheduler.fail(HostLostError(f"{record.describe()} of island {island} left the "
                                         f"cluster"))
