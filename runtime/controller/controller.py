"""The controller: sessions, slices, executables and arrays, and dispatch to the islands.

The controller keeps the bookkeeping per logical array (not per shard) and validates every call
against it, so a bad call fails at once with a precise status, before any host sees it. Valid calls
become instructions in the session's queue on their island; the island's gang scheduler
(scheduler.GangScheduler) orders them by its policy (FIFO, or proportional share by the sessions'
weights), and the reply goes back as soon as they are ordered, before they run.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import logging
import re
import secrets
import threading
import time
import uuid
from collections.abc import Sequence

import grpc
import jax

from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from proto import auth as _auth
from proto import limits as _limits
from runtime import metrics_state as _metrics_state
from proto import stablehlo as _stablehlo
from runtime.controller import visibility as _visibility
from proto import wire as _wire
from proto.admission import Admission, Chain
from proto.errors import (FailedPreconditionError, HostLostError, InvalidArgumentError,
                             NotFoundError, PathwaysError, ResourceExhaustedError, abort)
from proto.leases import DEFAULT_SESSION_LEASE_S, SessionLeases
from runtime.metrics import CountingInterceptor
from runtime.controller.placement import Placer
from runtime.controller.planner import Planner, command_result
# Submodules, not the package: `import scheduler` first imports the runtime, which lands here.
from scheduler.gang import GangScheduler, OrderTicket
from scheduler.policy import check_weight, make_policy
from scheduler.readiness import Readiness
from scheduler.resources import HostRecord, ResourceManager, SliceRecord

log = logging.getLogger(__name__)

#: Each session owns array ids [session_id << ID_BITS, (session_id + 1) << ID_BITS).
ID_BITS = _auth.ID_BITS
#: A host's address: HOST:PORT, HOST a name, an IPv4 address or a bracketed IPv6 one.
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]{1,253}):([0-9]{1,5})$")
#: Liveness probes: interval, and misses before a host is declared lost (detection < 2 s).
HEARTBEAT_INTERVAL_S = 0.5
HEARTBEAT_MISSES = 2
BUSY_HOST_TIMEOUT_S = 30.0
#: Deadline for hosts to receive a slice definition before CreateSlice returns.
SLICE_FLUSH_TIMEOUT_S = 10.0
#: Back-pressure: most instructions an island's order may run ahead of its slowest host, and how
#: long a client's commands wait for it to catch up.
MAX_BACKLOG = 4096
BACKLOG_TIMEOUT_S = 120.0
#: A request waiting for its turn in an island's order is ordered at once this long before the
#: client's deadline (its commands would otherwise be lost to the deadline).
ORDER_DEADLINE_MARGIN_S = 2.0
#: Most cross-island transfers remembered per source island (to fail them if it is lost).
MAX_INCOMING = 4096
#: Deadline of the pings `status` sends to every host.
STATUS_PING_TIMEOUT_S = 1.0


def _is_address(address: str) -> bool:
    match = _ADDRESS.match(address)
    return match is not None and 0 < int(match.group(2)) < 65536


@dataclasses.dataclass
class _Session:
    session_id: int
    name: str
    weight: float = 1.0  # proportional share
    slices: set[int] = dataclasses.field(default_factory=set)
    arrays: set[int] = dataclasses.field(default_factory=set)
    executables: set[int] = dataclasses.field(default_factory=set)
    executable_bytes: int = 0  # serialized bytes of its loaded executables
    programs: set[int] = dataclasses.field(default_factory=set)
    nbytes: int = 0  # device memory of its live arrays (replicas counted), for the quota

    def owns_id(self, array_id: int) -> bool:
        return array_id >> ID_BITS == self.session_id


@dataclasses.dataclass(frozen=True)
class _Executable:
    executable_id: int
    session_id: int
    slice_id: int
    name: str
    inputs: tuple[pb.ValueSpec, ...]
    outputs: tuple[pb.ValueSpec, ...]
    donated: frozenset[int]
    fingerprint: str = ""
    output_bytes: tuple[int, ...] = ()  # device memory of each output, replicas counted
    nbytes: int = 0  # serialized size

    @property
    def key(self) -> tuple:
        """Equal loads of one session on one slice share an executable."""
        return (self.session_id, self.slice_id, self.fingerprint, self.donated)


class Controller:
    """Controller state and logic, independent of gRPC. Instantiable: tests run several.

    `policy` is how each island's gang scheduler orders the work of several clients: "fifo"
    (arrival order) or "share" (device time in proportion to the sessions' weights).
    `credentials` are what the controller presents to its hosts (proto.auth; the same ones its
    server demands). `session_quota_bytes` bounds the device memory of each session's live arrays
    (None: unbounded); a command that would pass it fails with ResourceExhaustedError, alone.
    A session not heard from for `session_lease_s` seconds is ended as if it had disconnected,
    its arrays and slices freed (proto.leases; 0: sessions live until they disconnect).
    `limits` bound every request and what each session may hold (proto.limits).
    """

    def __init__(self, *, heartbeat: bool = True, policy: str = "fifo",
                 credentials: _auth.Credentials | None = None,
                 session_quota_bytes: int | None = None,
                 session_lease_s: float = DEFAULT_SESSION_LEASE_S,
                 limits: _limits.Limits = _limits.DEFAULT) -> None:
        make_policy(policy)  # InvalidArgumentError for an unknown name
        self.policy = policy
        self.limits = limits
        self.credentials = credentials or _auth.Credentials()
        if session_quota_bytes is not None and session_quota_bytes < 0:
            raise InvalidArgumentError("the session quota cannot be negative")
        self.session_quota_bytes = session_quota_bytes
        # Secret (session keys are made with it; hosts learn it over the dispatch stream only).
        self.controller_id = secrets.token_hex(16)
        # Public: names things outside the runtime (Ray actors) after this incarnation.
        self.name_tag = uuid.uuid4().hex[:8]
        self._epochs: dict[int, int] = {}  # island -> restarts under this controller
        # source island -> (island, spec) of arrays other islands expect from it (report_host_lost)
        self._incoming: dict[int, collections.deque] = {}
        self.resources = ResourceManager()
        # Arrays that do not exist yet (puts on their way, copies whose send is not ordered):
        # what reads them waits in its client's queue, not in an island's order.
        self.readiness = Readiness()
        self._schedulers: dict[int, GangScheduler] = {}
        self._sessions: dict[int, _Session] = {}
        self.planner = Planner(self)
        self._executables: dict[int, _Executable] = {}
        self._executable_keys: dict[tuple, int] = {}
        self._slice_executables: dict[int, set[int]] = {}  # slice id -> executable ids
        self._session_ids = itertools.count(1)
        self._executable_ids = itertools.count(1)
        self._lock = threading.RLock()
        self.admission: Admission | None = None  # its server's (create_controller_server)
        self._stop = threading.Event()
        self._probes: dict[tuple[int, int], tuple[grpc.Channel, pb_grpc.WorkerStub]] = {}
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                           name="heartbeat") if heartbeat else None
        if self._heartbeat:
            self._heartbeat.start()
        self.leases = SessionLeases(session_lease_s, self._expire_session)
        _metrics_state.track(self, "controller")

    # -- sessions and hosts ----------------------------------------------------------------------

    def connect(self, name: str, weight: float = 1.0) -> _Session:
        """Opens a session; `weight` is its proportional share (0: 1)."""
        weight = check_weight(weight)
        with self._lock:
            if len(self._sessions) >= self.limits.sessions:
                raise ResourceExhaustedError(f"the controller has {len(self._sessions)} open "
                                             f"sessions, its limit; close one first")
            session = _Session(next(self._session_ids), name, weight)
            self._sessions[session.session_id] = session
            self.leases.open(session.session_id)
            return session

    def disconnect(self, session_id: int) -> None:
        """Closes a session: deletes its arrays and releases its slices (after its queued work)."""
        with self._lock:
            session = self._session(session_id)
            self.planner.drop_session(session)
            for slice_id in sorted(session.slices):
                self.release_slice(session_id, slice_id)
            for executable_id in list(session.executables):
                self._forget_executable(executable_id)
            del self._sessions[session_id]
            self.leases.end(session_id)
            for scheduler in self._schedulers.values():
                scheduler.end_session(session_id)

    def _expire_session(self, session_id: int, silent_s: float) -> None:
        """Ends a session whose client went silent for longer than its lease (proto.leases)."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return  # it disconnected meanwhile
            arrays, slices = len(session.arrays), len(session.slices)
            self.disconnect(session_id)
        log.warning("session %d (%r) not heard from for %.1f s (lease %.1f s): ended it, freeing "
                    "%d arrays and %d slices", session_id, session.name, silent_s,
                    self.leases.lease_s, arrays, slices)

    def session_key(self, session_id: int) -> str:
        """The key a client presents to prove it is session `session_id` (proto.auth)."""
        return _auth.session_key(self.controller_id, session_id)

    def knows_session(self, session_id: int) -> bool:
        return session_id in self._sessions

    def register_host(self, info: pb.HostInfo) -> None:
        """Adds a host (or replaces an earlier registration of its island and index).

        A host registering on an island that lost one restarts the island: its slices (and the
        arrays and executables on them) are dropped and its order starts afresh (a new epoch), so
        a restarted island starts empty. Sessions that used it get NotFoundError for them."""
        if (info.island < 0 or info.host < 0 or info.num_devices <= 0
                or not _is_address(info.address)
                or (info.control_address and not _is_address(info.control_address))):
            raise InvalidArgumentError("host registration needs island >= 0, host >= 0, "
                                       "num_devices > 0 and addresses HOST:PORT")
        if info.island > 1 << 20 or info.host > 1 << 20 or info.num_devices > 1 << 20:
            raise InvalidArgumentError("host registration: island, host or device count too large")
        record = HostRecord(info.island, info.host, info.address, info.platform or "cpu",
                            info.num_devices, info.device_kind, info.backend or "local",
                            info.device_memory_bytes, info.distributed_hosts,
                            ray_node=info.ray_node)
        with self._lock:
            if self.resources.lost_host(info.island) is not None:
                self._restart_island(info.island)
            self.resources.register_host(record)
            scheduler = self._schedulers.get(info.island)
            if scheduler is None:
                scheduler = GangScheduler(
                    info.island, self.controller_id, self.report_host_lost, policy=self.policy,
                    epoch=self._epochs.get(info.island, 0),
                    open_channel=lambda address: _auth.open_channel(address, self.credentials),
                    readiness=self.readiness, input_wait_s=self.limits.input_wait_s)
                self._schedulers[info.island] = scheduler
            # Dispatch, progress and heartbeat go to the host's control server: client traffic on
            # its main server cannot make them late (runtime.worker.worker).
            control = info.control_address or info.address
            scheduler.set_host(info.host, control)
            old = self._probes.pop((info.island, info.host), None)
            channel = _auth.open_channel(control, self.credentials)
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
        for record in [r for r in self.resources.slices() if r.island == island]:
            session = self._sessions.get(record.session_id)
            if session is not None:
                self.planner.delete(session, sorted(self.planner.slice_arrays(record.slice_id)),
                                    strict=False)
                session.slices.discard(record.slice_id)
            self.resources.release(record.slice_id)
            for executable_id in list(self._slice_executables.get(record.slice_id, ())):
                self._forget_executable(executable_id)
        for host in self.resources.island_hosts(island):
            probe = self._probes.pop((island, host.host), None)
            if probe is not None:
                probe[0].close()
            self.resources.remove_host(island, host.host)
        log.warning("island %d restarted (epoch %d): its slices and arrays are gone", island,
                    self._epochs[island])


    def _heartbeat_loop(self) -> None:
        """Pings every host. A host whose process is gone refuses the connection: it is declared
        lost after HEARTBEAT_MISSES refusals in a row (about a second). A host that answers late is
        busy, not gone (a long compile, a starved process): it is declared lost only after
        BUSY_HOST_TIMEOUT_S without any answer."""
        refused: dict[tuple[int, int], int] = {}
        last_answer: dict[tuple[int, int], float] = {}
        while not self._stop.wait(HEARTBEAT_INTERVAL_S):
            with self._lock:
                probes = dict(self._probes)
            for key, (_, stub) in probes.items():
                now = time.monotonic()
                last_answer.setdefault(key, now)
                try:
                    reply = stub.Ping(pb.PingRequest(), timeout=HEARTBEAT_INTERVAL_S)
                except (grpc.RpcError, ValueError) as err:  # ValueError: channel replaced or closed
                    if self._stop.is_set():
                        return
                    code = err.code() if isinstance(err, grpc.RpcError) else None
                    refused[key] = refused.get(key, 0) + (code != grpc.StatusCode.DEADLINE_EXCEEDED)
                    silent = now - last_answer[key]
                    if refused[key] >= HEARTBEAT_MISSES or silent > BUSY_HOST_TIMEOUT_S:
                        reason = (f"unreachable ({code.name if code else 'closed'})"
                                  if refused[key] >= HEARTBEAT_MISSES
                                  else f"no answer for {silent:.0f} s")
                        self.report_host_lost(*key, reason)
                    continue
                refused[key], last_answer[key] = 0, now
                scheduler = self._schedulers.get(key[0])
                if scheduler is not None:
                    scheduler.note_progress(key[1], reply.executed)

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
                    with _auth.open_channel(address, self.credentials) as channel:
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

    def status(self, viewer: int | None = None, ping_hosts: bool = True) -> pb.GetStatusReply:
        """Hosts (each pinged now, unless not `ping_hosts`: what it runs or waits for), slices,
        and per island the order and the client queues in front of it. With a `viewer` session,
        only what concerns it (runtime.controller.visibility: its slices and queues; not what hosts run for
        others). Slices are listed up to Limits.status_slice_bytes; `slices_omitted` counts the
        rest."""
        with self._lock:
            depth = {i: s.queue_depth() for i, s in self._schedulers.items()}
            reply = pb.GetStatusReply(sessions=len(self._sessions), arrays=len(self.planner.arrays),
                                      session_lease_s=self.leases.lease_s,
                                      sessions_expired=self.leases.expired)
            probes = dict(self._probes)
            schedulers = sorted(self._schedulers.items())
        hosts = self.resources.hosts()
        self._list_slices(reply, [r for r in self.resources.slices()
                                  if viewer is None or r.session_id == viewer])
        pings = {key: stub.Ping.future(pb.PingRequest(), timeout=STATUS_PING_TIMEOUT_S)
                 for key, (_, stub) in probes.items()
                 if ping_hosts and any((h.island, h.host) == key and h.alive for h in hosts)}
        for h in hosts:
            info = pb.HostInfo(
                island=h.island, host=h.host, address=h.address, platform=h.platform,
                num_devices=h.num_devices, device_kind=h.device_kind, backend=h.backend,
                state=h.state, device_memory_bytes=h.device_memory_bytes,
                distributed_hosts=h.distributed_hosts, ray_node=h.ray_node,
                undelivered=depth.get(h.island, {}).get(h.host, 0))
            ping = pings.get((h.island, h.host))
            if ping is not None:
                try:
                    live = ping.result().host
                    info.activity, info.queue_depth = live.activity, live.queue_depth
                    info.received, info.executed = live.received, live.executed
                    info.hang = live.hang
                    info.current_sequence, info.current_name = (live.current_sequence,
                                                                live.current_name)
                    if live.hang:
                        info.state = "hung"
                except grpc.RpcError as err:
                    info.activity = f"not answering ({err.code().name})"
                except ValueError:  # its channel was replaced or closed meanwhile
                    info.activity = "not answering"
            reply.hosts.append(info)
        for _, scheduler in schedulers:
            reply.islands.append(scheduler.status())
        if viewer is not None:
            _visibility.restrict(reply, viewer)
        return reply

    def _list_slices(self, reply: pb.GetStatusReply, records: Sequence[SliceRecord]) -> None:
        """Adds slice descriptions to a status reply, within its byte budget."""
        budget = self.limits.status_slice_bytes
        hosts: dict[int, list[HostRecord]] = {}
        for record in sorted(records, key=lambda r: r.slice_id):
            island = hosts.get(record.island)
            if island is None:
                island = hosts[record.island] = self.resources.island_hosts(record.island)
            info = self._slice_info(record, island)
            budget -= info.ByteSize()
            if budget < 0:
                reply.slices_omitted += 1
            else:
                reply.slices.append(info)

    # -- slices -----------------------------------------------------------------------------------

    def _slice_info(self, record: SliceRecord,
                    hosts: Sequence[HostRecord] | None = None) -> pb.SliceInfo:
        """A slice as hosts and clients see it (`hosts`: its island's, when known already)."""
        hosts = self.resources.island_hosts(record.island) if hosts is None else hosts
        return pb.SliceInfo(
            slice_id=record.slice_id, island=record.island, mesh_shape=record.mesh_shape,
            axis_names=record.axis_names,
            devices=[pb.SliceDevice(host=h, device=d) for h, d in record.devices],
            host_addresses=[h.address for h in hosts],
            platform=hosts[0].platform if hosts else "")

    def create_slice(self, session_id: int, mesh_shape: Sequence[int], axis_names: Sequence[str],
                     island: int = -1, devices: Sequence[pb.SliceDevice] = ()) -> pb.SliceInfo:
        """Grants a slice (on `devices` when given) and makes its mesh known to its hosts before
        returning."""
        with self._lock:
            session = self._session(session_id)
            if len(session.slices) >= self.limits.slices_per_session:
                raise ResourceExhaustedError(f"session {session_id} holds {len(session.slices)} "
                                             f"slices, its limit; release one first")
            if island >= 0 and island in {h.island for h in self.resources.hosts()}:
                self._check_island(island)
            record = self.resources.allocate(session_id, mesh_shape, axis_names, island,
                                             [(d.host, d.device) for d in devices])
            info = self._slice_info(record)
            session.slices.add(record.slice_id)
            scheduler = self._scheduler(record.island)
            scheduler.submit([pb.Instruction(define_slice=pb.DefineSliceInstruction(slice=info))])
        scheduler.flush(SLICE_FLUSH_TIMEOUT_S)
        return info

    def release_slice(self, session_id: int, slice_id: int) -> None:
        with self._lock:
            session = self._session(session_id)
            if slice_id not in session.slices:
                raise NotFoundError(f"slice {slice_id} is not a slice of this session")
            record = self.resources.release(slice_id)
            session.slices.discard(slice_id)
            self.planner.delete(session, sorted(self.planner.slice_arrays(slice_id)),
                                strict=False)
            for executable_id in list(self._slice_executables.get(slice_id, ())):
                self._forget_executable(executable_id)
            scheduler = self._schedulers.get(record.island)
            if scheduler and not self.resources.lost_host(record.island) and not scheduler.failure:
                scheduler.enqueue(session_id, [pb.Instruction(  # after the session's queued work
                    release_slice=pb.ReleaseSliceInstruction(slice_id=slice_id))],
                    weight=session.weight, name=session.name)

    # -- executables ------------------------------------------------------------------------------

    def load_executable(self, request: pb.LoadExecutableRequest) -> _Executable:
        """Registers serialized StableHLO on a slice, after checking it against its claimed specs."""
        with self._lock:
            self._session(request.session_id)
            record = self._owned_slice(request.session_id, request.slice_id)
        _limits.check_request(self.limits, "LoadExecutable", request)
        placer = Placer(self.resources, request.session_id)
        if request.format == pb.STABLEHLO:
            _stablehlo.check_load(request.name, request.serialized, request.compile_options,
                                  request.inputs, request.outputs, request.donated, record.size)
            output_bytes = _place_specs(request, record, placer)
            fingerprint = _stablehlo.fingerprint(request.serialized, request.compile_options)
        else:
            try:
                exported = jax.export.deserialize(bytearray(request.serialized))
            except Exception as exc:
                raise InvalidArgumentError(f"{request.name!r}: not a serialized jax.export module "
                                           f"({type(exc).__name__})") from None
            output_bytes = _check_signature(request, exported, record, placer)
            fingerprint = hashlib.sha256(request.serialized).hexdigest()
        donated = frozenset(request.donated)
        key = (request.session_id, request.slice_id, fingerprint, donated)
        with self._lock:
            existing = self._executable_keys.get(key)
            if existing is not None:
                return self._executables[existing]
            session = self._session(request.session_id)
            self._owned_slice(request.session_id, request.slice_id)  # not released meanwhile
            if len(session.executables) >= self.limits.executables_per_session:
                raise ResourceExhaustedError(
                    f"session {request.session_id} holds {len(session.executables)} "
                    f"executables, its limit; release a slice (and its executables) first")
            nbytes = len(request.serialized)
            if session.executable_bytes + nbytes > self.limits.executable_bytes_per_session:
                raise ResourceExhaustedError(
                    f"session {request.session_id} would hold "
                    f"{session.executable_bytes + nbytes} bytes of executables, over its limit "
                    f"of {self.limits.executable_bytes_per_session}; release a slice first")
            exe = _Executable(next(self._executable_ids), request.session_id, request.slice_id,
                              request.name, tuple(request.inputs), tuple(request.outputs), donated,
                              fingerprint, output_bytes, nbytes)
            for v in exe.inputs + exe.outputs:
                v.sharding.slice_id = request.slice_id
            self._executables[exe.executable_id] = exe
            self._executable_keys[key] = exe.executable_id
            session.executables.add(exe.executable_id)
            session.executable_bytes += nbytes
            self._slice_executables.setdefault(request.slice_id, set()).add(exe.executable_id)
            self._scheduler(record.island).submit([pb.Instruction(load=pb.LoadInstruction(
                executable_id=exe.executable_id, slice_id=request.slice_id,
                serialized=request.serialized, fingerprint=fingerprint, inputs=request.inputs,
                outputs=request.outputs, donated=sorted(donated), name=request.name,
                format=request.format, compile_options=request.compile_options))])
            return exe

    def _forget_executable(self, executable_id: int) -> None:
        """Drops an executable's bookkeeping (its slice is released, or its session ended)."""
        exe = self._executables.pop(executable_id, None)
        if exe is None:
            return
        self._executable_keys.pop(exe.key, None)
        session = self._sessions.get(exe.session_id)
        if session is not None:
            session.executables.discard(executable_id)
            session.executable_bytes -= exe.nbytes
        on_slice = self._slice_executables.get(exe.slice_id)
        if on_slice is not None:
            on_slice.discard(executable_id)
            if not on_slice:
                del self._slice_executables[exe.slice_id]

    # -- arrays, commands and programs (runtime.controller.planner) -----------------------------------------

    def register_arrays(self, session_id: int, specs: Sequence[pb.ArraySpec],
                        timeout: float | None = None) -> list[int]:
        """Declares arrays a client is about to stream to their hosts; returns, per array, the
        island sequence number from which its hosts expect it."""
        placements = self.planner.place_arrays(Placer(self.resources, session_id), specs)
        with self._lock:
            sequences = self.planner.register_arrays(self._session(session_id), specs, placements)
        return sequences(timeout)

    def execute(self, session_id: int, commands: Sequence[pb.Command],
                timeout: float | None = None) -> list[pb.CommandResult]:
        """Checks each command and queues the accepted ones; returns once they are ordered,
        before any of them runs.

        The wait for their turn (set by the island's policy) happens outside the lock, so other
        clients go on; after `timeout` s the rest are ordered at once. Waits first while an island
        is more than MAX_BACKLOG instructions ahead of its slowest host.
        """
        for scheduler in list(self._schedulers.values()):
            scheduler.wait_backlog(MAX_BACKLOG, BACKLOG_TIMEOUT_S)
        deadline = None if timeout is None else time.monotonic() + timeout
        pieces, start, emitted = [], 0, 0
        while True:  # a bounded piece per hold of the lock: other clients go on in between
            with self._lock:
                try:
                    session = self._session(session_id)
                except NotFoundError as exc:  # closed meanwhile: the rest of it fails
                    if not pieces:
                        raise
                    pieces.append(lambda _, n=len(commands) - start, exc=exc:
                                  [command_result(exc)] * n)
                    break
                results, start, emitted = self.planner.execute(session, commands, start, emitted)
            pieces.append(results)
            if start >= len(commands):
                break
        return [result for piece in pieces for result in piece(
            None if deadline is None else max(0.0, deadline - time.monotonic()))]

    def register_program(self, request: pb.RegisterProgramRequest) -> int:
        """Checks a traced program (outside the lock: its work is the request's own) and
        registers it."""
        with self._lock:
            session = self._session(request.session_id)
        program = self.planner.plan_program(session, request)
        with self._lock:
            return self.planner.add_program(self._session(request.session_id), program)

    def delete_arrays(self, session_id: int, array_ids: Sequence[int]) -> None:
        """Deletes arrays (NOT_FOUND for an unknown id) after the work already ordered."""
        with self._lock:
            self.planner.delete(self._session(session_id), array_ids, strict=True)

    # -- helpers ----------------------------------------------------------------------------------

    def _session(self, session_id: int) -> _Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise NotFoundError(f"session {session_id} is unknown (connect first)")
        return session

    def _owned_slice(self, session_id: int, slice_id: int) -> SliceRecord:
        record = self.resources.get_slice(slice_id)
        if record.session_id != session_id:
            raise NotFoundError(f"slice {slice_id} is unknown or was released")
        return record

    def _executable(self, session: _Session, executable_id: int) -> _Executable:
        exe = self._executables.get(executable_id)
        if exe is None or exe.session_id != session.session_id:
            raise NotFoundError(f"executable {executable_id} is unknown")
        return exe

    def _check_island(self, island: int) -> None:
        lost = self.resources.lost_host(island)
        if lost is not None:
            raise HostLostError(f"{lost.describe()} of island {island} was lost: "
                                f"{lost.lost_reason}")
        scheduler = self._schedulers.get(island)
        failure = scheduler.failure if scheduler is not None else None
        if failure is not None:  # e.g. a hung computation (DeadlineExceededError)
            raise type(failure)(str(failure))

    def _scheduler(self, island: int) -> GangScheduler:
        scheduler = self._schedulers.get(island)
        if scheduler is None:
            raise FailedPreconditionError(f"island {island} has no hosts")
        return scheduler

    def scheduler(self, island: int) -> GangScheduler:
        """The gang scheduler of an island (FailedPreconditionError if it has no hosts)."""
        with self._lock:
            return self._scheduler(island)

    def _orderer(self, session: _Session):
        """Queues a session's instructions on an island: (island, ops) -> OrderTicket."""
        def order(island: int, ops: list[pb.Instruction]) -> OrderTicket:
            return self._scheduler(island).enqueue(session.session_id, ops,
                                                   weight=session.weight, name=session.name)
        return order

    def close(self) -> None:
        """Stops dispatch and the heartbeat; returns once the heartbeat thread has ended (a daemon
        thread still inside a gRPC call at interpreter exit can abort the process)."""
        self._stop.set()
        _metrics_state.untrack(self)
        self.leases.close()
        if self.admission is not None:
            self.admission.stop()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=2 * HEARTBEAT_INTERVAL_S + 1)
        with self._lock:
            schedulers = list(self._schedulers.values())
            for channel, _ in self._probes.values():
                channel.close()
        for scheduler in schedulers:  # outside the lock: their threads may take it to report
            scheduler.close()


