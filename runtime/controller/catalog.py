"""The catalog of the controller: slices and executables, and which islands take work. A component
of Controller (runtime.controller.controller); the planner sees it through `CatalogView`."""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import jax

from proto import limits as _limits
from proto import pathways_pb2 as pb
from proto import stablehlo as _stablehlo
from proto import wire as _wire
from proto.bounded import Latest
from proto.errors import (FailedPreconditionError, HostLostError, InvalidArgumentError,
                          NotFoundError, ResourceExhaustedError)
from runtime.controller.defaults import DROPPED_REMEMBERED, SLICE_FLUSH_TIMEOUT_S
from runtime.controller.placement import Placer
from runtime.controller.sessions import Executable, Session, SessionLedger, find_session
from scheduler.gang import GangScheduler
from scheduler.resources import HostRecord, ResourceManager, SliceRecord
from scheduler.tickets import OrderTicket


class CatalogView(Protocol):
    """What the planner (runtime.controller.planner) needs of the catalog: the registry of
    islands and slices, executables, the islands' orders, the request limits."""

    resources: ResourceManager
    limits: _limits.Limits

    def check_island(self, island: int) -> None:
        """HostLostError/FailedPreconditionError unless the island takes work."""

    def orderer(self, session: Session):
        """A function ordering a batch of the session's instructions on an island."""

    def executable(self, session: Session, executable_id: int) -> Executable:
        """The session's executable (NotFoundError otherwise)."""

    def slice_info(self, record: SliceRecord,
                   hosts: Sequence[HostRecord] | None = None) -> pb.SliceInfo:
        """A slice as hosts and clients see it."""


