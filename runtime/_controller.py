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
from runtime._errors import (ArrayNotFoundError, FailedPreconditionError, HostLostError,
                             InvalidArgumentError, NotFoundError, PathwaysError, abort)
from scheduler import GangScheduler, HostRecord, ResourceManager, SliceRecord

log = logging.getLogger(__name__)

#: Each session owns array ids [session_id << ID_BITS, (session_id + 1) << ID_BITS).
ID_BITS = 40
#: Liveness probes: interval, and misses before a host is declared lost (detection < 2 s).
HEARTBEAT_INTERVAL_S = 0.5
HEARTBEAT_MISSES = 2
#: Deadline for hosts to receive a slice definition before CreateSlice returns.
SLICE_FLUSH_TIMEOUT_S = 10.0
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
class _Array:
    spec: pb.ArraySpec
    island: int
    session_id: int


@dataclasses.dataclass(frozen=True)
class _Executable:
    executable_id: int
    session_id: int
    slice_id: int
    name: str
    inputs: tuple[pb.ValueSpec, ...]
    outputs: tuple[pb.ValueSpec, ...]
    donated: frozenset[int]


def _dims(sharding: pb.Sharding) -> tuple[tuple[str, ...], ...]:
    """Sharding dims without trailing unsplit entries, for comparing specs."""
    dims = [tuple(d.axes) for d in sharding.dims]
    while dims and not dims[-1]:
        dims.pop()
    return tuple(dims)


def _describe(dtype: str, shape: Sequence[int], sharding: pb.Sharding) -> str:
    return f"{dtype}[{','.join(map(str, shape))}] sharded {_wire.spec_from_proto(sharding)}"