def _check_signature(request: pb.LoadExecutableRequest, exported, record: SliceRecord,
                     placer: Placer) -> tuple[int, ...]:
    """InvalidArgumentError unless the module's avals match the specs the client claims;
    ResourceExhaustedError for an input or output that cannot fit its devices. Returns the device
    memory of each output (replicas counted)."""
    claims = [("input", request.inputs, exported.in_avals),
              ("output", request.outputs, exported.out_avals)]
    for what, specs, avals in claims:
        if len(specs) != len(avals):
            raise InvalidArgumentError(f"{request.name!r}: {len(specs)} {what} specs for a module "
                                       f"with {len(avals)} {what}s")
        for i, (spec, aval) in enumerate(zip(specs, avals)):
            if (_wire.dtype_from_name(spec.dtype), tuple(spec.shape)) != (aval.dtype, aval.shape):
                raise InvalidArgumentError(f"{request.name!r}: {what} {i} is {aval.str_short()} in "
                                           f"the module, {spec.dtype}{list(spec.shape)} in the request")
    if exported.nr_devices not in (1, record.size):
        raise InvalidArgumentError(f"{request.name!r} was exported for {exported.nr_devices} "
                                   f"devices; slice {record.slice_id} has {record.size}")
    if any(i < 0 or i >= len(request.inputs) for i in request.donated):
        raise InvalidArgumentError(f"{request.name!r}: donated input out of range")
    return _place_specs(request, record, placer)