class Catalog:
    """Slices and executables of a Controller, and the islands' schedulers as work finds them.

    It shares the controller's lock (`lock`), its session records (`sessions`, written through
    `ledger`) and its islands' schedulers (`schedulers`, which runtime.controller.health adds and
    drops); `forget_slice_arrays(session, slice_id)` deletes the planner's arrays on a slice that
    goes away."""

    def __init__(self, lock: threading.RLock, resources: ResourceManager,
                 schedulers: Mapping[int, GangScheduler], sessions: Mapping[int, Session],
                 ledger: SessionLedger, limits: _limits.Limits,
                 forget_slice_arrays: Callable[[Session, int], None]) -> None:
        self._lock = lock
        self.resources = resources
        self._schedulers = schedulers
        self._sessions = sessions
        self.sessions = ledger
        self.limits = limits
        self._forget_slice_arrays = forget_slice_arrays
        self._executables: dict[int, Executable] = {}
        self._executable_keys: dict[tuple, int] = {}
        self._slice_executables: dict[int, set[int]] = {}  # slice id -> executable ids
        self._executable_ids = itertools.count(1)
        # executable id -> why an island restart dropped it (the latest few; slices: resources)
        self._dropped: Latest[int, str] = Latest(DROPPED_REMEMBERED)

    def _session(self, session_id: int) -> Session:
        return find_session(self._sessions, session_id)

    def _scheduler(self, island: int) -> GangScheduler:
        scheduler = self._schedulers.get(island)
        if scheduler is None:
            raise FailedPreconditionError(f"island {island} has no hosts")
        return scheduler

    def scheduler(self, island: int) -> GangScheduler:
        """The gang scheduler of an island (FailedPreconditionError if it has no hosts)."""
        with self._lock:
            return self._scheduler(island)

    def orderer(self, session: Session):
        """Queues a session's instructions on an island: (island, ops) -> OrderTicket."""
        def order(island: int, ops: list[pb.Instruction]) -> OrderTicket:
            return self._scheduler(island).enqueue(session.session_id, ops,
                                                   weight=session.weight, name=session.name)
        return order

    def slice_info(self, record: SliceRecord,
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
                self.check_island(island)
            record = self.resources.allocate(session_id, mesh_shape, axis_names, island,
                                             [(d.host, d.device) for d in devices])
            info = self.slice_info(record)
            self.sessions.record_slice(session, record.slice_id)
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
            self.sessions.forget_slice(session, slice_id)
            self._forget_slice_arrays(session, slice_id)
            for executable_id in list(self._slice_executables.get(slice_id, ())):
                self.forget_executable(executable_id)
            scheduler = self._schedulers.get(record.island)
            if scheduler and not self.resources.lost_host(record.island) and not scheduler.failure:
                scheduler.enqueue(session_id, [pb.Instruction(  # after the session's queued work
                    release_slice=pb.ReleaseSliceInstruction(slice_id=slice_id))],
                    weight=session.weight, name=session.name)

    def load_executable(self, request: pb.LoadExecutableRequest) -> Executable:
        """Registers serialized StableHLO on a slice, after checking it against its claimed specs."""
        with self._lock:
            self._session(request.session_id)
            record = self._owned_slice(request.session_id, request.slice_id)
        _limits.check_request(self.limits, "LoadExecutable", request)
        placer = Placer(self.resources, request.session_id)
        if request.format == pb.STABLEHLO:
            _stablehlo.check_load(request.name, request.serialized, request.compile_options,
                                  request.inputs, request.outputs, request.donated, record.size)
            output_bytes = place_specs(request, record, placer)
            fingerprint = _stablehlo.fingerprint(request.serialized, request.compile_options)
        else:
            try:
                exported = jax.export.deserialize(bytearray(request.serialized))
            except Exception as exc:
                raise InvalidArgumentError(f"{request.name!r}: not a serialized jax.export module "
                                           f"({type(exc).__name__})") from None
            output_bytes = check_signature(request, exported, record, placer)
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
            exe = Executable(next(self._executable_ids), request.session_id, request.slice_id,
                              request.name, tuple(request.inputs), tuple(request.outputs), donated,
                              fingerprint, output_bytes, nbytes)
            for v in exe.inputs + exe.outputs:
                v.sharding.slice_id = request.slice_id
            self._executables[exe.executable_id] = exe
            self._executable_keys[key] = exe.executable_id
            self.sessions.record_executable(session, exe.executable_id, nbytes)
            self._slice_executables.setdefault(request.slice_id, set()).add(exe.executable_id)
            self._scheduler(record.island).submit([pb.Instruction(load=pb.LoadInstruction(
                executable_id=exe.executable_id, slice_id=request.slice_id,
                serialized=request.serialized, fingerprint=fingerprint, inputs=request.inputs,
                outputs=request.outputs, donated=sorted(donated), name=request.name,
                format=request.format, compile_options=request.compile_options))])
            return exe

    def forget_executable(self, executable_id: int) -> None:
        """Drops an executable's bookkeeping (its slice is released, or its session ended)."""
        exe = self._executables.pop(executable_id, None)
        if exe is None:
            return
        self._executable_keys.pop(exe.key, None)
        session = self._sessions.get(exe.session_id)
        if session is not None:
            self.sessions.forget_executable(session, executable_id, exe.nbytes)
        on_slice = self._slice_executables.get(exe.slice_id)
        if on_slice is not None:
            on_slice.discard(executable_id)
            if not on_slice:
                del self._slice_executables[exe.slice_id]

    def forget_island(self, island: int, why: str = "") -> None:
        """Forgets an island's slices, with their arrays and executables (called under the lock,
        as its host registers again after a loss: runtime.controller.health); `why` is told to
        whoever uses one of them later."""
        why = why or f"island {island} restarted"
        for record in [r for r in self.resources.slices() if r.island == island]:
            session = self._sessions.get(record.session_id)
            if session is not None:
                self._forget_slice_arrays(session, record.slice_id)
                self.sessions.forget_slice(session, record.slice_id)
            self.resources.release(record.slice_id, why)
            for executable_id in list(self._slice_executables.get(record.slice_id, ())):
                self._dropped[executable_id] = why
                self.forget_executable(executable_id)

    def _owned_slice(self, session_id: int, slice_id: int) -> SliceRecord:
        record = self.resources.get_slice(slice_id)
        if record.session_id != session_id:
            raise NotFoundError(f"slice {slice_id} is unknown or was released")
        return record

    def executable(self, session: Session, executable_id: int) -> Executable:
        exe = self._executables.get(executable_id)
        if exe is None and executable_id in self._dropped:
            raise NotFoundError(f"executable {executable_id} is unknown: "
                                f"{self._dropped[executable_id]}, which dropped it (compile the "
                                f"function again)")
        if exe is None or exe.session_id != session.session_id:
            raise NotFoundError(f"executable {executable_id} is unknown")
        return exe

    def check_island(self, island: int) -> None:
        lost = self.resources.lost_host(island)
        if lost is not None:
            raise HostLostError(f"{lost.describe()} of island {island} was lost: "
                                f"{lost.lost_reason}")
        scheduler = self._schedulers.get(island)
        failure = scheduler.failure if scheduler is not None else None
        if failure is not None:  # e.g. a hung computation (DeadlineExceededError)
            raise type(failure)(str(failure))


def check_signature(request: pb.LoadExecutableRequest, exported, record: SliceRecord,
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
    return place_specs(request, record, placer)

def place_specs(request: pb.LoadExecutableRequest, record: SliceRecord,
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