class Controller:
    """Controller state and logic, independent of gRPC. Instantiable: tests run several."""

    def __init__(self, *, heartbeat: bool = True) -> None:
        self.controller_id = uuid.uuid4().hex
        self.resources = ResourceManager()
        self._schedulers: dict[int, GangScheduler] = {}
        self._sessions: dict[int, _Session] = {}
        self._arrays: dict[int, _Array] = {}
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
            self._delete(session, sorted(session.arrays))
            for slice_id in sorted(session.slices):
                self.release_slice(session_id, slice_id)
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
                    stub.Ping(pb.PingRequest(), timeout=HEARTBEAT_INTERVAL_S)
                    misses[key] = 0
                except grpc.RpcError as err:
                    misses[key] = misses.get(key, 0) + 1
                    if misses[key] >= HEARTBEAT_MISSES:
                        record = self.resources.mark_lost(*key, f"no heartbeat ({err.code().name})")
                        if record:
                            log.warning("lost %s", record.describe())

    def status(self) -> pb.GetStatusReply:
        with self._lock:
            depth = {i: s.queue_depth() for i, s in self._schedulers.items()}
            reply = pb.GetStatusReply(sessions=len(self._sessions), arrays=len(self._arrays))
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
            self._delete(session, [a for a in session.arrays
                                   if self._arrays[a].spec.sharding.slice_id == slice_id])
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

    # -- arrays and calls -------------------------------------------------------------------------

    def register_arrays(self, session_id: int, specs: Sequence[pb.ArraySpec]) -> list[int]:
        """Declares arrays a client is about to stream to their hosts; returns, per array, the
        island sequence number from which its hosts expect it."""
        with self._lock:
            session = self._session(session_id)
            by_island: dict[int, list[pb.Instruction]] = {}
            seen: set[int] = set()
            for spec in specs:
                self._check_new_id(session, spec.array_id, seen)
                record = self._owned_slice(session_id, spec.sharding.slice_id)
                _wire.dtype_from_name(spec.dtype)
                _wire.shard_groups(spec.shape, _wire.MeshShape(record.mesh_shape,
                                                               record.axis_names), spec.sharding)
                seen.add(spec.array_id)
                by_island.setdefault(record.island, []).append(
                    pb.Instruction(expect=pb.ExpectArrayInstruction(spec=spec)))
            for island in by_island:
                self._check_island(island)
            for spec in specs:
                record = self.resources.get_slice(spec.sharding.slice_id)
                self._arrays[spec.array_id] = _Array(spec, record.island, session_id)
                session.arrays.add(spec.array_id)
            sequence: dict[int, int] = {}
            for island, ops in by_island.items():
                for op, seq in zip(ops, self._scheduler(island).submit(ops)):
                    sequence[op.expect.spec.array_id] = seq
            return [sequence[spec.array_id] for spec in specs]

    def execute(self, session_id: int, calls: Sequence[pb.Call]) -> list[int]:
        """Validates calls and orders them on their islands; returns each call's sequence number
        in its island's order, before any of them runs.

        All calls of one request are checked before any is ordered (a later call may read an
        earlier call's outputs), so a request either enters the order whole or not at all.
        """
        with self._lock:
            session = self._session(session_id)
            new: dict[int, _Array] = {}
            gone: set[int] = set()
            by_island: dict[int, list[tuple[int, pb.Instruction]]] = {}
            for n, call in enumerate(calls):
                exe = self._executables.get(call.executable_id)
                if exe is None or exe.session_id != session_id:
                    raise NotFoundError(f"call {n}: executable {call.executable_id} is unknown")
                record = self.resources.get_slice(exe.slice_id)
                self._check_call(session, n, exe, call, new, gone)
                for spec, array_id in zip(exe.outputs, call.outputs):
                    new[array_id] = _Array(pb.ArraySpec(array_id=array_id, dtype=spec.dtype,
                                                        shape=spec.shape, sharding=spec.sharding),
                                           record.island, session_id)
                gone.update(call.inputs[i] for i in exe.donated)
                by_island.setdefault(record.island, []).append((n, pb.Instruction(
                    execute=pb.ExecuteInstruction(executable_id=exe.executable_id,
                                                  inputs=call.inputs, outputs=call.outputs))))
            for island in by_island:
                self._check_island(island)
            for array_id, array in new.items():
                self._arrays[array_id] = array
                session.arrays.add(array_id)
            for array_id in gone:
                self._arrays.pop(array_id, None)
                session.arrays.discard(array_id)
            sequence = [0] * len(calls)
            for island, ops in by_island.items():
                seqs = self._scheduler(island).submit([op for _, op in ops])
                for (n, _), seq in zip(ops, seqs):
                    sequence[n] = seq
            return sequence

    def _check_call(self, session: _Session, n: int, exe: _Executable, call: pb.Call,
                    new: dict[int, _Array], gone: set[int]) -> None:
        if len(call.inputs) != len(exe.inputs) or len(call.outputs) != len(exe.outputs):
            raise InvalidArgumentError(
                f"call {n}: {exe.name} takes {len(exe.inputs)} inputs and gives "
                f"{len(exe.outputs)} outputs; got {len(call.inputs)} and {len(call.outputs)}")
        for i, (array_id, want) in enumerate(zip(call.inputs, exe.inputs)):
            array = new.get(array_id) or (None if array_id in gone else self._arrays.get(array_id))
            if array is None or array.session_id != session.session_id:
                raise ArrayNotFoundError(f"array {array_id} (input {i} of {exe.name}) is unknown "
                                         f"or was deleted")
            got = array.spec
            if (got.dtype, tuple(got.shape)) != (want.dtype, tuple(want.shape)):
                raise InvalidArgumentError(
                    f"input {i} of {exe.name}: expected {_describe(want.dtype, want.shape, want.sharding)}"
                    f", got {_describe(got.dtype, got.shape, got.sharding)}")
            if got.sharding.slice_id != exe.slice_id or _dims(got.sharding) != _dims(want.sharding):
                raise InvalidArgumentError(
                    f"input {i} of {exe.name}: expected {_wire.spec_from_proto(want.sharding)} on "
                    f"slice {exe.slice_id}, got {_wire.spec_from_proto(got.sharding)} on slice "
                    f"{got.sharding.slice_id}")
        donated = [call.inputs[i] for i in exe.donated]
        if len(set(donated)) != len(donated) or set(donated) & set(
                a for i, a in enumerate(call.inputs) if i not in exe.donated):
            raise InvalidArgumentError(f"call {n}: a donated input of {exe.name} is also passed "
                                       f"as another input")
        seen: set[int] = set()
        for array_id in call.outputs:
            self._check_new_id(session, array_id, seen | set(new))
            seen.add(array_id)

    def delete_arrays(self, session_id: int, array_ids: Sequence[int]) -> None:
        with self._lock:
            session = self._session(session_id)
            for array_id in array_ids:
                if array_id not in session.arrays:
                    raise ArrayNotFoundError(f"array {array_id} is unknown or was already deleted")
            self._delete(session, array_ids)

    def _delete(self, session: _Session, array_ids: Sequence[int]) -> None:
        by_island: dict[int, list[int]] = {}
        for array_id in array_ids:
            array = self._arrays.pop(array_id, None)
            session.arrays.discard(array_id)
            if array is not None:
                by_island.setdefault(array.island, []).append(array_id)
        for island, ids in by_island.items():
            if not self.resources.lost_host(island):
                self._scheduler(island).submit(
                    [pb.Instruction(delete=pb.DeleteInstruction(array_ids=ids))])

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

    def _check_new_id(self, session: _Session, array_id: int, pending: set[int]) -> None:
        if not session.owns_id(array_id) or array_id == session.session_id << ID_BITS:
            raise InvalidArgumentError(f"array id {array_id} is outside this session's id range")
        if array_id in self._arrays or array_id in pending:
            raise InvalidArgumentError(f"array id {array_id} is already in use")

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

    def RegisterArrays(self, request, context):
        sequence = self._call(context, self.controller.register_arrays, request.session_id,
                              request.arrays)
        return pb.RegisterArraysReply(sequence=sequence)

    def Execute(self, request, context):
        sequence = self._call(context, self.controller.execute, request.session_id, request.calls)
        return pb.ExecuteReply(sequence=sequence)

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