def _place_specs(request: pb.LoadExecutableRequest, record: SliceRecord,
                 placer: Placer) -> tuple[int, ...]:
    """Places every input and output of an executable on its slice (runtime.controller.placement):
    InvalidArgumentError for a sharding that does not fit the slice's mesh,
    ResourceExhaustedError for a value that cannot fit its devices. Returns the device memory of
    each output (replicas counted)."""
    output_bytes = []
    for what, specs in (("input", request.inputs), ("output", request.outputs)):
        for i, spec in enumerate(specs):
            sharding = pb.Sharding(slice_id=record.slice_id, dims=spec.sharding.dims)
            placement = placer.place(spec.dtype, spec.shape, sharding,
                                     f"{request.name!r} {what} {i}")
            if what == "output":
                output_bytes.append(placement.total_bytes)
    return tuple(output_bytes)


def _session_policy(controller: Controller) -> _auth.Authorize:
    """Session keys (proto.auth.session_policy), and a clear error for a session this
    controller does not know (it restarted, or the session was closed)."""
    check = _auth.session_policy(lambda: controller.controller_id)

    def authorize(method: str, request, key: str | None, is_host: bool) -> None:
        check(method, request, key, is_host)
        session_id = getattr(request, "session_id", None)
        if session_id is not None and not controller.knows_session(session_id):
            raise NotFoundError(f"session {session_id} is unknown to this controller (closed, "
                                f"its lease ran out, or the controller restarted): connect again")
        if session_id is not None:
            controller.leases.renew(session_id)  # any call of the session's renews its lease
    return authorize


