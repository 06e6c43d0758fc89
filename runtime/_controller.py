"""The controller: sessions, slices, executables and arrays, and dispatch to the islands.

The controller keeps the bookkeeping per logical array (not per shard) and validates every call
against it, so a bad call fails at once with a precise status, before any host sees it. Valid calls
become instructions in their island's total order (scheduler.GangScheduler); the reply goes back as
soon as they are ordered, before they run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import threading
import uuid
from collections.abc import Sequence

import grpc
import jax

from proto import pathways_pb2 as pb
from proto import pathways_pb2_grpc as pb_grpc
from runtime import _wire
from runtime._errors import (FailedPreconditionError, HostLostError, InvalidArgumentError,
                             NotFoundError, PathwaysError, abort)
from runtime._planner import Planner
from scheduler import GangScheduler, HostRecord, ResourceManager, SliceRecord

log = logging.getLogger(__name__)

#: Each session owns array ids [session_id << ID_BITS, (session_id + 1) << ID_BITS).
ID_BITS = 40
#: Liveness probes: interval, and misses before a host is declared lost (detection < 2 s).
HEARTBEAT_INTERVAL_S = 0.5
HEARTBEAT_MISSES = 2
#: Deadline for hosts to receive a slice definition before CreateSlice returns.
SLICE_FLUSH_TIMEOUT_S = 10.0
#: Back-pressure: most instructions an island's order may run ahead of its slowest host, and how
#: long a client's commands wait for it to catch up.
MAX_BACKLOG = 4096
BACKLOG_TIMEOUT_S = 120.0
#: Largest serialized executable accepted.
MAX_EXECUTABLE_BYTES = 256 << 20


@dataclasses.dataclass
class _Session:
    session_id: int
    name: str
    slices: set[int] = dataclasses.field(default_factory=set)
    arrays: set[int] = dataclasses.field(default_factory=set)

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


class Controller:
    """Controller state and logic, independent of gRPC. Instantiable: tests run several."""

    def __init__(self, *, heartbeat: bool = True) -> None:
        self.controller_id = uuid.uuid4().hex
        self.resources = ResourceManager()
        self._schedulers: dict[int, GangScheduler] = {}
        self._sessions: dict[int, _Session] = {}
        self.planner = Planner(self)
        self._executables: dict[int, _Executable] = {}
        self._executable_keys: dict[tuple, int] = {}
        self._session_ids = itertools.count(1)
        self._executable_ids = itertools.count(1)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._probes: dict[tuple[int, int], tuple[grpc.Channel, pb_grpc.WorkerStub]] = {}
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                           name="heartbeat") if heartbeat else None
        if self._heartbeat:
            self._heartbeat.start()

    # -- sessions and hosts ----------------------------------------------------------------------

    def connect(self, name: str) -> _Session:
        with self._lock:
            session = _Session(next(self._session_ids), name)
            self._sessions[session.session_id] = session
            return session

    def disconnect(self, session_id: int) -> None:
        """Closes a session: deletes its arrays and releases its slices."""
        with self._lock:
            session = self._session(session_id)
            self.planner.drop_session(session)
            for slice_id in sorted(session.slices):
                self.release_slice(session_id, slice_id)
            for key in [k for k, e in self._executable_keys.items() if k[0] == session_id]:
                del self._executables[self._executable_keys.pop(key)]
            del self._sessions[session_id]

    def register_host(self, info: pb.HostInfo) -> None:
        if info.island < 0 or info.host < 0 or info.num_devices <= 0 or not info.address:
            raise InvalidArgumentError("host registration needs island >= 0, host >= 0, "
                                       "num_devices > 0 and an address")
        record = HostRecord(info.island, info.host, info.address, info.platform or "cpu",
                            info.num_devices, info.device_kind, info.backend or "local")
        with self._lock:
            self.resources.register_host(record)
            scheduler = self._schedulers.get(info.island)
            if scheduler is None:
                scheduler = GangScheduler(info.island, self.controller_id, self._on_dispatch_failure)
                self._schedulers[info.island] = scheduler
            scheduler.set_host(info.host, info.address)
            old = self._probes.pop((info.island, info.host), None)
            channel = grpc.insecure_channel(info.address, options=_wire.GRPC_OPTIONS)
            self._probes[(info.island, info.host)] = (channel, pb_grpc.WorkerStub(channel))
        if old:
            old[0].close()
        log.info("registered %s", record.describe())

    def _on_dispatch_failure(self, island: int, host: int, reason: str) -> None:
        record = self.resources.mark_lost(island, host, reason)
        if record:
            log.warning("lost %s: %s", record.describe(), reason)

    def _heartbeat_loop(self) -> None:
        misses: dict[tuple[int, int], int] = {}
        while not self._stop.wait(HEARTBEAT_INTERVAL_S):
            with self._lock:
                probes = dict(self._probes)
            for key, (_, stub) in probes.items():
                try:
                    reply = stub.Ping(pb.PingRequest(), timeout=HEARTBEAT_INTERVAL_S)
                    misses[key] = 0
                    scheduler = self._schedulers.get(key[0])
                    if scheduler is not None:
                        scheduler.note_progress(key[1], reply.executed)
                except (grpc.RpcError, ValueError) as err:  # ValueError: channel replaced or closed
                    if self._stop.is_set():
                        return
                    misses[key] = misses.get(key, 0) + 1
                    if misses[key] >= HEARTBEAT_MISSES:
                        reason = err.code().name if isinstance(err, grpc.RpcError) else "closed"
                        record = self.resources.mark_lost(*key, f"no heartbeat ({reason})")
                        if record:
                            log.warning("lost %s", record.describe())

    def status(self) -> pb.GetStatusReply:
        with self._lock:
            depth = {i: s.queue_depth() for i, s in self._schedulers.items()}
            reply = pb.GetStatusReply(sessions=len(self._sessions), arrays=len(self.planner.arrays))
            for h in self.resources.hosts():
                reply.hosts.append(pb.HostInfo(
                    island=h.island, host=h.host, address=h.address, platform=h.platform,
                    num_devices=h.num_devices, device_kind=h.device_kind, backend=h.backend,
                    state="alive" if h.alive else f"lost: {h.lost_reason}",
                    queue_depth=depth.get(h.island, {}).get(h.host, 0)))
            reply.slices.extend(self._slice_info(s) for s in self.resources.slices())
            return reply

    # -- slices -----------------------------------------------------------------------------------

    def _slice_info(self, record: SliceRecord) -> pb.SliceInfo:
        hosts = self.resources.island_hosts(record.island)
        return pb.SliceInfo(
            slice_id=record.slice_id, island=record.island, mesh_shape=record.mesh_shape,
            axis_names=record.axis_names,
            devices=[pb.SliceDevice(host=h, device=d) for h, d in record.devices],
            host_addresses=[h.address for h in hosts], platform=hosts[0].platform)

    def create_slice(self, session_id: int, mesh_shape: Sequence[int], axis_names: Sequence[str],
                     island: int = -1) -> pb.SliceInfo:
        """Grants a slice and makes its mesh known to its hosts before returning."""
        with self._lock:
            session = self._session(session_id)
            if island >= 0 and island in {h.island for h in self.resources.hosts()}:
                self._check_island(island)
            record = self.resources.allocate(session_id, mesh_shape, axis_names, island)
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
            self.planner.delete(session, [a for a in session.arrays if self.planner.arrays[
                a].spec.sharding.slice_id == slice_id], strict=False)
            scheduler = self._schedulers.get(record.island)
            if scheduler and not self.resources.lost_host(record.island):
                scheduler.submit([pb.Instruction(
                    release_slice=pb.ReleaseSliceInstruction(slice_id=slice_id))])

    # -- executables ------------------------------------------------------------------------------

    def load_executable(self, request: pb.LoadExecutableRequest) -> _Executable:
        """Registers serialized StableHLO on a slice, after checking it against its claimed specs."""
        with self._lock:
            self._session(request.session_id)
            record = self._owned_slice(request.session_id, request.slice_id)
        if len(request.serialized) > MAX_EXECUTABLE_BYTES:
            raise InvalidArgumentError(f"executable of {len(request.serialized)} bytes is too large")
        try:
            exported = jax.export.deserialize(bytearray(request.serialized))
        except Exception as exc:
            raise InvalidArgumentError(f"{request.name!r}: not a serialized jax.export module "
                                       f"({type(exc).__name__})") from None
        _check_signature(request, exported, record)
        fingerprint = hashlib.sha256(request.serialized).hexdigest()
        donated = frozenset(request.donated)
        key = (request.session_id, request.slice_id, fingerprint, donated)
        with self._lock:
            existing = self._executable_keys.get(key)
            if existing is not None:
                return self._executables[existing]
            exe = _Executable(next(self._executable_ids), request.session_id, request.slice_id,
                              request.name, tuple(request.inputs), tuple(request.outputs), donated)
            for v in exe.inputs + exe.outputs:
                v.sharding.slice_id = request.slice_id
            self._executables[exe.executable_id] = exe
            self._executable_keys[key] = exe.executable_id
            self._scheduler(record.island).submit([pb.Instruction(load=pb.LoadInstruction(
                executable_id=exe.executable_id, slice_id=request.slice_id,
                serialized=request.serialized, fingerprint=fingerprint, inputs=request.inputs,
                outputs=request.outputs, donated=sorted(donated), name=request.name))])
            return exe

    # -- arrays, commands and programs (runtime._planner) -----------------------------------------

    def register_arrays(self, session_id: int, specs: Sequence[pb.ArraySpec]) -> list[int]:
        """Declares arrays a client is about to stream to their hosts; returns, per array, the
        island sequence number from which its hosts expect it."""
        with self._lock:
            return self.planner.register_arrays(self._session(session_id), specs)

    def execute(self, session_id: int, commands: Sequence[pb.Command]) -> list[pb.CommandResult]:
        """Checks each command and orders the accepted ones; returns before any of them runs.

        Waits first (outside the lock, so other clients go on) while an island is more than
        MAX_BACKLOG instructions ahead of its slowest host.
        """
        for scheduler in list(self._schedulers.values()):
            scheduler.wait_backlog(MAX_BACKLOG, BACKLOG_TIMEOUT_S)
        with self._lock:
            return self.planner.execute(self._session(session_id), commands)

    def register_program(self, request: pb.RegisterProgramRequest) -> int:
        with self._lock:
            return self.planner.register_program(self._session(request.session_id), request)

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

    def _scheduler(self, island: int) -> GangScheduler:
        scheduler = self._schedulers.get(island)
        if scheduler is None:
            raise FailedPreconditionError(f"island {island} has no hosts")
        return scheduler

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            for scheduler in self._schedulers.values():
                scheduler.close()
            for channel, _ in self._probes.values():
                channel.close()


def _check_signature(request: pb.LoadExecutableRequest, exported, record: SliceRecord) -> None:
    """InvalidArgumentError unless the module's avals match the specs the client claims."""
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
            _wire.shard_groups(spec.shape, _wire.MeshShape(record.mesh_shape, record.axis_names),
                               spec.sharding)
    if exported.nr_devices not in (1, record.size):
        raise InvalidArgumentError(f"{request.name!r} was exported for {exported.nr_devices} "
                                   f"devices; slice {record.slice_id} has {record.size}")
    if any(i < 0 or i >= len(request.inputs) for i in request.donated):
        raise InvalidArgumentError(f"{request.name!r}: donated input out of range")


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
        session = self._call(context, self.controller.connect, request.client_name)
        return pb.ConnectReply(session_id=session.session_id,
                               id_base=session.session_id << ID_BITS, id_range=1 << ID_BITS)

    def Disconnect(self, request, context):
        self._call(context, self.controller.disconnect, request.session_id)
        return pb.DisconnectReply()

    def RegisterHost(self, request, context):
        self._call(context, self.controller.register_host, request.host)
        return pb.RegisterHostReply()

    def GetStatus(self, request, context):
        return self.controller.status()

    def CreateSlice(self, request, context):
        info = self._call(context, self.controller.create_slice, request.session_id,
                          list(request.mesh_shape), list(request.axis_names), request.island)
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
        sequence = self._call(context, self.controller.register_arrays, request.session_id,
                              request.arrays)
        return pb.RegisterArraysReply(sequence=sequence)

    def Execute(self, request, context):
        results = self._call(context, self.controller.execute, request.session_id,
                             request.commands)
        return pb.ExecuteReply(results=results)

    def DeleteArrays(self, request, context):
        self._call(context, self.controller.delete_arrays, request.session_id, request.array_ids)
        return pb.DeleteArraysReply()


def create_controller_server(controller: Controller, address: str = "127.0.0.1:0", *,
                             max_workers: int = 32) -> tuple[grpc.Server, int]:
    """A started gRPC server for `controller` on `address` (port 0 picks one): (server, port)."""
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         options=_wire.GRPC_OPTIONS)
    pb_grpc.add_ControllerServicer_to_server(ControllerServicer(controller), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise FailedPreconditionError(f"cannot bind controller server to {address}")
    server.start()
    return server, port