class ControllerServicer(pb_grpc.ControllerServicer):
    """gRPC face of a Controller: every handler maps runtime exceptions to status codes."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def _call(self, context, fn, *args):
        try:
            return fn(*args)
        except PathwaysError as exc:
            abort(context, exc)

    def Connect(self, request, context):
        session = self._call(context, self.controller.connect, request.client_name,
                             request.weight)
        return pb.ConnectReply(session_id=session.session_id,
                               id_base=session.session_id << ID_BITS, id_range=1 << ID_BITS,
                               session_key=self.controller.session_key(session.session_id),
                               lease_s=self.controller.leases.lease_s)

    def KeepAlive(self, request, context):
        # The guard has checked the session's key and renewed its lease (_session_policy).
        return pb.KeepAliveReply(lease_s=self.controller.leases.lease_s)

    def Disconnect(self, request, context):
        self._call(context, self.controller.disconnect, request.session_id)
        return pb.DisconnectReply()

    def RegisterHost(self, request, context):
        self._call(context, self.controller.register_host, request.host)
        return pb.RegisterHostReply()

    def UnregisterHost(self, request, context):
        self._call(context, self.controller.unregister_host, request.island, request.host,
                   request.address)
        return pb.UnregisterHostReply()

    def GetStatus(self, request, context):
        controller = self.controller
        return controller.status(_visibility.viewer(context, controller.controller_id,
                                                    controller.credentials.host_token))

    def CreateSlice(self, request, context):
        info = self._call(context, self.controller.create_slice, request.session_id,
                          list(request.mesh_shape), list(request.axis_names), request.island,
                          request.devices)
        return pb.CreateSliceReply(slice=info)

    def ReleaseSlice(self, request, context):
        self._call(context, self.controller.release_slice, request.session_id, request.slice_id)
        return pb.ReleaseSliceReply()

    def LoadExecutable(self, request, context):
        exe = self._call(context, self.controller.load_executable, request)
        return pb.LoadExecutableReply(executable_id=exe.executable_id,
                                      fingerprint=hashlib.sha256(request.serialized).hexdigest())

    def RegisterProgram(self, request, context):
        program_id = self._call(context, self.controller.register_program, request)
        return pb.RegisterProgramReply(program_id=program_id)

    def RegisterArrays(self, request, context):
        with self.controller.leases.call(request.session_id):  # may wait for the island's order
            sequence = self._call(context, self.controller.register_arrays, request.session_id,
                                  request.arrays, _order_budget(context))
        return pb.RegisterArraysReply(sequence=sequence)

    def Execute(self, request, context):
        with self.controller.leases.call(request.session_id):  # may wait for the client's turn
            results = self._call(context, self.controller.execute, request.session_id,
                                 request.commands, _order_budget(context))
        return pb.ExecuteReply(results=results)

    def DeleteArrays(self, request, context):
        self._call(context, self.controller.delete_arrays, request.session_id, request.array_ids)
        return pb.DeleteArraysReply()


def _order_budget(context) -> float | None:
    """How long a request may wait for its turn in the order: its deadline, less a margin."""
    left = context.time_remaining()
    return None if left is None else max(0.0, left - ORDER_DEADLINE_MARGIN_S)


#: Calls only the cluster's own hosts may make (they need the host token, when there is one).
HOST_METHODS = ("RegisterHost", "UnregisterHost")
#: Client calls bounded per session and in all (proto.admission): those that may wait (for
#: their turn in an island's order, for hosts) and hold a thread meanwhile.
LIMITED_METHODS = ("CreateSlice", "ReleaseSlice", "LoadExecutable", "RegisterArrays", "Execute",
                   "RegisterProgram", "DeleteArrays", "GetStatus")


def create_controller_server(controller: Controller, address: str = "127.0.0.1:0", *,
                             max_workers: int = 64) -> tuple[grpc.Server, int]:
    """A started gRPC server for `controller` on `address` (port 0 picks one): (server, port).

    It demands the controller's credentials (proto.auth): the cluster token on every call, the
    host token on HOST_METHODS, a session's key on every call naming that session; TLS when the
    credentials have it. Requests out of the controller's limits are refused before any handler
    runs (proto.limits)."""
    credentials = controller.credentials
    limits = controller.limits
    guard = _auth.ServerGuard(credentials.token, host_token=credentials.host_token,
                              host_methods=HOST_METHODS, authorize=_session_policy(controller),
                              screen=lambda method, request: _limits.check_request(
                                  limits, method, request))
    guard = CountingInterceptor(guard, "controller")
    servicer = ControllerServicer(controller)
    admission = Admission("controller", LIMITED_METHODS, limits,
                          lambda: controller.controller_id, credentials.host_token,
                          per_session=limits.calls_per_session)
    controller.admission = admission
    return _auth.start_server(
        "controller", address, credentials, Chain(guard, admission),
        lambda server: pb_grpc.add_ControllerServicer_to_server(servicer, server),
        max_workers=max_workers)
